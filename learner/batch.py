"""From taken groups to model inputs: filter, re-materialise pixels, advantages, pack, collate.

Owns the path from `list[Group]` (what `LearnerServer.get_batch` returns) to
right-padded micro-batches the HF model and the fused loss take:
1. FAILED and ABORTED trajectories are dropped (never trained on: no finished
   episode, no meaningful reward) and counted;
2. groups whose rewards all agree carry no GRPO signal: dropped and counted
   (`grpo.zero_variance_groups`); done before decoding so their pixels are never read;
3. pixels are re-materialised from each `FrameRef` through env's shared decoder
   (or taken from inline `pixels`) and checked against the recorded content hash.
   A mismatch, a decode error, image-token runs that do not fit the images, or a
   banned token among the generated ones drops that trajectory (counted); then
   the variance check runs again on what is left;
4. advantages over the remaining trajectories of each group (`grpo.group_advantages`);
5. micro-batches packed by a token budget (rows x longest row), longest first;
6. collation, with the causal shift: position t's hidden state scores token t+1.

Decoding is batched per (video, size, crop) so the shared decoder walks each GOP
once and the G episodes of a group, which saw the same overview, hit its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from learner import grpo
from protos.records import FrameRef, Group, Status, Trajectory, content_hash

DROP_REASONS = ("failed", "aborted", "hash_mismatch", "decode_error", "image_tokens", "banned_token")
SKIP_STATUSES = {Status.FAILED: "failed", Status.ABORTED: "aborted"}


class MediaError(Exception):
    """A trajectory's images cannot be re-materialised exactly; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Sample:
    """One trajectory ready for the model: its token arrays, advantage and processed images."""

    token_ids: np.ndarray  # int64 [T]
    loss_mask: np.ndarray  # bool [T]
    behavior_logprobs: np.ndarray  # float32 [T]
    advantage: float
    traj_id: str = ""
    pixel_values: Optional[Tensor] = None  # [patches, C*t*p*p] from the image processor, None without images
    image_grid_thw: Optional[Tensor] = None  # int64 [images, 3]
    images: list[np.ndarray] = field(default_factory=list)  # the uint8 pixels, for reference checks

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class Prepared:
    """What `prepare_batch` made of a list of groups."""

    samples: list[Sample]
    counts: dict[str, int]  # dropped/<reason>, zero_variance_groups, groups_trained, trajectories_trained
    errors: list[str] = field(default_factory=list)  # the first few drop reasons in words, for the log


@dataclass
class MicroBatch:
    """Right-padded tensors of some samples. Per-token arrays are shifted: `[B, T-1]`."""

    inputs: dict[str, Any]  # the HF forward's keyword arguments
    targets: Tensor  # int64: the token each position predicts
    mask: Tensor  # bool: loss (generated) tokens
    behavior_logprobs: Tensor  # float32
    advantages: Tensor  # float32 [B]
    num_tokens: int  # real tokens (no padding)


# ------------------------------------------------------------------ pixels


def _frame_key(ref: FrameRef) -> tuple:
    return ref.video, tuple(int(v) for v in ref.size), tuple(float(v) for v in ref.crop)


def decode_refs(refs: Sequence[FrameRef], decoder: Any) -> dict[tuple, Any]:
    """(video, size, crop, frame index) -> uint8 image or MediaError, one decoder call per (video, size, crop)."""
    wanted: dict[tuple, set[int]] = {}
    for ref in refs:
        wanted.setdefault(_frame_key(ref), set()).add(int(ref.frame_index))
    out: dict[tuple, Any] = {}
    for (video, size, crop), indices in wanted.items():
        order = sorted(indices)
        try:
            images = decoder.frames(video, order, size=size, crop=crop)
        except Exception:  # noqa: BLE001 - find out which frames fail, so only the trajectories needing them drop
            images = [_decode_one(decoder, video, i, size, crop) for i in order]
        for i, img in zip(order, images):
            out[(video, size, crop, i)] = img
    return out


def _decode_one(decoder: Any, video: str, index: int, size: tuple, crop: tuple) -> Any:
    try:
        return decoder.frames(video, [index], size=size, crop=crop)[0]
    except Exception as e:  # noqa: BLE001 - a decode failure drops the trajectories that need this frame
        return MediaError("decode_error", f"{video} frame {index}: {type(e).__name__}: {e}")


def checked_images(traj: Trajectory, decoded: dict[tuple, Any]) -> list[np.ndarray]:
    """The trajectory's images, each verified against its FrameRef's content hash (MediaError otherwise)."""
    if traj.pixels is not None and len(traj.pixels) != len(traj.media):
        raise MediaError("hash_mismatch", f"{len(traj.pixels)} inline images for {len(traj.media)} media refs")
    images = []
    for k, ref in enumerate(traj.media):
        img = traj.pixels[k] if traj.pixels is not None else decoded[(*_frame_key(ref), int(ref.frame_index))]
        if isinstance(img, MediaError):
            raise img
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise MediaError("decode_error", f"image {k} is {img.dtype} {img.shape}, not uint8 HxWx3")
        if content_hash(img) != ref.content_hash:
            raise MediaError("hash_mismatch", f"image {k} ({ref.video} frame {ref.frame_index}) does not match its "
                                              "recorded content hash")
        images.append(img)
    return images


def image_runs(token_ids: np.ndarray, image_token_id: Optional[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of the image token."""
    if image_token_id is None:
        return []
    is_pad = np.concatenate([[False], token_ids == image_token_id, [False]])
    edges = np.flatnonzero(is_pad[1:] != is_pad[:-1])
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


def process_images(images: list[np.ndarray], token_ids: np.ndarray, processor: Any,
                   image_token_id: Optional[int]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(pixel_values, image_grid_thw) of the images, checked against the image-token runs of token_ids."""
    runs = image_runs(token_ids, image_token_id)
    if len(runs) != len(images):
        raise MediaError("image_tokens", f"{len(runs)} image-token runs for {len(images)} images")
    if not images:
        return None, None
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise MediaError("image_tokens", "the model's processor has no image processor (text-only model)")
    vision = ip(images=list(images), return_tensors="pt")
    grid = vision["image_grid_thw"].long()
    want = (grid.prod(-1) // int(ip.merge_size) ** 2).tolist()
    got = [n for _, n in runs]
    if want != got:
        raise MediaError("image_tokens", f"image-token runs {got} but the images need {want}")
    return vision["pixel_values"], grid


# ------------------------------------------------------------------ batch


def _zero_variance(items: list[tuple[int, Any]], counts: dict[str, int],
                   rewards: Optional[Sequence[float]] = None) -> list[tuple[int, Any]]:
    """Drop the (group index, item) pairs of groups whose rewards all agree (one-sample groups
    included); rewards are the items' own (`.reward`) unless given."""
    if not items:
        return items
    r = [t.reward for _, t in items] if rewards is None else list(rewards)
    flat, n_groups = grpo.zero_variance_groups(torch.tensor(r, dtype=torch.float64),
                                               torch.tensor([g for g, _ in items], dtype=torch.long))
    counts["zero_variance_groups"] += n_groups
    return [x for x, f in zip(items, flat.tolist()) if not f]


Live = list[tuple[int, Trajectory]]  # (group index in the step, trajectory)


def new_counts() -> dict[str, int]:
    return {**{f"dropped/{r}": 0 for r in DROP_REASONS}, "zero_variance_groups": 0, "subagent_trajectories_trained": 0}


def select(groups: Sequence[Group], counts: dict[str, int]) -> Live:
    """The trajectories worth decoding: FAILED/ABORTED ones dropped, then zero-variance groups (counted)."""
    live: Live = []
    for gi, group in enumerate(groups):
        for t in group.trajectories:
            if t.status in SKIP_STATUSES:
                counts[f"dropped/{SKIP_STATUSES[t.status]}"] += 1
            else:
                live.append((gi, t))
    return _zero_variance(live, counts)


def materialise(live: Live, *, processor: Any, image_token_id: Optional[int], banned: Sequence[int] = (),
                decoder: Any = None, counts: dict[str, int], errors: list[str]) -> list[tuple[int, Trajectory, tuple]]:
    """(row, trajectory, (images, pixel_values, image_grid_thw)) of each of `live` (rows are its
    indices) whose images re-decode exactly and fit its image tokens; the rest dropped and counted."""
    if decoder is None and any(t.pixels is None and t.media for _, t in live):
        from env.video import get_decoder

        decoder = get_decoder()
    decoded = decode_refs([r for _, t in live if t.pixels is None for r in t.media], decoder) if decoder else {}
    banned_arr = np.asarray(sorted(banned), dtype=np.int64)
    ready: list[tuple[int, Trajectory, tuple]] = []
    for row, (_, t) in enumerate(live):
        try:
            ids = t.token_ids.astype(np.int64)
            if banned_arr.size and np.isin(ids[t.loss_mask.astype(bool)], banned_arr).any():
                raise MediaError("banned_token", "a generated token is a banned (placeholder) id")
            images = checked_images(t, decoded)
            ready.append((row, t, (images, *process_images(images, ids, processor, image_token_id))))
        except MediaError as e:
            counts[f"dropped/{e.reason}"] += 1
            if len(errors) < 5:
                errors.append(f"{t.traj_id or t.group_id}: {e}")
    return ready


def score(table: Sequence[tuple[int, float]], rows: Sequence[int], adv_mode: str,
          counts: Optional[dict[str, int]] = None) -> dict[int, float]:
    """Advantage of each row that is left: `table[row]` = (group index, reward) of every selected
    trajectory, `rows` those whose media survived. Groups whose survivors all agree are dropped
    (counted) first. Pure, so every rank of a sharded learner computes the same numbers."""
    rows = sorted(rows)
    kept = _zero_variance([(table[r][0], r) for r in rows], counts if counts is not None else new_counts(),
                          rewards=[table[r][1] for r in rows])
    if not kept:
        return {}
    rewards = torch.tensor([table[r][1] for _, r in kept], dtype=torch.float64)
    adv = grpo.group_advantages(rewards, torch.tensor([g for g, _ in kept]), mode=adv_mode)
    if not bool((adv != 0).any()):
        raise RuntimeError(f"all {len(kept)} advantages of the batch are zero after filtering zero-variance groups")
    return {r: float(a) for (_, r), a in zip(kept, adv.tolist())}


def to_sample(t: Trajectory, media: tuple, advantage: float) -> Sample:
    images, pv, grid = media
    return Sample(t.token_ids.astype(np.int64), t.loss_mask.astype(bool), t.behavior_logprobs.astype(np.float32),
                  float(advantage), t.traj_id, pv, grid, images)


def prepare_batch(groups: Sequence[Group], *, processor: Any, image_token_id: Optional[int],
                  banned: Sequence[int] = (), adv_mode: str = "grpo", decoder: Any = None) -> Prepared:
    """Filter, re-materialise, check and score the trajectories of `groups` (see the module notes).

    `decoder` is a FrameDecoder (default: env's process-wide one). Never raises for bad
    trajectories: they are dropped and counted. Raises RuntimeError when what is left
    has only zero advantages (it cannot: zero-variance groups are gone, so that is a bug).
    """
    counts, errors = new_counts(), []
    live = select(groups, counts)
    ready = materialise(live, processor=processor, image_token_id=image_token_id, banned=banned, decoder=decoder,
                        counts=counts, errors=errors)
    adv = score([(g, t.reward) for g, t in live], [row for row, _, _ in ready], adv_mode, counts)
    samples = [to_sample(t, media, adv[row]) for row, t, media in ready if row in adv]
    counts["groups_trained"] = len({live[row][0] for row, _, _ in ready if row in adv})
    counts["trajectories_trained"] = len(samples)
    return Prepared(samples, counts, errors)


def pack(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of each micro-batch, longest rows first; rows x longest row <= budget (a longer row goes alone)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a micro-batch's first row is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def collate(samples: Sequence[Sample], *, pad_id: int, image_token_id: Optional[int] = None,
            video_token_id: Optional[int] = None, device: Any = "cpu", dtype: torch.dtype = torch.float32,
            token_types: Optional[Any] = None) -> MicroBatch:
    """Right-pad samples into one micro-batch on `device`; pixel values in `dtype`. `token_types(ids)` is
    the model family's mm_token_type_ids (models.hf.token_types_fn); by default image 1, video 2."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    if pad_id in (image_token_id, video_token_id):
        raise ValueError("the pad id must not be an image or video token (the model counts them everywhere)")
    b, t = len(samples), max(s.num_tokens for s in samples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.bool)
    behav = torch.zeros(b, t, dtype=torch.float32)
    for r, s in enumerate(samples):
        n = s.num_tokens
        ids[r, :n] = torch.from_numpy(s.token_ids)
        attn[r, :n] = 1
        mask[r, :n] = torch.from_numpy(s.loss_mask)
        behav[r, :n] = torch.from_numpy(s.behavior_logprobs)
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": attn.to(device)}
    with_images = [s for s in samples if s.pixel_values is not None]
    if with_images:
        # transformers 5 builds the 3-D (M-RoPE) positions only when told which tokens are image tokens.
        if token_types is not None:
            types = token_types(ids)
        else:
            types = (ids == image_token_id).int() + 2 * (ids == video_token_id).int() if video_token_id is not None \
                else (ids == image_token_id).int()
        inputs.update(pixel_values=torch.cat([s.pixel_values for s in with_images]).to(device, dtype),
                      image_grid_thw=torch.cat([s.image_grid_thw for s in with_images]).to(device),
                      mm_token_type_ids=types.to(device))
    return MicroBatch(inputs=inputs, targets=ids[:, 1:].to(device), mask=mask[:, 1:].to(device),
                      behavior_logprobs=behav[:, 1:].to(device),
                      advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
                      num_tokens=sum(s.num_tokens for s in samples))
