"""The demo's task family (env/flash.py) on real encoded video: what the overview and the no-tools
baseline show (no flash, ever), what a zoom into the searched segment shows (the target's colour),
and the scripted policies' accuracy under configs/demo.yaml (oracle >= 0.95, blind near chance)."""

from __future__ import annotations

import collections
import hashlib
import re

import pytest

from env.demo import CAPTION_SECONDS, load_jsonl, render_frames
from env.flash import (AVOID_COUNTS, OPTIONS, SHAPES, flash_sprites, make_flash_data, make_flash_task, plan_flashes,
                       read_colour, shape_sprite)


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    make_flash_data(root, videos=8, seconds=30, seed=5)
    return root


def test_tasks_are_deterministic_and_balanced(flash, tmp_path):
    tasks = load_jsonl(flash / "tasks.jsonl")
    again = make_flash_data(tmp_path, videos=2, seconds=30, seed=5)
    assert load_jsonl(again) == tasks[:2]
    # The pixels are the seed's. (The encoded bytes are not always: libx264 at 320x180 gave different
    # bytes for the same frames about 1 time in 4, differing in frames 1-3, so bytes are not compared.)
    def pixels() -> bytes:
        _, flashes, pixel_seed = make_flash_task(0, 5, 30, 10.0, (320, 180), "v")
        frames = render_frames(pixel_seed, 300, 10.0, (320, 180), flash_sprites(flashes))
        return hashlib.md5(b"".join(f.tobytes() for f in frames)).digest()

    assert pixels() == pixels()
    # Fixed options, answers cycling through them: no option letter pays more than another.
    assert all(t["options"] == OPTIONS for t in tasks)
    assert collections.Counter(t["answer"] for t in tasks) == {c: 2 for c in OPTIONS}
    for t in tasks:
        shape = t["metadata"]["shape"]
        assert shape in t["question"] and t["answer"] not in t["question"]
        hits = [c for c in t["captions"] if f"a {shape} flashes" in c["text"]]
        words = {w for c in t["captions"] for w in re.findall(r"[a-z]+", c["text"])}
        assert len(hits) == 1 and not words & set(OPTIONS), words & set(OPTIONS)  # no caption names a colour
        (s, e), = t["evidence"]
        assert hits[0]["start"] <= s < e <= hits[0]["end"]


def test_the_target_is_any_of_the_four_flashes_so_its_segment_must_be_searched():
    """Where the target flashes is spread over the video: a policy that zooms into one fixed segment, or into
    the earliest flash, is right about as often as it would be guessing (it was not: the target was always
    the earliest flash)."""
    targets = [plan_flashes(i, 13, 30.0, 10.0, (112, 64)) for i in range(96)]
    segment = collections.Counter(int(f[0]["first"] / 10.0 // CAPTION_SECONDS) for f in targets)
    earliest = sum(f[0]["first"] == min(g["first"] for g in f) for f in targets)
    assert set(segment) == set(range(6)) and max(segment.values()) <= 96 // 4, segment
    assert 12 <= earliest <= 36, earliest  # 1 in 4 expected: 24


def test_uniform_frames_never_show_a_flash_and_a_zoom_into_its_segment_does(flash):
    from env.video import FrameDecoder

    dec = FrameDecoder(256 * 2**20, 4)
    for t in load_jsonl(flash / "tasks.jsonl"):
        path = str(flash / t["video"])
        info = dec.info(path)
        uniform = [(i + 0.5) * info.duration / n for n in AVOID_COUNTS for i in range(n)]
        frames = dec.frames(path, [min(info.num_frames - 1, int(x * info.fps)) for x in uniform], size=(112, 64))
        assert [read_colour(f) for f in frames] == [None] * len(uniform), t["id"]
        (s, _), = t["evidence"]
        seg = CAPTION_SECONDS * int(s // CAPTION_SECONDS)
        zoom = dec.frames(path, [int((seg + CAPTION_SECONDS * (i + 0.5) / 4) * info.fps) for i in range(4)],
                          size=(112, 64))
        seen = {read_colour(f) for f in zoom} - {None}
        assert seen == {t["answer"]}, (t["id"], seen)


def test_read_colour_on_sprites_and_background():
    import numpy as np

    for kind in SHAPES:
        for colour in OPTIONS:
            rgb, mask = shape_sprite(kind, 16, colour)
            frame = np.full((64, 112, 3), 120, np.uint8)
            frame[10:42, 40:72][mask] = rgb[mask]
            assert read_colour(frame) == colour, (kind, colour)
    assert read_colour(np.full((64, 112, 3), 120, np.uint8)) is None
    assert read_colour(np.zeros((0, 0, 3), np.uint8)) is None


def test_oracle_solves_it_and_the_blind_policy_is_at_chance(flash):
    from configs import load_config
    from env import LocalEnv, load_tasks
    from env.demo import demo_perception
    from env.testing import BlindPolicy, OraclePolicy, run_episodes

    cfg = load_config("configs/demo.yaml", [])
    tasks = load_tasks(flash / "tasks.jsonl")
    locate, read = demo_perception()
    oracle = run_episodes(tasks, OraclePolicy(locate, read, zoom_frames=4), 8, env=LocalEnv(cfg.env, cfg.reward))
    blind = run_episodes(tasks, BlindPolicy(locate, read, seed=0), 8, env=LocalEnv(cfg.env, cfg.reward))
    assert oracle["accuracy"] >= 0.95 and oracle["mean_tool_calls"] == 2.0, oracle
    assert blind["accuracy"] <= 0.25 + 0.15, blind


def test_caption_frames_say_what_the_pixels_show():
    """The perception-pretraining examples (`weft pretrain-vision`): the caption's colour is the colour
    read_colour finds in exactly one of the frames; a "nothing" caption has no flash in any frame; the
    frames come at the requested size; the same seed gives the same examples."""
    import numpy as np

    from env.flash import NOTHING, caption_frames

    rng = np.random.default_rng(3)
    seen = collections.Counter()
    for _ in range(40):
        frames, caption = caption_frames(rng, (112, 64))
        assert 1 <= len(frames) <= 4 and all(f.shape == (64, 112, 3) and f.dtype == np.uint8 for f in frames)
        reads = [read_colour(f) for f in frames]
        if caption == NOTHING:
            assert reads == [None] * len(frames), reads
            seen["nothing"] += 1
            continue
        _, colour, kind, *_ = caption.split()
        assert colour in OPTIONS and kind in SHAPES and caption == f"a {colour} {kind} flashes up"
        assert sorted(r for r in reads if r) == [colour], (caption, reads)
        seen[colour] += 1
    assert seen["nothing"] >= 1 and all(seen[c] >= 2 for c in OPTIONS), seen
    a, b = caption_frames(np.random.default_rng(9)), caption_frames(np.random.default_rng(9))
    assert a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))


def test_demo_looks_tells_a_zoom_into_the_searched_segment_from_one_elsewhere(flash):
    """scripts/demo_looks.py reads the search hit out of env/tools.py's real output (so a change of that
    format fails here) and compares it with the first zoom call of the policy's turns, parsed as the env
    parses them."""
    import asyncio
    import importlib.util

    from configs import load_config
    from env import LocalEnv, load_tasks
    from env.testing import call

    spec = importlib.util.spec_from_file_location("demo_looks", "scripts/demo_looks.py")
    looks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(looks)
    cfg = load_config("configs/demo.yaml", [])
    task = load_tasks(flash / "tasks.jsonl")[0]
    search = call("temporal_search", query=task.question, top_k=1)

    async def search_output() -> str:
        ep = LocalEnv(cfg.env, cfg.reward).episode("looks")
        await ep.reset(task)
        obs, *_ = await ep.step(search)
        return obs.text

    text = asyncio.run(search_output())
    lo, hi = (float(x) for x in looks.FIRST_HIT.search(text).groups())
    assert hi - lo == 5.0 and lo % 5 == 0, text  # one caption segment

    def kind(*turns: str) -> str:
        return looks.kind([search, *turns], text)

    zoom = lambda a, b: call("temporal_zoom", start=a, end=b, num_frames=4)  # noqa: E731
    assert kind(zoom(lo, hi), "<answer>A</answer>") == "searched segment"
    assert kind(zoom(lo + 5, hi + 5)) == kind(zoom(lo, hi + 5)) == "elsewhere"
    assert kind("<answer>A</answer>") == "no zoom"
