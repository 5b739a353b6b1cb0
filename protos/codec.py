"""The one codec: records <-> bytes. Numpy arrays travel as raw buffers, never pickle.

Records are msgpack maps with a "kind" key; decoding is explicit per record type,
so a message cannot name an arbitrary class to build. `CodecError` is raised for
anything malformed, which the gRPC server turns into INVALID_ARGUMENT.

Two layouts of the same maps:
* inline (files, hand-built test payloads): an array is the map
  {"nd": dtype-string, "shape": [...], "data": bytes} inside the msgpack;
* framed (what `dumps` writes, the wire): `FRAME_MAGIC`, the header length and the
  data offset (uint32 little-endian each), the msgpack header, padding, then a data
  section holding every array's bytes. In the header an array is
  {"nd", "shape", "at": offset into the data section}. A group's arrays are laid out
  field by field (all token_ids, then all loss_masks, ...), each at its natural
  alignment, so one field of the whole group is one contiguous column, and the group's
  header is columnar too (see `_columnar_to_map`). Decoding is then zero-copy: every
  array is a view of the received bytes, and the learner validates a group's columns
  in one numpy pass each without concatenating (`from_map_columns`). msgpack's inline
  form copies every array out of the message and cannot give columns; on a 0.43 MB
  group that, with building a map per trajectory and per media ref, was most of the
  learner's cost per group.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

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
FRAME_MAGIC = b"WFT\x01"  # 0x57 would be msgpack's int 87 followed by extra data: never a valid inline record
_PREFIX = struct.Struct("<4sII")  # magic, header length, data offset (from the start of the frame)
_ALIGN = 8  # the data section starts 8-byte aligned within the message that carries the frame


class CodecError(ValueError):
    """Bytes that do not decode to a valid record."""


class _DataSection:
    """The arrays of a framed record, in the order added, each at its dtype's natural alignment."""

    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.size = 0

    def add(self, a: np.ndarray) -> int:
        """Append `a`'s bytes; returns their offset. No copy: the pieces are views, joined once by the caller."""
        pad = -self.size % a.dtype.itemsize
        if pad:
            self.pieces.append(bytes(pad))
            self.size += pad
        at = self.size
        if a.nbytes:  # memoryview cannot cast an empty array
            self.pieces.append(memoryview(a).cast("B"))
            self.size += a.nbytes
        return at


def encode_array(a: np.ndarray, section: Optional[_DataSection] = None) -> dict:
    a = np.ascontiguousarray(a)
    name = _NAME_OF.get(a.dtype)
    if name is None:  # not a native-order allowed dtype: a byte-swapped one is converted, the rest refused
        if a.dtype.name not in _DTYPES:
            raise CodecError(f"dtype {a.dtype} cannot be encoded")
        a, name = a.astype(a.dtype.newbyteorder("=")), a.dtype.name
    if section is not None:
        return {"nd": name, "shape": list(a.shape), "at": section.add(a)}
    # memoryview avoids a copy through tobytes() (2.5x faster packing for large arrays).
    return {"nd": name, "shape": list(a.shape), "data": memoryview(a).cast("B") if a.nbytes else b""}


def decode_array(d: Any, data: Optional[memoryview] = None) -> np.ndarray:
    """The array an encoded map describes; `data` is the frame's data section for an "at" array."""
    if not isinstance(d, dict) or len(d) != 3 or "nd" not in d or "shape" not in d:
        raise CodecError("array must be a map with keys nd, shape and data or at")
    dtype = _DTYPE_OF.get(d["nd"]) if isinstance(d["nd"], str) else None
    if dtype is None:
        raise CodecError(f"dtype {d['nd']!r} is not allowed")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CodecError(f"bad array shape {shape!r}")
    # math.prod, not np.prod: same product for these small int lists, without numpy's per-call overhead.
    count = math.prod(shape)
    if "at" in d:
        at = d["at"]
        if data is None:
            raise CodecError("an array with an offset outside a framed record")
        if not isinstance(at, int) or at < 0 or at + dtype.itemsize * count > len(data):
            raise CodecError(f"array at {at!r} of shape {shape} and dtype {dtype} lies outside the data section")
        a = np.frombuffer(data, dtype=dtype, count=count, offset=at)  # a view of the received bytes
    else:
        raw = d.get("data")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.itemsize * count:
            raise CodecError(f"array data length does not match shape {shape} and dtype {dtype}")
        a = np.frombuffer(raw, dtype=dtype)  # zero-copy view of the bytes msgpack made
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


def _traj_to_map(t: Trajectory, section: Optional[_DataSection] = None) -> dict:
    out = {"kind": "trajectory"}
    for name in _TRAJ_FIELDS:
        v = getattr(t, name)
        if name in _ARRAY_FIELDS:
            out[name] = encode_array(v, section)
        elif name == "media":
            out[name] = [_frame_ref_to_map(r) for r in v]
        elif name == "status":
            out[name] = v.value
        elif name == "pixels":
            out[name] = None if v is None else [encode_array(p, section) for p in v]
        elif name == "children":
            out[name] = [_traj_to_map(c, section) for c in v]
        else:
            out[name] = v
    return out


def _group_to_map(g: Group) -> dict:
    return {"kind": "group", "group_id": g.group_id, "task_id": g.task_id, "metadata": g.metadata,
            "trajectories": [_traj_to_map(t) for t in g.trajectories]}


# ---- the columnar layout of a framed group
# A group's header holds one list per trajectory field (index i = trajectory i) instead of
# one map per trajectory, its media flattened into one list per FrameRef field, and each
# per-token field as a column {"nd", "at", "lengths"} in the data section. Decoding then
# builds few Python objects (most of the old decode cost) and validation reads the columns.
# A field whose arrays are not all 1-D of one dtype (only a broken trajectory has that) is
# sent as a list of per-trajectory array maps instead, so that validation sees it as it is.
COLUMNAR = "group_columnar"
_SCALAR_FIELDS = ("traj_id", "group_id", "task_id", "status", "reward", "reward_terms", "metrics", "metadata", "pixels",
                  "children")


def _columnar_to_map(g: Group, section: _DataSection) -> dict:
    trajs = g.trajectories
    arrays: dict[str, Any] = {}
    for name in _ARRAY_FIELDS:
        arrs = [getattr(t, name) for t in trajs]
        dtype = arrs[0].dtype if arrs else None
        if arrs and dtype in _NAME_OF and all(a.ndim == 1 and a.dtype == dtype for a in arrs):
            ats = [section.add(np.ascontiguousarray(a)) for a in arrs]  # one dtype: no padding between them
            arrays[name] = {"nd": _NAME_OF[dtype], "at": ats[0], "lengths": [len(a) for a in arrs]}
        else:
            arrays[name] = [encode_array(a, section) for a in arrs]
    refs = [r for t in trajs for r in t.media]
    media = {"count": [len(t.media) for t in trajs], "video": [r.video for r in refs],
             "frame_index": [r.frame_index for r in refs], "time": [r.time for r in refs],
             "crop": [c for r in refs for c in r.crop], "size": [s for r in refs for s in r.size],
             "content_hash": [r.content_hash for r in refs]}
    traj = {name: [getattr(t, name) for t in trajs] for name in _SCALAR_FIELDS}
    traj["status"] = [t.status.value for t in trajs]
    traj["pixels"] = [None if t.pixels is None else [encode_array(p, section) for p in t.pixels] for t in trajs]
    traj["children"] = [[_traj_to_map(c, section) for c in t.children] for t in trajs]
    return {"kind": COLUMNAR, "group_id": g.group_id, "task_id": g.task_id, "metadata": g.metadata,
            "traj": traj, "arrays": arrays, "media": media}


def _list_field(d: dict, key: str, n: int, what: str) -> list:
    v = d.get(key)
    if not isinstance(v, list) or len(v) != n:
        raise CodecError(f"{what}.{key} must be a list of {n}")
    return v


def _columnar_columns(d: dict, data: Optional[memoryview]) -> dict[str, np.ndarray]:
    """The per-token fields a columnar group sends as columns (views of `data`); CodecError if one is bad."""
    cols = {}
    for name, spec in d["arrays"].items():
        if isinstance(spec, dict):
            if set(spec) != {"nd", "at", "lengths"} or not isinstance(spec["lengths"], list) or not all(
                    type(n) is int and n >= 0 for n in spec["lengths"]):
                raise CodecError(f"column {name} must be a map of nd, at and non-negative lengths")
            cols[name] = decode_array({"nd": spec["nd"], "shape": [sum(spec["lengths"])], "at": spec["at"]}, data)
    return cols


def _columnar_from_map(d: dict, data: Optional[memoryview]) -> tuple[Group, dict[str, np.ndarray]]:
    """The group, and the per-token fields it sends as columns (its trajectories' arrays are slices of these)."""
    traj, arrays, media = d.get("traj"), d.get("arrays"), d.get("media")
    if not (isinstance(traj, dict) and isinstance(arrays, dict) and isinstance(media, dict)):
        raise CodecError("a columnar group needs the maps traj, arrays and media")
    if set(arrays) != set(_ARRAY_FIELDS) or set(traj) != set(_SCALAR_FIELDS):
        raise CodecError(f"a columnar group has the arrays {sorted(_ARRAY_FIELDS)} and the fields {sorted(_SCALAR_FIELDS)}")
    ids = traj["traj_id"]
    n = len(ids) if isinstance(ids, list) else -1
    fields = {k: _list_field(traj, k, n, "traj") for k in _SCALAR_FIELDS}
    per_token: dict[str, list[np.ndarray]] = {}
    cols = _columnar_columns(d, data)
    for name, spec in arrays.items():
        if name in cols:
            ends = list(itertools.accumulate(spec["lengths"]))
            if len(ends) != n:
                raise CodecError(f"column {name} has {len(ends)} lengths for {n} trajectories")
            col = cols[name]
            per_token[name] = [col[a:b] for a, b in zip([0, *ends], ends)]  # views of the column
        else:
            per_token[name] = [decode_array(a, data) for a in _list_field(arrays, name, n, "arrays")]
    refs = _columnar_media(media, n)
    trajs, start = [], 0
    try:
        for i, count in enumerate(media["count"]):
            pixels = fields["pixels"][i]
            trajs.append(Trajectory(
                per_token["token_ids"][i], per_token["loss_mask"][i], per_token["behavior_logprobs"][i],
                per_token["policy_version"][i], media=refs[start:start + count], reward=float(fields["reward"][i]),
                reward_terms=dict(fields["reward_terms"][i]), status=Status(fields["status"][i]),
                group_id=str(fields["group_id"][i]), task_id=str(fields["task_id"][i]), traj_id=str(ids[i]),
                metrics=dict(fields["metrics"][i]), metadata=dict(fields["metadata"][i]),
                pixels=None if pixels is None else [decode_array(p, data) for p in pixels],
                children=_children_from_maps(fields["children"][i], data)))
            start += count
    except (ValueError, TypeError) as e:
        raise CodecError(f"bad trajectory: {e}") from None
    return Group(group_id=str(d.get("group_id", "")), task_id=str(d.get("task_id", "")), trajectories=trajs,
                 metadata=dict(d.get("metadata") or {})), cols


def _columnar_media(media: dict, n: int) -> list[FrameRef]:
    """All FrameRefs of the group, in trajectory order, checked for types (not values: validation's job)."""
    counts = _list_field(media, "count", n, "media")
    if not _types_in(counts, int) or (counts and min(counts) < 0):
        raise CodecError("media.count must hold non-negative ints")
    m = sum(counts)
    video, index, time_, hash_ = (_list_field(media, k, m, "media") for k in ("video", "frame_index", "time", "content_hash"))
    crop, size = _list_field(media, "crop", 4 * m, "media"), _list_field(media, "size", 2 * m, "media")
    if not (_types_in(video, str) and _types_in(hash_, str) and _types_in(index, int) and _types_in(size, int)):
        raise CodecError("media: video and content_hash must be strings, frame_index and size ints")
    try:  # msgpack keeps 0 and 1 as ints: crops and times may come as ints
        time_ = time_ if _types_in(time_, float) else [float(t) for t in time_]
        crop = crop if _types_in(crop, float) else [float(c) for c in crop]
    except (TypeError, ValueError) as e:
        raise CodecError(f"media: time and crop must be numbers ({e})") from None
    crops = zip(crop[0::4], crop[1::4], crop[2::4], crop[3::4])
    return list(map(_frame_ref, video, index, time_, crops, zip(size[0::2], size[1::2]), hash_))


def _types_in(values: list, kind: type) -> bool:
    """Every value is exactly of type `kind` (bool is not an int here); one C-level pass."""
    return set(map(type, values)) <= {kind}


_FRAME_REF_FIELDS = tuple(fld.name for fld in dataclasses.fields(FrameRef))


def _frame_ref(*values: Any) -> FrameRef:
    # FrameRef's frozen __init__ sets each field through object.__setattr__; for the few dozen refs
    # of every received group, filling __dict__ at once is about twice as fast. Same object.
    ref = object.__new__(FrameRef)
    object.__setattr__(ref, "__dict__", dict(zip(_FRAME_REF_FIELDS, values)))
    return ref


def _traj_from_map(d: dict, data: Optional[memoryview] = None) -> Trajectory:
    unknown = d.keys() - _TRAJ_KEYS
    if unknown:
        raise CodecError(f"unknown trajectory fields {sorted(unknown)}")
    missing = set(_ARRAY_FIELDS) - d.keys()
    if missing:
        raise CodecError(f"trajectory misses {sorted(missing)}")
    kw = {k: v for k, v in d.items() if k != "kind"}
    for name in _ARRAY_FIELDS:
        kw[name] = decode_array(kw[name], data)
    kw["media"] = [_frame_ref_from_map(r) for r in kw.get("media", [])]
    if kw.get("pixels") is not None:
        kw["pixels"] = [decode_array(p, data) for p in kw["pixels"]]
    kw["children"] = _children_from_maps(kw.get("children", []), data)
    try:
        kw["status"] = Status(kw.get("status", "COMPLETED"))
        return Trajectory(**kw)
    except (ValueError, TypeError) as e:
        raise CodecError(f"bad trajectory: {e}") from None


def _children_from_maps(maps: Any, data: Optional[memoryview]) -> list[Trajectory]:
    """A trajectory's sub-agent trajectories; they may not have children of their own."""
    if not isinstance(maps, list):
        raise CodecError("children must be a list of trajectories")
    out = []
    for m in maps:
        if not isinstance(m, dict) or m.get("kind") != "trajectory" or m.get("children"):
            raise CodecError("a child must be a trajectory map without children of its own")
        out.append(_traj_from_map(m, data))
    return out


def to_map(rec: Record, section: Optional[_DataSection] = None) -> dict:
    """A record as a msgpack-ready map; with `section`, its arrays' bytes go there instead (framed)."""
    if isinstance(rec, Trajectory):
        return _traj_to_map(rec, section)
    if isinstance(rec, Group):
        return _group_to_map(rec) if section is None else _columnar_to_map(rec, section)
    if isinstance(rec, FrameRef):
        return {"kind": "frame_ref", **_frame_ref_to_map(rec)}
    raise CodecError(f"cannot encode {type(rec).__name__}")


def from_map(d: Any, data: Optional[memoryview] = None) -> Record:
    """The record a map describes (`data`: a framed record's data section); CodecError if it is not a valid one."""
    if not isinstance(d, dict) or "kind" not in d:
        raise CodecError("record must be a map with a 'kind'")
    kind = d["kind"]
    if kind == "trajectory":
        return _traj_from_map(d, data)
    if kind == "group":
        trajs = d.get("trajectories")
        if not isinstance(trajs, list):
            raise CodecError("group.trajectories must be a list")
        items = [from_map(t, data) for t in trajs]
        if not all(isinstance(t, Trajectory) for t in items):
            raise CodecError("group.trajectories must hold trajectories")
        return Group(group_id=str(d.get("group_id", "")), task_id=str(d.get("task_id", "")),
                     trajectories=items, metadata=dict(d.get("metadata") or {}))
    if kind == COLUMNAR:
        return _columnar_from_map(d, data)[0]
    if kind == "frame_ref":
        return _frame_ref_from_map(d)
    raise CodecError(f"unknown record kind {kind!r}")


def _frame_pieces(rec: Record, before: Callable[[int], bytes]) -> list[Any]:
    """The pieces of before(n) + the framed record (n bytes), to be joined once.

    The padding after the header makes the data section start 8-byte aligned counted from
    the first byte of `before`: a receiver holding the whole message in one (aligned)
    buffer gets aligned arrays, which numpy reduces about twice as fast.
    """
    section = _DataSection()
    return frame_pieces(to_map(rec, section), section, before)


def frame_pieces(header_map: dict, section: _DataSection, before: Callable[[int], bytes]) -> list[Any]:
    """`_frame_pieces` of a map made by `to_map(rec, section)` (tests edit the map in between)."""
    header = msgpack.packb(header_map, use_bin_type=True)
    pad, head = 0, b""
    for _ in range(3):  # len(before(n)) may grow with n by a byte at a varint boundary; settles at once
        n = _PREFIX.size + len(header) + pad + section.size
        head = before(n)
        want = -(len(head) + _PREFIX.size + len(header)) % _ALIGN
        if want == pad:
            break
        pad = want
    prefix = _PREFIX.pack(FRAME_MAGIC, len(header), _PREFIX.size + len(header) + pad)
    return [head, prefix, header, bytes(pad), *section.pieces]


def dumps(rec: Record) -> bytes:
    """Encode one record to bytes (framed: see the module docstring)."""
    return b"".join(_frame_pieces(rec, lambda n: b""))


def dumps_framed(rec: Record, head: Callable[[int], bytes]) -> bytes:
    """head(n) + dumps(rec), where n is the length of the record's bytes, with one copy of the arrays.

    For a transport that puts a length-prefixed header before the record (a protobuf field):
    `head + dumps(rec)` would copy the payload twice. The record's arrays are aligned counted
    from the start of `head` (so the padding may differ from `dumps(rec)`'s; both decode the same).
    """
    return b"".join(_frame_pieces(rec, head))


def unpack(data: Union[bytes, memoryview]) -> tuple[Any, Optional[memoryview]]:
    """(map, data section) of a framed record, (map, None) of an inline one; CodecError if neither."""
    view = memoryview(data)
    if view[:len(FRAME_MAGIC)] == FRAME_MAGIC:
        if len(view) < _PREFIX.size:
            raise CodecError("frame shorter than its prefix")
        _, hlen, at = _PREFIX.unpack_from(view)
        if not _PREFIX.size + hlen <= at <= len(view):
            raise CodecError(f"frame header of {hlen} bytes and data at {at} do not fit in {len(view)} bytes")
        body, section = view[_PREFIX.size:_PREFIX.size + hlen], view[at:]
    else:
        body, section = view, None
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True), section
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise CodecError(f"not a msgpack record: {e}") from None


def loads(data: Union[bytes, memoryview]) -> Record:
    """Decode bytes made by `dumps` (or an inline msgpack record). Raises CodecError on anything malformed.

    Arrays of a framed record are read-only views of `data`.
    """
    obj, section = unpack(data)
    return from_map(obj, section)


def from_map_columns(d: Any, data: Optional[memoryview]) -> tuple[Record, dict[str, np.ndarray]]:
    """`from_map`, plus each per-token field a framed (columnar) group sends as one column: views of
    `data`, decoded once for both. {} for any other record."""
    if isinstance(d, dict) and d.get("kind") == COLUMNAR:
        return _columnar_from_map(d, data)
    return from_map(d, data), {}


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
