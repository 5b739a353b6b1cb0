"""The EnvActor passes the same contract check through a real local Ray cluster."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from actors.env_actor import EnvHandle, RemoteEpisodeEnv  # noqa: E402
from configs import EnvConfig  # noqa: E402
from env.demo import demo_perception  # noqa: E402
from env.testing import OraclePolicy, check_env, run_episode  # noqa: E402


@pytest.fixture
def ray_cluster(ray_temp_dir):
    # A private cluster: never `ray stop` (it would kill every Ray process on the machine).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_temp_dir)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_env_actor_passes_check_env(ray_cluster, demo_tasks):
    cfg = EnvConfig()
    handle = EnvHandle.start(cfg)
    report = check_env(demo_tasks[:2], make_env=lambda: RemoteEpisodeEnv(handle, cfg), fuzz_actions_count=200)
    assert report["ok"]
    locate, read = demo_perception()
    open_before = handle.stats()["open_episodes"]  # check_env abandons unfinished episodes on purpose
    recs = [run_episode(RemoteEpisodeEnv(handle, cfg), t, OraclePolicy(locate, read)) for t in demo_tasks]
    assert sum(r.correct for r in recs) >= 0.95 * len(recs)
    assert handle.stats()["open_episodes"] == open_before  # finished episodes are closed in the actor
