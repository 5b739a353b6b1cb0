"""env/demo.py: the generated data is real long-GOP H.264, deterministic for a seed, and its
question provably needs the tools -- the digit reads from a native-resolution crop of the
event, not from the 160x90 overview.

The seed is fixed (SEED). The reading claims hold by rate, not for every seed, so a fresh seed each run
failed CI now and then. Measured over seeds 1000-1039 (120 tasks, 3 event frames each):
- native crops: 360 of 360 frames read;
- 160x90 overview crops: 0 of 360;
- overview crops enlarged to the crop size: 12 frames in 6 tasks, never 2 tasks of one seed.
The rare tails, both seen in CI:
- seed 464802: one task (a yellow 8) reads in none of its 3 native crops (8 scores 0.672 against
  0 at 0.653, under read_digit's 0.05 margin);
- seed 465446: two of its 3 tasks read from enlarged overview crops.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from env.demo import COLOURS, GLYPHS, load_jsonl, locate_marker, make_demo_data, marker_sprite, read_digit
from env.video import FrameDecoder

SECONDS, FPS, SIZE = 30, 10, (640, 360)
OVERVIEW, ZOOM, CROP_BOX = (160, 90), (320, 180), (224, 224)
SEED = 1000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = make_demo_data(tmp_path_factory.mktemp("demo"), videos=3, seconds=SECONDS, seed=SEED)
    return SEED, out, load_jsonl(out)


@pytest.fixture(scope="module")
def dec() -> FrameDecoder:
    return FrameDecoder(128 * 2**20, 8)


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_tasks_are_well_formed_and_load(demo):
    from env.tasks import load_tasks

    seed, out, tasks = demo
    assert len(tasks) == 3 and len({t["id"] for t in tasks}) == 3
    for t in tasks:
        colour = t["metadata"]["colour"]
        assert t["question"] == f"What digit is shown inside the {colour} circle?"
        assert len(t["options"]) == 4 == len(set(t["options"])) and t["answer"] in t["options"]
        (start, end), = t["evidence"]
        assert 0 < start < end <= SECONDS and 1.0 <= end - start <= 2.0 + 1e-9, (seed, t["evidence"])
        caps = t["captions"]
        assert caps[0]["start"] == 0 and caps[-1]["end"] == SECONDS
        assert all(a["end"] == b["start"] for a, b in zip(caps, caps[1:]))
        hit = [c for c in caps if c["start"] < end and c["end"] > start]
        assert all(f"a {colour} circle with a number appears" in c["text"] for c in hit), (seed, hit)
        rest = [c for c in caps if c not in hit]
        assert not any(f"{colour} circle" in c["text"] for c in rest), (seed, rest)
        x1, y1, x2, y2 = t["metadata"]["event_bbox"]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and (x2 - x1) * SIZE[0] < 20  # small on purpose
        assert (out.parent / t["video"]).is_file()
    loaded = load_tasks(out)
    assert [t.id for t in loaded] == [t["id"] for t in tasks]


def test_videos_are_long_gop_h264(demo, dec):
    import av

    _, out, tasks = demo
    for t in tasks:
        path = out.parent / t["video"]
        info = dec.info(str(path))
        assert (info.num_frames, info.fps, info.width, info.height) == (SECONDS * FPS, FPS, *SIZE)
        assert info.keyframes == (0, 250)  # keyframe interval 250, no scene-cut keyframes
        with av.open(str(path)) as c:
            assert c.streams.video[0].codec_context.name == "h264"


def test_same_seed_same_bytes_other_seed_other_data(demo, tmp_path):
    seed, out, tasks = demo
    again = make_demo_data(tmp_path / "a", videos=1, seconds=SECONDS, seed=seed)
    (t0,) = load_jsonl(again)
    assert t0 == tasks[0]
    assert md5(again.parent / t0["video"]) == md5(out.parent / tasks[0]["video"]), f"seed {seed}"
    other = make_demo_data(tmp_path / "b", videos=1, seconds=8, seed=seed + 1)
    (t1,) = load_jsonl(other)
    assert t1["id"] != t0["id"] and json.dumps(t1["metadata"]) != json.dumps(t0["metadata"])


def fit(w: float, h: float, box=CROP_BOX) -> tuple[int, int]:
    """The size spatial_zoom returns: the crop scaled to fit the box, keeping its aspect."""
    s = min(box[0] / w, box[1] / h)
    return max(1, round(w * s)), max(1, round(h * s))


def pad(b, p=0.02):
    return max(0.0, b[0] - p), max(0.0, b[1] - p), min(1.0, b[2] + p), min(1.0, b[3] + p)


def crop_of(img: np.ndarray, box) -> np.ndarray:
    h, w = img.shape[:2]
    return img[int(box[1] * h):int(np.ceil(box[3] * h)), int(box[0] * w):int(np.ceil(box[2] * w))]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_answer_reads_from_a_native_crop_not_from_the_overview(demo, dec):
    import cv2

    seed, out, tasks = demo
    native_ok, tries, small_ok, small_up_tasks = 0, 0, 0, 0
    for t in tasks:
        path = str(out.parent / t["video"])
        first, last = t["metadata"]["event_frames"]
        colour, answer = t["metadata"]["colour"], t["answer"]
        task_ok = task_up = 0
        for i in sorted({first, (first + last) // 2, last}):
            tries += 1
            (zoom,) = dec.frames(path, [i], size=ZOOM)  # what temporal_zoom returns
            box = locate_marker(zoom, colour)
            assert box is not None and iou(box, t["metadata"]["event_bbox"]) > 0.3, (seed, t["id"], i, box)
            p = pad(box)
            (crop,) = dec.frames(path, [i], size=fit((p[2] - p[0]) * SIZE[0], (p[3] - p[1]) * SIZE[1]), crop=p)
            task_ok += read_digit(crop) == answer
            (small,) = dec.frames(path, [i], size=OVERVIEW)  # the event caught by an overview frame
            sc = crop_of(small, pad(t["metadata"]["event_bbox"]))
            small_ok += read_digit(sc) == answer
            task_up += read_digit(cv2.resize(np.ascontiguousarray(sc), fit(sc.shape[1], sc.shape[0]))) == answer
        assert task_ok >= 1, (seed, t["id"])
        small_up_tasks += task_up > 0
        native_ok += task_ok
    assert native_ok >= 0.8 * tries, f"seed {seed}: read {native_ok}/{tries} native crops"
    assert small_ok == 0, f"seed {seed}: read the digit at 160x90"
    # An enlarged overview crop reads now and then, and by task (glyph and place), not by frame (module
    # docstring). A bar on frames (<= 1/4 of them) failed in CI on a seed whose one readable task read in all 3.
    assert small_up_tasks <= 1, f"seed {seed}: {small_up_tasks} of 3 tasks read from enlarged 160x90 crops"


def test_overview_frames_do_not_give_the_answer(demo, dec):
    seed, out, tasks = demo
    for t in tasks:
        path = str(out.parent / t["video"])
        info = dec.info(path)
        idx = [min(info.num_frames - 1, int((k + 0.5) * info.duration / 8 * info.fps)) for k in range(8)]
        for img in dec.frames(path, idx, size=OVERVIEW):
            box = locate_marker(img, t["metadata"]["colour"])
            assert box is None or read_digit(crop_of(img, box)) != t["answer"], (seed, t["id"])


def test_locate_marker_finds_nothing_away_from_events(demo, dec):
    seed, out, tasks = demo
    for t in tasks:
        path = str(out.parent / t["video"])
        spans = [t["evidence"][0]] + [d["span"] for d in t["metadata"]["distractors"]]
        quiet = [i for i in range(0, SECONDS * FPS, 23) if all(not (s - 0.5 <= i / FPS <= e + 0.5) for s, e in spans)]
        for img in dec.frames(path, quiet, size=ZOOM):
            for colour in COLOURS:
                assert locate_marker(img, colour) is None, (seed, t["id"], colour)


def test_read_digit_on_rendered_markers_and_junk():
    rng = np.random.default_rng(SEED)  # fixed, as the module's data is
    for digit in GLYPHS:
        colour = str(rng.choice(list(COLOURS)))
        rgb, mask = marker_sprite(6, colour, digit)
        grey = rng.integers(60, 160, size=(30, 34, 1))  # muted, like the generator's backgrounds
        img = np.clip(grey + rng.integers(-12, 12, size=(30, 34, 3)), 0, 255).astype(np.uint8)
        y, x = int(rng.integers(0, 18)), int(rng.integers(0, 22))
        img[y:y + 12, x:x + 12][mask] = rgb[mask]
        big = np.kron(img, np.ones((5, 5, 1), np.uint8))
        assert read_digit(img) == digit and read_digit(big) == digit, (digit, colour)
    assert read_digit(np.zeros((0, 0, 3), np.uint8)) is None
    assert read_digit(rng.integers(90, 110, size=(50, 50, 3), dtype=np.uint8)) is None  # no circle
    with pytest.raises(ValueError):
        locate_marker(np.zeros((4, 4, 3), np.uint8), "purple")


def test_make_demo_data_rejects_bad_arguments(tmp_path):
    for kwargs in ({"videos": 0}, {"seconds": 2}, {"fps": 0}, {"size": (100, 50)}, {"size": (641, 360)}):
        with pytest.raises(ValueError):
            make_demo_data(tmp_path, **kwargs)
