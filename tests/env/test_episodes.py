"""LocalEnv, the in-process host of the one episode interface: many episodes at once on its threads give
what one VideoToolEnv stepping them one after another gives; closed episodes are released; prefetch
warms the shared cache and swallows errors."""

import asyncio

from env import LocalEnv, VideoToolEnv
from env.testing import call

ZOOM = call("temporal_zoom", start=1.0, end=6.0, num_frames=4)


def _serial(tasks):
    out = []
    for task in tasks:
        env = VideoToolEnv()
        out.append((env.reset(task), env.step(ZOOM), env.step("<answer>A</answer>")))
    return out


async def _concurrent(host, tasks):
    async def one(i, task):
        ep = host.episode(f"ep{i}")
        try:
            return await ep.reset(task), await ep.step(ZOOM), await ep.step("<answer>A</answer>")
        finally:
            await ep.close()

    return await asyncio.gather(*[one(i, t) for i, t in enumerate(tasks)])


def test_concurrent_episodes_match_one_env_stepping_them_in_turn(demo_tasks):
    tasks = demo_tasks * 2
    host = LocalEnv()
    got, want = asyncio.run(_concurrent(host, tasks)), _serial(tasks)
    for (r1, s1, a1), (r2, s2, a2) in zip(got, want):
        assert r1[0].text == r2[0].text and [f.ref for f in r1[0].frames] == [f.ref for f in r2[0].frames]
        for x, y in ((s1, s2), (a1, a2)):
            assert x[0].text == y[0].text and x[1:4] == y[1:4]
    assert asyncio.run(host.stats())["open_episodes"] == 0
    assert [t["function"]["name"] for t in asyncio.run(host.tool_schemas())] == \
        ["temporal_zoom", "spatial_zoom", "temporal_search", "get_frame"]


def test_prefetch_warms_the_overview_and_swallows_errors(demo_tasks, tmp_path):
    from configs import EnvConfig

    host = LocalEnv(EnvConfig(overview_size=[144, 81]))  # a size no other test decodes
    host.warm(demo_tasks[4])
    before = host.decoder.stats()
    obs, info = asyncio.run(host.episode("p").reset(demo_tasks[4]))
    after = host.decoder.stats()
    assert len(obs.frames) > 0 and after["misses"] == before["misses"]  # every overview frame was cached
    broken = type(demo_tasks[0])(**{**demo_tasks[0].__dict__, "id": "gone", "video": str(tmp_path / "gone.mp4")})
    host.prefetch(broken)  # a hint: no exception; the real reset reports the error
    host.warm(broken)
    assert asyncio.run(host.episode("q").reset(broken))[1]["status"] == "FAILED"
