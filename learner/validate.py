"""Validation of an incoming group: pure functions, an error string or None, never an exception.

Every error string is "<reason>: <detail>", where <reason> is a short stable key
(counted per reason by the server and sent back in the Ack) and <detail> says
what exactly was wrong. The checks (see `REASONS`) cover decoding, array
lengths, dtypes and shapes, logprob and version consistency with the loss
mask, token ranges, media refs, group size, ids, rewards and status.

Dtypes are checked on the raw msgpack map, before `Trajectory.__post_init__`
casts the arrays: a float token-id array would otherwise pass silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from protos.codec import COLUMNAR, CodecError, from_map_columns, unpack
from protos.records import FrameRef, Group, Status, Trajectory

# dtype each per-token array must have on the wire (what protos.records.Trajectory holds).
WIRE_DTYPES = {"token_ids": "int32", "loss_mask": "uint8", "behavior_logprobs": "float32", "policy_version": "int32"}
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_STATUSES = {s.value for s in Status}

# One line per reason key, as counted in StatusReply.rejected.
REASONS = {
    "decode": "payload is not msgpack, not a codec record, or not a Group",
    "group_id": "group id empty, or different from the GroupMessage's group_id",
    "group_id_reused": "group id seen before with different trajectory ids",
    "group_size": "number of trajectories differs from the configured G",
    "traj_id": "a trajectory id is missing or repeated within the group, or its group_id differs",
    "status": "unknown trajectory status",
    "dtype": "a per-token array has the wrong dtype",
    "shape": "a per-token array is not one-dimensional",
    "length_mismatch": "per-token arrays of one trajectory differ in length",
    "loss_mask_values": "loss_mask holds values other than 0 and 1",
    "no_generated_tokens": "a trajectory that did not fail has no loss-mask token, or no trajectory has one",
    "logprob_nonfinite": "a behaviour logprob is NaN or infinite",
    "logprob_positive": "a behaviour logprob on the loss mask is > 0",
    "logprob_off_mask": "a behaviour logprob off the loss mask is not 0",
    "version_off_mask": "policy_version off the loss mask is not -1",
    "version_negative": "policy_version on the loss mask is < 0",
    "version_future": "policy_version is newer than the learner's current version",
    "token_range": "a token id lies outside [0, vocab_size)",
    "media_video": "a media ref has an empty video path",
    "media_frame": "a media ref has a negative frame index or a non-finite / negative time",
    "media_crop": "a media crop is outside [0, 1] or not ordered (x1 < x2, y1 < y2)",
    "media_size": "a media size is not positive",
    "media_hash": "a media content hash is not 32 lowercase hex digits",
    "media_count": "image-token runs differ from the number of media refs",
    "pixels": "inline pixels do not match the media refs or are not uint8 HxWx3",
    "reward_nonfinite": "reward or a reward term is NaN or infinite",
    "malformed": "anything else that made validation itself fail",
}


@dataclass(frozen=True)
class Limits:
    """What a group is checked against: the configured G, the learner's version, the model's vocabulary."""

    group_size: int
    current_version: int
    vocab_size: Optional[int] = None
    image_token_id: Optional[int] = None


def reason_of(error: str) -> str:
    """The reason key of an error string made here."""
    return error.split(":", 1)[0]


def validate(payload: bytes, limits: Limits, envelope_group_id: Optional[str] = None) -> Optional[str]:
    """None if `payload` is a valid encoded group, else "<reason>: <detail>"."""
    return decode_group(payload, limits, envelope_group_id)[1]


def decode_group(payload: bytes, limits: Limits,
                 envelope_group_id: Optional[str] = None) -> tuple[Optional[Group], Optional[str]]:
    """(group, None) for a valid payload, (None, error) otherwise."""
    try:
        obj, section = unpack(payload)
    except Exception as e:  # noqa: BLE001 - any unpack failure is a decode error, never a crash
        return None, f"decode: {type(e).__name__}: {e}"
    try:
        err = _check_wire(obj)
        if err:
            return None, err
        try:
            group, columns = from_map_columns(obj, section)
        except CodecError as e:
            return None, f"decode: {e}"
        if not isinstance(group, Group):
            return None, f"decode: payload is a {type(group).__name__}, not a Group"
        if envelope_group_id is not None and group.group_id != envelope_group_id:
            return None, f"group_id: message says {envelope_group_id!r}, payload says {group.group_id!r}"
        err = validate_group(group, limits, columns)
        return (None, err) if err else (group, None)
    except Exception as e:  # noqa: BLE001 - a bug in a check must not take the server down
        return None, f"malformed: {type(e).__name__}: {e}"


def _check_wire(obj: Any) -> Optional[str]:
    """Checks that need the raw map: array dtypes (before casting) and status strings."""
    if isinstance(obj, dict) and obj.get("kind") == COLUMNAR:
        return _check_columnar_wire(obj)
    if not isinstance(obj, dict) or obj.get("kind") != "group" or not isinstance(obj.get("trajectories"), list):
        return None  # from_map reports the exact decode error
    for i, t in enumerate(obj["trajectories"]):
        if not isinstance(t, dict):
            continue
        status = t.get("status", Status.COMPLETED.value)
        if status not in _STATUSES:
            return f"status: trajectory {i} has status {status!r}, not one of {sorted(_STATUSES)}"
        for name, want in WIRE_DTYPES.items():
            arr = t.get(name)
            if isinstance(arr, dict) and arr.get("nd") != want:
                return f"dtype: trajectory {i} {name} is {arr.get('nd')!r}, expected {want}"
    return None


def _check_columnar_wire(obj: dict) -> Optional[str]:
    """`_check_wire` for the columnar layout: a column has one dtype, a per-trajectory list one each."""
    traj, arrays = obj.get("traj"), obj.get("arrays")
    statuses = traj.get("status") if isinstance(traj, dict) else None
    for i, status in enumerate(statuses if isinstance(statuses, list) else ()):
        if not isinstance(status, str) or status not in _STATUSES:
            return f"status: trajectory {i} has status {status!r}, not one of {sorted(_STATUSES)}"
    for name, want in WIRE_DTYPES.items():
        spec = arrays.get(name) if isinstance(arrays, dict) else None
        if isinstance(spec, dict) and spec.get("nd") != want:
            return f"dtype: {name} is {spec.get('nd')!r}, expected {want}"
        for i, arr in enumerate(spec if isinstance(spec, list) else ()):
            if isinstance(arr, dict) and arr.get("nd") != want:
                return f"dtype: trajectory {i} {name} is {arr.get('nd')!r}, expected {want}"
    return None


def validate_group(group: Group, limits: Limits, columns: Optional[dict[str, np.ndarray]] = None) -> Optional[str]:
    """Semantic checks of a decoded group (dtypes are the wire's business, see `_check_wire`).

    `columns`: per-token fields over the whole group (`protos.codec.from_map_columns`), which spare
    concatenating the trajectories' arrays; a field missing there is concatenated.
    """
    if not group.group_id:
        return "group_id: empty group id"
    trajs = group.trajectories
    if len(trajs) != limits.group_size:
        return f"group_size: {len(trajs)} trajectories, expected {limits.group_size}"
    ids = [t.traj_id for t in trajs]
    if not all(ids):
        return f"traj_id: trajectory {ids.index('')} has no traj_id"
    if len(set(ids)) != len(ids):
        return f"traj_id: repeated traj ids {sorted({i for i in ids if ids.count(i) > 1})}"
    for i, t in enumerate(trajs):
        if t.group_id != group.group_id:
            return f"traj_id: trajectory {i} has group_id {t.group_id!r}, the group is {group.group_id!r}"
        err = _check_shapes(t)
        if err:
            return _at(err, i, t)
    err = _check_tokens(trajs, limits, columns or {})
    if err:
        return err
    # count_nonzero is the cheapest "any" numpy has (no ufunc reduction machinery).
    generated = [np.count_nonzero(t.loss_mask) > 0 for t in trajs]
    refs_ok = _refs_ok([r for t in trajs for r in t.media])
    for i, t in enumerate(trajs):
        if t.status is not Status.FAILED and not generated[i]:
            return _at(f"no_generated_tokens: status {t.status.value} but the loss mask is empty", i, t)
        err = _check_media(t, limits, refs_ok) or _check_reward(t)
        if err:
            return _at(err, i, t)
    if not any(generated):
        return "no_generated_tokens: no trajectory in the group has a generated token"
    return _check_children(trajs, limits)


def _check_children(trajs: list[Trajectory], limits: Limits) -> Optional[str]:
    """Sub-agent trajectories get the same per-token, shape and media checks as their parents."""
    for i, t in enumerate(trajs):
        for c in t.children:
            err = _check_shapes(c) or _check_tokens([c], limits, {}) or _check_media(c, limits)
            if err:
                reason, detail = err.split(":", 1)
                return _at(f"{reason}: in sub-agent {c.traj_id!r}:{detail}", i, t)
    return None


def _at(err: str, i: int, t: Trajectory) -> str:
    """Put the trajectory's index and id into an error string, after its reason."""
    reason, detail = err.split(":", 1)
    return f"{reason}: trajectory {i} ({t.traj_id}):{detail}"


def _check_shapes(t: Trajectory) -> Optional[str]:
    n = t.token_ids.shape[0] if t.token_ids.ndim == 1 else -1
    if n >= 0 and all(a.ndim == 1 and a.shape[0] == n for a in (t.loss_mask, t.behavior_logprobs, t.policy_version)):
        return None  # the common case, decided without building the error's dicts
    arrays = {name: getattr(t, name) for name in WIRE_DTYPES}
    for name, a in arrays.items():
        if a.ndim != 1:
            return f"shape: {name} has shape {a.shape}, expected 1-D"
    lengths = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        return f"length_mismatch: {lengths}"
    return None


def _first(bad: np.ndarray) -> Optional[int]:
    """Index of the first True, or None (one pass: argmax stops at the first True)."""
    i = int(bad.argmax()) if bad.size else 0
    return i if bad.size and bad[i] else None


def _check_tokens(trajs: list[Trajectory], limits: Limits, columns: dict[str, np.ndarray]) -> Optional[str]:
    """Per-token checks, run once over the whole group's arrays laid end to end.

    One numpy pass per check for the group instead of one per trajectory: at a few
    thousand tokens a trajectory, the per-call overhead would otherwise dominate.
    The first offending token is mapped back to its trajectory for the message.
    """
    ends = np.cumsum([t.num_tokens for t in trajs])

    def cat(name: str) -> np.ndarray:
        if name in columns:
            return columns[name]
        return np.concatenate([getattr(t, name) for t in trajs]) if len(trajs) > 1 else getattr(trajs[0], name)

    def where(pos: int, err: str) -> str:
        i = int(np.searchsorted(ends, pos, side="right"))
        return _at(f"{err} at token {pos - (int(ends[i - 1]) if i else 0)}", i, trajs[i])

    mask, lp, ver, ids = cat("loss_mask"), cat("behavior_logprobs"), cat("policy_version"), cat("token_ids")
    if _tokens_ok(mask, lp, ver, ids, limits):
        return None
    # Something is wrong: the checks below, one at a time in a fixed order, find the first error.
    if (pos := _first(mask > 1)) is not None:
        return where(pos, f"loss_mask_values: value {int(mask[pos])}")
    on = mask == 1
    off = ~on
    if (pos := _first(~np.isfinite(lp))) is not None:
        return where(pos, f"logprob_nonfinite: {float(lp[pos])}")
    if (pos := _first((lp > 0) & on)) is not None:
        return where(pos, f"logprob_positive: {float(lp[pos])} on the loss mask")
    if (pos := _first((lp != 0) & off)) is not None:
        return where(pos, f"logprob_off_mask: {float(lp[pos])} off the loss mask")
    if (pos := _first((ver != -1) & off)) is not None:
        return where(pos, f"version_off_mask: {int(ver[pos])} off the loss mask, expected -1")
    if (pos := _first((ver < 0) & on)) is not None:
        return where(pos, f"version_negative: {int(ver[pos])} on the loss mask")
    if ver.size and int(ver.max()) > limits.current_version:  # off the mask all are -1, so max is over the mask
        pos = int(ver.argmax())
        return where(pos, f"version_future: version {int(ver[pos])} > learner version {limits.current_version}")
    if limits.vocab_size is not None and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limits.vocab_size):
        pos = _first((ids < 0) | (ids >= limits.vocab_size))
        return where(pos, f"token_range: id {int(ids[pos])} outside [0, {limits.vocab_size})")
    return None


def _tokens_ok(mask: np.ndarray, lp: np.ndarray, ver: np.ndarray, ids: np.ndarray, limits: Limits) -> bool:
    """True iff none of `_check_tokens`'s per-token checks fails, in fewer, cheaper passes.

    Whole-array reductions (max, min) replace most masked comparisons: with the mask
    in {0, 1}, "finite, <= 0 on the mask, 0 off it" holds iff -inf < min, max <= 0 (a
    NaN fails both) and no non-zero logprob sits off the mask; "-1 off the mask, >= 0 on
    it" holds iff min >= -1 and (version >= 0) is exactly the mask.
    """
    if mask.size == 0:
        return True
    if int(mask.max()) > 1:
        return False
    on = mask.view(np.bool_)  # a view, valid because every value is 0 or 1
    if not (lp.max() <= 0.0 and lp.min() > -np.inf):
        return False
    if ((lp != 0) > on).any():  # True > False: a non-zero logprob off the mask
        return False
    if int(ver.min()) < -1 or int(ver.max()) > limits.current_version or ((ver >= 0) != on).any():
        return False
    return limits.vocab_size is None or (int(ids.min()) >= 0 and int(ids.max()) < limits.vocab_size)


def _check_reward(t: Trajectory) -> Optional[str]:
    if not math.isfinite(t.reward) or not all(math.isfinite(float(v)) for v in t.reward_terms.values()):
        return f"reward_nonfinite: reward {t.reward}, terms {t.reward_terms}"
    return None


def _check_media(t: Trajectory, limits: Limits, refs_ok: bool = False) -> Optional[str]:
    """`refs_ok`: every FrameRef is already known to pass `_check_frame_ref` (see `_refs_ok`)."""
    for j, r in enumerate(() if refs_ok else t.media):
        err = _check_frame_ref(r)
        if err:
            reason, detail = err.split(":", 1)
            return f"{reason}: media {j}:{detail}"
    if limits.image_token_id is not None:
        is_img = (t.token_ids == limits.image_token_id).astype(np.int8)
        runs = int(np.count_nonzero(np.diff(is_img, prepend=0) == 1))
        if runs != len(t.media):
            return f"media_count: {runs} image-token runs, {len(t.media)} media refs"
    if t.pixels is not None:
        if len(t.pixels) != len(t.media):
            return f"pixels: {len(t.pixels)} inline images, {len(t.media)} media refs"
        for j, p in enumerate(t.pixels):
            if p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] != 3:
                return f"pixels: image {j} is {p.dtype} {p.shape}, expected uint8 HxWx3"
    return None


def _refs_ok(refs: list[FrameRef]) -> bool:
    """True iff every ref passes `_check_frame_ref`, checked field by field over all refs at once.

    The per-ref checks cost ~4 us a ref, a few dozen refs a group; these passes a tenth of
    that. NaN fails every comparison, so `0 <= x <= 1` also rejects it. On False the per-ref
    checks run and name the first bad ref.
    """
    if not refs:
        return True
    try:
        crops = np.array([r.crop for r in refs], dtype=np.float64)  # ValueError if one is not 4 numbers
    except (ValueError, TypeError):
        return False
    hashes = "".join(r.content_hash for r in refs)
    return (crops.shape == (len(refs), 4) and bool((crops >= 0.0).all() and (crops <= 1.0).all())
            and bool((crops[:, 0] < crops[:, 2]).all() and (crops[:, 1] < crops[:, 3]).all())
            and all(r.video for r in refs) and min(r.frame_index for r in refs) >= 0
            and all(0.0 <= r.time < math.inf for r in refs)
            and all(len(r.size) == 2 and r.size[0] > 0 and r.size[1] > 0 for r in refs)
            and len(hashes) == 32 * len(refs) and all(len(r.content_hash) == 32 for r in refs)
            and set(hashes) <= _HEX_DIGITS)


_HEX_DIGITS = frozenset("0123456789abcdef")


def _check_frame_ref(r: FrameRef) -> Optional[str]:
    if not r.video:
        return "media_video: empty video path"
    if r.frame_index < 0 or not math.isfinite(r.time) or r.time < 0:
        return f"media_frame: frame_index {r.frame_index}, time {r.time}"
    if len(r.crop) != 4 or not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in r.crop):
        return f"media_crop: {r.crop} not inside [0, 1]"
    x1, y1, x2, y2 = r.crop
    if not (x1 < x2 and y1 < y2):
        return f"media_crop: {r.crop} not ordered"
    if len(r.size) != 2 or r.size[0] <= 0 or r.size[1] <= 0:
        return f"media_size: {r.size}"
    if not _HEX32.match(r.content_hash):
        return f"media_hash: {r.content_hash!r}"
    return None
