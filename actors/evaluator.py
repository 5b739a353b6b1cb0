"""`weft eval`: every task through the agent loop, engine and env that training uses.

The episodes are `RolloutCore.run_group` groups (actors/rollout_worker.py): the same engine
(vLLM, or a scripted policy with the engine's contract), the same env, tools and reward function,
the same chat rendering and budgets as a training run of the same config. Only the sampling
differs (eval.temperature, greedy by default) and the group is K = eval.samples episodes of one
task. `--no-tools --frames N` is the baseline papers report against: no tools, one turn, N
uniform frames at the tools' frame size, an answer.

It runs in this process with one engine, or with `--ray` over rollout.num_workers Ray actors (a
RolloutCore each, with its own engine and env; RAY_ADDRESS joins a cluster). A task whose worker
died is run again on another (Ray restarts the dead one).

Output under --out: results.jsonl (a line per episode, env.scoring.episode_record), summary.json
(env.scoring.summarize; printed as a table, then as JSON on the last line), trajectories.msgpack and
view.html (the first eval.view_episodes episodes, drawn as `weft view` draws a run). A task's K
lines are appended in one write once the task is done, so a rerun with the same --out skips every
task already there and runs again a task cut off half-written: each appears exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from env.scoring import episode_record, format_summary, summarize
from env.types import Task
from protos.records import Group, Trajectory

log = logging.getLogger(__name__)

Play = Callable[[Task, str, Optional[Task]], Awaitable[Group]]  # (task, group id, task to prefetch) -> group


class ResultsFile:
    """results.jsonl: complete tasks only (K lines each), appended a task at a time."""

    def __init__(self, path: Path, samples: int) -> None:
        self.path, self.samples = path, samples
        self.by_task: dict[str, list[dict]] = {}
        self.dropped_lines = 0
        if path.is_file():
            self._load()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_all()  # the kept lines only: a torn tail or a half-written task is gone

    def _load(self) -> None:
        lines: dict[str, dict[int, dict]] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                lines.setdefault(str(r["task_id"]), {})[int(r["sample"])] = r
            except (ValueError, KeyError, TypeError):
                self.dropped_lines += 1
        for tid, rs in lines.items():
            if sorted(rs) == list(range(self.samples)):
                self.by_task[tid] = [rs[s] for s in range(self.samples)]
            else:
                self.dropped_lines += len(rs)  # half-written, or another K: run it again

    def _write_all(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for rs in self.by_task.values() for r in rs), encoding="utf-8")
        os.replace(tmp, self.path)

    def done(self, task_id: str) -> bool:
        return task_id in self.by_task

    def add(self, task_id: str, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())
        self.by_task[task_id] = records

    def records(self, task_ids: Optional[set[str]] = None) -> list[dict]:
        return [r for tid, rs in self.by_task.items() if task_ids is None or tid in task_ids for r in rs]


async def play_tasks(play: Play, tasks: list[Task], results: ResultsFile, concurrency: int,
                     keep: Callable[[Task, list[Trajectory]], None] = lambda task, trajs: None,
                     on_done: Callable[[], None] = lambda: None) -> None:
    """Play every task not in `results` yet, `concurrency` at a time, appending each as it finishes."""
    todo = [t for t in tasks if not results.done(t.id)]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, task: Task) -> None:
        async with gate:
            group = await play(task, f"eval-{i:06d}", todo[i + 1] if i + 1 < len(todo) else None)
        worker = group.metadata.get("worker", "")
        results.add(task.id, [{**episode_record(task, t, s), "worker": worker} for s, t in enumerate(group.trajectories)])
        keep(task, group.trajectories)
        on_done()

    await asyncio.gather(*[one(i, t) for i, t in enumerate(todo)])


# ------------------------------------------------------------------ where the episodes run


def local_core(cfg: Any, model_dir: Optional[str], engine_factory: Optional[Callable[[], Any]] = None) -> Any:
    """The RolloutCore of an in-process eval: one engine, one in-process env."""
    from actors.rollout_worker import RolloutCore

    return RolloutCore(model_dir or "", [], cfg.rollout, cfg.env, cfg.reward, worker_id="eval",
                       engine_factory=engine_factory)


class RayPlayers:
    """rollout.num_workers RolloutCore actors; each task goes to a free one (eval.concurrent_tasks each)."""

    ATTEMPTS = 3

    def __init__(self, cfg: Any, model_dir: Optional[str], engine_factory: Optional[Callable[[], Any]]) -> None:
        from actors.rollout_worker import remote_worker_class

        cls = remote_worker_class(cfg.rollout.num_cpus, cfg.rollout.num_gpus)
        n = max(1, cfg.rollout.num_workers)
        self.actors = [cls.options(max_restarts=-1).remote(model_dir or "", [], cfg.rollout, cfg.env, cfg.reward,
                                                           worker_id=f"eval{i}", engine_factory=engine_factory)
                       for i in range(n)]
        self.slots: asyncio.Queue = asyncio.Queue()
        for _ in range(cfg.eval.concurrent_tasks):
            for a in self.actors:
                self.slots.put_nowait(a)
        self.lost, self.samples = 0, cfg.eval.samples

    async def play(self, task: Task, gid: str, nxt: Optional[Task]) -> Group:
        import ray

        error = ""
        for _ in range(self.ATTEMPTS):
            actor = await self.slots.get()
            try:
                return await actor.run_group.remote(task, gid, prefetch=nxt)
            except ray.exceptions.RayActorError as e:  # the worker died (Ray restarts it): run the task elsewhere
                self.lost += 1
                error = f"{type(e).__name__}: {e}"
                log.warning("eval worker lost while playing %s; running it again", task.id)
            finally:
                self.slots.put_nowait(actor)
        fails = [Trajectory.failed(f"worker lost {self.ATTEMPTS} times: {error[:200]}", task_id=task.id,
                                   group_id=gid, traj_id=f"{gid}-{i}") for i in range(self.samples)]
        return Group(group_id=gid, task_id=task.id, trajectories=fails)

    async def shutdown(self) -> None:
        import ray

        await asyncio.gather(*[a.shutdown.remote() for a in self.actors], return_exceptions=True)
        for a in self.actors:
            ray.kill(a)


# ------------------------------------------------------------------ `weft eval`


def run_eval(cfg: Any, tasks: list[Task], out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Evaluate `tasks` (cfg as `configs.eval_config` made it) into `out_dir`; returns the summary (see `evaluate`)."""
    return asyncio.run(evaluate(cfg, tasks, out_dir, **kwargs))


async def evaluate(cfg: Any, tasks: list[Task], out_dir: str | Path, *, model_dir: Optional[str] = None,
                   engine_factory: Optional[Callable[[], Any]] = None, use_ray: bool = False,
                   data_path: Optional[str] = None, progress: bool = True, core: Any = None) -> dict[str, Any]:
    """`run_eval` on the running event loop. `core`: an already started RolloutCore to play on (kept
    running afterwards), instead of one made and shut down here."""
    out = Path(out_dir)
    results = ResultsFile(out / "results.jsonl", cfg.eval.samples)
    kept: list[Trajectory] = []
    skipped = sum(results.done(t.id) for t in tasks)
    t0 = time.perf_counter()

    def keep(task: Task, trajs: list[Trajectory]) -> None:
        if len(kept) < cfg.eval.view_episodes:
            kept.extend(trajs[: cfg.eval.view_episodes - len(kept)])

    with _progress(len(tasks), skipped, enabled=progress) as tick:
        if use_ray:
            await _play_on_ray(cfg, tasks, results, model_dir, engine_factory, keep, tick)
        else:
            await _play_here(cfg, tasks, results, core or local_core(cfg, model_dir, engine_factory), keep, tick,
                             shutdown=core is None)
    summary = {**summarize(results.records({t.id for t in tasks})), "resumed_tasks": skipped,
               "dropped_lines": results.dropped_lines, "seconds": time.perf_counter() - t0,
               "policy": "scripted" if engine_factory else "model", "model": model_dir,
               "no_tools": not cfg.env.tools, "temperature": cfg.eval.temperature}
    if kept:
        summary["view"] = _write_view(out, kept, data_path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


async def _play_here(cfg: Any, tasks: list[Task], results: ResultsFile, core: Any, keep: Any, tick: Any,
                     shutdown: bool) -> None:
    async def play(task: Task, gid: str, nxt: Optional[Task]) -> Group:
        return await core.run_group(task, gid, prefetch=nxt)

    try:
        await play_tasks(play, tasks, results, cfg.eval.concurrent_tasks, keep, tick)
    finally:
        if shutdown:
            await core.shutdown()


async def _play_on_ray(cfg: Any, tasks: list[Task], results: ResultsFile, model_dir: Optional[str],
                       engine_factory: Optional[Callable[[], Any]], keep: Any, tick: Any) -> None:
    players = RayPlayers(cfg, model_dir, engine_factory)
    try:
        await play_tasks(players.play, tasks, results, len(players.actors) * cfg.eval.concurrent_tasks, keep, tick)
    finally:
        await players.shutdown()


def _write_view(out: Path, trajs: list[Trajectory], data_path: Optional[str]) -> dict[str, Any]:
    from env.view import write_view
    from protos.codec import write_trajectories

    path = out / "trajectories.msgpack"
    write_trajectories(path, trajs)
    return write_view(path, out / "view.html", max_trajectories=len(trajs), data=data_path)


class _progress:
    """A progress bar on a terminal (rich), a log line per tenth of the tasks otherwise."""

    def __init__(self, total: int, done: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=False)
            self.bar.start()
            self.task = self.bar.add_task("eval", total=self.total, completed=self.done)
        return self.tick

    def tick(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.enabled and (self.done % max(1, self.total // 10) == 0 or self.done == self.total):
            print(f"[eval] {self.done}/{self.total} tasks", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_summary(summary: dict[str, Any]) -> None:
    print(format_summary(summary))
    print(json.dumps(summary, sort_keys=True))
