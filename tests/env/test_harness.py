"""The env unit-testing harness on demo data: the done-when numbers of the env issue, and that
check_env can fail (a checker that cannot fail is worth nothing)."""

from __future__ import annotations

import random

import pytest

from configs import EnvConfig
from env import VideoToolEnv
from env.demo import demo_perception
from env.env import COUNTERS
from env.fuzz import fuzz_actions
from env.testing import (BlindPolicy, EnvCheckError, FuzzPolicy, OraclePolicy, RandomPolicy, check_env,
                         run_episodes)
from env.tools import tool_schemas


def test_oracle_accuracy_at_least_095(demo_tasks):
    locate, read = demo_perception()
    s = run_episodes(demo_tasks, OraclePolicy(locate, read), episodes=2 * len(demo_tasks))
    assert s["crashes"] == 0 and s["failed"] == 0
    assert s["accuracy"] >= 0.95, s
    assert s["mean_tool_calls"] >= 2 and s["reward_terms"]["evidence"] > 0


def test_blind_accuracy_near_chance(demo_tasks):
    locate, read = demo_perception()
    n_opts = len(demo_tasks[0].options)
    accs = []
    for seed in range(4):
        accs.append(run_episodes(demo_tasks, BlindPolicy(locate, read, seed=seed), episodes=len(demo_tasks))["accuracy"])
    assert sum(accs) / len(accs) <= 1 / n_opts + 0.15, accs


def test_10000_fuzz_actions_zero_crashes(small_demo_tasks):
    """10,000 malformed/adversarial/valid turns through the real env (real decoding) without a crash."""
    demo_tasks = small_demo_tasks
    env = VideoToolEnv()
    rng = random.Random()
    actions = fuzz_actions(rng, 10_000, duration=12.0)
    crashes_before = COUNTERS["env_crash"]
    done, info = 0, {"status": "FAILED"}
    for i, action in enumerate(actions):
        if info["status"] != "RUNNING":
            obs, info = env.reset(demo_tasks[i % len(demo_tasks)])
        obs, r, term, trunc, info = env.step(action)  # must not raise
        assert isinstance(r, float)
        done += 1
    assert done == 10_000 and COUNTERS["env_crash"] == crashes_before


def test_random_and_fuzz_policies_run(demo_tasks):
    for pol in (RandomPolicy(tool_schemas(EnvConfig()), seed=1), FuzzPolicy(seed=2)):
        s = run_episodes(demo_tasks, pol, episodes=4)
        assert s["crashes"] == 0 and s["episodes"] == 4


def test_check_env_passes_on_demo(demo_tasks):
    report = check_env(demo_tasks[:3], fuzz_actions_count=300)
    assert report["ok"] and report["checked"]["schemas"] > 0 and report["checked"]["fuzz"] == 300


class _LyingEnv(VideoToolEnv):
    """Deliberately broken: drops a frame from each observation but keeps its marker."""

    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        if obs.frames:
            obs.frames = obs.frames[:-1]
        return obs, r, term, trunc, info


class _NoBudgetEnv(VideoToolEnv):
    """Deliberately broken: never truncates."""

    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        return obs, r, term, False, {**info, "status": "RUNNING"} if trunc else info


@pytest.mark.parametrize("broken,expect", [(_LyingEnv, "image markers"), (_NoBudgetEnv, "budgets")])
def test_check_env_catches_broken_envs(demo_tasks, broken, expect):
    from env import LocalEnv

    class Host(LocalEnv):  # hosts the broken episodes behind the episode interface
        def make(self):
            return broken(self.cfg, self.reward_cfg, decoder=self.decoder)

    with pytest.raises(EnvCheckError, match=expect):
        check_env(demo_tasks[:2], env=Host(), fuzz_actions_count=50)
