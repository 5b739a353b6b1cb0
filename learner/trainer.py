"""The GRPO trainer: groups in, one optimizer step, a new weight version out.

One step (`Trainer.train_step`), top to bottom:
  1. prepare (learner/batch.py): drop FAILED/ABORTED trajectories and zero-variance
     groups, re-decode pixels from FrameRefs and check their hashes, advantages;
  2. pack micro-batches by a token budget;
  3. proximal logprobs: a no-grad pass with the weights at the start of the step;
  4. per optimizer update (trainer.updates_per_step of them): forward, then the
     fused/chunked GRPO loss on the final hidden states and the LM head
     (`learner.loss.fused_policy_loss`), backward per micro-batch, clip, AdamW;
  5. version += 1; publish the weights under their HF names; checkpoint every N
     steps; log metrics (learner/metrics.py).
The logprobs are the engine's `processed_logprobs`: logits divided by the sampling
temperature with the banned ids (vision placeholders, padding rows) left out of the
softmax. Weights and optimizer state are fp32; on CUDA the forward runs under bf16
autocast, on the CPU in fp32. `Trainer.run` pulls batches from a `LearnerServer`;
`main_learner` is the `weft learner` command.

Deviations, on purpose: the proximal pass costs one extra forward per step even with
one update per step (then pi_theta == pi_prox and every ratio is 1): it keeps the
loss code path the same for any number of updates. Loss normalisers (token-mean,
seq-mean...) span all micro-batches of an update, not each micro-batch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from configs.schema import WeftConfig
from learner import checkpoint as ckpt
from learner.batch import (MicroBatch, Prepared, Sample, collate, materialise, new_counts, pack, prepare_batch, score,
                           select, to_sample)
from learner.buffer import oldest_version
from learner.distributed import Comm, balanced_split
from learner.kernels.chunked import chunked_token_logprobs
from learner.loss import fused_policy_loss
from learner.metrics import MetricsLogger
from learner.policy import dummy_vision_inputs, load_policy
from learner.weights import DTYPES
from protos.records import Group, Status, Trajectory

log = logging.getLogger(__name__)

_SUM_METRICS = ("tokens",)
_MAX_METRICS = ("is_weight_max",)
_LOSS_METRICS = ("loss", "pg_loss")
GATHER_BUCKET_BYTES = 256 * 2**20  # sharded: weights are all-gathered about this much (whole layers) at a time


# ------------------------------------------------------------------ devices and model pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but torch sees no CUDA device")
    return dev


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: "auto" is bf16 on CUDA and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast for the model's forward; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def hidden_states(model: Any, inputs: dict[str, Any]) -> Tensor:
    """Final (normed) hidden states `[B, T, H]` from the model's base: the LM head is applied by the loss kernel."""
    base = getattr(model, model.base_model_prefix)
    return base(**inputs, use_cache=False).last_hidden_state


def lm_head_weight(model: Any) -> Tensor:
    return model.get_output_embeddings().weight


def token_ids_of(model: Any) -> tuple[Optional[int], Optional[int]]:
    """(image token id, video token id) of a VL config; (None, None) for a text-only model."""
    cfg = model.config
    return getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)


def pad_id_of(tokenizer: Any, avoid: Sequence[Optional[int]]) -> int:
    """A pad id for right padding that is not an image/video token (the model counts those everywhere)."""
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None and cand not in avoid:
            return int(cand)
    return next(i for i in range(len(tokenizer)) if i not in avoid)


def combine_metrics(parts: Sequence[tuple[dict[str, Tensor], float, float]]) -> dict[str, float]:
    """Micro-batch metrics -> step metrics. parts: (metrics, token share, loss weight).

    Losses add with their loss weights, counts add, maxima take the max, the rest are
    token-weighted means.
    """
    out: dict[str, float] = {}
    for m, share, weight in parts:
        for k, v in m.items():
            x = float(v)
            if k in _LOSS_METRICS:
                out[k] = out.get(k, 0.0) + weight * x
            elif k in _SUM_METRICS:
                out[k] = out.get(k, 0.0) + x
            elif k in _MAX_METRICS:
                out[k] = max(out.get(k, -math.inf), x)
            else:
                out[k] = out.get(k, 0.0) + share * x
    return out


# ------------------------------------------------------------------ the trainer


class StepShare(NamedTuple):
    """What rank 0 hands one rank for a step: its trajectories (rows into `table`) and the
    (group index, reward) of every selected trajectory, from which each rank computes the
    same advantages."""

    rows: list[int]
    trajectories: list[Trajectory]
    table: list[tuple[int, float]]


class Trainer:
    """Owns the model, optimizer, step/version counters, checkpoints and metrics of one learner rank.

    `resume` (trainer.resume) decides where the weights come from: the newest complete
    checkpoint under trainer.run_dir ("auto"), `model_dir` ("never"), or a given
    checkpoint. Pass the LearnerServer *before starting it*: its state (buffer,
    seen-set, version) is restored from the checkpoint here. `comm` is this rank's place in
    a sharded learner (learner/distributed.py; default: one process). Rank 0 drives: its
    `train_step(groups)` and `run()` hand every other rank its share of each step, and those
    ranks sit in `follow()`.

    Versions name weights, so no two weight sets may share one: before publishing a version the
    trainer writes it to run_dir/published_version, and a trainer resumed from a checkpoint
    older than what its lost predecessor had published continues above that (rollout workers
    may hold, and have sampled with, those lost weights).
    """

    def __init__(self, cfg: WeftConfig, model_dir: Optional[str | Path] = None, *, server: Any = None,
                 log_metrics: bool = True, comm: Optional[Comm] = None) -> None:
        from models.hf import banned_token_ids, load_processor, token_types_fn

        self.cfg, self.tc = cfg, cfg.trainer
        check_trainer_config(cfg)
        if self.tc.run_dir is None:
            self.tc.run_dir = default_run_dir()
        self.run_dir = Path(self.tc.run_dir)
        self.comm = comm or Comm(device=resolve_device(self.tc.device))
        self.device = self.comm.device
        self.dtype = compute_dtype(self.tc.dtype, self.device)
        self.resumed_from = ckpt.resolve_resume(self.tc.resume, self.run_dir)
        source = weights_source(model_dir, self.resumed_from)
        sharded = self.comm.distributed
        self.policy = load_policy(source, self.comm, mixed_precision=sharded and self.dtype != torch.float32,
                                  cpu_offload=self.tc.cpu_offload, gradient_checkpointing=self.tc.gradient_checkpointing)
        # Sharded, FSDP2 casts to the compute dtype itself; one process uses autocast as before.
        self.autocast_dtype = torch.float32 if sharded else self.dtype
        self.model = self.policy.hf
        self.processor = load_processor(self.resumed_from / "model" if self.resumed_from else source)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_token_id, self.video_token_id = token_ids_of(self.model)
        self.token_types = token_types_fn(self.model.config) if self.image_token_id is not None else None
        self.banned_list = banned_token_ids(self.model.config, len(self.tokenizer))
        self.banned = torch.tensor(self.banned_list, dtype=torch.long, device=self.device)
        self.pad_id = pad_id_of(self.tokenizer, (self.image_token_id, self.video_token_id))
        self.dummy_vision = dummy_vision_inputs(self.processor, self.device) if sharded else None
        self.ref_policy = self._reference(model_dir, source)
        self.params = self.policy.parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=self.tc.lr, betas=tuple(self.tc.betas), eps=self.tc.eps,
                                           weight_decay=self.tc.weight_decay)
        self.server = server
        self.step = 0
        self.version = 0
        self.cursor = {"groups_consumed": 0, "trajectories_trained": 0, "batches": 0}
        self.skipped_in_a_row = 0  # batches since the last trained step that left nothing to train on
        self.stopped: Optional[str] = None  # why run() ended before total_steps, if it did
        self.last_metrics: dict[str, Any] = {}
        self.decoder = None  # env's shared FrameDecoder, created on first use
        self.saved_step: Optional[int] = None
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
            self.saved_step = self.step
        lost = published_version(self.run_dir)
        if self.resumed_from is not None and lost is not None and lost > self.version:
            self.version = lost + 1
            if self.server is not None:
                self.server.advance_version(self.version)
        self.metrics = (MetricsLogger(self.run_dir, self.tc.tensorboard, self.step if self.resumed_from else None)
                        if log_metrics and self.comm.is_main else None)

    def _reference(self, model_dir: Optional[str | Path], source: Path) -> Optional[Any]:
        """The frozen reference policy (the run's starting model, never a resumed checkpoint), sharded like
        the policy; only when a KL term needs it (loss.kl_coef, loss.kl_in_reward)."""
        if not (self.cfg.loss.kl_coef > 0 or self.cfg.loss.kl_in_reward > 0):
            return None
        ref = load_policy(Path(model_dir or self.cfg.model or source), self.comm,
                          mixed_precision=self.comm.distributed and self.dtype != torch.float32)
        ref.module.eval()
        for p in ref.module.parameters():
            p.requires_grad_(False)
        return ref

    # ---- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything but the weights and optimizer that a restart needs (plain types and tensors)."""
        from configs.loader import to_yaml

        return {"step": self.step, "version": self.version, "cursor": dict(self.cursor), "rng": ckpt.rng_state(),
                "server": self.server.state_dict() if self.server is not None else None, "config": to_yaml(self.cfg)}

    def save(self) -> Path:
        """A checkpoint of this step (every rank takes part; rank 0 drives it in `run`)."""
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.policy, self.optimizer, self.processor,
                                    self.state() if self.comm.is_main else None, self.comm,
                                    keep=self.tc.keep_checkpoints)
        self.saved_step = self.step
        if self.comm.is_main:
            log.info("checkpoint %s (step %d, version %d)", path, self.step, self.version)
        return path

    def export(self, out_dir: Optional[str | Path] = None) -> Optional[Path]:
        """The current weights as an HF model directory (default run_dir/model); every rank takes part."""
        dtype = getattr(self.model.config, "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(str(dtype), torch.float32)
        return self.policy.export_hf(out_dir or self.run_dir / "model", self.processor, dtype)

    def save_samples(self, groups: Sequence[Group]) -> Path:
        """The step's trajectories (FrameRefs, not pixels) for `weft view`; written whole or not at all."""
        from protos.codec import write_trajectories

        out = self.run_dir / "trajectories" / f"step_{self.step:06d}.msgpack"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        write_trajectories(tmp, [t for g in groups for t in g.trajectories])
        tmp.replace(out)
        return out

    def _restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.policy, self.optimizer, "cpu")
        self.step, self.version = int(state["step"]), int(state["version"])
        self.cursor.update({k: int(v) for k, v in state["cursor"].items()})
        ckpt.set_rng_state(state["rng"])
        if self.server is not None and state.get("server") is not None:
            self.server.load_state_dict(state["server"])
        if self.comm.is_main:
            log.info("resumed from %s at step %d, version %d", path, self.step, self.version)

    # ---- weights
    def publish_dtype(self) -> torch.dtype:
        name = self.cfg.rollout.dtype if self.tc.publish_dtype == "auto" else self.tc.publish_dtype
        return DTYPES[name]

    def publish(self) -> None:
        """Hand the current weights to the rollout workers as `self.version` (sharded: every rank
        takes part in gathering them, rank 0 publishes)."""
        if self.server is None and not self.policy.sharded:
            return
        named = self.policy.named_tensors(self.publish_dtype(), GATHER_BUCKET_BYTES)
        if self.server is not None and self.comm.is_main:
            mark_published(self.run_dir, self.version)
            self.server.set_step(self.step)
            self.server.publish(self.version, named)
        else:
            for _ in named:  # this rank's part of each bucket's all-gather
                pass

    # ---- per-token logprobs
    def _decoder(self) -> Any:
        if self.decoder is None:
            from env.video import get_decoder

            self.decoder = get_decoder(self.cfg.env.cache_bytes, self.cfg.env.reader_pool_size,
                                       self.cfg.env.video_backend)
        return self.decoder

    def prepare(self, groups: Sequence[Group]) -> Prepared:
        return prepare_batch(groups, processor=self.processor, image_token_id=self.image_token_id,
                             banned=self.banned_list, adv_mode=self.tc.adv_mode, decoder=self._decoder())

    def micro_batches(self, samples: Sequence[Sample]) -> list[MicroBatch]:
        return [collate([samples[i] for i in idx], pad_id=self.pad_id, image_token_id=self.image_token_id,
                        video_token_id=self.video_token_id, device=self.device, token_types=self.token_types)
                for idx in pack([s.num_tokens for s in samples], self.tc.micro_batch_tokens)]

    def _forward(self, mb: Optional[MicroBatch], head: Callable[[Tensor, Tensor], Any],
                 policy: Any = None) -> tuple[Any, Optional[Tensor]]:
        """Run the policy on a micro-batch (None: this rank's filler, see `_step`) and `head` on its
        shifted final hidden states and the LM head. The head runs outside autocast: the fused loss
        keeps its own fp32 accumulators."""
        inputs = mb.inputs if mb is not None else self._filler_inputs()
        dummy = self.dummy_vision if self.dummy_vision is not None and "pixel_values" not in inputs else None

        def shifted(hidden: Tensor, weight: Tensor) -> Any:
            hidden = hidden[:, :-1]
            # Under autocast the residual stream (and so the final norm's output) may stay fp32; the
            # LM head then runs in the compute dtype, as the engine's does.
            hidden = hidden if self.autocast_dtype == torch.float32 else hidden.to(self.autocast_dtype)
            weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
            with torch.autocast(self.device.type, enabled=False):
                return head(hidden, weight)

        with autocast(self.device, self.autocast_dtype):
            return (policy or self.policy)(inputs, shifted, dummy)

    def _filler_inputs(self) -> dict[str, Tensor]:
        """Two pad tokens: the forward a rank with fewer micro-batches runs so its collectives match."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @torch.no_grad()
    def token_logprobs(self, mb: Optional[MicroBatch], policy: Any = None) -> Optional[Tensor]:
        """Processed logprob of each loss token under the current weights (or `policy`'s, e.g. the
        reference) `[B, T-1]` (0 elsewhere)."""
        def head(hidden: Tensor, weight: Tensor) -> Optional[Tensor]:
            if mb is None:
                return None
            rows = mb.mask
            out = torch.zeros(rows.shape, dtype=torch.float32, device=self.device)
            if rows.any():
                h = hidden[rows]
                out[rows] = chunked_token_logprobs(h, weight, mb.targets[rows], chunk_size=self.tc.chunk_size,
                                                   temperature=self.tc.temperature, banned=self.banned).float()
            return out

        return self._forward(mb, head, policy)[0]

    def _loss(self, mb: Optional[MicroBatch], prox: Optional[Tensor],
              ref: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        def head(hidden: Tensor, weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            if mb is None:  # the filler: zero, but every parameter of the pass is in the graph
                return 0.0 * (hidden.float().sum() + weight.float().sum()), {}
            return fused_policy_loss(hidden, weight, mb.targets, mb.advantages, prox, mb.behavior_logprobs,
                                     mb.mask, self.cfg.loss, chunk_size=self.tc.chunk_size,
                                     temperature=self.tc.temperature, banned=self.banned, ref_logp=ref)

        (loss, m), anchor = self._forward(mb, head)
        return (loss if anchor is None else loss + anchor), m

    # ---- one step
    def _kl_in_reward(self, table: Sequence[tuple[int, float]], mine: Sequence[tuple[int, Trajectory, tuple]],
                      metrics: dict[str, Any]) -> list[tuple[int, float]]:
        """The step's (group, reward) table with each reward lowered by kl_in_reward x the sum over the
        trajectory's generated tokens of log(mu / pi_ref) (k1, as verl's use_kl_in_reward; mu: the engine's
        logprobs, the policy that sampled them). Every rank scores its own trajectories with the reference
        and all ranks get the same table."""
        samples = [to_sample(t, media, 0.0) for _, t, media in mine]
        order = pack([s.num_tokens for s in samples], self.tc.micro_batch_tokens) if samples else []
        n_mb = self.comm.max(len(order))
        sums: dict[int, float] = {}
        for k in range(n_mb):
            idx = order[k] if k < len(order) else []
            mb = self.micro_batches([samples[j] for j in idx])[0] if idx else None
            ref = self.token_logprobs(mb, self.ref_policy)  # fillers keep the ranks' collectives in step
            if mb is None:
                continue
            kl = torch.where(mb.mask, mb.behavior_logprobs - ref, 0.0).sum(-1)
            for j, v in zip(idx, kl.tolist()):
                sums[mine[j][0]] = v
        gathered = {r: v for part in self.comm.all_gather(sums) for r, v in part.items()}
        beta = self.cfg.loss.kl_in_reward
        if gathered and self.comm.is_main:
            metrics["kl_in_reward/seq_kl_mean"] = float(np.mean(list(gathered.values())))
        return [(g, r - beta * gathered.get(row, 0.0)) for row, (g, r) in enumerate(table)]

    def _subagent_samples(self, parents: Sequence[tuple[Trajectory, float]], counts: dict[str, int],
                          errors: list[str]) -> list[Sample]:
        """The sub-agent trajectories of the trained episodes, each with its episode's advantage (ParaVT's
        switch): they are the policy too, credited for the episode they served."""
        kids = [(c, a) for t, a in parents for c in t.children if c.status not in (Status.FAILED, Status.ABORTED)]
        ready = materialise([(0, c) for c, _ in kids], processor=self.processor, image_token_id=self.image_token_id,
                            banned=self.banned_list, decoder=self._decoder(), counts=counts, errors=errors)
        counts["subagent_trajectories_trained"] += len(ready)
        return [to_sample(c, media, kids[row][1]) for row, c, media in ready]

    def lr_at(self, step: int) -> float:
        if self.tc.warmup_steps <= 0:
            return self.tc.lr
        return self.tc.lr * min(1.0, (step + 1) / self.tc.warmup_steps)

    def plan(self, groups: Sequence[Group], counts: dict[str, int]) -> list[StepShare]:
        """Rank 0: the trajectories worth training, split across ranks by token count."""
        live = select(groups, counts)
        table = [(g, float(t.reward)) for g, t in live]
        parts = balanced_split([t.num_tokens for _, t in live], self.comm.world)
        return [StepShare(rows, [live[r][1] for r in rows], table) for rows in parts]

    def train_step(self, groups: Sequence[Group]) -> dict[str, Any]:
        """One GRPO step on `groups` (rank 0; the other ranks train their share in `follow`); returns
        (and logs) its metrics. No update when nothing survives filtering."""
        t0 = time.perf_counter()
        metrics = batch_metrics(groups, self.version)
        counts = new_counts()
        _, share = self.comm.scatter([("step", s) for s in self.plan(groups, counts)])
        return self._step(share, counts, metrics, groups, t0)

    def _step(self, share: StepShare, counts: dict[str, int], metrics: dict[str, Any],
              groups: Optional[Sequence[Group]], t0: float) -> dict[str, Any]:
        """The part of a step every rank runs on its share, in lockstep: the same number of forwards
        and backwards everywhere (a rank short of micro-batches runs fillers), normalisers summed
        over ranks, gradients summed by FSDP2's reduce-scatter."""
        comm = self.comm
        errors: list[str] = []
        live = list(zip([share.table[r][0] for r in share.rows], share.trajectories))
        ready = materialise(live, processor=self.processor, image_token_id=self.image_token_id,
                            banned=self.banned_list, decoder=self._decoder(), counts=counts, errors=errors)
        survivors = [r for part in comm.all_gather([share.rows[i] for i, _, _ in ready]) for r in part]
        table = share.table
        if self.cfg.loss.kl_in_reward > 0:
            table = self._kl_in_reward(table, [(share.rows[i], t, media) for i, t, media in ready], metrics)
        adv = score(table, survivors, self.tc.adv_mode, counts if comm.is_main else None)
        samples = [to_sample(t, media, adv[share.rows[i]]) for i, t, media in ready if share.rows[i] in adv]
        if self.tc.train_subagents:
            samples += self._subagent_samples([(t, adv[share.rows[i]]) for i, t, _ in ready if share.rows[i] in adv],
                                              counts, errors)
        for e in errors:
            log.warning("dropped trajectory %s", e)
        gathered = comm.gather(counts)
        if comm.is_main:
            metrics.update({k: sum(c[k] for c in gathered) for k in counts})
            metrics["groups_trained"] = len({share.table[r][0] for r in adv})
            metrics["trajectories_trained"] = len(adv)
            self.cursor["groups_consumed"] += len(groups or ())
        t_prep = time.perf_counter()
        metrics["time/prepare_s"] = t_prep - t0
        if not adv:  # Trainer.run warns and counts; replay counts
            return self._finish(metrics, t0, skipped=True)
        mbs: list[Optional[MicroBatch]] = list(self.micro_batches(samples)) if samples else []
        n_mb = comm.max(len(mbs))
        mbs += [None] * (n_mb - len(mbs))
        prox = [self.token_logprobs(mb) for mb in mbs]
        refs = [self.token_logprobs(mb, self.ref_policy) for mb in mbs] if self.cfg.loss.kl_coef > 0 else [None] * n_mb
        t_prox = time.perf_counter()
        n_updates = min(self.tc.updates_per_step, n_mb)
        splits = np.array_split(np.arange(n_mb), n_updates)
        # The normalisers of each update, over every rank's micro-batches of it (token-mean: loss tokens;
        # the seq-mean aggregations: sequences with a loss token).
        local = [[_norm_count(mbs[i], self.cfg.loss.loss_agg) for i in split] for split in splits]
        totals = comm.sum([sum(c) for c in local])
        n_loss_tokens = comm.sum([sum(float(mb.mask.sum()) for mb in mbs if mb is not None)])[0]
        parts, norms = [], []
        self.policy.module.train()
        for split, counts_k, total in zip(splits, local, totals):
            lr = self.lr_at(self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            for i, c in zip(split, counts_k):
                w = c / total if total else 0.0
                loss, m = self._loss(mbs[i], prox[i], refs[i])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: non-finite loss {float(loss)}")
                (loss * w).backward()
                if mbs[i] is not None:
                    parts.append(({k: float(v) for k, v in m.items()},
                                  float(mbs[i].mask.sum()) / max(n_loss_tokens, 1.0), w / n_updates))
            max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
            norms.append(self.policy.clip_grad_norm_(max_norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_train = time.perf_counter()
        real = [mb for mb in mbs if mb is not None]
        pad_slots = sum(mb.targets.numel() + mb.targets.shape[0] for mb in real)
        local_stats = {"parts": parts, "adv_abs": [abs(s.advantage) for s in samples],
                       "tokens_total": sum(s.num_tokens for s in samples), "real_tokens": sum(mb.num_tokens for mb in real),
                       "pad_slots": pad_slots, "micro_batches": len(real)}
        stats = comm.gather(local_stats)
        self.step += 1
        self.version += 1
        self.cursor["trajectories_trained"] += len(adv) if comm.is_main else 0
        t_pub = time.perf_counter()
        self.publish()
        metrics["time/publish_s"] = time.perf_counter() - t_pub
        if comm.is_main:
            metrics.update(combine_metrics([p for s in stats for p in s["parts"]]))
            metrics.update({"adv_abs_mean": float(np.mean([a for s in stats for a in s["adv_abs"]])),
                            "tokens_total": sum(s["tokens_total"] for s in stats),
                            "pad_frac": 1.0 - sum(s["real_tokens"] for s in stats) / max(sum(s["pad_slots"] for s in stats), 1),
                            "micro_batches": sum(s["micro_batches"] for s in stats), "updates": n_updates,
                            "grad_norm": float(np.mean(norms)), "lr": lr, "time/prox_s": t_prox - t_prep,
                            "time/train_s": t_train - t_prox, "learner/world_size": comm.world})
            if self.tc.sample_every and self.step % self.tc.sample_every == 0 and groups:
                self.save_samples(groups)
            metrics["tokens_per_s"] = n_loss_tokens / max(time.perf_counter() - t0, 1e-9)
        return self._finish(metrics, t0, skipped=False)

    def _finish(self, metrics: dict[str, Any], t0: float, skipped: bool) -> dict[str, Any]:
        metrics["skipped"] = int(skipped)
        metrics.setdefault("tokens_per_s", 0.0)  # a skipped step trained nothing
        # Counted when the step is over (weights published), not when its batch is taken: the
        # driver's pacing starts the next step's groups on this count, and groups started before
        # the new version is out would sample the old weights and come in one version too stale.
        self.cursor["batches"] += 1
        metrics["step"] = self.step
        metrics["version"] = self.version
        metrics["time/checkpoint_s"] = 0.0
        if not skipped and self.tc.checkpoint_every and self.step % self.tc.checkpoint_every == 0:
            t = time.perf_counter()
            self.save()
            metrics["time/checkpoint_s"] = time.perf_counter() - t
        if self.server is not None:
            stats = self.server.buffer.stats()
            c = stats["counters"]
            metrics.update({"buffer/size": stats["size"], "buffer/rejected": c["rejected"],
                            "buffer/stale": c["stale_at_put"] + c["stale_at_take"], "buffer/duplicate": c["duplicate"]})
        metrics["time/step_s"] = time.perf_counter() - t0
        if not self.comm.is_main:
            return metrics
        self.last_metrics = metrics
        if self.metrics is not None:
            # A skipped batch's row carries the step it followed; kept out of TensorBoard, where its reward
            # would be a second point at that step's x. metrics.jsonl keeps it, flagged skipped with its batch.
            self.metrics.log(self.step, {**metrics, "batch": self.cursor["batches"]}, tensorboard=not skipped)
        return metrics

    # ---- the loop
    def run(self, stop: Optional[threading.Event] = None,
            on_wait: Optional[Callable[[float], None]] = None) -> None:
        """Take batches from the server and train until total_steps or `stop`; save a checkpoint at the end.

        `on_wait(seconds)` hears how long each wait for a batch took (the learner's idle time)."""
        if self.server is None:
            raise RuntimeError("Trainer.run needs a LearnerServer")
        stop = stop or threading.Event()
        if self.version > 0:  # resumed: workers that (re)connect get the weights they must sample with
            self.command("publish")
            self.publish()
        ok = False
        try:
            while not stop.is_set() and not (self.tc.total_steps and self.step >= self.tc.total_steps):
                t_wait = time.perf_counter()
                groups = self.server.get_batch(self.tc.groups_per_step, timeout=self.tc.batch_timeout_s)
                if on_wait is not None:
                    on_wait(time.perf_counter() - t_wait)
                if not groups:
                    self.command("idle")  # the other ranks wait for rank 0 at most batch_timeout_s at a time
                    if not stop.is_set():
                        log.info("step %d: no batch within %.0f s (buffer %d/%d)", self.step, self.tc.batch_timeout_s,
                                 len(self.server.buffer), self.server.buffer.capacity)
                    continue
                m = self.train_step(groups)
                if not m["skipped"]:
                    self.skipped_in_a_row = 0
                    log.info("step %d version %d loss %.4f reward %.3f (%.1f s)", self.step, self.version,
                             m.get("loss", float("nan")), m.get("reward_mean", float("nan")), m["time/step_s"])
                elif self._too_many_skipped(m):
                    break
            ok = True
        finally:
            # After a failure the other ranks may be gone or stuck in a collective: the driver
            # restarts the whole group from the last checkpoint instead.
            if ok or not self.comm.distributed:
                self.finish()
            if self.metrics is not None:
                self.metrics.close()

    def _too_many_skipped(self, m: dict[str, Any]) -> bool:
        """Count a batch that trained nothing; True (and `stopped` says why) once trainer.max_skipped_batches
        of them came in a row."""
        self.skipped_in_a_row += 1
        log.warning("batch %d trained nothing (%d groups: %d zero-variance; reward %.3f); %d such batches in a row",
                    self.cursor["batches"], m.get("groups", 0), m.get("zero_variance_groups", 0),
                    m.get("reward_mean", float("nan")), self.skipped_in_a_row)
        limit = self.tc.max_skipped_batches
        if not limit or self.skipped_in_a_row < limit:
            return False
        self.stopped = (f"{self.skipped_in_a_row} batches in a row trained nothing (last: {m.get('groups', 0)} groups, "
                        f"{m.get('zero_variance_groups', 0)} with every reward the same, reward {m.get('reward_mean', float('nan')):.3f}): "
                        "the tasks are all too easy or all too hard for this policy (trainer.max_skipped_batches)")
        log.error("step %d: stopping: %s", self.step, self.stopped)
        return True

    def finish(self, export_dir: Optional[str | Path] = None) -> None:
        """Rank 0 at the end: the last checkpoint, the HF export (to `export_dir`, else run_dir/model when
        trainer.export_hf), and the other ranks released."""
        if self.step > 0 and self.saved_step != self.step:
            self.command("save")
            self.save()
        if export_dir is not None or (self.tc.export_hf and self.step > 0):
            self.command("export", None if export_dir is None else str(export_dir))
            self.export(export_dir)
        self.command("stop")

    def command(self, kind: str, payload: Any = None) -> None:
        """Rank 0 tells every other rank what to do next (see `follow`)."""
        if self.comm.distributed:
            self.comm.scatter([(kind, payload)] * self.comm.world)

    def follow(self) -> None:
        """A rank other than 0: do what rank 0 says until it says stop."""
        while True:
            kind, payload = self.comm.scatter(None)
            if kind == "publish":
                self.publish()
            elif kind == "step":
                self._step(payload, new_counts(), {}, None, time.perf_counter())
            elif kind == "save":
                self.save()
            elif kind == "export":
                self.export(payload)
            elif kind == "stop":
                return

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


PUBLISHED = "published_version"


def mark_published(run_dir: Path, version: int) -> None:
    """Record `version` as handed out, before it is (written whole: a temp file renamed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{PUBLISHED}.tmp"
    tmp.write_text(str(int(version)))
    tmp.replace(run_dir / PUBLISHED)


def published_version(run_dir: Path) -> Optional[int]:
    """The newest version a learner of this run dir handed out, if any."""
    try:
        return int((run_dir / PUBLISHED).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _norm_count(mb: Optional[MicroBatch], loss_agg: str) -> float:
    """What a micro-batch adds to its update's normaliser: loss tokens (token-mean) or sequences with
    a loss token (the seq-mean aggregations); a filler adds nothing."""
    if mb is None:
        return 0.0
    if loss_agg == "token-mean":
        return float(mb.mask.sum())
    return float((mb.mask.sum(-1) > 0).sum())


def weights_source(model_dir: Optional[str | Path], resumed_from: Optional[Path]) -> Path:
    """Where the initial weights come from: the base model directory, which a resumed checkpoint
    then overwrites; without one, the checkpoint's config (random weights, overwritten too)."""
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        return Path(model_dir)
    if resumed_from is not None:
        return resumed_from / "model"
    raise FileNotFoundError(f"no checkpoint to resume and no HF model directory given ({model_dir})")


def default_run_dir() -> str:
    """runs/<local timestamp>: a fresh directory per run unless the user names one."""
    return time.strftime("runs/%Y%m%d-%H%M%S")


def check_trainer_config(cfg: WeftConfig) -> None:
    """ValueError for settings that cannot work together (beyond the per-field bounds)."""
    tc = cfg.trainer
    if tc.groups_per_step > cfg.learner.buffer_capacity:
        raise ValueError(f"trainer.groups_per_step ({tc.groups_per_step}) exceeds learner.buffer_capacity "
                         f"({cfg.learner.buffer_capacity}): a batch could never be taken")
    if len(tc.betas) != 2 or not all(0.0 <= b < 1.0 for b in tc.betas):
        raise ValueError(f"trainer.betas must be two numbers in [0, 1), got {tc.betas}")
    if tc.weight_transport == "nccl":
        raise ValueError("trainer.weight_transport=nccl: the sender exists (learner.weights.DistributedWeightSender) "
                         "but no rollout worker receives over NCCL yet; use grpc")
    if abs(tc.temperature - cfg.rollout.temperature) > 1e-9 and cfg.rollout.temperature > 0:
        log.warning("trainer.temperature %.3g != rollout.temperature %.3g: the IS weights will be off",
                    tc.temperature, cfg.rollout.temperature)


def batch_metrics(groups: Sequence[Group], version: int) -> dict[str, Any]:
    """Rewards, accuracy and staleness of the groups as taken (before filtering)."""
    ran = [t for g in groups for t in g.trajectories if t.status not in (Status.FAILED, Status.ABORTED)]
    rewards = np.asarray([t.reward for t in ran], dtype=np.float64)
    terms = sorted({k for t in ran for k in t.reward_terms})
    lags = []
    for g in groups:
        try:
            lags.append(version - oldest_version(g))
        except ValueError:
            continue  # no generated token at all: nothing to measure
    hist: dict[int, int] = {}
    for lag in lags:
        hist[lag] = hist.get(lag, 0) + 1
    out: dict[str, Any] = {
        "groups": len(groups), "trajectories": sum(len(g.trajectories) for g in groups),
        "reward_mean": float(rewards.mean()) if rewards.size else 0.0,
        "reward_std": float(rewards.std()) if rewards.size else 0.0,
        "accuracy": float(np.mean([t.reward_terms.get("accuracy", 0.0) > 0 for t in ran])) if ran else 0.0,
        "staleness_mean": float(np.mean(lags)) if lags else 0.0, "staleness_max": max(lags) if lags else 0,
        "staleness_hist": dict(sorted(hist.items())),
    }
    for k in terms:
        out[f"reward/{k}"] = float(np.mean([t.reward_terms.get(k, 0.0) for t in ran]))
    # What the episodes did, beside what they earned: tool use being learned shows here first.
    for k in ("tool_calls", "turns", "frames"):
        out[f"episode/{k}"] = float(np.mean([t.metrics.get(k, 0.0) for t in ran])) if ran else 0.0
    out["episode/used_tools"] = float(np.mean([t.metrics.get("tool_calls", 0.0) > 0 for t in ran])) if ran else 0.0
    return out


# ------------------------------------------------------------------ `weft learner`


def main_learner(args: argparse.Namespace) -> int:
    """`weft learner`: serve LearnerService, train on what rollout workers submit, publish weights, checkpoint.

    SIGINT/SIGTERM stop it cleanly (a final checkpoint is saved); killed harder, it resumes
    from the newest complete checkpoint (trainer.resume=auto).
    """
    import signal

    from configs import load_config
    from learner.service import LearnerService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    for key, value in (("port", args.port), ("host", args.host), ("token", args.token)):
        if value is not None:
            setattr(cfg.learner, key, value)
    if args.run_dir is not None:
        cfg.trainer.run_dir = args.run_dir
    if args.world_size is not None:
        cfg.learner.world_size = args.world_size
    if args.replay is not None:
        return main_replay(cfg, args)
    if cfg.learner.world_size > 1:
        raise SystemExit("weft learner serves as one process; a sharded learner runs under `weft train` "
                         "(learner.world_size ranks placed by Ray), or offline with --replay")
    svc = LearnerService(cfg, args.model or cfg.model)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current step, then saving", signum)
        svc.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    address = svc.start()
    print(f"learner listening on {address} (version {svc.trainer.version}, step {svc.trainer.step})", flush=True)
    while not svc.join(timeout=1.0):
        pass
    progress = svc.stop()
    if progress["stopped"]:
        log.error("stopped before trainer.total_steps: %s", progress["stopped"])
    return 1 if progress["error"] or progress["stopped"] else 0


def main_replay(cfg: WeftConfig, args: argparse.Namespace) -> int:
    """`weft learner --replay FILE --steps K --out DIR`: prints a JSON summary last."""
    import json

    from learner.replay import replay

    if args.steps is None or args.out is None:
        raise SystemExit("--replay needs --steps and --out")
    if cfg.trainer.run_dir is None:
        cfg.trainer.run_dir = default_run_dir()
    summary = replay(cfg, args.model or cfg.model, args.replay, args.steps, args.out, cfg.learner.world_size)
    print(json.dumps(summary))
    return 0


def fill_learner_limits(cfg: WeftConfig, model_dir: Optional[str | Path]) -> None:
    """Set learner.vocab_size and learner.image_token_id from the model (the server validates with them)."""
    from transformers import AutoConfig

    source = ckpt.resolve_resume(cfg.trainer.resume, cfg.trainer.run_dir)
    source = source / "model" if source else model_dir
    if source is None:
        return
    hf = AutoConfig.from_pretrained(str(source))
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    if cfg.learner.vocab_size is None:
        cfg.learner.vocab_size = int(text.vocab_size)
    if cfg.learner.image_token_id is None and getattr(hf, "image_token_id", None) is not None:
        cfg.learner.image_token_id = int(hf.image_token_id)
