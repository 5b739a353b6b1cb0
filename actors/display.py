"""What the driver shows while a run trains: a rich live table on a terminal, a log line per step otherwise.

`display(mode, total_steps)` is a context manager yielding `update(snapshot)`, where
a snapshot is `Dispatcher.snapshot()`. Modes (run.display): rich | log | none | auto
(rich when stdout is a terminal: `ray job submit` and CI capture output, where a
redrawn table is noise and one line per step reads better).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator


def fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def row(s: dict[str, Any], total_steps: int) -> dict[str, str]:
    """The numbers a user watches, as strings (one place for both the table and the log line)."""
    m, c = s.get("metrics", {}), s.get("counts", {})
    reruns = sum(v for k, v in c.items() if k.startswith("rerun/"))
    return {"step": f"{s['step']}/{total_steps}", "version": str(s["version"]),
            "reward": fmt(m.get("reward_mean")), "accuracy": fmt(m.get("accuracy")),
            "tool calls/ep": fmt(m.get("episode/tool_calls"), 2),
            "tokens/s": fmt(m.get("tokens_per_s"), 1), "staleness": fmt(m.get("staleness_mean"), 2),
            "workers": f"{s['workers_alive']}/{s['workers']}", "envs": f"{s['envs_alive']}/{s['envs']}",
            "groups ok/run/rerun": f"{c.get('accepted', 0)}/{s['running']}/{reruns}",
            "buffer": str(s["buffer"]), "learner idle": fmt(s.get("idle_frac"), 2),
            "val acc": "-" if not s.get("validation") else f"{s['validation']['accuracy']:.3f}@{s['validation']['step']}"}


def _table(r: dict[str, str]) -> Any:
    from rich.table import Table

    t = Table(title="weft train", show_header=True, header_style="bold")
    for k in r:
        t.add_column(k, justify="right")
    t.add_row(*r.values())
    return t


@contextlib.contextmanager
def display(mode: str, total_steps: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "log"
    if mode == "none":
        yield lambda s: None
        return
    if mode == "log":
        last = {"key": None}

        def log_line(s: dict[str, Any]) -> None:
            m = s.get("metrics", {})
            key = (m.get("step"), m.get("skipped"), s["step"])  # once per step, when its metrics are in
            if key != last["key"] and m.get("step") == s["step"]:
                last["key"] = key
                print(time.strftime("%H:%M:%S ") + "  ".join(f"{k}={v}" for k, v in row(s, total_steps).items()),
                      flush=True)

        yield log_line
        return
    from rich.live import Live

    with Live(refresh_per_second=2) as live:
        yield lambda s: live.update(_table(row(s, total_steps)))


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run tables: did it learn (first vs last steps), and where every group went."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    learn = Table(title=f"learning over {summary['steps']} steps (mean ± std)", header_style="bold")
    for col in ("metric", "first steps", "last steps", "rise", "rise / s.e."):
        learn.add_column(col, justify="right")
    for key, s in summary["learning"].items():
        learn.add_row(key, f"{s['first_mean']:.3f} ± {s['first_std']:.3f}", f"{s['last_mean']:.3f} ± {s['last_std']:.3f}",
                      f"{s['rise']:+.3f}", f"{s['rise_se']:+.1f}")
    console.print(learn)
    if summary.get("validation"):
        val = Table(title="validation (data.val_path, with each step's weights)", header_style="bold")
        for col in ("step", "version", "accuracy", "tasks", "seconds"):
            val.add_column(col, justify="right")
        for v in summary["validation"]:
            val.add_row(str(v["step"]), str(v["version"]), f"{v['accuracy']:.3f}", str(v["tasks"]), f"{v['seconds']:.1f}")
        console.print(val)
    g = summary["groups"]
    acct = Table(title="groups", header_style="bold")
    for k in ("created", "accepted", "duplicate", "stale", "rejected", "given_up", "abandoned", "pending"):
        acct.add_column(k, justify="right")
    acct.add_row(*(str(g[k]) for k in ("created", "accepted", "duplicate", "stale", "rejected", "given_up",
                                        "abandoned", "pending")))
    console.print(acct)
    console.print(f"groups that crossed a weight update mid-episode: {g['crossed_versions']}")
    console.print(f"re-run: {g['reruns']}  restarts: workers {g['worker_restarts']}, envs {g['env_restarts']}, learner {g.get('learner_restarts', 0)}  "
                  f"learner idle {summary['learner']['idle_frac']:.2f}  run dir: {summary['run_dir']}")
