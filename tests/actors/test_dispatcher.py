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
    """Counts like LearnerService.progress(): accepted groups; a batch of n is taken and trained at once."""

    def __init__(self, gps: int, max_staleness: int):
        self.gps, self.s = gps, max_staleness
        self.p = {"step": 0, "version": 0, "batches": 0, "accepted": 0, "stale_at_take": 0, "stale_at_put": 0,
                  "duplicate": 0, "groups_consumed": 0, "buffer": 0, "done": False, "error": None, "metrics": {},
                  "idle_frac": 0.0, "rejected": 0}
        self.seen: set[str] = set()
        self.violations: list[str] = []

    def submit(self, group_id: str, started_version: int) -> str:
        if group_id in self.seen:
            self.p["duplicate"] += 1
            return "duplicate"
        if self.p["version"] - started_version > self.s:
            self.violations.append(f"{group_id}: started at v{started_version}, learner at v{self.p['version']}")
        self.seen.add(group_id)
        self.p["accepted"] += 1
        self.p["buffer"] += 1
        return "accepted"

    def progress(self) -> dict:
        while self.p["buffer"] >= self.gps:  # train a step
            self.p["buffer"] -= self.gps
            self.p["groups_consumed"] += self.gps
            for k in ("batches", "step", "version"):
                self.p[k] += 1
        return dict(self.p)

    def report(self) -> tuple[dict, list[str]]:
        return self.progress(), self.violations


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
        await asyncio.sleep(0.01)
        outcome = await self.learner.submit.remote(item["group_id"], item["min_version"])
        return {"outcome": outcome, "generated_tokens": 1, "incarnation": self.incarnation}


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


def run(staleness: int, steps: int, die_file: str = "", workers: int = 2):
    from actors.dispatcher import Dispatcher

    cfg = load_config(None, [f"learner.max_staleness={staleness}", "trainer.groups_per_step=3",
                             "rollout.concurrent_groups=4", "run.probe_every_s=0.2"])
    learner = FakeLearner.remote(3, staleness)
    pool = [FakeWorker.remote(learner, die_file) for _ in range(workers)]
    d = Dispatcher(cfg, tasks(), pool, [], learner)
    peak = {"running": 0}

    def tick(snap):
        peak["running"] = max(peak["running"], snap["running"] + snap["buffer"])

    acct = d.run(steps, on_tick=tick)
    progress, violations = ray.get(learner.report.remote())
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
