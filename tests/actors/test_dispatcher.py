"""The dispatcher's pacing and re-runs on a real Ray cluster, with stand-in workers and learner.

The stand-ins are fakes on purpose: a vLLM engine per worker and a real trainer make every
run minutes long, and tests/test_train.py runs the real ones end to end (including a SIGKILLed
worker). Here the learner is a small actor that "trains" a step as soon as it holds a batch
(versions advance at once), and a worker "runs" a group in a few milliseconds, so the pacing
rule and the accounting can be checked over many steps in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from configs import load_config
from env.types import Task

pytestmark = pytest.mark.ray


@ray.remote
class FakeLearner:
    """Counts like LearnerService.progress(): accepted groups; a batch of n is taken and trained at once.
    With `crash_at`, it "loses a rank" once when it reaches that step: `restore` then rolls it back to
    its last checkpoint (every `checkpoint_every` steps: seen-set and counters) and, as the real
    trainer does, continues above every version it had published."""

    def __init__(self, gps: int, max_staleness: int, crash_at: int = 0, checkpoint_every: int = 2):
        self.gps, self.s, self.crash_at, self.every = gps, max_staleness, crash_at, checkpoint_every
        self.p = {"step": 0, "version": 0, "batches": 0, "accepted": 0, "stale_at_take": 0, "stale_at_put": 0,
                  "duplicate": 0, "groups_consumed": 0, "buffer": 0, "done": False, "error": None, "metrics": {},
                  "idle_frac": 0.0, "rejected": 0}
        self.seen: set[str] = set()
        self.violations: list[str] = []
        self.saved = (dict(self.p), set())
        self.lost = False
        self.restored_at = None  # the version the restored learner started at
        self.trained: list[str] = []  # group ids in the order the surviving timeline trained them
        self.pending: list[str] = []

    def submit(self, group_id: str, started_version: int) -> tuple[str, int]:
        if self.lost:
            return "unavailable", self.p["version"]
        if group_id in self.seen:
            self.p["duplicate"] += 1
            return "duplicate", self.p["version"]
        if self.p["version"] - started_version > self.s:  # the real learner drops it (stale_at_put)
            self.violations.append((group_id, started_version, self.p["version"]))
            self.p["stale_at_put"] += 1
            return "stale", self.p["version"]
        self.seen.add(group_id)
        self.pending.append(group_id)
        self.p["accepted"] += 1
        self.p["buffer"] += 1
        return "accepted", self.p["version"]

    def progress(self) -> dict:
        while not self.lost and self.p["buffer"] >= self.gps:  # train a step
            self.p["buffer"] -= self.gps
            self.p["groups_consumed"] += self.gps
            self.trained += self.pending[:self.gps]
            self.pending = self.pending[self.gps:]
            for k in ("batches", "step", "version"):
                self.p[k] += 1
            if self.p["step"] % self.every == 0:
                self.saved = (dict(self.p), set(self.seen), list(self.trained), list(self.pending))
            if self.p["step"] == self.crash_at:
                self.lost, self.crash_at = True, 0
        return {**self.p, "lost": self.lost}

    def restore(self) -> None:
        published = self.p["version"]
        p, seen, trained, pending = self.saved
        self.p, self.seen, self.trained, self.pending = dict(p), set(seen), list(trained), list(pending)
        self.p["version"] = published + 1
        self.restored_at = self.p["version"]
        self.lost = False

    def seen_ids(self) -> list[str]:
        return sorted(self.seen)

    def report(self) -> tuple[dict, list[tuple[str, int, int]], list[str]]:
        return self.progress(), self.violations, self.trained

    def restored_version(self):
        return self.restored_at


class FakeGroup:
    """The driver's side of the stand-in learner, shaped like actors.learner_actor.LearnerGroup."""

    def __init__(self, actor):
        self.actor, self.restarts, self.address = actor, 0, "fake:1"

    def progress(self) -> dict:
        from actors.learner_actor import LearnerLost

        p = ray.get(self.actor.progress.remote())
        if p.pop("lost"):
            raise LearnerLost("a learner rank failed (stand-in)")
        return p

    def restart(self) -> str:
        self.restarts += 1
        ray.get(self.actor.restore.remote())
        return self.address

    def seen_group_ids(self) -> set[str]:
        return set(ray.get(self.actor.seen_ids.remote()))


@ray.remote(max_restarts=-1, max_task_retries=0)
class FakeWorker:
    """run_item's shape and the `apply`/`ping` protocol of actors.rollout_worker.RolloutWorker.
    With `die_file`, the first worker to run its 3rd item exits hard (once across restarts)."""

    def __init__(self, learner, die_file: str = ""):
        self.learner, self.die_file, self.n = learner, die_file, 0
        from actors.env_actor import incarnation

        self.incarnation = incarnation()  # as the real actors

    async def apply(self, func, *args, **kwargs):
        out = func(self, *args, **kwargs)
        return await out if hasattr(out, "__await__") else out

    async def ping(self):
        return self.incarnation

    async def run_item(self, item):
        import asyncio

        self.n += 1
        if self.die_file and self.n == 3 and not os.path.exists(self.die_file):
            Path(self.die_file).write_text("died")
            os._exit(1)
        while True:
            await asyncio.sleep(0.01)
            outcome, version = await self.learner.submit.remote(item["group_id"], item["min_version"])
            if outcome != "unavailable":  # the real client retries a learner that is down, too
                break
        return {"outcome": outcome, "generated_tokens": 1, "incarnation": self.incarnation, "learner_version": version}


@pytest.fixture(scope="module")
def cluster():
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="wray", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def tasks(n: int = 5) -> list[Task]:
    return [Task(id=f"t{i}", video=f"v{i}.mp4", question="q", options=["a", "b"], answer="a") for i in range(n)]


def run(staleness: int, steps: int, die_file: str = "", workers: int = 2, crash_at: int = 0, checkpoint_every: int = 2):
    from actors.dispatcher import Dispatcher

    cfg = load_config(None, [f"learner.max_staleness={staleness}", "trainer.groups_per_step=3",
                             "rollout.concurrent_groups=4", "run.probe_every_s=0.2"])
    learner = FakeLearner.remote(3, staleness, crash_at, checkpoint_every)
    pool = [FakeWorker.remote(learner, die_file) for _ in range(workers)]
    d = Dispatcher(cfg, tasks(), pool, [], FakeGroup(learner))
    peak = {"running": 0}

    def tick(snap):
        peak["running"] = max(peak["running"], snap["running"] + snap["buffer"])

    acct = d.run(steps, on_tick=tick)
    progress, violations, trained = ray.get(learner.report.remote())
    run.trained = trained
    return acct, progress, violations, peak, d


def test_sync_pacing_starts_a_step_only_from_the_newest_weights(cluster):
    acct, progress, violations, peak, _ = run(staleness=0, steps=10)
    assert progress["step"] >= 10
    assert violations == []
    assert peak["running"] <= 3  # never more than one step's groups out at once
    assert acct["created"] == acct["accepted"] == progress["accepted"]


def test_async_pacing_runs_ahead_by_at_most_the_staleness_bound(cluster):
    acct, progress, violations, peak, _ = run(staleness=2, steps=10)
    assert violations == []
    assert 3 < peak["running"] <= 9  # up to (s + 1) steps of groups in flight or waiting
    assert acct["created"] == acct["accepted"] + acct["abandoned"] + acct["pending"]


def test_a_worker_that_dies_mid_group_is_restarted_and_its_groups_run_again(cluster, tmp_path):
    acct, progress, violations, _, d = run(staleness=1, steps=8, die_file=str(tmp_path / "died"))
    assert (tmp_path / "died").exists()
    assert acct["reruns"]["worker_lost"] >= 1
    # The run may end before Ray has the worker back; once its new incarnation answers a probe,
    # the driver counts one restart.
    for _ in range(100):
        if d.accounting()["worker_restarts"]:
            break
        d.last_probe = 0.0
        d._probe()
        d._collect(0.1)
    assert d.accounting()["worker_restarts"] == 1
    ends = sum(acct[k] for k in ("accepted", "duplicate", "stale", "rejected", "given_up", "abandoned", "pending"))
    assert ends == acct["created"]
    assert progress["accepted"] == acct["accepted"]  # each group id accepted once
    assert progress["step"] >= 8


def test_a_lost_learner_is_restarted_and_the_groups_it_lost_run_again(cluster):
    """The learner loses a rank at step 7 and comes back from its step-4 checkpoint: the groups it had
    accepted since are run again, and the surviving timeline trains every group exactly once."""
    acct, progress, violations, _, d = run(staleness=1, steps=10, crash_at=7, checkpoint_every=4)
    assert acct["learner_restarts"] == 1 and acct["reruns"]["learner_lost"] >= 3, acct  # step 7's groups at least
    # The restored learner starts above every version its predecessor published, so a group started
    # before the loss and submitted after it may be too old: it is dropped (stale), never trained. No
    # group started after the restart is.
    restored = ray.get(d.learner.actor.restored_version.remote())
    assert progress["step"] >= 9 and all(started < restored for _, started, _ in violations), (violations, restored)
    assert acct["stale"] == len(violations)
    ends = sum(acct[k] for k in ("accepted", "duplicate", "stale", "rejected", "given_up", "abandoned", "pending"))
    assert ends == acct["created"]
    assert progress["accepted"] == acct["accepted"]  # what the restored learner holds is what the driver counts
    trained = run.trained
    assert len(trained) == len(set(trained)) == progress["groups_consumed"]  # none twice, none lost


def test_a_slow_group_holds_back_new_starts_until_it_is_in():
    """Out-of-order completion: a group started at batch 0 that is still running after the learner
    trained batch 1 (with groups started later) caps the supply at (0 + s + 1) * n, so the learner
    cannot train the batch that would leave it more than s versions behind."""
    from actors.dispatcher import Dispatcher, Item

    cfg = load_config(None, ["learner.max_staleness=1", "trainer.groups_per_step=2"])
    d = Dispatcher(cfg, tasks(), [], [], learner=None)
    d.progress = {"batches": 1, "step": 1, "version": 1, "accepted": 3, "stale_at_take": 0}
    assert d.budget() == (1 + 1 + 1) * 2 - 3  # nothing running: AReaL's bound from the current batch
    d.running = {"g0": (Item(0, "g0", tasks()[0], 1, started_batches=0), 0)}
    assert d.budget() == (0 + 1 + 1) * 2 - 4 == 0  # the slow one is the 4th: no 5th may start before it lands
    d.running["g4"] = (Item(4, "g4", tasks()[0], 1, started_batches=1), 0)
    assert d.budget() < 0
