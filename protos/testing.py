"""Random but valid `Group`s for tests and benchmarks of the wire and the learner service.

"Valid" means what learner/validate.py checks: equal-length per-token arrays,
logprobs <= 0 on the loss mask and 0 off it, policy versions in [oldest, newest]
on the mask and -1 off it, one image-token run per media ref when an image token
id is given, unique traj ids, finite rewards. Fresh randomness on every call
unless the caller passes a seeded generator. `malformed_payloads` is the
catalogue of bad submissions the learner must reject (one per validation reason).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import msgpack
import numpy as np

from protos.codec import _DataSection, dumps, frame_pieces, to_map
from protos.records import FrameRef, Group, Status, Trajectory


def random_frame_ref(rng: np.random.Generator) -> FrameRef:
    x1, y1 = rng.uniform(0, 0.5, 2)
    x2, y2 = x1 + rng.uniform(0.1, 0.5), y1 + rng.uniform(0.1, 0.5)
    frame = int(rng.integers(0, 5000))
    return FrameRef(video=f"/data/videos/{rng.integers(1000)}.mp4", frame_index=frame, time=frame / 30.0,
                    crop=(float(x1), float(y1), float(x2), float(y2)),
                    size=(int(rng.integers(16, 640)), int(rng.integers(16, 640))),
                    content_hash=uuid.UUID(int=int(rng.integers(2**63)) << 64 | int(rng.integers(2**63))).hex)


def random_trajectory(rng: np.random.Generator, *, group_id: str, task_id: str, num_tokens: int = 64,
                      versions: tuple[int, int] = (0, 0), vocab_size: int = 1000, media: int = 1,
                      image_token_id: Optional[int] = None, turns: int = 2) -> Trajectory:
    """One episode of `num_tokens` tokens: a prompt, then `turns` generated spans with observations between.

    Image tokens (when `image_token_id` is given) sit in the prompt, one run of 1-4 per media ref,
    separated by an ordinary token so that runs stay distinct.
    """
    T = max(num_tokens, 2 * turns + 5 * media + 2)
    ids = rng.integers(0, vocab_size, T).astype(np.int32)
    if image_token_id is not None:
        ids[ids == image_token_id] = (image_token_id + 1) % vocab_size
        pos = 1
        for _ in range(media):
            run = int(rng.integers(1, 5))
            ids[pos:pos + run] = image_token_id
            pos += run + 1
        prompt_end = pos
    else:
        prompt_end = max(1, T // 4)
    mask = np.zeros(T, np.uint8)
    # `turns` generated spans inside [prompt_end, T), the last one ending at T.
    cuts = np.sort(rng.choice(np.arange(prompt_end + 1, T), size=min(2 * turns - 1, T - prompt_end - 1), replace=False))
    bounds = [prompt_end, *cuts.tolist(), T]
    for start, end in zip(bounds[1::2], bounds[2::2]):
        mask[start:end] = 1
    mask[-1] = 1  # at least one generated token, always
    lo, hi = versions
    on = mask.astype(bool)
    return Trajectory(
        token_ids=ids, loss_mask=mask,
        behavior_logprobs=np.where(on, -rng.exponential(1.0, T), 0.0).astype(np.float32),
        policy_version=np.where(on, rng.integers(lo, hi + 1, T), -1).astype(np.int32),
        media=[random_frame_ref(rng) for _ in range(media)],
        reward=float(rng.normal()), reward_terms={"accuracy": float(rng.integers(0, 2))},
        status=Status.COMPLETED if rng.random() < 0.8 else Status.TRUNCATED,
        group_id=group_id, task_id=task_id, traj_id=f"{group_id}/{uuid.uuid4().hex[:12]}",
        metrics={"turns": float(turns)})


def random_group(rng: Optional[np.random.Generator] = None, *, group_size: int = 4, num_tokens: int = 64,
                 versions: tuple[int, int] = (0, 0), vocab_size: int = 1000, media: int = 1,
                 image_token_id: Optional[int] = None, failed: int = 0, group_id: Optional[str] = None) -> Group:
    """A valid group of `group_size` trajectories, the last `failed` of them FAILED (empty arrays)."""
    rng = rng if rng is not None else np.random.default_rng()
    gid = group_id or f"g-{uuid.uuid4().hex[:16]}"
    task_id = f"task-{rng.integers(10**6)}"
    trajs = [random_trajectory(rng, group_id=gid, task_id=task_id, num_tokens=num_tokens, versions=versions,
                               vocab_size=vocab_size, media=media, image_token_id=image_token_id)
             for _ in range(group_size - failed)]
    trajs += [Trajectory.failed("VideoCorrupt: test", task_id=task_id, group_id=gid,
                                traj_id=f"{gid}/failed-{i}") for i in range(failed)]
    return Group(group_id=gid, task_id=task_id, trajectories=trajs)


@dataclass
class Malformed:
    """One bad submission: what is wrong (`name`), the validation reason it must get, and the wire bytes."""

    name: str
    reason: str
    group_id: str  # what the GroupMessage envelope says
    payload: bytes
    traj_id: str  # the trajectory the edit touched (shuffled to a random place in the group)


def _first(g: Group) -> Trajectory:
    return g.trajectories[0]


def _set(t: Trajectory, **kw: Any) -> None:
    for k, v in kw.items():
        object.__setattr__(t, k, v)  # after __post_init__: keeps the wrong dtype or shape on purpose


def _media(t: Trajectory, **kw: Any) -> None:
    t.media[0] = dataclasses.replace(t.media[0], **kw)


def _no_tokens(t: Trajectory) -> None:
    _set(t, loss_mask=np.zeros_like(t.loss_mask), behavior_logprobs=np.zeros_like(t.behavior_logprobs),
         policy_version=np.full_like(t.policy_version, -1))


def _on(t: Trajectory) -> int:
    return int(np.flatnonzero(t.loss_mask)[0])


def _off(t: Trajectory) -> int:
    return int(np.flatnonzero(t.loss_mask == 0)[0])


def _poke(arr: np.ndarray, i: int, value: Any) -> np.ndarray:
    arr = arr.copy()
    arr[i] = value
    return arr


def _map_edit(g: Group, edit: Callable[[dict], None]) -> bytes:
    m = to_map(g)
    edit(m)
    return msgpack.packb(m, use_bin_type=True)


def _frame_edit(g: Group, edit: Callable[[dict], None]) -> bytes:
    """The framed (columnar) payload of `g` with its header map edited."""
    section = _DataSection()
    m = to_map(g, section)
    edit(m)
    return b"".join(frame_pieces(m, section, lambda n: b""))


def _truncate_frame(g: Group) -> bytes:
    data = dumps(g)
    return data[:-5]  # the last column now runs past the end of the data section


def malformed_payloads(rng: Optional[np.random.Generator] = None, *, group_size: int = 4, vocab_size: int = 1000,
                       image_token_id: int = 7, current_version: int = 0) -> list[Malformed]:
    """35 kinds of bad group, each from a fresh valid one, for a learner configured with these limits."""
    rng = rng if rng is not None else np.random.default_rng()
    v = current_version
    # name -> (reason, edit). An edit changes the group in place, or returns bytes / (envelope id, bytes).
    cases: dict[str, tuple[str, Callable[[Group], Any]]] = {
        "garbage_bytes": ("decode", lambda g: b"\xc1\x00 not msgpack"),
        "not_a_group": ("decode", lambda g: dumps(_first(g))),
        "truncated_array": ("decode", lambda g: _map_edit(g, lambda m: m["trajectories"][0]["token_ids"].update(
            data=bytes(m["trajectories"][0]["token_ids"]["data"])[:-1]))),
        "unknown_status": ("status", lambda g: _map_edit(g, lambda m: m["trajectories"][0].update(status="EXPLODED"))),
        "float_token_ids": ("dtype", lambda g: _set(_first(g), token_ids=_first(g).token_ids.astype(np.float32))),
        "int64_versions": ("dtype", lambda g: _set(_first(g), policy_version=_first(g).policy_version.astype(np.int64))),
        "two_dim_tokens": ("shape", lambda g: _set(_first(g), token_ids=_first(g).token_ids[None, :])),
        "short_loss_mask": ("length_mismatch", lambda g: _set(_first(g), loss_mask=_first(g).loss_mask[:-1])),
        "mask_value_2": ("loss_mask_values", lambda g: _set(_first(g), loss_mask=_poke(_first(g).loss_mask, _on(_first(g)), 2))),
        "no_generated_tokens": ("no_generated_tokens", lambda g: _no_tokens(_first(g))),
        "all_failed": ("no_generated_tokens", lambda g: g.trajectories.__setitem__(slice(None), [
            Trajectory.failed("x", group_id=g.group_id, task_id=g.task_id, traj_id=t.traj_id) for t in g.trajectories])),
        "nan_logprob": ("logprob_nonfinite", lambda g: _set(_first(g), behavior_logprobs=_poke(
            _first(g).behavior_logprobs, _on(_first(g)), np.nan))),
        "positive_logprob": ("logprob_positive", lambda g: _set(_first(g), behavior_logprobs=_poke(
            _first(g).behavior_logprobs, _on(_first(g)), 0.5))),
        "logprob_off_mask": ("logprob_off_mask", lambda g: _set(_first(g), behavior_logprobs=_poke(
            _first(g).behavior_logprobs, _off(_first(g)), -0.3))),
        "version_off_mask": ("version_off_mask", lambda g: _set(_first(g), policy_version=_poke(
            _first(g).policy_version, _off(_first(g)), 0))),
        "negative_version": ("version_negative", lambda g: _set(_first(g), policy_version=_poke(
            _first(g).policy_version, _on(_first(g)), -3))),
        "future_version": ("version_future", lambda g: _set(_first(g), policy_version=_poke(
            _first(g).policy_version, _on(_first(g)), v + 5))),
        "token_id_too_big": ("token_range", lambda g: _set(_first(g), token_ids=_poke(_first(g).token_ids, -1, vocab_size))),
        "negative_token_id": ("token_range", lambda g: _set(_first(g), token_ids=_poke(_first(g).token_ids, -1, -1))),
        "empty_video_path": ("media_video", lambda g: _media(_first(g), video="")),
        "negative_frame_index": ("media_frame", lambda g: _media(_first(g), frame_index=-1)),
        "crop_outside_unit": ("media_crop", lambda g: _media(_first(g), crop=(0.1, 0.1, 1.5, 0.9))),
        "crop_unordered": ("media_crop", lambda g: _media(_first(g), crop=(0.6, 0.1, 0.2, 0.9))),
        "zero_size": ("media_size", lambda g: _media(_first(g), size=(0, 180))),
        "bad_hash": ("media_hash", lambda g: _media(_first(g), content_hash="not-a-hash")),
        "extra_media_ref": ("media_count", lambda g: _first(g).media.append(_first(g).media[0])),
        "wrong_group_size": ("group_size", lambda g: g.trajectories.pop()),
        "missing_traj_id": ("traj_id", lambda g: _set(_first(g), traj_id="")),
        "duplicate_traj_id": ("traj_id", lambda g: _set(_first(g), traj_id=g.trajectories[1].traj_id)),
        "nan_reward": ("reward_nonfinite", lambda g: _set(_first(g), reward=float("nan"))),
        "empty_group_id": ("group_id", lambda g: ("", dumps(dataclasses.replace(g, group_id="")))),
        "envelope_mismatch": ("group_id", lambda g: ("someone-else", dumps(g))),
        # The framed (columnar) layout: a header that lies about where the arrays are.
        "frame_cut_short": ("decode", _truncate_frame),
        "frame_header_too_long": ("decode", lambda g: dumps(g)[:4] + b"\xff\xff\xff\x7f" + dumps(g)[8:]),
        "column_lengths_miscounted": ("decode", lambda g: _frame_edit(g, lambda m: m["arrays"]["loss_mask"].update(
            lengths=m["arrays"]["loss_mask"]["lengths"][:-1]))),
        "column_offset_outside": ("decode", lambda g: _frame_edit(g, lambda m: m["arrays"]["token_ids"].update(at=2**40))),
        "media_count_miscounted": ("decode", lambda g: _frame_edit(g, lambda m: m["media"]["count"].__setitem__(0, 99))),
    }
    out = []
    for name, (reason, edit) in cases.items():
        g = random_group(rng, group_size=group_size, versions=(0, v), vocab_size=vocab_size,
                         image_token_id=image_token_id, media=2)
        victim = g.trajectories[0].traj_id
        res = edit(g)
        rng.shuffle(g.trajectories)  # the edited trajectory lands anywhere, so errors must locate it
        gid, payload = (res if isinstance(res, tuple) else
                        (g.group_id, res if isinstance(res, bytes) else dumps(g)))
        out.append(Malformed(name, reason, gid, payload, victim))
    return out
