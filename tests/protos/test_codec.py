"""The one codec: round trips of every record, raw numpy buffers, and malformed input as CodecError."""

import msgpack
import numpy as np
import pytest

from protos import CodecError, FrameRef, Group, Status, Trajectory, dumps, loads, read_trajectories, write_trajectories
from protos.codec import COLUMNAR, FRAME_MAGIC, decode_array, encode_array, from_map, from_map_columns, to_map, unpack


def make_traj(rng: np.random.Generator, T: int = 50, media: int = 2, pixels: bool = False) -> Trajectory:
    mask = (rng.random(T) < 0.5).astype(np.uint8)
    return Trajectory(
        token_ids=rng.integers(0, 5000, T), loss_mask=mask,
        behavior_logprobs=np.where(mask, -rng.random(T), 0).astype(np.float32),
        policy_version=np.where(mask, rng.integers(0, 4, T), -1),
        media=[FrameRef(f"/v/{i}.mp4", int(rng.integers(0, 900)), float(rng.random() * 60), (0.1, 0.2, 0.5, 0.9),
                        (320, 180), "ab" * 16) for i in range(media)],
        reward=float(rng.random()), reward_terms={"accuracy": 1.0, "format": -0.5}, status=Status.TRUNCATED,
        group_id="g1", task_id="t1", traj_id=f"t1-{rng.integers(1e9)}", metrics={"turns": 3.0},
        metadata={"error": "", "turn_texts": ["a", "b"]},
        pixels=[rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)] if pixels else None)


def assert_same(a: Trajectory, b: Trajectory):
    for name in ("token_ids", "loss_mask", "behavior_logprobs", "policy_version"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.media == b.media and a.reward == b.reward and a.reward_terms == b.reward_terms
    assert a.status == b.status and a.metadata == b.metadata and a.metrics == b.metrics
    assert (a.pixels is None) == (b.pixels is None)
    if a.pixels is not None:
        assert all(np.array_equal(p, q) for p, q in zip(a.pixels, b.pixels))


@pytest.mark.parametrize("pixels", [False, True])
def test_trajectory_round_trip(pixels):
    rng = np.random.default_rng()
    t = make_traj(rng, T=int(rng.integers(1, 300)), pixels=pixels)
    assert_same(t, loads(dumps(t)))


def test_group_round_trip_and_failed():
    rng = np.random.default_rng()
    g = Group("g", "t", [make_traj(rng), Trajectory.failed("VideoCorrupt: x", task_id="t", group_id="g")], {"k": 1})
    back = loads(dumps(g))
    assert isinstance(back, Group) and back.group_id == "g" and back.metadata == {"k": 1}
    assert_same(g.trajectories[0], back.trajectories[0])
    assert back.trajectories[1].status is Status.FAILED and back.trajectories[1].metadata["error"] == "VideoCorrupt: x"


def test_dumps_is_deterministic_and_thread_safe():
    """The same bytes from threads encoding at once as from one; a failed encode (an unencodable
    value) raises and leaves nothing behind for the next."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng()
    groups = [Group(f"g{i}", "t", [make_traj(rng, T=int(rng.integers(1, 3000))) for _ in range(3)]) for i in range(24)]
    with pytest.raises(TypeError):
        dumps(Group("bad", "t", [make_traj(rng)], {"x": object()}))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(dumps, groups * 3))
    assert got == [dumps(g) for g in groups * 3]


def test_framed_group_is_columnar_and_zero_copy():
    """`dumps` lays a group's per-token fields out as columns: decoding gives views of the bytes, each
    trajectory's arrays are slices of its column, and each column is aligned to its dtype."""
    rng = np.random.default_rng()
    g = Group("g", "t", [make_traj(rng, T=int(rng.integers(1, 400)), pixels=bool(i % 2)) for i in range(4)]
              + [Trajectory.failed("x", group_id="g")])
    data = dumps(g)
    assert data[:4] == FRAME_MAGIC
    obj, section = unpack(data)
    assert obj["kind"] == COLUMNAR and isinstance(obj["arrays"]["token_ids"], dict)
    back, cols = from_map_columns(obj, section)
    for a, b in zip(g.trajectories, back.trajectories, strict=True):
        assert_same(a, b)
    for a, b in zip(from_map(obj, section).trajectories, back.trajectories, strict=True):
        assert_same(a, b)
    assert set(cols) == {"token_ids", "loss_mask", "behavior_logprobs", "policy_version"}
    for name, col in cols.items():
        assert np.array_equal(col, np.concatenate([getattr(t, name) for t in g.trajectories]))
        assert not col.flags.writeable and col.flags.aligned  # a view of the (immutable) bytes
        assert col.ctypes.data % col.dtype.itemsize == 0
        assert all(np.shares_memory(col, getattr(t, name)) for t in back.trajectories if t.num_tokens)


def test_a_broken_field_travels_as_it_is():
    """A field that is not 1-D of one dtype in every trajectory is sent per trajectory, unchanged,
    so that the learner's validation sees (and rejects) exactly what was sent."""
    rng = np.random.default_rng()
    g = Group("g", "t", [make_traj(rng), make_traj(rng)])
    object.__setattr__(g.trajectories[0], "token_ids", g.trajectories[0].token_ids.astype(np.float32))
    obj, section = unpack(dumps(g))
    spec = obj["arrays"]["token_ids"]
    assert isinstance(spec, list) and [a["nd"] for a in spec] == ["float32", "int32"]
    cols = from_map_columns(obj, section)[1]
    assert "token_ids" not in cols and "loss_mask" in cols


def test_inline_layout_still_loads():
    rng = np.random.default_rng()
    g = Group("g", "t", [make_traj(rng), make_traj(rng, pixels=True)])
    back = loads(msgpack.packb(to_map(g), use_bin_type=True))
    for a, b in zip(g.trajectories, back.trajectories):
        assert_same(a, b)


def test_corrupted_frames_are_codec_errors_or_decode():
    """Any byte of a framed group flipped: loads either decodes or raises CodecError, nothing else."""
    rng = np.random.default_rng()
    data = bytearray(dumps(Group("g", "t", [make_traj(rng, T=20, media=1) for _ in range(2)])))
    for _ in range(400):
        junk = bytearray(data)
        for i in rng.integers(0, len(junk), int(rng.integers(1, 4))):
            junk[i] = int(rng.integers(0, 256))
        try:
            loads(bytes(junk[:int(rng.integers(len(junk) // 2, len(junk) + 1))]))
        except CodecError:
            pass


def test_arrays_are_raw_buffers_not_pickle():
    t = make_traj(np.random.default_rng(0))
    m = to_map(t)
    assert m["token_ids"]["nd"] == "int32" and bytes(m["token_ids"]["data"]) == t.token_ids.tobytes()
    assert b"pickle" not in dumps(t) and b"numpy" not in dumps(t)


def test_byte_swapped_arrays_travel_as_native():
    swapped = np.arange(-5, 5, dtype=">i4")
    back = decode_array(msgpack.unpackb(msgpack.packb(encode_array(swapped))))
    assert back.dtype == np.dtype("int32") and np.array_equal(back, swapped)


def test_file_round_trip(tmp_path):
    rng = np.random.default_rng()
    trajs = [make_traj(rng) for _ in range(5)]
    assert write_trajectories(tmp_path / "x.msgpack", trajs) == 5
    for a, b in zip(trajs, read_trajectories(tmp_path / "x.msgpack")):
        assert_same(a, b)


def _mutated_maps():
    base = to_map(make_traj(np.random.default_rng(1)))
    yield "not a map", [1, 2]
    yield "no kind", {k: v for k, v in base.items() if k != "kind"}
    yield "unknown kind", {**base, "kind": "os.system"}
    yield "unknown field", {**base, "evil": 1}
    yield "missing array", {k: v for k, v in base.items() if k != "loss_mask"}
    yield "object dtype", {**base, "token_ids": {"nd": "object", "shape": [1], "data": b"x"}}
    yield "short buffer", {**base, "token_ids": {"nd": "int32", "shape": [50], "data": b"abc"}}
    yield "negative shape", {**base, "token_ids": {"nd": "int32", "shape": [-1], "data": b""}}
    yield "bad status", {**base, "status": "WHATEVER"}
    yield "bad media", {**base, "media": [{"video": "x"}]}
    yield "group of junk", {"kind": "group", "trajectories": [1, 2]}


@pytest.mark.parametrize("name,obj", list(_mutated_maps()), ids=[n for n, _ in _mutated_maps()])
def test_malformed_is_codec_error(name, obj):
    with pytest.raises(CodecError):
        loads(msgpack.packb(obj, use_bin_type=True))


def test_garbage_bytes_are_codec_error():
    rng = np.random.default_rng()
    for _ in range(200):
        with pytest.raises(CodecError):
            loads(rng.bytes(int(rng.integers(0, 64))))
