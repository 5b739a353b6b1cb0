"""The wire contract: committed stubs match learner.proto, payloads are the one codec, validation, weight chunking."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from google.protobuf.message import DecodeError

from actors.learner_client import _assemble, encode_group, group_message, parse_weight_message
from configs.schema import LearnerConfig
from learner.server import LearnerServer, _service_handler, build_snapshot, parse_group_message
from learner.validate import REASONS, Limits, reason_of, validate, validate_group
from protos import learner_pb2 as pb
from protos import learner_pb2_grpc  # noqa: F401 - importable as protos.learner_pb2_grpc
from protos.codec import FRAME_MAGIC, dumps, loads
from protos.testing import malformed_payloads, random_group

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("learner_pb2.py", "learner_pb2.pyi", "learner_pb2_grpc.py")
PER_TOKEN_REASONS = {"shape", "length_mismatch", "loss_mask_values", "logprob_nonfinite", "logprob_positive",
                     "logprob_off_mask", "version_off_mask", "version_negative", "version_future", "token_range",
                     "media_video", "media_frame", "media_crop", "media_size", "media_hash", "media_count",
                     "reward_nonfinite"}


def test_committed_stubs_match_the_proto(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True, env=env)
    for name in STUBS:
        fresh, committed = (tmp_path / "protos" / name).read_bytes(), (ROOT / "protos" / name).read_bytes()
        assert fresh == committed, f"protos/{name} is stale: run scripts/gen_protos.sh"
    assert b"from protos import learner_pb2 as" in (ROOT / "protos/learner_pb2_grpc.py").read_bytes()


def test_service_shape_and_server_registration():
    assert pb.DESCRIPTOR.package == "weft.v1"
    svc = pb.DESCRIPTOR.services_by_name["LearnerService"]
    shape = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert shape == {"SubmitGroups": (True, False), "WatchWeights": (False, True), "GetStatus": (False, False)}
    # The server registers the methods by hand (pre-serialized weight chunks): same names, same shapes.
    handler = _service_handler(LearnerServer(LearnerConfig()))  # not started
    for name, (client_streaming, server_streaming) in shape.items():
        details = type("D", (), {"method": f"/{svc.full_name}/{name}", "invocation_metadata": ()})()
        h = handler.service(details)
        assert (h.request_streaming, h.response_streaming) == (client_streaming, server_streaming), name


def test_group_message_carries_the_codec_payload():
    g = random_group(group_size=3, failed=1)
    msg = pb.GroupMessage.FromString(pb.GroupMessage(group_id=g.group_id, payload=dumps(g)).SerializeToString())
    back = loads(msg.payload)
    assert back.group_id == g.group_id and [t.traj_id for t in back.trajectories] == [t.traj_id for t in g.trajectories]
    for a, b in zip(g.trajectories, back.trajectories):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.behavior_logprobs, b.behavior_logprobs)


@pytest.mark.parametrize("payload_len", [0, 1, 127, 128, 16383, 16384, 2**21 + 5])
@pytest.mark.parametrize("group_id", ["", "g", "gé-" * 50])
def test_hand_serialized_group_message_is_protobufs_bytes(group_id, payload_len):
    payload = os.urandom(payload_len)
    want = pb.GroupMessage(group_id=group_id, payload=payload).SerializeToString()
    assert group_message(group_id, payload) == want
    got = parse_group_message(want)
    assert got.group_id == group_id and bytes(got.payload) == payload


def test_encode_group_is_protobufs_bytes_of_the_codec_payload():
    g = random_group(group_size=3, failed=1)
    data = encode_group(g)
    msg = pb.GroupMessage.FromString(data)
    assert data == pb.GroupMessage(group_id=g.group_id, payload=msg.payload).SerializeToString()
    # The payload is the codec's framed group; its arrays are 8-byte aligned counted from the message's
    # first byte (so differently padded than dumps(g), which counts from its own first byte).
    back, want = loads(msg.payload), loads(dumps(g))
    assert [t.traj_id for t in back.trajectories] == [t.traj_id for t in want.trajectories]
    for a, b in zip(back.trajectories, want.trajectories):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.behavior_logprobs, b.behavior_logprobs)
        assert a.media == b.media and a.reward == b.reward and a.status == b.status
    start = len(data) - len(msg.payload)  # the payload is the message's last field
    magic, _, at = struct.unpack_from("<4sII", data, start)
    assert magic == FRAME_MAGIC and (start + at) % 8 == 0


def _field(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + pb.GroupMessage(payload=value).SerializeToString()[1:]  # tag + protobuf's length varint


@pytest.mark.parametrize("data", [
    _field(0x12, b"pay") + _field(0x0A, b"gid"),  # fields out of order
    _field(0x12, b"first") + _field(0x12, b"last"),  # a repeated field: the last one wins
    _field(0x0A, b"gid") + b"\x18\x07" + _field(0x12, b"p"),  # an unknown varint field 3
    _field(0x0A, b"gid") + b"\x12\x85\x80\x80\x80\x00hello",  # a non-minimal length varint
    _field(0x0A, b"gid") + b"\x12\x09short",  # length past the end
    _field(0x0A, b"\xff\xfe") + _field(0x12, b"p"),  # group id not UTF-8
    b"\x12",  # truncated
    b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an over-long varint
    b"",
])
def test_parse_group_message_decides_as_protobuf_does(data):
    both = _both_parse(parse_group_message, pb.GroupMessage.FromString, data)
    if both:
        got, want = both
        assert (got.group_id, bytes(got.payload)) == (want.group_id, want.payload)


def _both_parse(fast, protobuf, data):
    """(fast(data), protobuf(data)); None when protobuf refuses `data` and fast raises the same DecodeError."""
    try:
        want = protobuf(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            fast(data)
        return None
    return fast(data), want


def test_fresh_random_groups_are_valid():
    rng = np.random.default_rng()
    for _ in range(30):
        G, v = int(rng.integers(1, 9)), int(rng.integers(0, 20))
        g = random_group(rng, group_size=G, versions=(max(0, v - 3), v), failed=int(rng.integers(0, G)),
                         media=int(rng.integers(0, 4)), image_token_id=7, num_tokens=int(rng.integers(8, 400)))
        assert validate(dumps(g), Limits(G, v, 1000, 7), g.group_id) is None


def test_each_malformed_kind_gets_its_reason():
    cases = malformed_payloads(group_size=4, vocab_size=1000, image_token_id=7, current_version=3)
    assert len({c.name for c in cases}) >= 20
    for c in cases:
        err = validate(c.payload, Limits(4, 3, 1000, 7), c.group_id)
        assert err is not None and reason_of(err) == c.reason, (c.name, err)
        assert c.reason in REASONS
        if c.reason in PER_TOKEN_REASONS:  # the message names the bad trajectory wherever it sits
            assert c.traj_id in err, (c.name, err)


def _token_rules_broken(g, limits) -> bool:
    """Oracle for the per-token rules, written plainly (one token at a time) to check the vectorised checks."""
    for t in g.trajectories:
        for m, lp, ver, tok in zip(t.loss_mask, t.behavior_logprobs, t.policy_version, t.token_ids):
            if m > 1 or not np.isfinite(lp) or (m == 1 and (lp > 0 or ver < 0)) or (m == 0 and (lp != 0 or ver != -1)):
                return True
            if ver > limits.current_version or not 0 <= tok < limits.vocab_size:
                return True
    return False


def test_per_token_checks_match_a_token_by_token_oracle():
    rng = np.random.default_rng()
    edge = {"loss_mask": [0, 1, 2, 255], "behavior_logprobs": [np.nan, np.inf, -np.inf, 0.5, -0.5, 0.0, -1e-45, 1e-45],
            "policy_version": [-2, -1, 0, 3, 4, 2**31 - 1], "token_ids": [-1, 0, 999, 1000]}
    for _ in range(600):
        g = loads(dumps(random_group(rng, group_size=3, versions=(0, 3), num_tokens=int(rng.integers(8, 40)))))
        for _ in range(int(rng.integers(0, 4))):  # a few tokens set to edge values, anywhere in the group
            t = g.trajectories[int(rng.integers(3))]
            name = str(rng.choice(list(edge)))
            arr = getattr(t, name).copy()
            arr[int(rng.integers(arr.size))] = rng.choice(edge[name])
            setattr(t, name, arr)
        limits = Limits(3, 3, 1000)
        err = validate_group(g, limits)
        if _token_rules_broken(g, limits):
            assert err is not None and reason_of(err) in PER_TOKEN_REASONS, err
        else:  # zeroing a mask token may leave a trajectory without generated tokens
            assert err is None or reason_of(err) == "no_generated_tokens", err


def test_validation_never_raises_on_random_bytes():
    rng = np.random.default_rng()
    good = dumps(random_group(rng, group_size=2))
    for _ in range(200):
        junk = bytearray(good)
        for i in rng.integers(0, len(junk), int(rng.integers(1, 20))):
            junk[i] = int(rng.integers(0, 256))
        err = validate(bytes(junk), Limits(2, 0))
        assert err is None or reason_of(err) in REASONS


@pytest.mark.parametrize("bucket", [1024, 4096, 100_000])
def test_weight_chunks_round_trip(bucket):
    rng = np.random.default_rng()
    sd = {"embed": torch.randn(int(rng.integers(50, 300)), 64, dtype=torch.bfloat16),
          "scalar": torch.tensor(float(rng.random())), "empty": torch.zeros(0, 3),
          "ids": torch.from_numpy(rng.integers(-2**40, 2**40, 77)), "flag": torch.rand(5) > 0.5,
          "half": torch.randn(3, 3, 3, dtype=torch.float16)}
    snap = build_snapshot(9, sd, bucket)
    header, *chunks = [pb.WeightMessage.FromString(m) for m in snap.messages()]
    assert header.header.num_chunks == len(chunks) and header.header.total_bytes == sum(
        t.numel() * t.element_size() for t in sd.values())
    assert [len(c.chunk.data) for c in chunks] == snap.data_bytes and max(snap.data_bytes) <= bucket
    # Hand-serialized (one copy of the tensor bytes): exactly protobuf's bytes of the same message.
    assert [c.SerializeToString() for c in chunks] == list(snap.messages())[1:]
    # ... and read back by the client with the tensor bytes as a view, the rest as protobuf reads it.
    for raw, want in zip(list(snap.messages())[1:], chunks):
        piece = parse_weight_message(raw)
        assert isinstance(piece.data, memoryview) and bytes(piece.data) == want.chunk.data
        assert piece.chunk.SerializeToString() == _without_data(want.chunk).SerializeToString()
    sd["embed"].zero_()  # the snapshot was copied: later trainer updates do not leak into it
    (version, tensors), = list(_assemble(iter([header, *chunks]), announce_only=False))
    assert version == 9 and [n for n, _ in tensors] == list(sd)
    for name, t in tensors:
        ref = sd[name] if name != "embed" else t
        assert t.dtype == ref.dtype and t.shape == ref.shape and torch.equal(t, ref)
    assert tensors[0][1].abs().sum() > 0


def _without_data(chunk: pb.WeightChunk) -> pb.WeightChunk:
    out = pb.WeightChunk()
    out.CopyFrom(chunk)
    out.ClearField("data")
    return out


_CHUNK = pb.WeightChunk(version=3, index=1, slices=[pb.TensorSlice(name="w", dtype="float32", shape=[2], tensor_nbytes=8,
                                                                   nbytes=8)], data=b"\x01" * 8)


@pytest.mark.parametrize("data", [
    pb.WeightMessage(chunk=_CHUNK).SerializeToString(),
    pb.WeightMessage(header=pb.VersionHeader(version=3, num_chunks=2, num_tensors=1, total_bytes=8)).SerializeToString(),
    pb.WeightMessage(chunk=pb.WeightChunk(data=b"ab", version=1)).SerializeToString(),
    _field(0x12, _field(0x22, b"first") + b"\x08\x05" + _field(0x22, b"last")),  # data repeated: the last wins
    _field(0x12, b"\x08\x05" + _field(0x22, b"d") + b"\x2d\x00\x00\x00\x00"),  # an unknown fixed32 field 5
    _field(0x12, b"\x08\x85\x80\x80\x80\x00" + _field(0x22, b"d")),  # a non-minimal varint
    _field(0x12, b"\x08\x05\x22\x09short"),  # data length past the end
    b"\x12\x05\x08\x01",  # chunk length past the end
    b"\x12",
    b"",
])
def test_parse_weight_message_decides_as_protobuf_does(data):
    both = _both_parse(parse_weight_message, pb.WeightMessage.FromString, data)
    if not both:
        return
    got, want = both
    if want.HasField("chunk"):
        assert bytes(got.data) == want.chunk.data
        assert _without_data(got.chunk).SerializeToString() == _without_data(want.chunk).SerializeToString()
    else:
        assert got.chunk is None and (got.header == want.header if want.HasField("header") else got.header is None)
