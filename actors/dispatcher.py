"""The driver's loop: hand GRPO groups to rollout workers within the staleness budget, re-run lost ones.

Work items are numbered; item i is task i of a seeded shuffle (TaskSampler) under
group id `g{i:07d}`, so a re-run is the same task under the same id, and the
learner's exactly-once answers DUPLICATE if the first attempt did arrive.

Pacing (bounded staleness, as AReaL's rollout controller does it): with B batches
trained, s = learner.max_staleness and n = trainer.groups_per_step, a new group is
started only while

    running + (accepted by the learner - dropped stale at take) < (B_g + s + 1) * n

for B_g the batches trained when the oldest running group g started (B itself when none
runs), and it starts from the learner's current weights (the worker waits for them: they
are pushed right after each step). A group started at version v is then among the first
(v + s + 1) * n groups supplied, and while it runs no group is started beyond them, so the
learner cannot train (v + s + 1) batches without it: its oldest token is at most s versions
stale. AReaL's bound uses B alone, which assumes groups finish in the order they started;
one slow group overtaken by later ones then went stale (seen in the demo run). The oldest
running group's B_g is what makes the bound hold when groups finish out of order. s = 0 is the synchronous baseline (a step's groups all start from the newest
weights, and none starts while the learner trains); s > 0 lets rollout run ahead while
the learner trains, and episodes in flight keep going across weight updates (the
workers load new weights with pause(keep) -> load -> resume).

The learner is a `LearnerGroup` (actors/learner_actor.py). When one of its ranks dies, the
group is restarted from its newest checkpoint; groups it had accepted after that checkpoint
are gone with it, so every accepted group the restored learner has not seen is run again
(`rerun/learner_lost`). An acceptance that arrives after the restart is checked the same way:
the ack carries the accepting learner's version, and the restored learner starts above every
version its predecessor handed out.

Validation (data.val_path, trainer.val_every, trainer.val_before_train): at a validation step N
the pacing stops at N (no group is started that the learner would train after step N), and once
the learner is at N and no training group is running, every validation task is handed to the
workers with N's weights (`RolloutWorker.run_eval`: eval.samples episodes at eval.temperature, on
the env actors, nothing submitted). Their records are scored (env.scoring), logged as `val/...` at
step N in the run's metrics, and training resumes. So a validation is exact: all its episodes ran
on the weights of step N. A validation task lost with its worker or env actor is run again.

Pools are RLlib FaultTolerantActorManagers. A call that fails with a Ray error takes
its actor out of service (Ray restarts it: max_restarts); its items go back to the
front of the queue; an async ping brings the actor back once it answers. Every item
ends in exactly one bucket of `accounting()`.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray
from ray.rllib.utils.actor_manager import FaultTolerantActorManager

from actors.rollout_worker import TaskSampler
from configs.schema import WeftConfig
from env.types import Task

log = logging.getLogger(__name__)

FINAL = ("accepted", "duplicate", "stale", "rejected", "given_up")  # outcomes that end an item
RERUN = ("worker_lost", "worker_error", "env_lost", "learner_lost")  # outcomes that put it back in the queue
MAX_ATTEMPTS = 5


@dataclass
class Item:
    index: int
    group_id: str
    task: Task
    attempts: int = 0
    started_batches: int = 0  # the learner's trained batches when this attempt was dispatched


def call_run_item(worker: Any, item: dict[str, Any]) -> Any:
    """What the manager runs on a RolloutWorker (through its `apply`)."""
    return worker.run_item(item)


def call_run_eval(worker: Any, item: dict[str, Any]) -> Any:
    return worker.run_eval(item)


def call_ping(actor: Any) -> Any:
    return actor.ping()


def call_set_learner(worker: Any, address: str) -> Any:
    return worker.set_learner(address)


class Validation:
    """When the next validation is due, and the one in progress (see the module notes)."""

    def __init__(self, tasks: list[Task], every: int, before: bool, total_steps: int) -> None:
        self.tasks, self.every, self.before, self.total_steps = tasks, every, before, total_steps
        self.at: Optional[int] = None  # the step the next validation runs at
        self.started: Optional[tuple[int, int, float]] = None  # (step, version, monotonic start) while one runs
        self.queue: collections.deque[Item] = collections.deque()
        self.running: dict[str, tuple[Item, int]] = {}
        self.records: list[dict[str, Any]] = []
        self.versions: list[int] = []  # weight versions that sampled the running validation's tokens
        self.history: list[dict[str, Any]] = []

    def schedule(self, step: int) -> None:
        """The next validation step after `step` (step 0 itself before training, when asked for)."""
        due = [0] if self.before and step == 0 and not self.history else []
        if self.every:
            due += [(step // self.every + 1) * self.every, self.total_steps]
        self.at = min((d for d in due if d <= self.total_steps and (d > step or d == 0 == step)), default=None)

    def begin(self, step: int, version: int) -> None:
        self.started, self.records, self.versions = (step, version, time.monotonic()), [], []
        self.queue.extend(Item(i, f"val-{step:06d}-{i:05d}", t) for i, t in enumerate(self.tasks))

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)


class Dispatcher:
    def __init__(self, cfg: WeftConfig, tasks: list[Task], workers: list, envs: list, learner: Any,
                 start_index: int = 0, val_tasks: Optional[list[Task]] = None) -> None:
        self.cfg = cfg
        self.gps = cfg.trainer.groups_per_step
        self.staleness = cfg.learner.max_staleness
        self.sampler = TaskSampler(tasks, cfg.rollout.seed, start_index)
        self.workers = FaultTolerantActorManager(workers, max_remote_requests_in_flight_per_actor=1_000_000)
        self.envs = FaultTolerantActorManager(envs, max_remote_requests_in_flight_per_actor=1_000_000)
        self.learner = learner
        self.queue: collections.deque[Item] = collections.deque()  # items to run again, first
        self.running: dict[str, tuple[Item, int]] = {}  # group id -> (item, worker id)
        self.counts: collections.Counter = collections.Counter()
        self.probing: dict[str, set[int]] = {"workers": set(), "envs": set()}
        # Incarnation ids each actor has answered with (actors.env_actor.incarnation). Ray restarts
        # an actor in the background, and calls made while it restarts wait rather than fail, so
        # the manager may never see one down: a new id made by a restart is how one is counted.
        self.incarnations: dict[tuple[str, int], set[str]] = collections.defaultdict(set)
        self.last_probe = 0.0
        self.progress: dict[str, Any] = {}
        self.created = 0
        self.accepted: dict[str, Item] = {}  # what a restarted learner may have lost
        self.restored: Optional[tuple[int, set[str]]] = None  # (first version, seen ids) of the last restart
        tc = cfg.trainer
        self.val = Validation(val_tasks, tc.val_every, tc.val_before_train, tc.total_steps) \
            if val_tasks and (tc.val_every or tc.val_before_train) else None

    # ---- the loop
    def run(self, total_steps: int, on_tick: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
        """Dispatch until the learner has trained `total_steps` steps, then let running groups finish."""
        from actors.learner_actor import LearnerLost

        while True:
            try:
                self.progress = self.learner.progress()
            except LearnerLost as e:
                self._learner_lost(e)
                continue
            self._validate()
            if (self.progress["step"] >= total_steps or self.progress["done"]) and not self._val_due():
                break
            self._dispatch()
            self._collect(0.25)
            self._probe()
            if on_tick:
                on_tick(self.snapshot())
        self._drain(on_tick)
        return self.accounting()

    def _drain(self, on_tick: Optional[Callable[[dict[str, Any]], None]]) -> None:
        deadline = time.monotonic() + self.cfg.run.drain_timeout_s
        while self.running and time.monotonic() < deadline:
            self._collect(0.25)
            self._probe()
            if on_tick:
                on_tick(self.snapshot())
        self.counts["abandoned"] += len(self.running)
        for gid in list(self.running):
            log.warning("group %s still running at the end: abandoned", gid)
        self.counts["pending"] += len(self.queue)

    # ---- dispatching
    def budget(self) -> int:
        """Groups that may start now (see the module docstring); none past a due validation's step."""
        p = self.progress
        supplied = len(self.running) + p["accepted"] - p["stale_at_take"]
        ahead = self.staleness + 1
        if self.val is not None and self.val.at is not None:
            ahead = min(ahead, max(0, self.val.at - p["step"]))
        oldest = min((item.started_batches for item, _ in self.running.values()), default=p["batches"])
        limit = min(p["batches"] + ahead, oldest + self.staleness + 1)
        return limit * self.gps - supplied

    def _dispatch(self) -> None:
        for _ in range(max(self.budget(), 0)):
            wid = self._free_worker()
            if wid is None:
                return
            item = self.queue.popleft() if self.queue else self._new_item()
            item.attempts += 1
            item.started_batches = self.progress["batches"]
            payload = {"group_id": item.group_id, "task": item.task, "env": self._env_for(item),
                       "min_version": self.progress["version"],
                       "next_task": self.sampler.peek() if self.sampler.tasks else None}
            fired = self.workers.foreach_actor_async([call_run_item], tag=item.group_id, kwargs=[{"item": payload}],
                                                     remote_actor_ids=[wid])
            if not fired:  # the manager refused (actor just went unhealthy): try again next tick
                item.attempts -= 1
                self.queue.appendleft(item)
                return
            self.running[item.group_id] = (item, wid)
            self.counts["dispatched"] += 1

    def _new_item(self) -> Item:
        index = self.sampler.cursor
        self.created += 1
        return Item(index, f"g{index:07d}", self.sampler.next())

    def _free_worker(self) -> Optional[int]:
        busy = list(self.running.values()) + (list(self.val.running.values()) if self.val is not None else [])
        load = collections.Counter(wid for _, wid in busy)
        free = [w for w in self.workers.healthy_actor_ids() if load[w] < self.cfg.rollout.concurrent_groups]
        return min(free, key=lambda w: load[w]) if free else None

    def _env_for(self, item: Item) -> int:
        """A live env actor for the item's group (all its episodes share one: one video, one cache)."""
        healthy = self.envs.healthy_actor_ids() or self.envs.actor_ids()
        return healthy[item.index % len(healthy)] if healthy else 0

    # ---- results
    def _collect(self, timeout: float) -> None:
        for r in self.workers.fetch_ready_async_reqs(timeout_seconds=timeout, mark_healthy=True):
            if r.tag in ("probe", "health"):
                self._pinged("workers", r)
                continue
            if self.val is not None and r.tag in self.val.running:
                self._val_result(r)
                continue
            item, _ = self.running.pop(r.tag)
            if r.ok:
                out = r.get()
                self._saw("workers", r.actor_id, out.get("incarnation"))
                self._record(item, out["outcome"], out.get("reason", ""), out)
            else:
                err = r.get()
                lost = isinstance(err, ray.exceptions.RayActorError)
                self._record(item, "worker_lost" if lost else "worker_error", f"{type(err).__name__}: {err}", {})

    def _record(self, item: Item, outcome: str, reason: str, out: dict[str, Any]) -> None:
        if outcome in RERUN:
            self.counts[f"rerun/{outcome}"] += 1
            if item.attempts >= MAX_ATTEMPTS:
                log.error("group %s failed %d times (%s): giving up", item.group_id, item.attempts, reason)
                self.counts["given_up"] += 1
                return
            log.warning("group %s: %s (%s); running it again", item.group_id, outcome, reason[:200])
            self.queue.appendleft(item)
            return
        if outcome == "accepted" and not self._accepted(item, out):
            return
        self.counts[outcome] += 1
        self.counts["generated_tokens"] += out.get("generated_tokens", 0)
        # A partial rollout: its episodes kept running while new weights were loaded.
        self.counts["crossed_versions"] += int(out.get("max_version", -1) > out.get("min_version", -1) >= 0)
        if outcome == "rejected":
            log.error("learner rejected group %s: %s", item.group_id, reason)

    # ---- validation
    def _val_due(self) -> bool:
        v = self.val
        return v is not None and v.at is not None and (v.started is not None or v.at <= self.progress["step"])

    def _validate(self) -> None:
        """Start a due validation once the learner has stopped at its step and no training group runs;
        hand its tasks out; log it when every task is back."""
        v, p = self.val, self.progress
        if v is None:
            return
        if v.at is None and v.started is None:
            v.schedule(p["step"])
        if v.started is None:
            if v.at is None or p["step"] < v.at or self.running:
                return
            v.begin(p["step"], p["version"])
            log.info("validation at step %d (version %d): %d tasks", p["step"], p["version"], len(v.tasks))
        while v.queue:
            wid = self._free_worker()
            if wid is None:
                return
            item = v.queue.popleft()
            item.attempts += 1
            payload = {"group_id": item.group_id, "task": item.task, "env": self._env_for(item),
                       "min_version": v.started[1], "next_task": v.queue[0].task if v.queue else None}
            if not self.workers.foreach_actor_async([call_run_eval], tag=item.group_id, kwargs=[{"item": payload}],
                                                    remote_actor_ids=[wid]):
                item.attempts -= 1
                v.queue.appendleft(item)
                return
            v.running[item.group_id] = (item, wid)
        if not v.busy:
            self._finish_validation()

    def _val_result(self, r: Any) -> None:
        v = self.val
        item, _ = v.running.pop(r.tag)
        out = r.get() if r.ok else None
        if out is not None and out.get("outcome") == "done":
            self._saw("workers", r.actor_id, out.get("incarnation"))
            v.records += out["records"]
            v.versions += [out[k] for k in ("min_version", "max_version") if out.get(k, -1) >= 0]
            return
        reason = out.get("reason", "") if out is not None else f"{type(r.get()).__name__}: {r.get()}"
        self.counts["val_rerun"] += 1
        if item.attempts >= MAX_ATTEMPTS:  # scored as failed episodes, never dropped from the figure
            from env.scoring import episode_record
            from protos.records import Trajectory

            log.error("validation task %s failed %d times (%s)", item.task.id, item.attempts, reason[:200])
            v.records += [episode_record(item.task, Trajectory.failed(reason[:300], task_id=item.task.id), s)
                          for s in range(self.cfg.eval.samples)]
            return
        log.warning("validation task %s: %s; running it again", item.task.id, reason[:200])
        v.queue.appendleft(item)

    def _finish_validation(self) -> None:
        from env.scoring import summarize, val_metrics

        v = self.val
        step, version, t0 = v.started
        summary = summarize(v.records)
        metrics = {**val_metrics(summary), "val/version": float(version), "val/seconds": time.monotonic() - t0}
        if v.versions:  # equal to val/version: every validation token was sampled with the step's weights
            metrics.update({"val/policy_version_min": float(min(v.versions)), "val/policy_version_max": float(max(v.versions))})
        v.history.append({"step": step, "version": version, "accuracy": summary["accuracy"],
                          "tasks": summary["tasks"], "episodes": summary["episodes"], "seconds": metrics["val/seconds"],
                          "by_category": summary.get("by_category", {})})
        log.info("validation at step %d: accuracy %.3f over %d tasks (%.1f s)", step, summary["accuracy"],
                 summary["tasks"], metrics["val/seconds"])
        try:
            self.learner.log_metrics(step, metrics)
        except Exception as e:  # noqa: BLE001 - a learner lost meanwhile: the history below still has it
            log.warning("could not log validation metrics to the learner: %s", e)
        v.started = None
        v.schedule(step)

    # ---- a lost learner
    def _learner_lost(self, err: Exception) -> None:
        """Restart the learner group from its newest checkpoint and run again what it lost."""
        if self.learner.restarts >= self.cfg.run.max_learner_restarts:
            raise RuntimeError(f"{err} (the learner was restarted {self.learner.restarts} times already; "
                               "run.max_learner_restarts)") from None
        log.error("%s: restarting the learner group from its newest checkpoint", err)
        before = self.learner.address
        address = self.learner.restart()
        self.counts["restarts/learner"] += 1
        if address != before:  # the old port was taken: tell the workers where the learner is now
            self.workers.foreach_actor([call_set_learner] * self.workers.num_healthy_actors(),
                                       kwargs=[{"address": address}] * self.workers.num_healthy_actors(),
                                       timeout_seconds=60)
        self.progress = self.learner.progress()
        self.restored = (self.progress["version"], self.learner.seen_group_ids())
        for gid in [g for g in self.accepted if g not in self.restored[1]]:
            self._lost_acceptance(self.accepted.pop(gid))
        log.warning("learner back at step %d, version %d (%s); %d accepted groups it lost run again",
                    self.progress["step"], self.progress["version"], address, self.counts["rerun/learner_lost"])

    def _lost_acceptance(self, item: Item) -> None:
        self.counts["accepted"] -= 1
        self.counts["rerun/learner_lost"] += 1
        self.queue.appendleft(item)

    def _accepted(self, item: Item, out: dict[str, Any]) -> bool:
        """Record an acceptance; False when a learner since lost had accepted it (run it again instead)."""
        if self.restored is not None and out.get("learner_version", self.restored[0]) < self.restored[0] \
                and item.group_id not in self.restored[1]:
            self.counts["rerun/learner_lost"] += 1
            self.queue.appendleft(item)
            return False
        self.accepted[item.group_id] = item
        return True

    # ---- health
    def _probe(self) -> None:
        """Every probe_every_s: ping the healthy actors (a dead one is taken out of service) and the
        unhealthy ones (one that answers is taken back)."""
        if time.monotonic() - self.last_probe < self.cfg.run.probe_every_s:
            self._collect_env_pings()
            return
        self.last_probe = time.monotonic()
        for name, pool in (("workers", self.workers), ("envs", self.envs)):
            pool.foreach_actor_async([call_ping] * len(pool.healthy_actor_ids()), tag="health",
                                     remote_actor_ids=pool.healthy_actor_ids())
            down = [a for a in pool.actor_ids() if not pool.is_actor_healthy(a) and a not in self.probing[name]]
            if down:
                pool.foreach_actor_async([call_ping] * len(down), tag="probe", healthy_only=False,
                                         remote_actor_ids=down)
                self.probing[name].update(down)
        self._collect_env_pings()

    def _collect_env_pings(self) -> None:
        for r in self.envs.fetch_ready_async_reqs(timeout_seconds=0, mark_healthy=True):
            self._pinged("envs", r)

    def _pinged(self, pool: str, r: Any) -> None:
        self.probing[pool].discard(r.actor_id)
        if r.ok:
            self._saw(pool, r.actor_id, r.get())

    def _saw(self, pool: str, actor_id: int, incarnation: Any) -> None:
        """An answer from `actor_id` of `pool` carrying its (id, restarted) incarnation."""
        if incarnation is None:  # an answer without one (a stand-in actor)
            return
        uid, restarted = incarnation
        seen = self.incarnations[(pool, actor_id)]
        if uid not in seen:
            seen.add(uid)
            if restarted:
                self.counts[f"restarts/{pool}"] += 1
                log.warning("%s actor %d is back after a restart", pool[:-1], actor_id)

    # ---- reporting
    def snapshot(self) -> dict[str, Any]:
        p = self.progress
        return {**p, "workers_alive": self.workers.num_healthy_actors(), "workers": self.workers.num_actors(),
                "envs_alive": self.envs.num_healthy_actors(), "envs": self.envs.num_actors(),
                "running": len(self.running), "queued": len(self.queue), "counts": dict(self.counts),
                "validation": self.val.history[-1] if self.val is not None and self.val.history else None,
                "restarts": self.counts["restarts/workers"] + self.counts["restarts/envs"] + self.counts["restarts/learner"]}

    def accounting(self) -> dict[str, Any]:
        """Where every item went. created == sum of FINAL outcomes + abandoned + pending."""
        c = self.counts
        return {"created": self.created, **{k: c[k] for k in FINAL}, "abandoned": c["abandoned"],
                "pending": c["pending"], "dispatched": c["dispatched"],
                "reruns": {k: c[f"rerun/{k}"] for k in RERUN},
                "worker_restarts": self.counts["restarts/workers"], "env_restarts": self.counts["restarts/envs"],
                "learner_restarts": self.counts["restarts/learner"],
                "generated_tokens": c["generated_tokens"], "crossed_versions": c["crossed_versions"]}
