"""Per-step metrics of the learner: what each one means, and where they go (JSONL + TensorBoard).

`METRIC_HELP` has one line per metric the trainer and SFT log (the loss's own come
from `learner.grpo.METRIC_HELP`); `docs/metrics.md` is generated from it
(`metrics_markdown`) and a test keeps the two equal and checks every logged key is
documented. `MetricsLogger` appends one JSON object per step to
`run_dir/metrics.jsonl` and writes scalars (and the staleness histogram) to
TensorBoard under `run_dir/tb`. On resume it drops the lines of steps after the
checkpoint, so the file never holds two different step 7s.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from learner import grpo

# Keys with a "/" stand for a family: "reward/<term>" documents reward/accuracy, reward/format, ...
TRAINER_HELP = {
    "step": "optimizer steps taken so far (the line's x axis)",
    "time": "unix time the line was written (JSONL only)",
    "version": "weight version after this step (published to the rollout workers)",
    "skipped": "1 when nothing was left to train on after filtering (no update, no new version), else 0",
    "batch": "batches taken from the buffer so far, this one included (a skipped batch's row repeats the step it followed)",
    "reward_mean": "mean reward of the batch's trajectories that ran (FAILED/ABORTED excluded)",
    "reward_std": "std of those rewards",
    "reward/<term>": "mean of one named reward term (accuracy, format, tool, evidence, cost) over the same trajectories",
    "accuracy": "fraction of those trajectories whose accuracy term is positive (right answer)",
    "episode/<term>": "mean over the same trajectories of what the episode did: tool_calls, turns, frames (returned by "
                      "tools); used_tools is the fraction that made at least one tool call",
    "adv_abs_mean": "mean |advantage| over the trajectories trained on",
    "groups": "groups taken from the buffer for this step",
    "groups_trained": "groups left after dropping zero-variance groups and bad trajectories",
    "trajectories": "trajectories in the groups taken",
    "trajectories_trained": "trajectories trained on",
    "zero_variance_groups": "groups dropped because all their rewards agreed (no GRPO signal)",
    "subagent_trajectories_trained": "sub-agent trajectories trained with their episode's advantage (trainer.train_subagents)",
    "kl_in_reward/seq_kl_mean": "mean over the step's trajectories of sum_t log(mu / pi_ref), the KL taken off rewards (loss.kl_in_reward)",
    "dropped/failed": "FAILED trajectories dropped (never trained on)",
    "dropped/aborted": "ABORTED trajectories dropped (the episode was stopped from outside)",
    "dropped/hash_mismatch": "trajectories dropped because a re-decoded image did not match its recorded content hash",
    "dropped/decode_error": "trajectories dropped because an image could not be re-decoded",
    "dropped/image_tokens": "trajectories dropped because their image-token runs did not fit their images",
    "dropped/banned_token": "trajectories dropped because a generated token was a banned (placeholder) id",
    "staleness_mean": "mean over the batch's groups of (version before the step - oldest token version)",
    "staleness_max": "largest such lag in the batch",
    "staleness_hist": "histogram lag -> groups of this batch (JSONL dict; a TensorBoard histogram)",
    "buffer/size": "groups waiting in the learner's buffer after the batch was taken",
    "buffer/rejected": "groups rejected by validation since the start (all reasons; see GetStatus for each)",
    "buffer/stale": "groups dropped as too stale since the start (at submission and when taken)",
    "buffer/duplicate": "resubmitted groups answered DUPLICATE since the start (exactly-once at work)",
    "tokens_total": "tokens in the trained trajectories (prompt, turns, observations)",
    "pad_frac": "fraction of the micro-batches' padded token slots that are padding",
    "micro_batches": "micro-batches (forward/backward passes) in the step, summed over the learner's ranks",
    "learner/world_size": "learner ranks that trained the step (FSDP2 data parallel; 1 = one process)",
    "updates": "optimizer updates in the step (trainer.updates_per_step, fewer if there were fewer micro-batches)",
    "grad_norm": "global gradient norm before clipping (mean over the step's updates)",
    "lr": "learning rate of the step's last update",
    "tokens_per_s": "loss tokens trained per second of step time",
    "time/step_s": "wall time of the whole step",
    "time/prepare_s": "filtering, pixel re-materialisation and image processing",
    "time/prox_s": "the no-grad pass for the proximal logprobs",
    "time/train_s": "forward, backward and optimizer updates",
    "time/publish_s": "gathering (sharded) and cutting the new weights into chunks for the rollout workers",
    "time/checkpoint_s": "saving a checkpoint (0 on steps without one)",
    "validation": "1 on a validation row (written by the driver between steps; the step's training row is separate)",
    "val/<term>": "validation on data.val_path with the step's weights (trainer.val_every): accuracy (mean@K), pass@k, "
                  "mean_frames, mean_tool_calls, mean_turns, failed, tasks, seconds, version (the step's weights), "
                  "policy_version_min/max (the versions that sampled its tokens: equal to version), and accuracy "
                  "per task category as val/<category key>/<value>",
    "sft/loss": "SFT: mean negative log-likelihood of the model-turn tokens",
    "sft/token_acc": "SFT: fraction of model-turn tokens the model ranks first",
    "sft/tokens": "SFT: model-turn (loss) tokens in the step",
}
METRIC_HELP = {**grpo.METRIC_HELP, **TRAINER_HELP}


def help_for(key: str) -> Optional[str]:
    """The help line of a logged key (families like reward/accuracy resolve to reward/<term>)."""
    if key in METRIC_HELP:
        return METRIC_HELP[key]
    head = key.split("/", 1)[0]
    return METRIC_HELP.get(f"{head}/<term>")


def metrics_markdown() -> str:
    """docs/metrics.md: every logged metric in one line."""
    lines = ["# Learner metrics", "",
             "Every key the learner logs per step to `run_dir/metrics.jsonl` and TensorBoard (`run_dir/tb`).",
             "Generated from `learner/metrics.py` (`METRIC_HELP`); a test keeps this page equal to it.", "",
             "| metric | meaning |", "| --- | --- |"]
    lines += [f"| `{k}` | {v.replace('|', chr(92) + '|')} |" for k, v in METRIC_HELP.items()]
    return "\n".join(lines) + "\n"


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it visible rather than crash the log
    return v


class MetricsLogger:
    """Appends per-step metrics to run_dir/metrics.jsonl and, optionally, TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: Optional[int] = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (a run killed after its last checkpoint logged them)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut by the kill
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any], tensorboard: bool = True) -> None:
        """One row of metrics.jsonl at `step`; also TensorBoard scalars and histograms unless `tensorboard` is off."""
        row = {"step": int(step), "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._writer is None or not tensorboard:
            return
        for k, v in row.items():
            if k in ("step", "time"):
                continue
            if isinstance(v, dict):
                values = np.repeat([float(x) for x in v], [int(c) for c in v.values()]) if v else np.zeros(0)
                if values.size:
                    self._writer.add_histogram(k, values, step)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(k, float(v), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ------------------------------------------------------------------ a run's summary

LEARNING_KEYS = ("reward_mean", "accuracy", "reward/format", "reward/tool", "reward/accuracy", "reward/evidence",
                 "episode/used_tools", "episode/tool_calls")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The trained steps of run_dir/metrics.jsonl (skipped steps and validation rows left out), in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if not row.get("skipped") and not row.get("validation"):
            rows.append(row)
    return rows


def learning_summary(rows: list[dict[str, Any]], window: int = 10) -> dict[str, dict[str, float]]:
    """First-`window` vs last-`window` steps: mean and standard deviation of each LEARNING_KEYS metric,
    and the rise (last mean - first mean) in units of the pooled standard error."""
    out: dict[str, dict[str, float]] = {}
    if not rows:
        return out
    w = max(1, min(window, len(rows) // 2 or 1))
    for key in LEARNING_KEYS:
        first = np.array([r[key] for r in rows[:w] if isinstance(r.get(key), (int, float))], dtype=float)
        last = np.array([r[key] for r in rows[-w:] if isinstance(r.get(key), (int, float))], dtype=float)
        if not first.size or not last.size:
            continue
        se = math.sqrt(first.var(ddof=1) / first.size + last.var(ddof=1) / last.size) if min(first.size, last.size) > 1 else 0.0
        rise = float(last.mean() - first.mean())
        out[key] = {"first_mean": float(first.mean()), "first_std": float(first.std()), "last_mean": float(last.mean()),
                    "last_std": float(last.std()), "rise": rise, "rise_se": rise / se if se > 0 else 0.0, "window": w}
    return out
