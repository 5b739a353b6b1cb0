"""The rollout worker as a real Ray actor (with an EnvActor), and `weft rollout` end to end.

Groups come back complete (G trajectories each), every trajectory passes the
learner's own validation (learner.validate), failed episodes are kept with a
reason, and the CLI writes a file protos.read_trajectories reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def data_dir(short_demo_dir):
    return short_demo_dir


def _valid(group, G, engine_vocab=None):
    from learner.validate import Limits, validate_group

    return validate_group(group, Limits(group_size=G, current_version=0, vocab_size=engine_vocab))


def test_ray_rollout_worker_with_env_actor(tiny_dir, data_dir, tmp_path, ray_temp_dir):
    import ray

    from actors.env_actor import RemoteEnv
    from actors.rollout_worker import remote_worker_class
    from configs import EnvConfig, RolloutConfig
    from env import load_tasks

    tasks = load_tasks(data_dir / "tasks.jsonl")
    broken = type(tasks[0])(**{**tasks[0].__dict__, "id": "broken", "video": str(tmp_path / "missing.mp4")})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_temp_dir)
    try:
        env = RemoteEnv.start(EnvConfig(max_turns=2, overview_frames=4))
        cfg = RolloutConfig(group_size=3, concurrent_groups=2, max_tokens_per_turn=24, max_model_len=4096,
                            max_context_tokens=4096)
        worker = remote_worker_class(num_cpus=0.5).remote(str(tiny_dir), tasks + [broken], cfg, env=env)
        groups = ray.get(worker.collect.remote(3), timeout=600)
        status = ray.get(worker.status.remote())
        ray.get(worker.shutdown.remote())
    finally:
        ray.shutdown()
    assert len(groups) == 3 and all(len(g.trajectories) == 3 for g in groups)
    assert status["cursor"] == 3 and status["counters"]["groups"] == 3
    for g in groups:
        if g.task_id == "broken":
            assert all(t.status.value == "FAILED" and "Video" in t.metadata["error"] for t in g.trajectories)
        else:
            assert _valid(g, 3) is None, _valid(g, 3)
            assert all(t.status.value in ("COMPLETED", "TRUNCATED") for t in g.trajectories)


def test_weft_rollout_cli(tiny_dir, data_dir, tmp_path):
    from protos import read_trajectories

    out = tmp_path / "trajs.msgpack"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "weft_cli.py"), "rollout", "--model", str(tiny_dir),
                           "--data", str(data_dir), "--groups", "2", "--group-size", "2", "--out", str(out),
                           "env.max_turns=2", "rollout.max_tokens_per_turn=24", "rollout.max_model_len=4096",
                           "rollout.max_context_tokens=4096"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    trajs = read_trajectories(out)
    assert summary["groups"] == 2 and summary["trajectories"] == len(trajs) == 4
    assert summary["generated_tokens"] == int(sum(t.loss_mask.sum() for t in trajs)) > 0
    assert all(np.isfinite(t.behavior_logprobs).all() for t in trajs)


def test_rollout_worker_attaches_to_a_running_learner_and_leaves(tiny_dir, data_dir):
    """`weft rollout-worker --learner HOST:PORT`: a worker outside any driver takes the learner's current
    weights before its first group, submits its groups over gRPC, and disconnects cleanly."""
    import asyncio
    import time

    from actors.rollout_worker import attach
    from configs import load_config
    from env import load_tasks
    from learner.server import LearnerServer
    from learner.weights import named_weights
    from models.hf import load_hf_model

    cfg = load_config(None, ["rollout.group_size=2", "rollout.max_tokens_per_turn=24", "rollout.max_model_len=4096",
                             "rollout.max_context_tokens=4096", "rollout.concurrent_groups=1", "env.max_turns=2",
                             "env.overview_frames=2", "learner.group_size=2"])
    server = LearnerServer(cfg.learner).start()
    try:
        server.publish(3, named_weights(load_hf_model(tiny_dir, "float32")))  # a learner already at version 3
        out = asyncio.run(attach(cfg, str(tiny_dir), load_tasks(data_dir / "tasks.jsonl"), server.address, groups=2))
        assert out["acks"] == {"ACCEPTED": 2} and out["version"] == 3, out
        groups = server.get_batch(2, timeout=5)
        versions = {int(v) for g in groups for t in g.trajectories for v in t.policy_version[t.loss_mask.astype(bool)]}
        assert versions == {3}, versions  # no group was sampled from the stale base weights
        deadline = time.monotonic() + 10
        while server.status().subscribers and time.monotonic() < deadline:  # it left: no weight stream open
            time.sleep(0.1)
        assert server.status().subscribers == 0
    finally:
        server.stop()
