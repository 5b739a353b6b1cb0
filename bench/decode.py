"""Decode benchmark: what the shared FrameDecoder buys over naive decord use.

(1) A GRPO group: G=8 episodes of one task, each asking for the 8-frame overview (160x90)
    and two 16-frame temporal zooms (320x180) -- the same frames, as the episodes of a group
    do at the start. Shared FrameDecoder (cold: fresh decoder, probe included) vs naive
    `decord.VideoReader(path, width, height).get_batch(indices)` with a reader per request.
(2) Zoom latency: one 16-frame temporal zoom over a 10 s window with a cold cache and a fresh
    reader vs the single-GOP floor: a fresh reader that seeks to the window's keyframe and
    decodes up to the last needed frame (skip_frames, converting only the last frame).
(3) Zoom then crop: a temporal zoom followed by a spatial crop of one of its frames, for each
    resize strategy: decord-scaled readers vs native decode (cached) + OpenCV resize.
(4) The PyAV backend (env.video_backend=pyav; what AV1 files get) on the same H.264 file and
    on a variable-frame-rate re-encode of it: (1) against naive PyAV (a container per request,
    a seek and decode per frame, scaled by swscale) and (2) against PyAV's single-GOP floor (a
    fresh container that seeks to the keyframe and decodes to the last needed frame), and its
    shared-decoder times as a ratio to decord's on the same file.

Medians over --reps repetitions; the last line is JSON with the numbers.
    python bench/decode.py [--data tasks.jsonl] [--task 0] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import decord  # noqa: E402

from env.demo import load_jsonl, make_demo_data  # noqa: E402
from env.video import FrameDecoder  # noqa: E402

OVERVIEW, ZOOM, CROP = (160, 90), (320, 180), (224, 224)


def medians(cands: dict[str, tuple[Callable[..., object], Optional[Callable[[], object]]]], reps: int) -> dict[str, float]:
    """Median seconds of each candidate fn() (or fn(setup()), setup untimed). Candidates run
    interleaved, in rotating order, so load from other processes hits them alike."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, setup = cands[name]
            arg = setup() if setup else None
            t0 = time.perf_counter()
            fn(arg) if setup else fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def known_decoder(path: str, resize: str, backend: str = "auto") -> FrameDecoder:
    """A fresh decoder (empty cache, no reader) that has already probed `path`."""
    dec = FrameDecoder(resize=resize, backend=backend)
    dec.info(path)
    return dec


def window(info, start: float, seconds: float, k: int) -> list[int]:
    """k frame indices spread over [start, start + seconds), as temporal_zoom samples them."""
    return sorted({info.index_at(start + (j + 0.5) * seconds / k) for j in range(k)})


def group_requests(info, evidence_start: float) -> list[tuple[list[int], tuple[int, int]]]:
    """One episode's decode requests: overview, a zoom on the evidence, a zoom elsewhere."""
    dur = info.duration
    overview = sorted({info.index_at((i + 0.5) * dur / 8) for i in range(8)})
    z1_start = min(max(0.0, evidence_start - 3.0), dur - 10.0)
    z2_start = (z1_start + dur / 2) % max(1.0, dur - 10.0)
    return [(overview, OVERVIEW), (window(info, z1_start, 10.0, 16), ZOOM), (window(info, z2_start, 10.0, 16), ZOOM)]


def gop_spans(info, idx: list[int]) -> list[tuple[int, int]]:
    """Per GOP the indices touch: its keyframe and the last needed frame in it. A decoder cannot do
    less than walk each of these spans once (a span crossing a keyframe restarts there)."""
    return sorted({max(k for k in info.keyframes if k <= i): i for i in idx}.items())


def play_group(dec: FrameDecoder, path: str, reqs: list, g: int) -> None:
    """The decode requests of the g episodes of one group, through `dec`."""
    for _ in range(g):
        for idx, size in reqs:
            dec.frames(path, idx, size=size)


def bench_group(path: str, evidence_start: float, reps: int, g: int = 8) -> dict:
    info = FrameDecoder().info(path)
    reqs = group_requests(info, evidence_start)

    def shared(resize: str) -> Callable[[], None]:
        def run() -> None:
            episodes(FrameDecoder(resize=resize))  # cold: new cache, new readers, and the probe is paid here
        return run

    def episodes(dec: FrameDecoder) -> None:
        play_group(dec, path, reqs, g)

    def naive() -> None:
        for _ in range(g):
            for idx, size in reqs:
                decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=size[0],
                                   height=size[1]).get_batch(idx).asnumpy()

    m = medians({"native": (shared("native"), None), "decoder": (shared("decoder"), None), "naive": (naive, None),
                 "native_probed": (episodes, lambda: known_decoder(path, "native"))}, reps)
    return {"naive_s": m["naive"], **{k: {"shared_s": m[k], "speedup": m["naive"] / m[k]}
                                      for k in ("native", "decoder", "native_probed")}}


def bench_zoom(path: str, start_s: float, reps: int) -> dict:
    info = FrameDecoder().info(path)
    idx = window(info, start_s, 10.0, 16)
    spans = gop_spans(info, idx)

    def zoom(dec: FrameDecoder) -> None:
        dec.frames(path, idx, size=ZOOM)

    def floor_skip() -> None:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=ZOOM[0], height=ZOOM[1])
        for k, last in spans:
            vr.seek(k)
            vr.skip_frames(last - k)  # decoded, not converted to RGB
            vr.next().asnumpy()

    def floor_next() -> None:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, width=ZOOM[0], height=ZOOM[1])
        for k, last in spans:
            vr.seek(k)
            for _ in range(last - k + 1):
                vr.next()

    m = medians({"native": (zoom, lambda: known_decoder(path, "native")),
                 "decoder": (zoom, lambda: known_decoder(path, "decoder")),
                 "floor": (floor_skip, None), "floor_next": (floor_next, None)}, reps)
    return {"frames": [idx[0], idx[-1]], "gop_spans": spans, "floor_s": m["floor"], "floor_next_s": m["floor_next"],
            **{k: {"zoom_s": m[k], "ratio": m[k] / m["floor"]} for k in ("native", "decoder")}}


def bench_zoom_crop(path: str, start_s: float, reps: int) -> dict:
    info = FrameDecoder().info(path)
    idx = window(info, start_s, 10.0, 16)

    def run(dec: FrameDecoder) -> None:
        dec.frames(path, idx, size=ZOOM)
        dec.frames(path, [idx[7]], size=CROP, crop=(0.1, 0.1, 0.4, 0.5))

    m = medians({k: (run, lambda k=k: known_decoder(path, k)) for k in ("native", "decoder")}, reps)
    return {k: {"zoom_then_crop_s": v} for k, v in m.items()}


def pyav_seek_decode(path: str, info, spans: list[tuple[int, int]], size: tuple[int, int]) -> None:
    """Plain PyAV on a fresh container: per (seek_to, target) index pair, seek (back to a keyframe)
    to seek_to's pts, decode up to target's, and convert only that frame. Naive use is one pair
    (i, i) per frame; the single-GOP floor is one pair (keyframe, last needed frame) per GOP."""
    import av

    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_count = 1  # as the shared decoder's readers (num_threads=1)
        for seek_to, target in spans:
            c.seek(int(info.pts[seek_to]), stream=st, backward=True)
            for f in c.decode(st):
                if f.pts >= info.pts[target]:
                    f.to_ndarray(format="rgb24", width=size[0], height=size[1])
                    break


def bench_pyav(path: str, evidence_start: float, start_s: float, reps: int, g: int = 8) -> dict:
    """(4): the PyAV backend's group sharing and zoom floor, and its times against decord's."""
    info = FrameDecoder(backend="pyav").info(path)
    reqs = group_requests(info, evidence_start)
    idx = window(info, start_s, 10.0, 16)
    spans = gop_spans(info, idx)

    def group(backend: str) -> Callable[[], None]:
        return lambda: play_group(FrameDecoder(backend=backend), path, reqs, g)  # cold, as bench_group's

    def naive() -> None:
        for _ in range(g):
            for ix, size in reqs:
                pyav_seek_decode(path, info, [(i, i) for i in ix], size)

    def zoom(dec: FrameDecoder) -> None:
        dec.frames(path, idx, size=ZOOM)

    m = medians({"pyav": (group("pyav"), None), "decord": (group("auto"), None), "naive": (naive, None),
                 **{f"zoom_pyav_{r}": (zoom, lambda r=r: known_decoder(path, r, "pyav")) for r in ("native", "decoder")},
                 **{f"zoom_decord_{r}": (zoom, lambda r=r: known_decoder(path, r, "auto")) for r in ("native", "decoder")},
                 "floor": (lambda: pyav_seek_decode(path, info, spans, ZOOM), None)}, reps)
    return {"cfr": info.cfr, "group": {"naive_s": m["naive"], "shared_s": m["pyav"], "speedup": m["naive"] / m["pyav"],
                                       "decord_shared_s": m["decord"], "pyav_over_decord": m["pyav"] / m["decord"]},
            "zoom": {r: {"zoom_s": m[f"zoom_pyav_{r}"], "ratio": m[f"zoom_pyav_{r}"] / m["floor"],
                         "decord_zoom_s": m[f"zoom_decord_{r}"],
                         "pyav_over_decord": m[f"zoom_pyav_{r}"] / m[f"zoom_decord_{r}"]} for r in ("native", "decoder")}
            | {"floor_s": m["floor"], "gop_spans": spans}}


def vfr_copy(path: str, out: Path) -> str:
    """The same pictures re-encoded at a variable rate: frame durations cycle 1, 1, 2 source frames."""
    import av

    from env.demo import write_video

    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        fps = float(c.streams.video[0].average_rate)
    steps = [(1, 1, 2)[i % 3] / fps for i in range(len(frames))]
    times = [sum(steps[:i]) for i in range(len(frames))]
    return str(write_video(out, frames, fps, times=times))


def print_pyav(name: str, r: dict) -> None:
    grp, z = r["group"], r["zoom"]
    print(f"(4) PyAV backend, {name}{'' if r['cfr'] else ' (variable frame rate)'}: group of 8 "
          f"{grp['shared_s'] * 1e3:.0f} ms vs naive PyAV {grp['naive_s'] * 1e3:.0f} ms = {grp['speedup']:.1f}x "
          f"(goal >= 4x), {grp['pyav_over_decord']:.2f}x decord's {grp['decord_shared_s'] * 1e3:.0f} ms; zoom vs PyAV "
          f"floor {z['floor_s'] * 1e3:.0f} ms: " + ", ".join(
              f"{r} {z[r]['zoom_s'] * 1e3:.0f} ms = {z[r]['ratio']:.2f}x ({z[r]['pyav_over_decord']:.2f}x decord's "
              f"{z[r]['decord_zoom_s'] * 1e3:.0f} ms)" for r in ("native", "decoder")) + " (goal <= 1.2x)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="tasks.jsonl (default: generate demo videos into a temp dir)")
    ap.add_argument("--task", type=int, default=0, help="which task's video to use")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = Path(args.data) if args.data else make_demo_data(tmp, videos=1, seconds=60, seed=0)
        gen_s = time.perf_counter() - t0
        task = load_jsonl(data)[args.task]
        path = str((data.parent / task["video"]).resolve())
        ev = float(task["evidence"][0][0]) if task.get("evidence") else 0.0
        info = FrameDecoder().info(path)
        print(f"video {path}: {info.num_frames} frames, {info.fps:g} fps, {info.width}x{info.height}, "
              f"keyframes {list(info.keyframes)[:8]}{' (generated in %.1f s)' % gen_s if not args.data else ''}")
        out: dict = {"video": {"frames": info.num_frames, "fps": info.fps, "size": [info.width, info.height],
                               "gop": (info.keyframes[1] - info.keyframes[0]) if len(info.keyframes) > 1 else None}}
        start = 30.0 if info.duration >= 45 else 0.0
        out["group"] = grp = bench_group(path, ev, args.reps)
        out["zoom_one_gop"] = bench_zoom(path, start, args.reps)
        out["zoom_two_gops"] = bench_zoom(path, max(0.0, start - 10.0), args.reps)
        out["zoom_then_crop"] = zc = bench_zoom_crop(path, start, args.reps)
        print(f"(1) GRPO group of 8 (overview + 2 zooms each): naive {grp['naive_s'] * 1e3:.0f} ms; shared, cold "
              f"(probe included): " + ", ".join(f"{k} {grp[k]['shared_s'] * 1e3:.0f} ms = {grp[k]['speedup']:.1f}x"
                                                for k in ("native", "decoder")) + " (goal >= 4x); native, file "
              f"probed before: {grp['native_probed']['shared_s'] * 1e3:.0f} ms = {grp['native_probed']['speedup']:.1f}x")
        for name in ("zoom_one_gop", "zoom_two_gops"):
            z = out[name]
            print(f"(2) 16-frame zoom over 10 s, frames {z['frames'][0]}-{z['frames'][1]}, GOP spans {z['gop_spans']}: "
                  f"floor {z['floor_s'] * 1e3:.0f} ms (next()-loop {z['floor_next_s'] * 1e3:.0f} ms); "
                  + ", ".join(f"{k} {z[k]['zoom_s'] * 1e3:.0f} ms = {z[k]['ratio']:.2f}x" for k in ("native", "decoder"))
                  + " (goal <= 1.2x)")
        print("(3) zoom then a crop of one of its frames: "
              + ", ".join(f"{k} {zc[k]['zoom_then_crop_s'] * 1e3:.0f} ms" for k in ("native", "decoder")))
        out["pyav_h264"] = bench_pyav(path, ev, start, args.reps)
        print_pyav("same H.264 file", out["pyav_h264"])
        out["pyav_vfr"] = bench_pyav(vfr_copy(path, Path(tmp) / "vfr.mp4"), ev, start, args.reps)
        print_pyav("H.264 re-encoded at a variable rate", out["pyav_vfr"])
        print(json.dumps(out, sort_keys=True))
        return out


if __name__ == "__main__":
    main()
