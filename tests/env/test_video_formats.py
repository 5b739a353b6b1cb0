"""Real-world video through env/video.py: a codec matrix, variable frame rate and rotation, each
encoded here with PyAV and read back through both backends (decord and PyAV).

Every frame carries its index as binary blocks (test_video.counter_frames), so each frame
returned for a time t is checked to be the one shown at t: the last frame whose presentation
timestamp is <= t. Durations are checked to the end of the last frame.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from test_video import counter_frames, read_counter

from env.errors import VideoCorrupt, VideoEmpty, VideoError
from env.video import TIME_EPS, FrameDecoder, VideoReader

N = 96
# (name, codec, pixel format, container suffix)
MATRIX = [
    ("h264", "libx264", "yuv420p", "mp4"),
    ("hevc", "libx265", "yuv420p", "mp4"),
    ("hevc10", "libx265", "yuv420p10le", "mp4"),
    ("vp9", "libvpx-vp9", "yuv420p", "webm"),
    ("av1", "libsvtav1", "yuv420p", "mp4"),
    ("mpeg4", "mpeg4", "yuv420p", "mp4"),
    ("mjpeg", "mjpeg", "yuvj420p", "avi"),
]


def encode(path: Path, codec: str, pix: str, ticks: list[int], tb: Fraction, rotation: int = 0, **options) -> Path:
    """Counter frames shown at ticks[i] * tb (one more tick value ends the last frame).

    rotation: the picture is stored turned clockwise by that many degrees, with a display matrix
    that turns it back, as a phone writes a portrait recording."""
    frames = list(counter_frames(len(ticks) - 1))
    turns = rotation // 90
    with av_open(path, options) as out:
        s = out.add_stream(codec, rate=Fraction(1) / (tb * (ticks[1] - ticks[0])))
        h, w = frames[0].shape[:2]
        s.width, s.height = (h, w) if turns % 2 else (w, h)
        s.pix_fmt, s.time_base = pix, tb
        s.codec_context.time_base = tb
        if rotation:
            s.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            import av

            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(a, -turns)), format="rgb24")
            f.pts, f.time_base, f.duration = ticks[i], tb, ticks[i + 1] - ticks[i]
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return path


def av_open(path: Path, options: dict):
    import av

    return av.open(str(path), "w", options=options)


def expected_index(ticks: list[int], tb: Fraction, t: float) -> int:
    """The frame shown at t: the last whose start <= t + TIME_EPS (clamped), in exact arithmetic."""
    starts = [(k - ticks[0]) * tb for k in ticks[:-1]]
    tt = Fraction(t) + Fraction(TIME_EPS)
    i = sum(1 for s in starts if s <= tt) - 1
    return min(max(i, 0), len(starts) - 1)


CFR_TB = Fraction(1, 48)
CFR_TICKS = [2 * i for i in range(N + 1)]  # 24 fps
VFR_TICKS = [2 * i for i in range(48)] + [96 + 4 * i for i in range(49)]  # 48 frames at 24 fps, then 48 at 12: 6 s


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, list[int], Fraction]]:
    d = tmp_path_factory.mktemp("formats")
    out = {}
    for name, codec, pix, ext in MATRIX:
        out[name] = (encode(d / f"{name}.{ext}", codec, pix, CFR_TICKS, CFR_TB), CFR_TICKS, CFR_TB)
    out["vfr"] = (encode(d / "vfr.mp4", "libx264", "yuv420p", VFR_TICKS, CFR_TB), VFR_TICKS, CFR_TB)
    for rot in (90, 270):
        out[f"rot{rot}"] = (encode(d / f"rot{rot}.mp4", "libx264", "yuv420p", CFR_TICKS, CFR_TB, rot), CFR_TICKS, CFR_TB)
    return out


def times_to_check(duration: float, rng: np.random.Generator) -> list[float]:
    return [0.0, 2.5, 5.0, duration - 1e-3, duration + 1.0, -1.0] + list(rng.uniform(0, duration, 24))


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("name", [m[0] for m in MATRIX] + ["vfr", "rot90", "rot270"])
def test_frame_shown_at_each_time_is_exact(files, name, backend):
    path, ticks, tb = files[name]
    d = FrameDecoder(32 * 2**20, 4, backend=backend)
    vr = VideoReader(path, decoder=d)
    info = d.info(str(path))
    end = float((ticks[-1] - ticks[0]) * tb)
    assert vr.duration == pytest.approx(end, abs=1e-9), info
    assert (vr.width, vr.height, vr.num_frames) == (160, 96, N), info  # displayed size, upright
    if backend == "pyav" or name == "av1":
        assert info.backend == "pyav", info
    else:
        assert info.backend == "decord", info
    assert info.cfr == (name != "vfr")
    rng = np.random.default_rng()
    times = times_to_check(vr.duration, rng)
    frames, stamps = vr.get_frames(times)
    want = [expected_index(ticks, tb, t) for t in times]
    assert [read_counter(f) for f in frames] == want, f"{name} {backend} times {times}"
    np.testing.assert_allclose(stamps, [float((ticks[i] - ticks[0]) * tb) for i in want])
    # Any order, any size, through the cache and GOP-ordered decoding.
    idx = rng.permutation(N)[:20].tolist()
    assert [read_counter(f) for f in d.frames(str(path), idx, size=(80, 48))] == idx


def test_vfr_figures_from_the_issue(files):
    """48 frames at 24 fps then 48 at 12 fps: 6 s; 2.5 s shows frame 54 and 5.0 s frame 84."""
    path = files["vfr"][0]
    vr = VideoReader(path, decoder=FrameDecoder(8 * 2**20, 2))
    assert vr.duration == pytest.approx(6.0)
    assert [vr.index_for_time(t) for t in (2.5, 5.0, 1.99, 2.0)] == [54, 84, 47, 48]
    frames, stamps = vr.get_frames([2.5, 5.0])
    assert [read_counter(f) for f in frames] == [54, 84]
    np.testing.assert_allclose(stamps, [2.5, 5.0])


def test_av1_goes_to_pyav_and_says_why(files):
    info = FrameDecoder(8 * 2**20, 2).info(str(files["av1"][0]))
    assert info.backend == "pyav" and "decord" in info.why and "video stream" in info.why, info.why
    assert info.codec == "libdav1d" or "av1" in info.codec
    with pytest.raises(VideoEmpty, match="video stream"):  # forced decord: its own error, typed
        FrameDecoder(8 * 2**20, 2, backend="decord").info(str(files["av1"][0]))


def test_rotation_matches_decord(files):
    """decord applies the display matrix itself; PyAV frames are turned by ours. Same pixels, near enough."""
    for rot in (90, 270):
        path = str(files[f"rot{rot}"][0])
        a = FrameDecoder(8 * 2**20, 2, backend="decord").frames(path, [5, 60])
        b = FrameDecoder(8 * 2**20, 2, backend="pyav").frames(path, [5, 60])
        for x, y in zip(a, b):
            assert x.shape == y.shape == (96, 160, 3)
            assert np.abs(x.astype(int) - y.astype(int)).mean() < 3


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_decoder_mode_scaling_of_rotated_files(files, backend):
    """resize="decoder": PyAV scales before turning (at the swapped size); rotated decord files
    are scaled from native frames instead (decord's own scaler gets them wrong)."""
    path = str(files["rot90"][0])
    got = FrameDecoder(8 * 2**20, 2, resize="decoder", backend=backend).frames(path, [7, 70], size=(80, 48))
    assert [g.shape for g in got] == [(48, 80, 3)] * 2 and [read_counter(g) for g in got] == [7, 70]


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_fuzzed_bytes_give_frames_or_typed_errors(files, backend, tmp_path):
    """Random byte damage to H.264 and AV1 files: every ask returns right-shaped frames or a
    VideoError, within the timeouts, and the decoder keeps serving a good file."""
    rng = np.random.default_rng()
    seed = int(rng.integers(2**31))
    rng = np.random.default_rng(seed)
    d = FrameDecoder(8 * 2**20, 4, backend=backend, probe_timeout_s=20, decode_timeout_s=10)
    outcomes = []
    for k in range(6):
        src = files["h264" if k % 2 else "av1"][0]
        data = bytearray(src.read_bytes())
        for _ in range(int(rng.integers(1, 40))):
            data[int(rng.integers(len(data) // 8, len(data)))] = int(rng.integers(256))
        path = tmp_path / f"fuzz{k}{src.suffix}"
        path.write_bytes(bytes(data))
        t0 = time.perf_counter()
        try:
            got = d.frames(str(path), rng.integers(0, N, 6).tolist())
            assert all(g.ndim == 3 and g.shape[2] == 3 for g in got)
            outcomes.append("frames")
        except VideoError as e:
            assert str(path) in str(e)
            outcomes.append(type(e).__name__)
        except ValueError as e:  # a damaged index can shorten the video below the indices asked for
            assert "out of range" in str(e), e
            outcomes.append("range")
        assert time.perf_counter() - t0 < 60, f"seed {seed}"
    good = str(files["h264"][0])
    assert [read_counter(f) for f in d.frames(good, [3, 90])] == [3, 90], f"seed {seed} {outcomes}"


def test_truncated_av1_is_corrupt(files, tmp_path):
    """An AV1 file whose index survives but whose samples stop halfway is VideoCorrupt under both
    backends: PyAV must not quietly serve the frames that happen to be there."""
    fs = encode(tmp_path / "fs.mp4", "libsvtav1", "yuv420p", CFR_TICKS, CFR_TB, movflags="faststart").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(fs[: fs.find(b"mdat") + (len(fs) - fs.find(b"mdat")) // 2])
    for backend in ("auto", "pyav"):
        with pytest.raises(VideoCorrupt, match="truncated"):
            FrameDecoder(8 * 2**20, 2, backend=backend).frames(str(cut), [0])


def test_in_process_probe_agrees_with_the_child(files):
    for name in ("vfr", "av1", "rot90"):
        path = str(files[name][0])
        a = FrameDecoder(8 * 2**20, 2).info(path)
        b = FrameDecoder(8 * 2**20, 2, validate=False).info(path)
        assert a == b, (a, b)
        np.testing.assert_array_equal(a.times, b.times)


def test_tools_see_vfr_time(files):
    """What a tool gets (env.tool.EpisodeVideo): the frames shown at the asked times, and those
    times in the FrameRefs the learner re-decodes from."""
    from env.tool import EpisodeVideo

    video = EpisodeVideo(str(files["vfr"][0]), FrameDecoder(8 * 2**20, 2), 160 * 96)
    assert video.duration == pytest.approx(6.0)
    images, times = video.get_frames([5.0, 2.5, 0.5])
    assert [read_counter(i) for i in images] == [12, 54, 84]
    np.testing.assert_allclose(times, [0.5, 2.5, 5.0])
    assert [video.frame(i).ref.frame_index for i in images] == [12, 54, 84]
    assert [video.frame(i).ref.time for i in images] == pytest.approx([0.5, 2.5, 5.0])


def test_shared_decoder_refuses_a_second_backend():
    from env.video import get_decoder

    dec = get_decoder()
    with pytest.raises(ValueError, match="video_backend"):
        get_decoder(backend="pyav" if dec.backend != "pyav" else "decord")
    assert get_decoder(backend=dec.backend) is dec
