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
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from configs.schema import WeftConfig
from learner import checkpoint as ckpt
from learner.batch import MicroBatch, Prepared, Sample, collate, pack, prepare_batch
from learner.buffer import oldest_version
from learner.kernels.chunked import chunked_token_logprobs
from learner.loss import fused_policy_loss
from learner.metrics import MetricsLogger
from learner.weights import DTYPES, named_weights
from protos.records import Group, Status

log = logging.getLogger(__name__)

_SUM_METRICS = ("tokens",)
_MAX_METRICS = ("is_weight_max",)
_LOSS_METRICS = ("loss", "pg_loss")


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


def micro_weights(masks: Sequence[Tensor], loss_agg: str) -> list[float]:
    """Weight of each micro-batch's loss so their sum is the loss of all of them together.

    The fused loss normalises by its own micro-batch: tokens for token-mean, sequences
    (with a loss token) for the seq-mean aggregations; the weight is its share.
    """
    if loss_agg == "token-mean":
        n = [float(m.sum()) for m in masks]
    else:
        n = [float((m.sum(-1) > 0).sum()) for m in masks]
    total = sum(n)
    return [x / total if total else 0.0 for x in n]


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


class Trainer:
    """Owns the model, optimizer, step/version counters, checkpoints and metrics of one learner.

    `resume` (trainer.resume) decides where the weights come from: the newest complete
    checkpoint under trainer.run_dir ("auto"), `model_dir` ("never"), or a given
    checkpoint. Pass the LearnerServer *before starting it*: its state (buffer,
    seen-set, version) is restored from the checkpoint here.
    """

    def __init__(self, cfg: WeftConfig, model_dir: Optional[str | Path] = None, *, server: Any = None,
                 log_metrics: bool = True) -> None:
        from models.hf import banned_token_ids, load_hf_model, load_processor

        self.cfg, self.tc = cfg, cfg.trainer
        check_trainer_config(cfg)
        if self.tc.run_dir is None:
            self.tc.run_dir = default_run_dir()
        self.run_dir = Path(self.tc.run_dir)
        self.device = resolve_device(self.tc.device)
        self.dtype = compute_dtype(self.tc.dtype, self.device)
        self.resumed_from = ckpt.resolve_resume(self.tc.resume, self.run_dir)
        source = self.resumed_from / "model" if self.resumed_from else model_dir
        if source is None or not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint under {self.run_dir} and no HF model directory given ({source})")
        self.model = load_hf_model(source, "float32", str(self.device)).train()
        self.processor = load_processor(source)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.image_token_id, self.video_token_id = token_ids_of(self.model)
        self.banned_list = banned_token_ids(self.model.config, len(self.tokenizer))
        self.banned = torch.tensor(self.banned_list, dtype=torch.long, device=self.device)
        self.pad_id = pad_id_of(self.tokenizer, (self.image_token_id, self.video_token_id))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.tc.lr, betas=tuple(self.tc.betas), eps=self.tc.eps,
                                           weight_decay=self.tc.weight_decay)
        self.server = server
        self.step = 0
        self.version = 0
        self.cursor = {"groups_consumed": 0, "trajectories_trained": 0, "batches": 0}
        self.last_metrics: dict[str, Any] = {}
        self.decoder = None  # env's shared FrameDecoder, created on first use
        self.saved_step: Optional[int] = None
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
            self.saved_step = self.step
        self.metrics = (MetricsLogger(self.run_dir, self.tc.tensorboard, self.step if self.resumed_from else None)
                        if log_metrics else None)

    # ---- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything but the weights that a restart needs (plain types and tensors)."""
        from configs.loader import to_yaml

        return {"step": self.step, "version": self.version, "optimizer": self.optimizer.state_dict(),
                "cursor": dict(self.cursor), "rng": ckpt.rng_state(),
                "server": self.server.state_dict() if self.server is not None else None, "config": to_yaml(self.cfg)}

    def save(self) -> Path:
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.processor, self.state(),
                                    keep=self.tc.keep_checkpoints)
        self.saved_step = self.step
        log.info("checkpoint %s (step %d, version %d)", path, self.step, self.version)
        return path

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
        state = ckpt.load_state(path, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.version = int(state["step"]), int(state["version"])
        self.cursor.update({k: int(v) for k, v in state["cursor"].items()})
        ckpt.set_rng_state(state["rng"])
        if self.server is not None and state.get("server") is not None:
            self.server.load_state_dict(state["server"])
        log.info("resumed from %s at step %d, version %d", path, self.step, self.version)

    # ---- weights
    def publish_dtype(self) -> torch.dtype:
        name = self.cfg.rollout.dtype if self.tc.publish_dtype == "auto" else self.tc.publish_dtype
        return DTYPES[name]

    def publish(self) -> None:
        """Hand the current weights to the rollout workers as `self.version`."""
        if self.server is not None:
            self.server.set_step(self.step)
            self.server.publish(self.version, named_weights(self.model, self.publish_dtype()))

    # ---- per-token logprobs
    def prepare(self, groups: Sequence[Group]) -> Prepared:
        if self.decoder is None:
            from env.video import get_decoder

            self.decoder = get_decoder(self.cfg.env.cache_bytes, self.cfg.env.reader_pool_size)
        return prepare_batch(groups, processor=self.processor, image_token_id=self.image_token_id,
                             banned=self.banned_list, adv_mode=self.tc.adv_mode, decoder=self.decoder)

    def micro_batches(self, samples: Sequence[Sample]) -> list[MicroBatch]:
        return [collate([samples[i] for i in idx], pad_id=self.pad_id, image_token_id=self.image_token_id,
                        video_token_id=self.video_token_id, device=self.device)
                for idx in pack([s.num_tokens for s in samples], self.tc.micro_batch_tokens)]

    def _hidden(self, mb: MicroBatch) -> Tensor:
        with autocast(self.device, self.dtype):
            hidden = hidden_states(self.model, mb.inputs)[:, :-1]
        # Under autocast the residual stream (and so the final norm's output) may stay fp32; the
        # LM head then runs in the compute dtype, as the engine's does.
        return hidden if self.dtype == torch.float32 else hidden.to(self.dtype)

    def _head(self, hidden: Tensor) -> Tensor:
        w = lm_head_weight(self.model)
        return w if w.dtype == hidden.dtype else w.to(hidden.dtype)

    @torch.no_grad()
    def token_logprobs(self, mb: MicroBatch) -> Tensor:
        """Processed logprob of each loss token under the current weights `[B, T-1]` (0 elsewhere)."""
        hidden = self._hidden(mb)
        rows = mb.mask
        out = torch.zeros(rows.shape, dtype=torch.float32, device=self.device)
        if rows.any():
            h = hidden[rows]
            out[rows] = chunked_token_logprobs(h, self._head(h), mb.targets[rows], chunk_size=self.tc.chunk_size,
                                               temperature=self.tc.temperature, banned=self.banned).float()
        return out

    def _loss(self, mb: MicroBatch, prox: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = self._hidden(mb)
        return fused_policy_loss(hidden, self._head(hidden), mb.targets, mb.advantages, prox, mb.behavior_logprobs,
                                 mb.mask, self.cfg.loss, chunk_size=self.tc.chunk_size,
                                 temperature=self.tc.temperature, banned=self.banned)

    # ---- one step
    def lr_at(self, step: int) -> float:
        if self.tc.warmup_steps <= 0:
            return self.tc.lr
        return self.tc.lr * min(1.0, (step + 1) / self.tc.warmup_steps)

    def train_step(self, groups: Sequence[Group]) -> dict[str, Any]:
        """One GRPO step on `groups`; returns (and logs) its metrics. No update when nothing survives filtering."""
        t0 = time.perf_counter()
        metrics = batch_metrics(groups, self.version)
        prepared = self.prepare(groups)
        for e in prepared.errors:
            log.warning("dropped trajectory %s", e)
        metrics.update(prepared.counts)
        self.cursor["groups_consumed"] += len(groups)
        t_prep = time.perf_counter()
        metrics["time/prepare_s"] = t_prep - t0
        if not prepared.samples:
            log.warning("step %d: nothing to train on after filtering %d groups", self.step, len(groups))
            return self._finish(metrics, t0, skipped=True)
        mbs = self.micro_batches(prepared.samples)
        prox = [self.token_logprobs(mb) for mb in mbs]
        t_prox = time.perf_counter()
        n_updates = min(self.tc.updates_per_step, len(mbs))
        splits = np.array_split(np.arange(len(mbs)), n_updates)
        n_loss_tokens = float(sum(int(mb.mask.sum()) for mb in mbs))
        parts, norms = [], []
        self.model.train()
        for split in splits:
            lr = self.lr_at(self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            weights = micro_weights([mbs[i].mask for i in split], self.cfg.loss.loss_agg)
            for i, w in zip(split, weights):
                loss, m = self._loss(mbs[i], prox[i])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: non-finite loss {float(loss)}")
                (loss * w).backward()
                parts.append((m, float(mbs[i].mask.sum()) / max(n_loss_tokens, 1.0), w / n_updates))
            max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
            norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_train = time.perf_counter()
        metrics.update(combine_metrics(parts))
        pad_slots = sum(mb.targets.numel() + mb.targets.shape[0] for mb in mbs)
        metrics.update({"adv_abs_mean": float(np.mean([abs(s.advantage) for s in prepared.samples])),
                        "tokens_total": sum(s.num_tokens for s in prepared.samples),
                        "pad_frac": 1.0 - sum(mb.num_tokens for mb in mbs) / max(pad_slots, 1),
                        "micro_batches": len(mbs), "updates": n_updates, "grad_norm": float(np.mean(norms)),
                        "lr": lr, "time/prox_s": t_prox - t_prep, "time/train_s": t_train - t_prox})
        self.step += 1
        self.version += 1
        self.cursor["trajectories_trained"] += len(prepared.samples)
        t_pub = time.perf_counter()
        self.publish()
        metrics["time/publish_s"] = time.perf_counter() - t_pub
        if self.tc.sample_every and self.step % self.tc.sample_every == 0:
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
        self.last_metrics = metrics
        if self.metrics is not None:
            self.metrics.log(self.step, metrics)
        return metrics

    # ---- the loop
    def run(self, stop: Optional[threading.Event] = None,
            on_wait: Optional[Callable[[float], None]] = None) -> None:
        """Take batches from the server and train until total_steps or `stop`; save a checkpoint at the end.

        `on_wait(seconds)` hears how long each wait for a batch took (the learner's idle time)."""
        if self.server is None:
            raise RuntimeError("Trainer.run needs a LearnerServer")
        stop = stop or threading.Event()
        if self.version > 0:
            self.publish()  # resumed: workers that (re)connect get the weights they must sample with
        try:
            while not stop.is_set() and not (self.tc.total_steps and self.step >= self.tc.total_steps):
                t_wait = time.perf_counter()
                groups = self.server.get_batch(self.tc.groups_per_step, timeout=self.tc.batch_timeout_s)
                if on_wait is not None:
                    on_wait(time.perf_counter() - t_wait)
                if not groups:
                    if not stop.is_set():
                        log.info("step %d: no batch within %.0f s (buffer %d/%d)", self.step, self.tc.batch_timeout_s,
                                 len(self.server.buffer), self.server.buffer.capacity)
                    continue
                m = self.train_step(groups)
                log.info("step %d version %d loss %.4f reward %.3f (%.1f s)", self.step, self.version,
                         m.get("loss", float("nan")), m.get("reward_mean", float("nan")), m["time/step_s"])
        finally:
            if self.step > 0 and self.saved_step != self.step:
                self.save()
            if self.metrics is not None:
                self.metrics.close()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


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
    return 1 if progress["error"] else 0


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
