"""env/video.py on real H.264 files decoded by real decord 0.6.0 (and, where marked, by PyAV;
tests/env/test_video_formats.py covers other codecs, VFR and rotation).

Test videos carry their frame index as 10 binary blocks on the top row, so every returned
frame can be checked to be exactly the one asked for; the rest of the frame is four
coloured quadrants for crop checks. Random choices are fresh each run (seeded from the
clock and printed on failure through the assertion messages).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from env.demo import write_video
from env.errors import VideoCorrupt, VideoDecodeTimeout, VideoEmpty, VideoNotFound
from env.video import FrameDecoder, VideoReader, get_decoder, naive_walk_cost, resize_to_fit

W, H, FPS, N, GOP = 160, 96, 10, 300, 50
QUADS = {"tl": (200, 40, 40), "tr": (40, 180, 40), "bl": (40, 40, 200), "br": (220, 200, 30)}


def counter_frames(n: int, offset: int = 0, w: int = W, h: int = H):
    for i in range(n):
        f = np.empty((h, w, 3), np.uint8)
        f[16:56, : w // 2], f[16:56, w // 2:] = QUADS["tl"], QUADS["tr"]
        f[56:, : w // 2], f[56:, w // 2:] = QUADS["bl"], QUADS["br"]
        f[:16] = 40
        for b in range(10):
            if ((i + offset) >> b) & 1:
                f[0:16, b * 16:(b + 1) * 16] = 255
        yield f


def read_counter(img: np.ndarray) -> int:
    """The index coded in the top row of a frame at any size (block means, robust to codec blur)."""
    h, w = img.shape[:2]
    row = img[: max(1, round(h * 16 / H)) - (1 if h >= 48 else 0)].astype(np.float32).mean(-1)
    bw = w / 10
    return sum(1 << b for b in range(10) if row[:, int(b * bw) + 1:max(int(b * bw) + 2, int((b + 1) * bw) - 1)].mean() > 150)


def remux(src: Path, dst: Path, fmt: str, **options) -> Path:
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w", format=fmt, options=options) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                o.mux(p)
    return dst


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """The counter video, its variants, and one file per kind of damage."""
    d = tmp_path_factory.mktemp("video")
    good = write_video(d / "counter.mp4", counter_frames(N), FPS, gop=GOP)  # moov at the end, as ffmpeg writes
    fast = remux(good, d / "fast.mp4", "mp4", movflags="faststart")  # moov first, as streaming files are
    src, fs = good.read_bytes(), fast.read_bytes()
    rng = np.random.default_rng()
    mdat = fs.find(b"mdat")
    files = {"good": good, "fast": fast}
    bad = {
        "trunc_mid_mdat": src[: len(src) // 2],  # moov lost
        "trunc_moov": src[: src.find(b"moov") + (len(src) - src.find(b"moov")) // 2],  # half the index lost
        "fast_trunc_mid_mdat": fs[: mdat + (len(fs) - mdat) // 2],  # index intact, samples missing
        "random_bytes": rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes(),
        "header_then_garbage": fs[: mdat + 8] + rng.integers(0, 256, len(fs) - mdat - 8, dtype=np.uint8).tobytes(),
        "zero_length": b"",
        "text": b"not a video at all\n" * 50,
    }
    for name, data in bad.items():
        (d / f"{name}.mp4").write_bytes(data)
        files[name] = d / f"{name}.mp4"
    files["audio_only"] = audio_only(d / "audio_only.mp4")
    # A valid MPEG-TS with a 250-frame GOP: decord 0.6.0 spins forever seeking near its end.
    long_gop = write_video(d / "long_gop.mp4", counter_frames(260, w=64, h=48), FPS, gop=250)
    files["ts_hang"] = remux(long_gop, d / "long_gop.ts", "mpegts")
    files["dir"] = d
    return files


def audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="mp4") as o:
        s = o.add_stream("aac", rate=16000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        fr.sample_rate, fr.pts, fr.time_base = 16000, 0, Fraction(1, 16000)
        o.mux(s.encode(fr))
        o.mux(s.encode(None))
    return path


@pytest.fixture(scope="module")
def dec() -> FrameDecoder:
    return FrameDecoder(64 * 2**20, 8)


# ------------------------------------------------------------------ exactness

def test_info_and_exact_frame_at_time(media, dec):
    vr = VideoReader(media["good"], decoder=dec)
    assert (vr.num_frames, vr.fps, vr.width, vr.height) == (N, FPS, W, H)
    assert vr.duration == pytest.approx(N / FPS)
    assert dec.info(str(media["good"])).keyframes == tuple(range(0, N, GOP))
    rng = np.random.default_rng()
    times = list(rng.uniform(-2, N / FPS + 2, size=40)) + [k / FPS for k in rng.integers(0, N, 10)] + [0.0, N / FPS]
    frames, stamps = vr.get_frames(times)
    want = [min(max(int(np.floor(t * FPS + 1e-6)), 0), N - 1) for t in times]
    assert frames.shape == (len(times), H, W, 3) and frames.dtype == np.uint8
    assert [read_counter(f) for f in frames] == want, f"times {times}"
    np.testing.assert_allclose(stamps, np.asarray(want) / FPS)
    assert [vr.index_for_time(k / FPS) for k in range(N)] == list(range(N))  # k/fps lands on frame k


def test_native_and_decoder_resize_give_the_same_frames(media):
    rng = np.random.default_rng()
    idx = sorted(rng.choice(N, 12, replace=False).tolist())
    for resize in ("native", "decoder"):
        d = FrameDecoder(8 * 2**20, 2, resize=resize, validate=False)
        for size in [(80, 48), (320, 192), (W, H)]:
            got = d.frames(str(media["good"]), idx, size=size)
            assert all(g.shape == (size[1], size[0], 3) for g in got)
            assert [read_counter(g) for g in got] == idx, (resize, size)


def test_crop_then_resize(media, dec):
    path = str(media["good"])
    (native,) = dec.frames(path, [123])
    assert not native.flags.writeable  # cached arrays are shared: read-only
    crop = (0.55, 0.65, 0.95, 0.95)  # inside the bottom-right quadrant
    (c,) = dec.frames(path, [123], crop=crop)
    assert c.shape == (round(0.3 * H), round(0.4 * W), 3)
    np.testing.assert_array_equal(c, native[62:91, 88:152])
    (cs,) = dec.frames(path, [123], size=(32, 16), crop=crop)
    assert cs.shape == (16, 32, 3)
    assert np.abs(cs.reshape(-1, 3).mean(0) - QUADS["br"]).max() < 12
    (tl,) = dec.frames(path, [123], size=(100, 100), crop=(0.05, 0.2, 0.45, 0.55))  # enlarged
    assert np.abs(tl[10:-10, 10:-10].reshape(-1, 3).mean(0) - QUADS["tl"]).max() < 12


def test_bad_arguments_are_value_errors(media, dec):
    path = str(media["good"])
    for kwargs in ({"indices": [N]}, {"indices": [-1]}, {"indices": [1.5]}, {"indices": [0], "crop": (0.5, 0, 0.4, 1)},
                   {"indices": [0], "crop": (0, 0, 1.2, 1)}, {"indices": [0], "size": (0, 10)}, {"indices": [0], "size": "big"}):
        with pytest.raises(ValueError):
            dec.frames(path, **kwargs)
    with pytest.raises(ValueError):
        VideoReader(path, decoder=dec).get_frames([float("nan")])


def test_resize_to_fit():
    rng = np.random.default_rng()
    for _ in range(200):
        w, h, cap = (int(v) for v in rng.integers(1, 4000, size=3))
        nw, nh = resize_to_fit(w, h, cap)
        assert nw * nh <= max(cap, 1) or (nw, nh) == (1, 1)
        assert (nw, nh) == (w, h) if w * h <= cap else (nw <= w and nh <= h)
        if w * h > cap and min(nw, nh) > 20:
            assert abs(nw / nh - w / h) / (w / h) < 0.1  # aspect kept
    assert resize_to_fit(640, 360, 320 * 320) == (426, 240)
    with pytest.raises(ValueError):
        resize_to_fit(0, 10, 100)


def test_get_decoder_is_one_shared_instance():
    assert get_decoder() is get_decoder(cache_bytes=1, pool_size=1)


# ------------------------------------------------------------------ cache

def test_cache_hits_and_byte_bound(media):
    path = str(media["good"])
    frame_bytes = W * H * 3
    d = FrameDecoder(cache_bytes=10 * frame_bytes, pool_size=2, validate=False)
    first = d.frames(path, [5, 6, 7, 8, 9])
    s1 = d.stats()
    again = d.frames(path, [9, 8, 7, 6, 5])
    s2 = d.stats()
    assert s2["hits"] - s1["hits"] == 5 and s2["frames_decoded"] == s1["frames_decoded"] == 5
    assert all(a is b for a, b in zip(first, reversed(again)))  # served from the cache, not re-decoded
    rng = np.random.default_rng()
    for _ in range(4):
        idx = rng.choice(N, 15, replace=False).tolist()
        assert [read_counter(f) for f in d.frames(path, idx)] == idx
        assert d.stats()["cache_bytes"] <= 10 * frame_bytes
    s3 = d.stats()
    assert s3["evictions"] > 0 and s3["cache_entries"] <= 10
    assert FrameDecoder(cache_bytes=0, validate=False).frames(path, [3])[0] is not None  # no cache still works


# ------------------------------------------------------------------ ordering

def test_keyframe_aware_order_walks_less_and_returns_the_same_frames(media):
    import decord

    path = str(media["good"])
    rng = np.random.default_rng()
    idx = rng.choice(N, 24, replace=False).tolist()  # shuffled, across all six GOPs
    d = FrameDecoder(64 * 2**20, 2)  # probed in a child: the reader below starts at frame 0
    ours = d.frames(path, idx)
    keys = d.info(path).keyframes
    naive = decord.VideoReader(path, num_threads=1).get_batch(idx).asnumpy()
    assert all(np.array_equal(a, b) for a, b in zip(ours, naive))
    assert [read_counter(f) for f in ours] == idx
    walked = d.stats()["frames_walked"]
    per_gop = {}
    for i in idx:
        k = max(x for x in keys if x <= i)
        per_gop[k] = max(per_gop.get(k, 0), i)
    assert walked == sum(last - k + 1 for k, last in per_gop.items())  # one pass per GOP
    assert walked < naive_walk_cost(idx, keys)

    # And in time: frames of one GOP asked for backwards make decord re-seek for each one.
    back = list(range(GOP * 3 + 45, GOP * 3 - 1, -3))

    def t_ours() -> float:
        t0 = time.perf_counter()
        FrameDecoder(validate=False).frames(path, back)
        return time.perf_counter() - t0

    def t_naive() -> float:
        t0 = time.perf_counter()
        decord.VideoReader(path, num_threads=1).get_batch(back).asnumpy()
        return time.perf_counter() - t0

    ours_s = sorted(t_ours() for _ in range(3))[1]
    naive_s = sorted(t_naive() for _ in range(3))[1]
    assert ours_s < naive_s, f"ours {ours_s:.4f}s vs naive {naive_s:.4f}s"


# ------------------------------------------------------------------ threads

@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_threads_hammering_get_correct_frames(media, backend):
    path, fast = str(media["good"]), str(media["fast"])
    # small: evictions under load
    d = FrameDecoder(cache_bytes=40 * W * H * 3, pool_size=3, validate=False, backend=backend)
    errors: list[str] = []
    seed = int(time.time_ns() % 2**32)

    def worker(k: int) -> None:
        rng = np.random.default_rng([seed, k])
        for _ in range(12):
            p = path if rng.random() < 0.7 else fast
            idx = rng.integers(0, N, size=int(rng.integers(1, 8))).tolist()
            size = [None, (80, 48)][int(rng.integers(2))]
            try:
                got = [read_counter(f) for f in d.frames(p, idx, size=size)]
                if got != idx:
                    errors.append(f"{p} {size} asked {idx} got {got}")
            except Exception as e:  # noqa: BLE001 - collected and reported
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"seed {seed}: {errors[:3]}"


def test_concurrent_requests_for_the_same_frames_decode_once(media):
    path = str(media["good"])
    d = FrameDecoder(64 * 2**20, 4, validate=False)
    d.info(path)
    idx = list(range(200, 296, 6))  # 16 frames, like one temporal zoom
    barrier = threading.Barrier(8)
    out: list = [None] * 8

    def worker(k: int) -> None:
        barrier.wait()
        out[k] = d.frames(path, idx, size=(80, 48))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all([read_counter(f) for f in o] == idx for o in out)
    assert d.stats()["frames_decoded"] == len(idx)  # eight asks, one decode per frame


# ------------------------------------------------------------------ damaged files

@pytest.mark.parametrize("name,err", [
    ("missing", VideoNotFound), ("dir", VideoNotFound), ("zero_length", VideoEmpty), ("audio_only", VideoEmpty),
    ("trunc_mid_mdat", VideoCorrupt), ("trunc_moov", VideoCorrupt), ("fast_trunc_mid_mdat", VideoCorrupt),
    ("random_bytes", VideoCorrupt), ("header_then_garbage", VideoCorrupt), ("text", VideoCorrupt),
])
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_damaged_file_gives_typed_error_quickly(media, name, err, backend):
    path = str(media["dir"] / "nope.mp4") if name == "missing" else str(media[name])
    d = FrameDecoder(8 * 2**20, 2, probe_timeout_s=10, backend=backend)
    t0 = time.perf_counter()
    with pytest.raises(err) as exc:
        d.frames(path, [0])
    assert time.perf_counter() - t0 < 5
    assert path in str(exc.value) and exc.value.path == path
    with pytest.raises(err):  # remembered: the second ask fails at once, without a new probe
        t1 = time.perf_counter()
        VideoReader(path, decoder=d)
    assert time.perf_counter() - t1 < 0.5
    assert [read_counter(f) for f in d.frames(str(media["good"]), [7])] == [7]  # the decoder still works


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_damaged_files_in_process_without_probe(media, backend):
    """validate=False: decord and PyAV raise (they do not crash) on each damaged file, and the
    error comes back typed; the decoder goes on serving good files."""
    d = FrameDecoder(8 * 2**20, 2, validate=False, backend=backend)
    for name in ("trunc_mid_mdat", "trunc_moov", "fast_trunc_mid_mdat", "random_bytes", "header_then_garbage",
                 "text", "audio_only"):
        with pytest.raises(VideoEmpty if name == "audio_only" else VideoCorrupt):
            d.frames(str(media[name]), [0, 150, 299])
    assert [read_counter(f) for f in d.frames(str(media["good"]), [299, 0])] == [299, 0]


def test_decoder_hang_is_cut_off_by_the_probe(media):
    path = str(media["ts_hang"])
    d = FrameDecoder(8 * 2**20, 2, probe_timeout_s=3)
    t0 = time.perf_counter()
    with pytest.raises(VideoDecodeTimeout):
        d.frames(path, [0])
    assert time.perf_counter() - t0 < 10
    t1 = time.perf_counter()
    with pytest.raises(VideoDecodeTimeout):
        d.info(path)
    assert time.perf_counter() - t1 < 0.1


def test_decoder_hang_in_process_is_cut_off_by_the_decode_timeout(media):
    # Run in a child: the hung native thread cannot be killed and would spin on a core for
    # the rest of the test session. The child reports what its caller saw, then exits hard.
    code = (
        "import os, sys, time\n"
        "from env.video import FrameDecoder\n"
        "d = FrameDecoder(2**20, 2, validate=False, decode_timeout_s=1.5)\n"
        f"path = {str(media['ts_hang'])!r}\n"
        "print('first', [x.shape for x in d.frames(path, [0])], flush=True)\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    d.frames(path, [259])\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, round(time.perf_counter() - t, 1), flush=True)\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    d.frames(path, [0, 1])\n"
        "except Exception as e:\n"
        "    print('again', type(e).__name__, round(time.perf_counter() - t, 2), flush=True)\n"
        "os._exit(0)\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("first"), r.stdout + r.stderr[-500:]
    kind, secs = lines[1].split()
    assert kind == "VideoDecodeTimeout" and 1.4 < float(secs) < 6, lines
    assert lines[2].startswith("again VideoDecodeTimeout") and float(lines[2].split()[-1]) < 0.1, lines


def test_probe_reports_a_crashed_decoder_process(media, monkeypatch):
    import env.video as video

    monkeypatch.setattr(video, "_probe_command", lambda *a: [sys.executable, "-c", "import os; os.abort()"])  # a real SIGABRT
    with pytest.raises(VideoCorrupt, match="crashed"):
        video.probe_video(str(media["good"]), timeout_s=10)


def test_a_rewritten_file_is_read_afresh(media, tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(media["good"].read_bytes())
    d = FrameDecoder(8 * 2**20, 2)
    assert read_counter(d.frames(str(path), [3])[0]) == 3
    write_video(tmp_path / "w.mp4", counter_frames(40, offset=500), FPS, gop=GOP)
    (tmp_path / "w.mp4").replace(path)
    assert d.info(str(path)).num_frames == 40
    assert read_counter(d.frames(str(path), [3])[0]) == 503
