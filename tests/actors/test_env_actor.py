"""The EnvActor passes the same contract check through a real local Ray cluster."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from actors.env_actor import RemoteEnv  # noqa: E402
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
    import asyncio

    cfg = EnvConfig()
    env = RemoteEnv.start(cfg)
    report = check_env(demo_tasks[:2], env=env, fuzz_actions_count=200)
    assert report["ok"]
    locate, read = demo_perception()

    async def oracle():
        return [await run_episode(env, t, OraclePolicy(locate, read), f"o{i}") for i, t in enumerate(demo_tasks)]

    recs = asyncio.run(oracle())
    assert sum(r.correct for r in recs) >= 0.95 * len(recs)
    assert asyncio.run(env.stats())["open_episodes"] == 0  # every episode is closed in the actor


@pytest.mark.ray
def test_episode_on_a_restarted_env_actor_is_lost_not_failed(ray_cluster, demo_tasks):
    """An EnvActor killed between two calls of an episode comes back (max_restarts) without the
    episode: the next step raises EpisodeLost, which the rollout worker counts as env_lost and
    runs again, instead of training on a FAILED episode that was not the policy's fault."""
    import asyncio

    from actors.env_actor import EnvActor
    from actors.rollout_worker import ENV_LOST
    from env.errors import EpisodeLost

    handle = RemoteEnv(EnvActor.options(max_restarts=1, max_task_retries=0).remote(EnvConfig()))

    async def episode() -> None:
        slot = handle.episode("g:0")
        obs, info = await slot.reset(demo_tasks[0])
        assert obs.frames and info.get("status") != "FAILED"
        before = await handle.actor.ping.remote()
        ray.kill(handle.actor, no_restart=False)
        for _ in range(300):  # until the restarted actor answers, with a new incarnation id
            try:
                after = await handle.actor.ping.remote()
                if after != before:
                    assert before[1] is False and after[1] is True  # what the driver counts restarts by
                    break
            except ray.exceptions.RayActorError:
                pass
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the env actor did not come back")
        with pytest.raises(EpisodeLost, match="no episode"):
            await slot.step('<tool_call>{"name": "get_frame", "arguments": {"t": 1.0}}</tool_call>')
        with pytest.raises(EpisodeLost):
            await slot.truncate("budget")

    asyncio.run(episode())
    assert "EpisodeLost" in ENV_LOST
