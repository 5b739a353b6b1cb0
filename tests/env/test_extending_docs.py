"""docs/extending.md's tool and reward snippets are runnable: written out as the user's modules, named in
config, they pass check_env and pay their own reward terms."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def _module(name: str) -> str:
    blocks = re.findall(r"```python\n(# (\w+)\.py\n.*?)```", DOC.read_text(), re.DOTALL)
    return next(code for code, module in blocks if module == name)


def test_the_documented_tool_and_reward_run(tmp_path, monkeypatch, demo_tasks):
    from configs import load_config
    from env import LocalEnv
    from env.testing import RandomPolicy, check_env, run_episodes

    for name in ("my_tools", "my_rewards"):
        (tmp_path / f"{name}.py").write_text(_module(name))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["env.tools=[my_tools:VIDEO_ZOOM,temporal_search]", "env.max_frames_per_call=16",
                             "reward.fn=my_rewards:video_o3", "reward.weights={acc: 1.0, fmt: 1.0, tool: 1.0}",
                             "reward.kwargs={clue_scale: 0.5}"])
    env = LocalEnv(cfg.env, cfg.reward)
    assert check_env(demo_tasks[:2], env=env, fuzz_actions_count=100)["ok"]
    import asyncio

    out = run_episodes(demo_tasks, RandomPolicy(asyncio.run(env.tool_schemas()), seed=3), 12, env=env)
    assert out["crashes"] == 0 and set(out["reward_terms"]) == {"acc", "fmt", "tool"}, out
    assert out["mean_tool_calls"] > 0
