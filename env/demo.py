"""Demo data: long distracting H.264 videos with one short, small event each, and the
question about it, plus the perception helpers scripted policies use to answer from pixels.

Each video shows a drifting texture and muted moving shapes; a few saturated coloured
circles, each holding a white digit, flash up for 1-2 s at different times and places.
The question asks for the digit in the circle of one colour. At the overview's size
(160x90) the digit is a few blurred pixels and the event usually falls between the 8
overview frames, so answering needs the tools: temporal_search (the event's segment
caption names the circle), temporal_zoom (to find it), spatial_zoom (to read it).

Videos are encoded with PyAV's bundled libx264, one keyframe every `gop` frames and no
scene-cut keyframes, like real footage. Output is deterministic for a seed: same
tasks, same pixels, and (with the same PyAV/x264 build) the same bytes.

`locate_marker(image, colour)` and `read_digit(image)` are the perception functions
for scripted policies: colour thresholds and template matching against the very
glyphs the generator draws.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

# Saturated marker colours; the background never reaches their saturation (see _texture, _shapes).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 210, 30),
}
_HUES = {"red": 0.0, "yellow": 51.0, "green": 128.0, "blue": 223.0}  # degrees, measured from COLOURS

# 5x7 bitmap digits: the one font used to draw and to read (read_digit matches these).
GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
_GLYPH_ARR = {d: np.array([[c == "1" for c in row] for row in g], dtype=bool) for d, g in GLYPHS.items()}
CAPTION_SECONDS = 5.0  # one caption per segment of this length


@dataclass(frozen=True)
class Event:
    """One coloured circle holding a digit, shown on frames [first, last] at centre (x, y)."""

    colour: str
    digit: str
    first: int
    last: int
    x: int
    y: int
    radius: int


# ------------------------------------------------------------------ drawing

def marker_sprite(radius: int, colour: str, digit: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB sprite and mask of a filled circle with a white digit; cell = radius / 6 pixels."""
    cell = max(1, radius // 6)
    size = 2 * radius
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mask = (xx - radius) ** 2 + (yy - radius) ** 2 <= radius ** 2
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[mask] = COLOURS[colour]
    glyph = np.kron(_GLYPH_ARR[digit], np.ones((cell, cell), bool))
    gh, gw = glyph.shape
    y0, x0 = radius - gh // 2, radius - gw // 2
    rgb[y0:y0 + gh, x0:x0 + gw][glyph] = 255
    return rgb, mask


def _paste(frame: np.ndarray, rgb: np.ndarray, mask: np.ndarray, x0: int, y0: int) -> None:
    """Draw a sprite with its top-left at (x0, y0), clipped to the frame."""
    h, w = mask.shape
    fy0, fx0 = max(y0, 0), max(x0, 0)
    fy1, fx1 = min(y0 + h, frame.shape[0]), min(x0 + w, frame.shape[1])
    if fy1 <= fy0 or fx1 <= fx0:
        return
    sub_m = mask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    sub_rgb = rgb[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    frame[fy0:fy1, fx0:fx1][sub_m] = sub_rgb[sub_m]


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, muted (low-saturation) texture with fine grain, larger than the frame so it can drift."""
    from PIL import Image

    coarse = rng.uniform(50, 170, size=(h // 24 + 2, w // 24 + 2)).astype(np.float32)
    tint = rng.uniform(-12, 12, size=(h // 48 + 2, w // 48 + 2, 3)).astype(np.float32)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    tints = [np.asarray(Image.fromarray(np.ascontiguousarray(tint[..., c])).resize((w, h), Image.BICUBIC)) for c in range(3)]
    grain = rng.normal(0, 6, size=(h, w)).astype(np.float32)
    tex = base[..., None] + np.stack(tints, -1) + grain[..., None]
    return np.clip(tex, 0, 255).astype(np.uint8)


def _shapes(rng: np.random.Generator, w: int, h: int, n: int) -> list[dict]:
    """Muted moving shapes (circles and rectangles) that bounce off the frame edges."""
    out = []
    for _ in range(n):
        sw, sh = (int(v) for v in rng.integers(h // 8, h // 3, size=2))
        if rng.random() < 0.5:
            sh = sw
            yy, xx = np.mgrid[0:sh, 0:sw] + 0.5
            mask = (xx - sw / 2) ** 2 + (yy - sh / 2) ** 2 <= (sw / 2) ** 2
            kind = "circle"
        else:
            mask = np.ones((sh, sw), bool)
            kind = "rectangle"
        grey = rng.uniform(40, 210)
        colour = np.clip(grey + rng.uniform(-12, 12, size=3), 0, 255)  # saturation stays well below markers'
        rgb = np.broadcast_to(colour.astype(np.uint8), (sh, sw, 3)).copy()
        pos = rng.uniform([0, 0], [w - sw, h - sh])
        vel = rng.uniform(20, 80, size=2) * rng.choice([-1, 1], size=2) * (h / 360)
        out.append({"rgb": rgb, "mask": mask, "pos": pos, "vel": vel, "kind": kind, "shade": _shade(grey)})
    return out


def _shade(grey: float) -> str:
    return "dark grey" if grey < 90 else "grey" if grey < 160 else "light grey"


def _move(shape: dict, w: int, h: int, dt: float) -> None:
    sh, sw = shape["mask"].shape
    shape["pos"] = shape["pos"] + shape["vel"] * dt
    for k, lim in ((0, w - sw), (1, h - sh)):
        if shape["pos"][k] < 0 or shape["pos"][k] > lim:
            shape["vel"][k] = -shape["vel"][k]
            shape["pos"][k] = min(max(shape["pos"][k], 0), lim)


def _plan_events(rng: np.random.Generator, n_frames: int, fps: float, w: int, h: int,
                 n_distractors: int) -> list[Event]:
    """The target event first, then distractors of other colours and digits at other times."""
    radius = 6 * max(1, round(h / 360))  # glyph cell 1 px at 360p: legible only at native resolution
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    digits = [str(d) for d in rng.permutation(10)]
    events: list[Event] = []
    for k in range(1 + n_distractors):
        length = int(round(rng.uniform(1.0, 2.0) * fps))
        for _ in range(100):  # rejection-sample a start that keeps events >= 2 s apart
            first = int(rng.integers(int(2 * fps), max(int(2 * fps) + 1, n_frames - length - int(2 * fps))))
            if all(first > e.last + 2 * fps or first + length < e.first - 2 * fps for e in events):
                break
        margin = 2 * radius
        x = int(rng.integers(margin, w - margin))
        y = int(rng.integers(margin, h - margin))
        events.append(Event(colours[k % len(colours)], digits[k], first, min(first + length, n_frames) - 1, x, y, radius))
    return events


def _where(x: float, y: float, w: int, h: int) -> str:
    col = ["left", "centre", "right"][min(2, int(3 * x / w))]
    row = ["top", "middle", "bottom"][min(2, int(3 * y / h))]
    if row == "middle":
        return "centre" if col == "centre" else col
    return row if col == "centre" else f"{row}-{col}"


def _scene(seed: int, size: tuple[int, int], fps: float) -> tuple[np.ndarray, list[dict], float, int]:
    """The background of one video: drifting texture, moving shapes, drift period and margin."""
    w, h = size
    rng = np.random.default_rng(seed)
    pad = max(16, w // 8)
    tex = _texture(rng, h + pad, w + pad)
    shapes = _shapes(rng, w, h, n=6)
    return tex, shapes, rng.uniform(20, 40) * fps, pad


Sprite = tuple[int, int, int, int, np.ndarray, np.ndarray]  # first frame, last frame, left, top, RGB, mask


def event_sprites(events: list[Event]) -> list[Sprite]:
    """The digit family's events as sprites for render_frames."""
    return [(e.first, e.last, e.x - e.radius, e.y - e.radius, *marker_sprite(e.radius, e.colour, e.digit))
            for e in events]


def render_frames(seed: int, n_frames: int, fps: float, size: tuple[int, int],
                  sprites: list[Sprite]) -> Iterator[np.ndarray]:
    """Yield the RGB frames of one video: the seed's background, each sprite on its frames (deterministic)."""
    w, h = size
    tex, shapes, period, pad = _scene(seed, size, fps)
    for i in range(n_frames):
        ox = int(pad / 2 + pad / 2 * math.sin(2 * math.pi * i / period))
        oy = int(pad / 2 + pad / 2 * math.cos(2 * math.pi * i / (1.3 * period)))
        frame = tex[oy:oy + h, ox:ox + w].copy()
        for s in shapes:
            _paste(frame, s["rgb"], s["mask"], int(s["pos"][0]), int(s["pos"][1]))
            _move(s, w, h, 1.0 / fps)
        for first, last, x0, y0, rgb, mask in sprites:
            if first <= i <= last:
                _paste(frame, rgb, mask, x0, y0)
        yield frame


# ------------------------------------------------------------------ encoding

def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, gop: int = 250,
                crf: int = 20, preset: str = "veryfast", times: Optional[Sequence[float]] = None) -> Path:
    """Encode RGB frames to H.264 mp4 with PyAV's libx264: a keyframe every `gop` frames, no scene cuts.

    times: when each frame is shown (seconds, increasing), for a variable-frame-rate file;
    default i / fps."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4") as out:
        stream = None
        for i, arr in enumerate(frames):
            if stream is None:
                stream = out.add_stream("libx264", rate=rate)
                stream.height, stream.width = arr.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.gop_size = gop
                if times is not None:  # a fine clock, so the encoder keeps each frame's own time
                    stream.codec_context.time_base = stream.time_base = Fraction(1, 90000)
                # scenecut=0: no extra keyframes, so GOPs are as long as real footage's.
                stream.options = {"preset": preset, "crf": str(crf),
                                  "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            if times is None:
                frame.pts, frame.time_base = i, 1 / rate
            else:
                frame.pts, frame.time_base = round(times[i] * 90000), Fraction(1, 90000)
            out.mux(stream.encode(frame))
        if stream is None:
            raise ValueError(f"write_video({path}): no frames given")
        out.mux(stream.encode(None))
    return path


# ------------------------------------------------------------------ tasks

def captions(rng: np.random.Generator, seconds: float, fps: float, size: tuple[int, int],
             events: list[tuple[int, int, int, int, str]], pixel_seed: int) -> list[dict]:
    """One caption per CAPTION_SECONDS segment: the background's shapes and motion, then a phrase for
    each event (first frame, last frame, x, y, phrase with "{where}") that overlaps the segment."""
    w, h = size
    shapes = _scene(pixel_seed, size, fps)[1]  # the shapes the frames show, to name them
    kinds = sorted({f"{s['shade']} {s['kind']}s" for s in shapes})
    motions = ["drift across", "bounce around", "slide over", "wander across"]
    caps = []
    start = 0.0
    while start < seconds - 1e-9:
        end = min(seconds, start + CAPTION_SECONDS)
        text = f"{' and '.join(rng.choice(kinds, size=min(2, len(kinds)), replace=False))} " \
               f"{rng.choice(motions)} a textured background"
        for first, last, x, y, phrase in events:
            if first / fps < end and (last + 1) / fps > start:
                text += "; " + phrase.format(where=_where(x, y, w, h))
        caps.append({"start": round(start, 3), "end": round(end, 3), "text": text})
        start = end
    return caps


def make_task(index: int, seed: int, seconds: float, fps: float, size: tuple[int, int],
              video_rel: str) -> tuple[dict, list[Event], int]:
    """The task dict for video `index`, its events, and the pixel seed of its frames."""
    w, h = size
    rng = np.random.default_rng([seed, index])
    n_frames = int(round(seconds * fps))
    # Each event needs ~2 s plus a 2 s gap; short videos get fewer distractors.
    room = max(0, int((seconds - 4) // 4) - 1)
    events = _plan_events(rng, n_frames, fps, w, h, n_distractors=min(int(rng.integers(2, 4)), room))
    target = events[0]
    others = [e.digit for e in events[1:]]
    rest = [str(d) for d in rng.permutation(10) if str(d) != target.digit and str(d) not in others]
    options = [target.digit] + (others + rest)[:3]
    options = [options[i] for i in rng.permutation(len(options))]
    pixel_seed = int(rng.integers(2**31))
    r = target.radius
    bbox = [round((target.x - r) / w, 4), round((target.y - r) / h, 4),
            round((target.x + r) / w, 4), round((target.y + r) / h, 4)]
    task = {
        "id": f"demo-{seed}-{index:03d}",
        "video": video_rel,
        "question": f"What digit is shown inside the {target.colour} circle?",
        "options": options,
        "answer": target.digit,
        "evidence": [[round(target.first / fps, 3), round((target.last + 1) / fps, 3)]],
        "captions": captions(rng, n_frames / fps, fps, size, [(e.first, e.last, e.x, e.y, f"a {e.colour} circle with a "
                             "number appears in the {where}") for e in events], pixel_seed),
        "metadata": {"event_bbox": bbox, "colour": target.colour, "event_frames": [target.first, target.last],
                     "distractors": [{"colour": e.colour, "digit": e.digit,
                                      "span": [round(e.first / fps, 3), round((e.last + 1) / fps, 3)]}
                                     for e in events[1:]]},
    }
    return task, events, pixel_seed


# The demo runs on the flash family (env/flash.py: DEMO_RL, DEMO_COLDSTART, DEMO_HELDOUT); digit
# tasks are what tests and benchmarks of spatial_zoom and decoding use.


def make_demo_data(out_dir: str | Path, videos: int = 8, seconds: float = 60.0, seed: int = 0,
                   fps: float = 10.0, size: tuple[int, int] = (640, 360), gop: int = 250) -> Path:
    """Write `videos` mp4s under out_dir/videos and out_dir/tasks.jsonl; return the jsonl path."""
    if videos < 1 or seconds < 6 or fps <= 0:
        raise ValueError(f"make_demo_data: need videos >= 1, seconds >= 6, fps > 0 (got {videos}, {seconds}, {fps})")

    def make(i: int, rel: str, wh: tuple[int, int]) -> tuple[dict, list[Sprite], int]:
        task, events, pixel_seed = make_task(i, seed, seconds, fps, wh, rel)
        return task, event_sprites(events), pixel_seed

    return write_task_set(out_dir, f"demo_{seed}", videos, seconds, fps, size, gop, make)


def write_task_set(out_dir: str | Path, prefix: str, videos: int, seconds: float, fps: float,
                   size: tuple[int, int], gop: int,
                   make: Callable[[int, str, tuple[int, int]], tuple[dict, list[Sprite], int]]) -> Path:
    """Encode videos/{prefix}_{i:03d}.mp4 for i < videos, each from make(i, relative path, size) ->
    (task, sprites, pixel seed), and write their tasks.jsonl; return its path."""
    from env.tasks import write_tasks

    w, h = (int(v) for v in size)
    if w < 160 or h < 90 or w % 2 or h % 2:
        raise ValueError(f"size must be even and at least 160x90, got {size}")
    out_dir = Path(out_dir)
    tasks = []
    for i in range(videos):
        rel = f"videos/{prefix}_{i:03d}.mp4"
        task, sprites, pixel_seed = make(i, rel, (w, h))
        write_video(out_dir / rel, render_frames(pixel_seed, int(round(seconds * fps)), fps, (w, h), sprites), fps,
                    gop=gop)
        tasks.append(task)
    return write_tasks(out_dir / "tasks.jsonl", tasks)


# ------------------------------------------------------------------ perception

def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value (0..1) of a uint8 RGB image."""
    rgb = image.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return hue, sat, mx


def colour_mask(image: np.ndarray, colour: str, tol: float = 22.0) -> np.ndarray:
    """Pixels of a marker colour: saturated, bright enough, hue within `tol` degrees."""
    if colour not in _HUES:
        raise ValueError(f"unknown marker colour {colour!r}; known: {sorted(_HUES)}")
    hue, sat, val = _hsv(image)
    dh = np.abs((hue - _HUES[colour] + 180.0) % 360.0 - 180.0)
    return (sat > 0.55) & (val > 0.35) & (dh < tol)


def _largest_blob(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """Bounding box (x0, y0, x1, y1), end-exclusive, of the largest 8-connected blob, or None.

    Labels by propagating the minimum pixel id through each blob; the mask is first cut to
    its pixels' bounding box and, when still large, subsampled (a box a few pixels loose is
    fine for its callers), which keeps this at about a millisecond."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    oy, ox = int(ys.min()), int(xs.min())
    sub = mask[oy:int(ys.max()) + 1, ox:int(xs.max()) + 1]
    f = max(1, -(-max(sub.shape) // 64))
    sub = sub[::f, ::f]
    h, w = sub.shape
    big = np.iinfo(np.int32).max
    labels = np.where(sub, np.arange(h * w, dtype=np.int32).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        new = np.where(sub, nb, big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[sub], return_counts=True)
    by, bx = np.nonzero(labels == ids[np.argmax(counts)])
    x0, y0 = ox + int(bx.min()) * f, oy + int(by.min()) * f
    x1, y1 = ox + (int(bx.max()) + 1) * f, oy + (int(by.max()) + 1) * f
    if f > 1:  # refine to full resolution: the mask's pixels within the loose box
        ys, xs = np.nonzero(mask[max(0, y0 - f):y1 + f, max(0, x0 - f):x1 + f])
        x0, y0, x1, y1 = max(0, x0 - f) + int(xs.min()), max(0, y0 - f) + int(ys.min()), \
            max(0, x0 - f) + int(xs.max()) + 1, max(0, y0 - f) + int(ys.max()) + 1
    return x0, y0, x1, y1


def locate_marker(image: np.ndarray, colour: str, min_pixels: int = 4) -> Optional[tuple[float, float, float, float]]:
    """Normalised (x1, y1, x2, y2) box of the `colour` circle in an RGB frame, or None if absent."""
    mask = colour_mask(image, colour)
    if int(mask.sum()) < min_pixels:
        return None
    box = _largest_blob(mask)
    if box is None:
        return None
    h, w = mask.shape
    x0, y0, x1, y1 = box
    return x0 / w, y0 / h, x1 / w, y1 / h


_C = 4  # read_digit compares at 4 canonical pixels per glyph cell
_R = 6  # marker radius in glyph cells (see marker_sprite)


def _templates() -> tuple[np.ndarray, np.ndarray]:
    """Whiteness templates of the ten digits inside the circle, as the generator draws them at
    1 px per cell (360p), enlarged to the canonical grid; zero-mean, unit-norm rows [10, K]."""
    n = 2 * _R * _C
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    interior = (xx - n / 2) ** 2 + (yy - n / 2) ** 2 <= (0.92 * n / 2) ** 2
    rows = []
    for d in GLYPHS:
        rgb, _ = marker_sprite(_R, "red", d)
        t = np.kron((rgb.min(-1) > 200).astype(np.float32), np.ones((_C, _C), np.float32))[interior]
        t -= t.mean()
        rows.append(t / np.linalg.norm(t))
    return np.stack(rows), interior


_TEMPLATES: list = []  # filled on first use: (matrix [10, K], interior mask)


def _sample(img: np.ndarray, cx: float, cy: float, step: float, n: int) -> np.ndarray:
    """Bilinear samples of a 2-D image on an n x n grid centred at (cx, cy), `step` pixels apart."""
    v, u = np.mgrid[0:n, 0:n] + 0.5
    x = np.clip(cx + (u - n / 2) * step - 0.5, 0, img.shape[1] - 1.001)
    y = np.clip(cy + (v - n / 2) * step - 0.5, 0, img.shape[0] - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    fx, fy = x - x0, y - y0
    return (img[y0, x0] * (1 - fx) * (1 - fy) + img[y0, x0 + 1] * fx * (1 - fy)
            + img[y0 + 1, x0] * (1 - fx) * fy + img[y0 + 1, x0 + 1] * fx * fy)


def read_digit(image: np.ndarray, min_score: float = 0.55, min_margin: float = 0.05,
               min_diameter: int = 8) -> Optional[str]:
    """The digit inside the largest saturated circle of an RGB image, or None if unreadable.

    The circle is found by saturation; its whiteness (min channel: high for the white glyph,
    low for any saturated colour) is sampled on the generator's glyph grid over small shifts
    and scales and correlated with each digit. A digit is returned only if its score is high
    and clearly above the runner-up; a circle under `min_diameter` pixels is never read."""
    if not _TEMPLATES:
        _TEMPLATES.extend(_templates())
    tmpl, interior = _TEMPLATES
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        return None
    _, sat, val = _hsv(img)
    box = _largest_blob((sat > 0.45) & (val > 0.3))
    if box is None or min(box[2] - box[0], box[3] - box[1]) < min_diameter:
        return None
    x0, y0, x1, y1 = box
    cx, cy, cell = (x0 + x1) / 2, (y0 + y1) / 2, ((x1 - x0) + (y1 - y0)) / 4 / _R
    white = img.min(-1).astype(np.float32)
    best = np.full(len(tmpl), -1.0)
    for scale in (0.88, 0.94, 1.0, 1.06, 1.12):
        for dy in np.linspace(-0.6, 0.6, 5) * cell:
            for dx in np.linspace(-0.6, 0.6, 5) * cell:
                p = _sample(white, cx + dx, cy + dy, cell * scale / _C, 2 * _R * _C)[interior]
                p = p - p.mean()
                norm = np.linalg.norm(p)
                if norm > 1e-6:
                    best = np.maximum(best, tmpl @ (p / norm))
    order = np.argsort(-best)
    if best[order[0]] < min_score or best[order[0]] - best[order[1]] < min_margin:
        return None
    return list(GLYPHS)[int(order[0])]


def demo_perception() -> tuple[Callable[[np.ndarray, Any], Optional[tuple[float, float, float, float]]],
                               Callable[[np.ndarray, Any], Optional[str]]]:
    """(locate, read) in env.testing's form, (image, task) -> box / answer, for demo tasks. Digit
    tasks: locate finds the circle of the colour the question names; read reads its digit. Flash
    tasks (env.flash, metadata family "flash"): locate finds the flash; read reads its colour."""
    from env.flash import locate_flash, read_colour

    def is_flash(task: Any) -> bool:
        return (getattr(task, "metadata", None) or {}).get("family") == "flash"

    def colour_of(task: Any) -> Optional[str]:
        meta = getattr(task, "metadata", None) or {}
        if meta.get("colour") in COLOURS:
            return meta["colour"]
        words = str(getattr(task, "question", "")).lower().replace("?", " ").split()
        return next((c for c in COLOURS if c in words), None)

    def locate(image: np.ndarray, task: Any) -> Optional[tuple[float, float, float, float]]:
        if is_flash(task):
            return locate_flash(image)
        colour = colour_of(task)
        return locate_marker(image, colour) if colour else None

    def read(image: np.ndarray, task: Any) -> Optional[str]:
        return read_colour(image) if is_flash(task) else read_digit(image)

    return locate, read


def load_jsonl(path: str | Path) -> list[dict]:
    """The raw task dicts of a tasks.jsonl (tests and the benchmark read them directly)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _fit(w: float, h: float, box: tuple[int, int]) -> tuple[int, int]:
    s = min(box[0] / w, box[1] / h)
    return max(1, round(w * s)), max(1, round(h * s))


def _pad(b: Sequence[float], p: float = 0.02) -> tuple[float, float, float, float]:
    return max(0.0, b[0] - p), max(0.0, b[1] - p), min(1.0, b[2] + p), min(1.0, b[3] + p)


def _cut(img: np.ndarray, b: Sequence[float]) -> np.ndarray:
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[int(b[1] * h):math.ceil(b[3] * h), int(b[0] * w):math.ceil(b[2] * w)])


def perception_rates(tasks_jsonl: str | Path, overview: tuple[int, int] = (160, 90), zoom: tuple[int, int] = (320, 180),
                     crop_box: tuple[int, int] = (224, 224)) -> dict[str, float]:
    """How often the perception helpers answer from each view of every event frame, as the
    scripted policies use them: locate on the zoom frame, then read a spatial crop of the
    native frame (padded box, fitted in crop_box); versus reading the event's box cut from an
    overview-sized or zoom-sized frame, as is and enlarged to crop_box. Fractions of frames."""
    from env.video import FrameDecoder

    base = Path(tasks_jsonl).parent
    dec = FrameDecoder(256 * 2**20, 4)
    counts: dict[str, int] = {}
    n = 0

    def add(key: str, ok: bool) -> None:
        counts[key] = counts.get(key, 0) + int(ok)

    for t in load_jsonl(tasks_jsonl):
        path = str(base / t["video"])
        info = dec.info(path)
        first, last = t["metadata"]["event_frames"]
        colour, answer, bbox = t["metadata"]["colour"], t["answer"], t["metadata"]["event_bbox"]
        for i in range(first, last + 1):
            n += 1
            (z,) = dec.frames(path, [i], size=zoom)
            box = locate_marker(z, colour)
            add("located_in_zoom", box is not None)
            if box is not None:
                p = _pad(box)
                (c,) = dec.frames(path, [i], size=_fit((p[2] - p[0]) * info.width, (p[3] - p[1]) * info.height, crop_box), crop=p)
                add("read_native_crop", read_digit(c) == answer)
            for name, size in (("overview", overview), ("zoom", zoom)):
                (img,) = dec.frames(path, [i], size=size)
                cut = _cut(img, _pad(bbox))
                r, r_up = read_digit(cut), read_digit(_enlarge(cut, crop_box))
                add(f"read_{name}_cut", r == answer)
                add(f"wrong_{name}_cut", r is not None and r != answer)
                add(f"read_{name}_cut_enlarged", r_up == answer)
                add(f"wrong_{name}_cut_enlarged", r_up is not None and r_up != answer)
    return {"event_frames": n, **{k: v / max(1, n) for k, v in sorted(counts.items())}}


def _enlarge(img: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize(_fit(img.shape[1], img.shape[0], box), Image.BILINEAR))


def main(argv: Optional[list[str]] = None) -> None:
    """python -m env.demo OUT_DIR [--videos N] [--seconds S] [--seed K] [--check]"""
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Generate weft demo videos and tasks.")
    ap.add_argument("out_dir")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="also measure perception_rates on the result")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = make_demo_data(args.out_dir, videos=args.videos, seconds=args.seconds, seed=args.seed)
    print(f"wrote {path} ({args.videos} videos x {args.seconds:g} s) in {time.perf_counter() - t0:.1f} s")
    if args.check:
        print(json.dumps(perception_rates(path), indent=1))


if __name__ == "__main__":
    main()
