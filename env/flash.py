"""The demo's task family: the colour of a brief shape flash, which only the tools can show.

Each video is the digit family's background (drifting texture, muted moving shapes) with four
large saturated shapes flashing up for `FLASH_SECONDS` each, one per colour and one per shape
kind, in four different caption segments. The question names one shape ("What colour is the
triangle that flashes up?"); the options are the four colours, always in the same order, and
across a data set the answers cycle through them, so no option letter pays more than another.

Why only the tools answer it, at the demo's own resolution and budgets:
* A flash is shorter than the gap between uniformly sampled frames, and it is placed between the
  sampling instants ((i + 0.5) * duration / n) of every count in `AVOID_COUNTS`: the overview's
  4 frames and the no-tools baseline's 12 (overview + tool frame budget of configs/demo.yaml).
  Uniform sampling at those budgets never shows a flash; at another count it would catch one
  with probability about n * FLASH_SECONDS / duration, as brief events in long footage are missed.
* All four colours flash in every video, so a colour seen anywhere says nothing.
* The captions (for temporal_search) say which shape flashes in which 5 s segment, never its
  colour. temporal_zoom over that segment with 4 frames (1.25 s apart) always catches the flash,
  and at the 112x64 zoom size the shape is half the frame high: a tiny vision tower sees its colour.

So the policy to learn is search -> zoom into the segment the search returns -> answer. The scripted
oracle plays exactly that (metadata "oracle_plan": "search_then_zoom", env.testing.OraclePolicy),
reading the colour with `read_colour`. Deterministic for a seed, as the digit family.

`caption_frames` makes the examples `weft pretrain-vision` teaches a tiny random model to see with:
frames of fresh backgrounds, with or without one flashed shape, and their caption; no task video.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from env.demo import CAPTION_SECONDS, COLOURS, captions, colour_mask, locate_marker, write_task_set

SHAPES = ("circle", "square", "triangle", "diamond")
OPTIONS = list(COLOURS)  # red, green, blue, yellow: the same order in every task
FLASH_SECONDS = 1.5
AVOID_COUNTS = (4, 12)  # uniform frame counts that must never show a flash (see the module notes)
MARGIN_S = 0.15  # a flash keeps this far from every avoided instant (decoders round to a frame)


def shape_sprite(kind: str, radius: int, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB sprite and mask of a filled shape of `kind`, 2 * radius pixels wide."""
    size = 2 * radius
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    u, v = (xx - radius) / radius, (yy - radius) / radius  # -1..1
    mask = {"circle": u ** 2 + v ** 2 <= 1.0,
            "square": (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),
            "triangle": (v <= 0.8) & (v >= -0.9 + 1.7 * np.abs(u)),
            "diamond": np.abs(u) + np.abs(v) <= 1.0}[kind]
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[mask] = COLOURS[colour]
    return rgb, mask


def _instants(duration: float) -> list[float]:
    return [(i + 0.5) * duration / n for n in AVOID_COUNTS for i in range(n)]


def _place(rng: np.random.Generator, segment: int, duration: float, fps: float) -> tuple[int, int]:
    """First and last frame of a flash inside caption segment `segment`, clear of every avoided instant."""
    lo, hi = segment * CAPTION_SECONDS, min(duration, (segment + 1) * CAPTION_SECONDS)
    length = int(round(FLASH_SECONDS * fps))
    starts = [s for s in range(int(np.ceil(lo * fps)), int((hi - FLASH_SECONDS) * fps) + 1)
              if all(not (s / fps - MARGIN_S <= t <= (s + length) / fps + MARGIN_S) for t in _instants(duration))]
    if not starts:
        raise ValueError(f"no room for a {FLASH_SECONDS} s flash in segment {segment} of a {duration} s video")
    first = int(rng.choice(starts))
    return first, first + length - 1


def _segments(duration: float, fps: float) -> list[int]:
    """Caption segments with room for a flash."""
    out = []
    for m in range(int(np.ceil(duration / CAPTION_SECONDS))):
        try:
            _place(np.random.default_rng(0), m, duration, fps)
            out.append(m)
        except ValueError:
            pass
    return out


def plan_flashes(index: int, seed: int, seconds: float, fps: float, size: tuple[int, int]) -> list[dict]:
    """The four flashes of video `index`: the target first. Its colour cycles with the index (from a
    seeded start), so a set of 4k videos answers each option k times."""
    w, h = size
    rng = np.random.default_rng([seed, index, 1])
    segments = _segments(seconds, fps)
    if len(segments) < len(SHAPES):
        raise ValueError(f"a {seconds} s video has room for {len(segments)} flashes; need {len(SHAPES)} "
                         f"(use at least 30 s)")
    first_colour = int(np.random.default_rng([seed, 2]).integers(len(OPTIONS)))
    target_colour = OPTIONS[(first_colour + index) % len(OPTIONS)]
    others = [str(c) for c in rng.permutation([c for c in OPTIONS if c != target_colour])]
    # Which of the four flashes, in time order, is the target: uniform, so the segment the search returns is
    # uniform too. (The target was always the earliest: 0-5 s in 77 of the demo's 112 tasks, never past 15 s,
    # so zooming into the start paid without reading the search.)
    slot = int(rng.integers(len(SHAPES)))
    colours = others[:slot] + [target_colour] + others[slot:]
    kinds = [str(k) for k in rng.permutation(SHAPES)]
    radius = int(0.4 * h)  # the shape is 0.8 of the frame high: its colour fills most of a zoomed frame
    flashes = []
    for k, seg in enumerate(sorted(int(s) for s in rng.choice(segments, size=len(SHAPES), replace=False))):
        first, last = _place(rng, seg, seconds, fps)
        x = int(rng.integers(radius + 2, w - radius - 2))
        y = int(rng.integers(radius + 2, h - radius - 2))
        flashes.append({"kind": kinds[k], "colour": colours[k], "first": first, "last": last, "x": x, "y": y,
                        "radius": radius})
    target = next(i for i, f in enumerate(flashes) if f["colour"] == target_colour)
    return [flashes[target]] + flashes[:target] + flashes[target + 1:]


def flash_sprites(flashes: list[dict]) -> list:
    """The flashes as sprites for env.demo.render_frames."""
    return [(f["first"], f["last"], f["x"] - f["radius"], f["y"] - f["radius"],
             *shape_sprite(f["kind"], f["radius"], f["colour"])) for f in flashes]


def make_flash_task(index: int, seed: int, seconds: float, fps: float, size: tuple[int, int],
                    video_rel: str) -> tuple[dict, list[dict], int]:
    """The task dict for video `index`, its flashes (target first) and the pixel seed of its frames."""
    w, h = size
    flashes = plan_flashes(index, seed, seconds, fps, size)
    rng = np.random.default_rng([seed, index, 3])
    pixel_seed = int(rng.integers(2**31))
    t = flashes[0]
    r = t["radius"]
    task = {
        "id": f"flash-{seed}-{index:03d}",
        "video": video_rel,
        "question": f"What colour is the {t['kind']} that flashes up?",
        "options": list(OPTIONS),
        "answer": t["colour"],
        "evidence": [[round(t["first"] / fps, 3), round((t["last"] + 1) / fps, 3)]],
        "captions": captions(rng, seconds, fps, size, [(f["first"], f["last"], f["x"], f["y"], f"a {f['kind']} flashes "
                             "up in the {where}") for f in flashes], pixel_seed),
        "metadata": {"family": "flash", "oracle_plan": "search_then_zoom", "shape": t["kind"], "colour": t["colour"],
                     "event_frames": [t["first"], t["last"]],
                     "event_bbox": [round((t["x"] - r) / w, 4), round((t["y"] - r) / h, 4),
                                    round((t["x"] + r) / w, 4), round((t["y"] + r) / h, 4)],
                     "distractors": [{"shape": f["kind"], "colour": f["colour"],
                                      "span": [round(f["first"] / fps, 3), round((f["last"] + 1) / fps, 3)]}
                                     for f in flashes[1:]]},
    }
    return task, flashes, pixel_seed


# The demo's three sets (scripts/demo.sh, bench/e2e.py, tests): different videos and seeds. The
# cold-start SFT plays its own set (as VideoZoomer and VideoThinker keep SFT data apart from RL data);
# the held-out set is never trained on.
DEMO_RL = {"videos": 32, "seconds": 30.0, "seed": 13}
DEMO_COLDSTART = {"videos": 64, "seconds": 30.0, "seed": 7}
DEMO_HELDOUT = {"videos": 16, "seconds": 30.0, "seed": 21}


def make_flash_data(out_dir: str | Path, videos: int = 8, seconds: float = 30.0, seed: int = 0, fps: float = 10.0,
                    size: tuple[int, int] = (320, 180), gop: int = 250) -> Path:
    """Write `videos` flash mp4s under out_dir/videos and out_dir/tasks.jsonl; return the jsonl path."""
    if videos < 1 or fps <= 0:
        raise ValueError(f"make_flash_data: need videos >= 1 and fps > 0 (got {videos}, {fps})")

    def make(i: int, rel: str, wh: tuple[int, int]) -> tuple[dict, list, int]:
        task, flashes, pixel_seed = make_flash_task(i, seed, seconds, fps, wh, rel)
        return task, flash_sprites(flashes), pixel_seed

    return write_task_set(out_dir, f"flash_{seed}", videos, seconds, fps, size, gop, make)


# ------------------------------------------------------------------ captioned frames (perception pretraining)

NOTHING = "nothing flashes up"


def caption_frames(rng: np.random.Generator, out_size: tuple[int, int] = (112, 64),
                   size: tuple[int, int] = (320, 180), flash_prob: float = 0.85) -> tuple[list[np.ndarray], str]:
    """One captioned example for `weft pretrain-vision`: 1-4 frames of a fresh background (env.demo's texture
    and muted shapes, a new seed each time), one of which shows a saturated shape of a random kind, colour,
    size and place with probability `flash_prob`; caption "a <colour> <shape> flashes up", else NOTHING.
    Rendered at `size` and scaled to `out_size` as the tools scale frames. No task video is used, so a model
    pretrained on these has seen no demo set, held-out or other."""
    from PIL import Image

    from env.demo import render_frames

    w, h = size
    k = int(rng.integers(1, 5))
    sprites, caption = [], NOTHING
    if rng.random() < flash_prob:
        kind, colour, j = str(rng.choice(SHAPES)), str(rng.choice(OPTIONS)), int(rng.integers(k))
        r = int(rng.integers(int(0.25 * h), int(0.42 * h)))
        x, y = int(rng.integers(r + 2, w - r - 2)), int(rng.integers(r + 2, h - r - 2))
        sprites = [(j, j, x - r, y - r, *shape_sprite(kind, r, colour))]
        caption = f"a {colour} {kind} flashes up"
    frames = render_frames(int(rng.integers(2**31)), k, 2.0, size, sprites)  # 2 fps: the shapes move between frames
    return [np.asarray(Image.fromarray(f).resize(out_size, Image.BILINEAR)) for f in frames], caption


# ------------------------------------------------------------------ perception

def _colour_pixels(image: np.ndarray) -> dict[str, int]:
    return {c: int(colour_mask(image, c).sum()) for c in OPTIONS}


def read_colour(image: np.ndarray, min_frac: float = 0.01) -> Optional[str]:
    """The marker colour covering most of the image, if it covers at least `min_frac` of it; else None.
    The background never reaches the markers' saturation (env.demo), so a frame without a flash reads None."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        return None
    counts = _colour_pixels(img)
    best = max(counts, key=counts.get)
    return best if counts[best] >= min_frac * img.shape[0] * img.shape[1] else None


def locate_flash(image: np.ndarray, min_frac: float = 0.01) -> Optional[tuple[float, float, float, float]]:
    """Normalised box of the flash in a frame (the colour read_colour reads), or None."""
    colour = read_colour(image, min_frac)
    return locate_marker(image, colour) if colour else None

