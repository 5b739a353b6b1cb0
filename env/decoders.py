"""The two decoding backends behind `env.video.FrameDecoder`, and the probe that picks one per file.

decord is the fast path: it opens most files and applies rotation metadata itself. Its FFmpeg
(decord 0.6.0) has no AV1 decoder, so AV1 files ("cannot find video stream") and anything else
decord fails on go to PyAV, which decodes through the machine's FFmpeg (libdav1d for AV1).
Both backends index frames in presentation order and return upright uint8 RGB arrays.

Time comes from presentation timestamps, read once per file by demuxing the video stream with
PyAV (packets only, nothing decoded): the frame shown at t is the last frame whose pts <= t. A
file whose table is i / fps to within one time-base tick is constant-rate, and the caller keeps
the floor(t * fps) fast path for it.

This file also runs as a script (`python env/decoders.py PATH MAX_KEYS BACKEND`): the probe runs
in a child so that a decoder hang or crash cannot take the caller down. It therefore imports
nothing from the `env` package, and raises plain exceptions that env/video.py maps to its
typed VideoErrors.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

import numpy as np

BACKENDS = ("auto", "decord", "pyav")
REORDER_SLACK = 64  # frames decoded past the last wanted one before a missing frame is an error


class NoVideoStream(Exception):
    """The file has no decodable video stream."""


class Truncated(Exception):
    """The file holds fewer frames than its own index lists: no backend should paper over that."""


# --------------------------------------------------------------------- timestamps
def read_table(path: str) -> dict[str, Any]:
    """The video stream's packet timestamps, from a demux pass (no decoding).

    Returns pts (sorted presentation timestamps in time-base ticks, one a frame), time_base
    (num, den), keys (pts of keyframes), last_duration (ticks the last-shown frame lasts, 0 when
    the file does not say), rate (the stream's nominal frame rate or 0.0), codec, width, height."""
    import av

    with av.open(path) as c:
        if not c.streams.video:
            raise NoVideoStream("no video stream")
        st = c.streams.video[0]
        pts, keys, durs, seen = [], [], {}, 0
        for p in c.demux(st):
            seen += p.size > 0
            if p.size == 0 or p.is_discard:  # flush packets; samples an edit list cuts away
                continue
            t = p.pts if p.pts is not None else p.dts
            if t is None:
                raise ValueError("a packet has neither pts nor dts")
            pts.append(int(t))
            durs[int(t)] = int(p.duration or 0)
            if p.is_keyframe:
                keys.append(int(t))
        if not pts:
            raise NoVideoStream("the video stream has no packets")
        # An MP4/MOV sample table lists every frame; more listed than read means the file was cut
        # short. (AVI's count is in time-base ticks, so it is not compared.)
        if "mp4" in c.format.name and st.frames and st.frames > seen:
            raise Truncated(f"the index lists {st.frames} frames but only {seen} are in the file (truncated)")
        pts = sorted(set(pts))
        rate = st.average_rate or st.guessed_rate or st.base_rate
        return {"pts": pts, "time_base": [st.time_base.numerator, st.time_base.denominator], "keys": sorted(keys),
                "last_duration": durs.get(pts[-1], 0), "rate": float(rate) if rate else 0.0,
                "codec": st.codec_context.name, "width": st.codec_context.width, "height": st.codec_context.height}


def constant_rate(t: np.ndarray, tick: float, rate: float) -> Optional[float]:
    """The frame rate if frame i is shown at i / rate to within one tick (a constant-rate file), else None.

    t: each frame's time in seconds from the first; tick: the time base in seconds. Candidates:
    the stream's nominal rate, then the mean rate over the table (a stream whose nominal rate is
    missing or wrong can still be constant)."""
    tol = tick + 1e-9
    i = np.arange(len(t), dtype=np.float64)
    cands = [rate] if rate > 0 else []
    if len(t) > 1 and t[-1] > 0:
        cands.append((len(t) - 1) / t[-1])
    for fps in cands:
        if np.abs(t - i / fps).max() <= tol:
            return float(fps)
    return None if len(t) > 1 or not cands else cands[0]


# --------------------------------------------------------------------- decord
class DecordSource:
    """A decord VideoReader (decoder-side scaling to `size` when given)."""

    def __init__(self, path: str, size: Optional[tuple[int, int]] = None, threads: int = 1):
        import decord

        kw: dict[str, Any] = {"ctx": decord.cpu(0), "num_threads": threads}
        if size is not None:
            kw["width"], kw["height"] = size
        self.reader = decord.VideoReader(path, **kw)

    def read(self, indices: list[int], key: int, pos: Optional[int]) -> list[np.ndarray]:
        """Frames at sorted `indices` of one GOP (decord seeks itself; key and pos are unused)."""
        return list(self.reader.get_batch(indices).asnumpy())


# --------------------------------------------------------------------- PyAV
class PyAVSource:
    """One PyAV input container: seeks to a GOP's keyframe (unless the decoder is already inside
    that GOP, before the first wanted frame) and decodes forward, mapping each decoded frame to
    its presentation index through the pts table. Frames come back rotated upright, converted
    to RGB at `size` (width, height; upright) by swscale when given, else at native size."""

    def __init__(self, path: str, pts: Sequence[int], rotation: int = 0, threads: int = 1,
                 size: Optional[tuple[int, int]] = None):
        import av
        from av.video.reformatter import VideoReformatter

        self.container = av.open(path)
        self.stream = self.container.streams.video[0]
        self.reformatter = VideoReformatter()  # one swscale context, reused: 0.3 ms a frame, not 1.7
        self.stream.thread_count = max(1, int(threads))
        self.pts = [int(p) for p in pts]
        self.index_of = {p: i for i, p in enumerate(self.pts)}
        self.turns = int(round(rotation / 90)) % 4  # np.rot90 turns (counterclockwise, as the display matrix says)
        self.size = size if size is None or self.turns % 2 == 0 else (size[1], size[0])  # before turning
        self._frames: Optional[Any] = None  # decoded-frame iterator from the current position

    def read(self, indices: list[int], key: int, pos: Optional[int]) -> list[np.ndarray]:
        """Frames at sorted `indices`, all after keyframe index `key`; `pos` is the index the
        decoder would produce next (None: unknown), so a forward read needs no seek."""
        want = {self.pts[i]: i for i in indices}
        try:
            if self._frames is None or pos is None or not key <= pos <= indices[0]:
                self._seek(key)
            got = self._collect(want)
            if len(got) < len(want) and key > 0:  # the seek landed past a wanted frame: from the top
                self._seek(0)
                got = self._collect(want)
        except BaseException:
            self._frames = None  # the decoder's position is unknown after an error
            raise
        missing = sorted(i for p, i in want.items() if p not in got)
        if missing:
            raise ValueError(f"frames {missing[:5]} were not produced by the decoder")
        return [got[self.pts[i]] for i in indices]

    def _seek(self, index: int) -> None:
        self.container.seek(self.pts[index], stream=self.stream, backward=True, any_frame=False)
        self._frames = self._decode()

    def _decode(self) -> Any:
        for packet in self.container.demux(self.stream):
            yield from packet.decode()  # the empty packet at the end flushes the decoder

    def _collect(self, want: dict[int, int]) -> dict[int, np.ndarray]:
        got: dict[int, np.ndarray] = {}
        last, past = max(want), 0
        for frame in self._frames:
            p = frame.pts
            if p is None:
                raise ValueError("a decoded frame has no pts")
            if p in want:
                got[p] = self._rgb(frame)
                if len(got) == len(want):
                    return got
            if p > last:
                past += 1
                if past > REORDER_SLACK:
                    break
        self._frames = None  # exhausted or abandoned: the next read seeks
        return got

    def _rgb(self, frame: Any) -> np.ndarray:
        w, h = self.size or (None, None)
        arr = self.reformatter.reformat(frame, w, h, "rgb24", interpolation="AREA" if w else None).to_ndarray()
        return np.ascontiguousarray(np.rot90(arr, self.turns)) if self.turns else arr


def _rotation(path: str, pts: Sequence[int]) -> int:
    """Degrees counterclockwise the display matrix turns the picture (0 when none, or when the
    first frame does not decode: the backend check then decides)."""
    try:
        src = PyAVSource(path, pts)
        try:
            src._seek(0)
            frame = next(iter(src._frames))
            return int(round(frame.rotation or 0)) % 360
        finally:
            src.container.close()
    except Exception:  # noqa: BLE001 - a damaged first frame is reported by the decode checks
        return 0


# --------------------------------------------------------------------- probe
def _spread(keys: Sequence[int], n: int, max_keys: int) -> list[int]:
    """A spread of keyframes and the last frame: where truncated or mis-indexed files fail."""
    step = max(1, len(keys) // max_keys)
    return sorted(set(list(keys)[::step]) | {n - 1})


def _test_read(src: Any, check: list[int], keys: Sequence[int]) -> None:
    """Decode each frame of `check` (one GOP at a time, as the decoder will)."""
    import bisect

    for i in check:
        k = keys[bisect.bisect_right(keys, i) - 1]
        src.read([i], k, None)


def probe(path: str, backend: str = "auto", max_keys: int = 16, test: bool = True, threads: int = 1) -> dict[str, Any]:
    """What a file is and which backend decodes it, as a JSON-able dict (see env/video.py's VideoInfo).

    auto: decord when it opens the file, agrees with the timestamp table on the frame count,
    and (test=True) decodes a spread of keyframes and the last frame; otherwise PyAV. The
    reason for the choice is returned in "why". Raises NoVideoStream or ValueError/RuntimeError
    (with both backends' messages) when neither can read the file."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        table: Optional[dict] = read_table(path)
        table_err = ""
    except (NoVideoStream, Truncated):
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg errors of every kind; decord may still read it
        table, table_err = None, f"timestamps unreadable: {_short(e)}"
    if table is not None:
        table["rotation"] = _rotation(path, table["pts"])
    errors = [table_err] if table_err else []
    if backend in ("auto", "decord"):
        try:
            return _probe_decord(path, table, table_err, backend, max_keys, test, threads)
        except Exception as e:  # noqa: BLE001 - decord raises plain DECORDError/RuntimeError
            no_stream = isinstance(e, NoVideoStream) or "cannot find video stream" in str(e)
            errors.insert(0, f"decord: {_short(e)}")
        if backend == "decord" or table is None:
            raise (NoVideoStream if no_stream else RuntimeError)("; ".join(errors))
    if table is None:
        raise RuntimeError("; ".join(errors))
    try:
        return _probe_pyav(path, table, errors[0] if errors else "video_backend=pyav", max_keys, test, threads)
    except Exception as e:  # noqa: BLE001 - FFmpeg errors of every kind
        raise RuntimeError("; ".join(errors + [f"pyav: {_short(e)}"])) from None


def _probe_decord(path: str, table: Optional[dict], table_err: str, backend: str, max_keys: int, test: bool,
                  threads: int) -> dict[str, Any]:
    src = DecordSource(path, threads=threads)
    vr = src.reader
    n = len(vr)
    if n <= 0:
        raise NoVideoStream("no frames")
    keys = sorted({int(k) for k in vr.get_key_indices()} | {0})
    h, w = vr[0].shape[:2]
    out = {"backend": "decord", "num_frames": n, "width": int(w), "height": int(h), "keyframes": keys,
           "avg_fps": float(vr.get_avg_fps()), "rotation": table["rotation"] if table else 0, "why": "decord opens it" if backend == "auto" else
           "video_backend=decord"}
    if table is not None:
        if len(table["pts"]) != n and backend == "auto":
            raise ValueError(f"decord counts {n} frames, the stream has {len(table['pts'])} timestamps")
        out["table"] = table
    else:
        out["why"] += f"; {table_err}, so time is index / average fps"
    if test:
        _test_read(src, _spread(keys, n, max_keys), keys)
    return out


def _probe_pyav(path: str, table: dict, why: str, max_keys: int, test: bool, threads: int) -> dict[str, Any]:
    pts, key_pts = table["pts"], set(table["keys"])
    keys = sorted({i for i, p in enumerate(pts) if p in key_pts} | {0})
    rotation = table["rotation"]
    src = PyAVSource(path, pts, rotation, threads)
    (first,) = src.read([0], 0, None)
    if test:
        _test_read(src, _spread(keys, len(pts), max_keys), keys)
    return {"backend": "pyav", "num_frames": len(pts), "width": int(first.shape[1]), "height": int(first.shape[0]),
            "keyframes": keys, "avg_fps": 0.0, "rotation": rotation, "why": why, "table": table}


def _short(e: BaseException) -> str:
    """An FFmpeg/decord message without decord's '[hh:mm:ss] file.cc:123: ' prefixes, first line."""
    import re

    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(e)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Stack trace")]
    return (lines[0] if lines else type(e).__name__)[:240]


def main(argv: list[str]) -> None:
    """Child-process entry: probe argv[0] and print one JSON line (ok, or kind and message)."""
    path, max_keys, backend = argv[0], int(argv[1]), argv[2]
    try:
        res = {"ok": True, **probe(path, backend, max_keys)}
    except NoVideoStream as e:
        res = {"ok": False, "kind": "empty", "msg": str(e)[:2000]}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which types it
        res = {"ok": False, "kind": "corrupt", "msg": str(e)[:2000]}
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
