"""The one codec: records <-> msgpack bytes. Numpy arrays travel as raw buffers, never pickle.

An array is the map {"nd": dtype-string, "shape": [...], "data": bytes}; records
are maps with a "kind" key. Decoding is explicit per record type, so a message
cannot name an arbitrary class to build. `CodecError` is raised for anything
malformed, which the gRPC server turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import msgpack
import numpy as np

from protos.records import FrameRef, Group, Status, Trajectory

# dtypes allowed on the wire: plain numeric types only (no object arrays).
_DTYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64", "bool"}
_ARRAY_FIELDS = ("token_ids", "loss_mask", "behavior_logprobs", "policy_version")
# Looked up per array rather than rebuilt: np.dtype(name) and dtype.name cost microseconds each,
# which at a few dozen arrays a group is a noticeable share of the codec's time.
_DTYPE_OF = {n: np.dtype(n) for n in _DTYPES}
_NAME_OF = {np.dtype(n): n for n in _DTYPES}  # native byte order only; anything else takes the slow path
_TRAJ_FIELDS = tuple(fld.name for fld in dataclasses.fields(Trajectory))
_TRAJ_KEYS = frozenset(_TRAJ_FIELDS) | {"kind"}

Record = Union[Trajectory, Group, FrameRef]


class CodecError(ValueError):
    """Bytes that do not decode to a valid record."""


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    name = _NAME_OF.get(a.dtype) or a.dtype.name
    if name not in _DTYPES:
        raise CodecError(f"dtype {a.dtype} cannot be encoded")
    # memoryview avoids a copy through tobytes() (2.5x faster packing for large arrays).
    return {"nd": name, "shape": list(a.shape), "data": memoryview(a).cast("B")}


def decode_array(d: Any) -> np.ndarray:
    if not isinstance(d, dict) or set(d) != {"nd", "shape", "data"}:
        raise CodecError("array must be a map with keys nd, shape, data")
    dtype = _DTYPE_OF.get(d["nd"]) if isinstance(d["nd"], str) else None
    if dtype is None:
        raise CodecError(f"dtype {d['nd']!r} is not allowed")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CodecError(f"bad array shape {shape!r}")
    data = d["data"]
    # math.prod, not np.prod: same product for these small int lists, without numpy's per-call overhead.
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize * math.prod(shape):
        raise CodecError(f"array data length does not match shape {shape} and dtype {dtype}")
    # Zero-copy view of the bytes msgpack made; a 1-D array needs no reshape.
    a = np.frombuffer(data, dtype=dtype)
    return a if len(shape) == 1 else a.reshape(shape)


def _frame_ref_to_map(r: FrameRef) -> dict:
    return {"video": r.video, "frame_index": r.frame_index, "time": r.time, "crop": list(r.crop),
            "size": list(r.size), "content_hash": r.content_hash}


def _frame_ref_from_map(d: Any) -> FrameRef:
    try:
        return FrameRef(video=str(d["video"]), frame_index=int(d["frame_index"]), time=float(d["time"]),
                        crop=tuple(map(float, d["crop"])), size=tuple(map(int, d["size"])),
                        content_hash=str(d["content_hash"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"bad FrameRef: {e}") from None


def _traj_to_map(t: Trajectory) -> dict:
    out = {"kind": "trajectory"}
    for name in _TRAJ_FIELDS:
        v = getattr(t, name)
        if name in _ARRAY_FIELDS:
            out[name] = encode_array(v)
        elif name == "media":
            out[name] = [_frame_ref_to_map(r) for r in v]
        elif name == "status":
            out[name] = v.value
        elif name == "pixels":
            out[name] = None if v is None else [encode_array(p) for p in v]
        else:
            out[name] = v
    return out


def _traj_from_map(d: dict) -> Trajectory:
    unknown = d.keys() - _TRAJ_KEYS
    if unknown:
        raise CodecError(f"unknown trajectory fields {sorted(unknown)}")
    missing = set(_ARRAY_FIELDS) - d.keys()
    if missing:
        raise CodecError(f"trajectory misses {sorted(missing)}")
    kw = {k: v for k, v in d.items() if k != "kind"}
    for name in _ARRAY_FIELDS:
        kw[name] = decode_array(kw[name])
    kw["media"] = [_frame_ref_from_map(r) for r in kw.get("media", [])]
    if kw.get("pixels") is not None:
        kw["pixels"] = [decode_array(p) for p in kw["pixels"]]
    try:
        kw["status"] = Status(kw.get("status", "COMPLETED"))
        return Trajectory(**kw)
    except (ValueError, TypeError) as e:
        raise CodecError(f"bad trajectory: {e}") from None


def to_map(rec: Record) -> dict:
    """A record as a msgpack-ready map."""
    if isinstance(rec, Trajectory):
        return _traj_to_map(rec)
    if isinstance(rec, Group):
        return {"kind": "group", "group_id": rec.group_id, "task_id": rec.task_id, "metadata": rec.metadata,
                "trajectories": [_traj_to_map(t) for t in rec.trajectories]}
    if isinstance(rec, FrameRef):
        return {"kind": "frame_ref", **_frame_ref_to_map(rec)}
    raise CodecError(f"cannot encode {type(rec).__name__}")


def from_map(d: Any) -> Record:
    """The record a map describes; CodecError if it is not a valid one."""
    if not isinstance(d, dict) or "kind" not in d:
        raise CodecError("record must be a map with a 'kind'")
    kind = d["kind"]
    if kind == "trajectory":
        return _traj_from_map(d)
    if kind == "group":
        trajs = d.get("trajectories")
        if not isinstance(trajs, list):
            raise CodecError("group.trajectories must be a list")
        items = [from_map(t) for t in trajs]
        if not all(isinstance(t, Trajectory) for t in items):
            raise CodecError("group.trajectories must hold trajectories")
        return Group(group_id=str(d.get("group_id", "")), task_id=str(d.get("task_id", "")),
                     trajectories=items, metadata=dict(d.get("metadata") or {}))
    if kind == "frame_ref":
        return _frame_ref_from_map(d)
    raise CodecError(f"unknown record kind {kind!r}")


_local = threading.local()  # one Packer per thread: a Packer is not thread-safe
_KEEP_PACKER_BYTES = 8 * 2**20


def dumps(rec: Record) -> bytes:
    """Encode one record to bytes."""
    # A reused Packer keeps its grown (and already touched) buffer; packb makes a fresh one per
    # call, and at a few hundred kB the fresh memory's page faults cost more than the packing.
    packer = getattr(_local, "packer", None) or msgpack.Packer(use_bin_type=True)
    _local.packer = None  # a failed pack may leave the packer mid-message: start clean next time
    out = packer.pack(to_map(rec))
    if len(out) <= _KEEP_PACKER_BYTES:  # do not pin a huge buffer (inline pixels) to the thread
        _local.packer = packer
    return out


def dumps_framed(rec: Record, head: Callable[[int], bytes]) -> bytes:
    """head(n) + dumps(rec), where n = len(dumps(rec)), with a single copy of the encoded bytes.

    For a transport that puts a length-prefixed header before the record (a protobuf field):
    `head + dumps(rec)` would copy the payload twice, out of the packer and into the join.
    """
    packer = getattr(_local, "framer", None) or msgpack.Packer(use_bin_type=True, autoreset=False)
    _local.framer = None  # as in dumps: a failed pack must not leave a half-written buffer behind
    packer.pack(to_map(rec))
    with packer.getbuffer() as body:
        out = b"".join((head(len(body)), body))
    packer.reset()
    if len(out) <= _KEEP_PACKER_BYTES:
        _local.framer = packer
    return out


def loads(data: bytes) -> Record:
    """Decode bytes made by `dumps`. Raises CodecError on anything malformed."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise CodecError(f"not a msgpack record: {e}") from None
    return from_map(obj)


def write_trajectories(path: str | Path, trajs: Iterable[Trajectory]) -> int:
    """Write trajectories to a file as a stream of msgpack maps; returns how many."""
    n = 0
    with open(path, "wb") as fh:
        for t in trajs:
            fh.write(msgpack.packb(to_map(t), use_bin_type=True))
            n += 1
    return n


def iter_trajectories(path: str | Path) -> Iterator[Trajectory]:
    """Stream the trajectories of a file written by `write_trajectories`."""
    with open(path, "rb") as fh:
        for obj in msgpack.Unpacker(fh, raw=False, max_buffer_size=2**31 - 1):
            rec = from_map(obj)
            if not isinstance(rec, Trajectory):
                raise CodecError(f"{path}: expected trajectories, found {type(rec).__name__}")
            yield rec


def read_trajectories(path: str | Path) -> list[Trajectory]:
    """All trajectories of a file written by `write_trajectories`."""
    return list(iter_trajectories(path))
