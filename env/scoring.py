"""Scoring episodes as a benchmark does: one record per episode, then mean@K, pass@K and per-category accuracy.

`weft eval` (actors/evaluator.py) and validation during training (actors/dispatcher.py) both
score with these functions, on trajectories from the same agent loop RL trains with.

The prediction of an episode is its parsed `<answer>` (what the reward reads); when there is
none, the final turn's own text is read instead (a no-tools baseline may answer "B" without the
tags, and benchmarks score that). Either way `env.rewards.choice_of` reads the option from the
forms models write ("B", "(B)", "B.", "B) text", "The answer is B", the option's text), and
numeric or short answers keep the env's normalised match. `answer_from` says which it was.

Accuracy is mean@K: the mean over tasks of the fraction of a task's K samples that are right
(greedy, K = 1, is plain accuracy). pass@k is the unbiased estimator of Chen et al. (2021),
1 - C(n-c, k) / C(n, k) averaged over tasks, for k = 1, 2, 4, ... up to K.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Iterable, Optional

from env.rewards import choice_of, match_answer
from env.types import Task
from protos.records import Status, Trajectory

# Task metadata keys reported per value (a benchmark's task type, duration group, domain, ...).
CATEGORY_KEYS = ("task_type", "duration_group", "domain", "sub_category", "category", "question_type", "level")


def prediction(traj: Trajectory) -> tuple[Optional[str], str]:
    """(the episode's answer, where it came from: 'tag', 'text' or 'none')."""
    answer = traj.metadata.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer), "tag"
    turns = traj.metadata.get("turn_texts") or []
    last = str(turns[-1]).replace("<|im_end|>", "").strip() if turns else ""
    return (last, "text") if last else (None, "none")


def categories(task: Task) -> dict[str, list[str]]:
    """The task's category values by key (a ';'-joined value, like LVBench's question types, is several)."""
    out = {}
    for key in CATEGORY_KEYS:
        value = task.metadata.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            out[key] = [v.strip() for v in str(value).split(";") if v.strip()]
    return out


def episode_record(task: Task, traj: Trajectory, sample: int) -> dict[str, Any]:
    """One line of results.jsonl."""
    pred, source = prediction(traj)
    correct = pred is not None and match_answer(pred, task.answer, task.options)
    letter = choice_of(pred, task.options) if task.options and pred is not None else None
    shown = chr(65 + letter) if letter is not None else (pred[:200] if pred else None)
    if traj.status is Status.FAILED:
        reason = str(traj.metadata.get("error", "failed"))[:300]
    elif traj.status is Status.TRUNCATED:
        reason = str(traj.metadata.get("truncated_by", "truncated"))
    else:
        reason = ""
    m = traj.metrics
    return {"task_id": task.id, "sample": int(sample), "prediction": shown, "answer": task.answer,
            "correct": bool(correct), "answer_from": source, "turns": int(m.get("turns", 0)),
            "tool_calls": int(m.get("tool_calls", 0)), "frames": int(m.get("images", len(traj.media))),
            "generated_tokens": int(m.get("generated_tokens", 0)), "seconds": round(float(m.get("episode_s", 0.0)), 3),
            "status": traj.status.value, "reason": reason, "categories": categories(task)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with n samples, c of them right (Chen et al. 2021)."""
    if k > n or n < 1:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a set of episode records (summary.json; `val/...` metrics during training)."""
    records = list(records)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(r)
    if not by_task:
        return {"tasks": 0, "episodes": 0, "accuracy": 0.0}
    frac = {t: sum(r["correct"] for r in rs) / len(rs) for t, rs in by_task.items()}
    n_min = min(len(rs) for rs in by_task.values())
    ks = sorted({k for k in (2 ** i for i in range(int(math.log2(n_min)) + 1))} | {n_min})
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    cats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for t, rs in by_task.items():
        for key, values in rs[0]["categories"].items():
            for v in values:
                cats[key][v].append(frac[t])
    return {
        "tasks": len(by_task), "episodes": len(records), "samples": n_min,
        "accuracy": sum(frac.values()) / len(frac),
        "pass_at_k": {str(k): sum(pass_at_k(len(rs), sum(r["correct"] for r in rs), k) for rs in by_task.values())
                      / len(by_task) for k in ks},
        "by_category": {key: {v: {"accuracy": sum(xs) / len(xs), "tasks": len(xs)} for v, xs in sorted(vals.items())}
                        for key, vals in sorted(cats.items())},
        "mean_frames": mean("frames"), "mean_tool_calls": mean("tool_calls"), "mean_turns": mean("turns"),
        "mean_generated_tokens": mean("generated_tokens"), "mean_seconds": mean("seconds"),
        "status": dict(Counter(r["status"] for r in records)),
        "answer_from": dict(Counter(r["answer_from"] for r in records)),
        "failures": dict(Counter(_reason_key(r["reason"]) for r in records if r["status"] == Status.FAILED.value)),
    }


def _reason_key(reason: str) -> str:
    """A failure reason without its particulars (paths, numbers), so alike failures count together."""
    head = reason.split(":", 1)[0].strip()
    return head[:80] or "unknown"


def val_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A summary as flat `val/...` metrics (metrics.jsonl, TensorBoard)."""
    out = {"val/accuracy": summary["accuracy"], "val/tasks": float(summary["tasks"])}
    if summary["tasks"]:
        out.update({f"val/pass@{k}": v for k, v in summary["pass_at_k"].items()})
        out.update({"val/mean_frames": summary["mean_frames"], "val/mean_tool_calls": summary["mean_tool_calls"],
                    "val/mean_turns": summary["mean_turns"],
                    "val/failed": float(summary["status"].get(Status.FAILED.value, 0))})
        for key, values in summary["by_category"].items():
            out.update({f"val/{key}/{v}": s["accuracy"] for v, s in values.items()})
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table (what `weft eval` prints)."""
    if not summary.get("tasks"):
        return "no episodes"
    lines = [f"{summary['tasks']} tasks x {summary['samples']} sample(s) = {summary['episodes']} episodes",
             f"  {'accuracy (mean@' + str(summary['samples']) + ')':<40}{summary['accuracy']:>8.3f}"]
    lines += [f"  {'pass@' + k:<40}{v:>8.3f}" for k, v in summary["pass_at_k"].items()]
    for key, values in summary["by_category"].items():
        lines.append(f"  by {key}:")
        lines += [f"    {v[:36]:<38}{s['accuracy']:>8.3f}  ({s['tasks']} tasks)" for v, s in values.items()]
    lines += [f"  {'mean frames / tool calls / turns':<40}{summary['mean_frames']:>8.1f} / "
              f"{summary['mean_tool_calls']:.2f} / {summary['mean_turns']:.2f}",
              f"  {'status':<40}{summary['status']}", f"  {'answer read from':<40}{summary['answer_from']}"]
    if summary["failures"]:
        lines.append(f"  {'failures':<40}{summary['failures']}")
    return "\n".join(lines)
