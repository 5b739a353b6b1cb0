"""The GRPO trainer on a tiny Qwen2.5-VL and real groups (scripted episodes in the real env, images as FrameRefs).

Covers: logprobs equal an HF forward with the engine's processing (temperature, banned
ids), in padded micro-batches; the banned-id mask in both kernel paths; a step
changes the weights, bumps the version and streams HF-named weights over gRPC;
pixel re-materialisation checks hashes and drops what does not match; micro-batch
splitting leaves the loss and gradient unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.batch import collate, prepare_batch
from protos.records import Group, Status, Trajectory


@pytest.fixture(scope="module")
def groups(make_groups):
    return make_groups(2, 4, seed=0)


def _trainer(cfg, tiny_dir, **kw):
    from learner.trainer import Trainer

    return Trainer(cfg, tiny_dir, **kw)


def test_token_logprobs_equal_hf_reference_in_padded_micro_batches(tiny_dir, make_cfg, groups):
    from models.hf import hf_token_logprobs

    tr = _trainer(make_cfg("trainer.temperature=0.7"), tiny_dir, log_metrics=False)
    prepared = tr.prepare(groups)
    samples = prepared.samples
    assert len(samples) == 8 and len({s.num_tokens for s in samples}) > 1  # rows of different lengths: padding
    mb = collate(samples, pad_id=tr.pad_id, image_token_id=tr.image_token_id, video_token_id=tr.video_token_id)
    mine = tr.token_logprobs(mb).numpy()
    worst, banned_effect = 0.0, 0.0
    for r, s in enumerate(samples):
        ref = hf_token_logprobs(tr.model, tr.processor, s.token_ids.tolist(), s.images, 1, temperature=0.7,
                                banned=tr.banned_list)
        unbanned = hf_token_logprobs(tr.model, tr.processor, s.token_ids.tolist(), s.images, 1, temperature=0.7)
        on = s.loss_mask[1:]
        worst = max(worst, float(np.abs(mine[r, : s.num_tokens - 1][on] - ref[on]).max()))
        banned_effect = max(banned_effect, float(np.abs(unbanned[on] - ref[on]).max()))
    print(f"\nmax |trainer - HF| over {int(mb.mask.sum())} tokens: {worst:.2e}; effect of the ban: {banned_effect:.2e}")
    assert worst < 1e-4
    assert banned_effect > 1e-4  # the ban changes the numbers, so the comparison above can fail


def test_banned_ids_in_both_kernel_paths():
    from configs.schema import LossConfig
    from learner import grpo
    from learner.kernels.chunked import chunked_token_logprobs
    from learner.loss import fused_policy_loss

    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    n, h, v, temp = 37, 16, 50, 0.8
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    banned = torch.tensor([3, 17, 49])
    targets = torch.randint(0, v - 3, (n,), generator=g)
    targets[torch.isin(targets, banned)] = 0

    def reference(hid, w):
        z = hid @ w.t() / temp
        z = z.index_fill(1, banned, float("-inf"))
        return torch.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]

    ref = reference(hidden, weight)
    got = chunked_token_logprobs(hidden, weight, targets, chunk_size=8, temperature=temp, banned=banned)
    torch.testing.assert_close(got, ref)
    gh, gw = torch.autograd.grad((got * torch.arange(n)).sum(), (hidden, weight))
    rh, rw = torch.autograd.grad((ref * torch.arange(n)).sum(), (hidden, weight))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    # The fused loss: same value and gradients as grpo.policy_loss on the reference logprobs.
    cfg = LossConfig()
    b, t = 1, n
    mask = (torch.rand(b, t, generator=g) < 0.7).double()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    prox = (reference(hidden, weight).detach() + 0.05 * torch.randn(n, generator=g, dtype=torch.float64))[None]
    behav = prox - 0.1 * torch.rand(b, t, generator=g, dtype=torch.float64)
    loss, _ = fused_policy_loss(hidden[None], weight, targets[None], adv, prox, behav, mask, cfg, chunk_size=8,
                                temperature=temp, banned=banned)
    ref_loss, _ = grpo.policy_loss(reference(hidden, weight)[None], prox, behav, adv, mask, cfg)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref_loss, (hidden, weight)))
    with pytest.raises(ValueError, match="banned ids"):
        chunked_token_logprobs(hidden, weight, targets, chunk_size=8, banned=torch.tensor([v]))


def test_step_changes_weights_bumps_version_and_streams_hf_named_weights(tiny_dir, make_cfg, groups):
    from actors.learner_client import LearnerClient
    from learner.metrics import help_for
    from learner.server import LearnerServer

    cfg = make_cfg("trainer.lr=1e-3", "rollout.dtype=float32", "learner.group_size=4")
    server = LearnerServer(cfg.learner).start()
    try:
        tr = _trainer(cfg, tiny_dir, server=server)
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        m = tr.train_step(groups)
        assert tr.step == 1 and tr.version == 1 and server.version == 1 and m["version"] == 1 and m["skipped"] == 0
        changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert len(changed) == len(before)  # Adam moves every parameter that got a gradient: all of them
        assert m["trajectories_trained"] == 8 and m["tokens"] > 0 and np.isfinite(m["loss"]) and m["grad_norm"] > 0
        # Engine-side view: the streamed weights are the trainer's, under the names load_weights takes.
        with LearnerClient.from_config(cfg.learner, server.address) as client:
            version, tensors = next(client.watch_weights(from_version=0))
        assert version == 1
        got = dict(tensors)
        assert set(got) == set(before) and "lm_head.weight" in got
        assert any(k.startswith("model.visual.") for k in got) and any(k.startswith("model.language_model.") for k in got)
        for n, p in tr.model.named_parameters():
            assert torch.equal(got[n], p.detach()), n
        # Every logged number has a line in docs/metrics.md (via METRIC_HELP), and the JSONL line is there.
        assert [k for k in m if help_for(k) is None] == []
        row = json.loads((tr.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["step"] == 1 and row["version"] == 1 and row["staleness_hist"] == {"0": 2}
    finally:
        server.stop(0)


def test_rematerialisation_checks_hashes_and_drops_bad_trajectories(tiny_dir, make_cfg, groups, processor, monkeypatch):
    from learner import batch as batch_mod
    from models.hf import banned_token_ids_of

    banned = banned_token_ids_of(tiny_dir)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    gs = [Group(g.group_id, g.task_id, [dataclasses.replace(t) for t in g.trajectories]) for g in groups]
    victim = gs[0].trajectories[0]
    k = int(np.random.default_rng().integers(len(victim.media)))
    victim.media = list(victim.media)
    victim.media[k] = dataclasses.replace(victim.media[k], content_hash="0" * 32)  # tampered
    moved = gs[0].trajectories[1]
    moved.media = [dataclasses.replace(r, video=r.video + ".missing") for r in moved.media]  # cannot be decoded
    gs[1].trajectories.append(Trajectory.failed("VideoCorrupt: test", task_id=gs[1].task_id, group_id=gs[1].group_id,
                                                traj_id="failed-1"))
    flat = Group("flat", "t", [dataclasses.replace(t, reward=1.0) for t in groups[1].trajectories])
    prep = prepare_batch(gs + [flat], processor=processor, image_token_id=image_id, banned=banned)
    c = prep.counts
    assert c["dropped/hash_mismatch"] == 1 and c["dropped/decode_error"] == 1 and c["dropped/failed"] == 1
    assert c["zero_variance_groups"] == 1 and c["trajectories_trained"] == 6
    assert victim.traj_id not in {s.traj_id for s in prep.samples}
    assert any("content hash" in e for e in prep.errors)
    # Untampered: every trajectory's pixels are re-decoded exactly (hashes match), none dropped.
    assert prepare_batch(groups, processor=processor, image_token_id=image_id, banned=banned).counts[
        "trajectories_trained"] == 8
    # A generated placeholder token can never be trained on.
    bad = dataclasses.replace(groups[0].trajectories[1], token_ids=groups[0].trajectories[1].token_ids.copy())
    bad.token_ids[np.flatnonzero(bad.loss_mask)[0]] = banned[0]
    g2 = Group("g", "t", [bad, *groups[0].trajectories[:1], *groups[0].trajectories[2:]])
    assert prepare_batch([g2], processor=processor, image_token_id=image_id, banned=banned).counts[
        "dropped/banned_token"] == 1
    # An all-zero-advantage batch is a bug upstream: loud, never a silent no-op step.
    monkeypatch.setattr(batch_mod.grpo, "group_advantages", lambda r, g, mode="grpo": torch.zeros_like(r))
    with pytest.raises(RuntimeError, match="advantages"):
        prepare_batch(groups, processor=processor, image_token_id=image_id, banned=banned)


def test_nothing_left_to_train_on_is_a_counted_skip(tiny_dir, make_cfg, groups):
    tr = _trainer(make_cfg(), tiny_dir, log_metrics=False)
    flat = [Group(g.group_id, g.task_id, [dataclasses.replace(t, reward=0.5) for t in g.trajectories]) for g in groups]
    failed = Group("f", "t", [dataclasses.replace(t, status=Status.FAILED) for t in groups[0].trajectories])
    m = tr.train_step(flat + [failed])
    assert m["skipped"] == 1 and tr.version == 0 and tr.step == 0
    assert m["zero_variance_groups"] == 2 and m["dropped/failed"] == 4


def test_a_run_of_skipped_batches_stops_the_learner_with_a_checkpoint_and_a_reason(tiny_dir, make_cfg, groups):
    """trainer.max_skipped_batches: batches whose groups all scored the same train nothing, and after that
    many in a row the learner stops (a run would otherwise never reach total_steps) with the reason in
    progress(), after its final checkpoint. Groups arrive over real gRPC. A skipped batch's row in
    metrics.jsonl carries its batch number and stays out of TensorBoard (no second point at its step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from actors.learner_client import LearnerClient
    from learner.service import LearnerService

    cfg = make_cfg("trainer.lr=1e-3", "rollout.dtype=float32", "learner.group_size=4", "trainer.groups_per_step=1",
                   "trainer.total_steps=10", "trainer.max_skipped_batches=2", "trainer.checkpoint_every=0",
                   "trainer.export_hf=false", "trainer.tensorboard=true")
    flat = [Group(f"flat{i}", g.task_id, [dataclasses.replace(t, reward=0.5, group_id=f"flat{i}",
                                                             traj_id=f"flat{i}/{k}") for k, t in enumerate(g.trajectories)])
            for i, g in enumerate(groups)]
    svc = LearnerService(cfg, tiny_dir)
    svc.start()
    try:
        with LearnerClient.from_config(cfg.learner, svc.address) as client:
            client.submit([groups[0]])  # trains step 1
            deadline = time.monotonic() + 120
            while svc.progress()["step"] < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            client.submit(flat)  # two batches of one zero-variance group each
        assert svc.join(timeout=120), "the learner did not stop after 2 skipped batches"
        p = svc.progress()
        assert p["error"] is None and p["step"] == 1 and p["batches"] == 3, p
        assert p["stopped"] and "2 batches in a row trained nothing" in p["stopped"], p
    finally:
        svc.stop()
    from learner.checkpoint import latest_checkpoint

    assert latest_checkpoint(cfg.trainer.run_dir) is not None  # step 1 saved on the way out
    run_dir = Path(cfg.trainer.run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["batch"], r["skipped"]) for r in rows] == [(1, 1, 0), (1, 2, 1), (1, 3, 1)], rows
    assert rows[1]["zero_variance_groups"] == 1 and "loss" not in rows[1]
    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("reward_mean")] == [1]


def test_micro_batch_split_leaves_loss_and_gradient_unchanged(tiny_dir, make_cfg, groups):
    for agg in ("token-mean", "seq-mean-token-mean"):
        whole = _trainer(make_cfg(f"loss.loss_agg={agg}", "trainer.micro_batch_tokens=100000"), tiny_dir,
                         log_metrics=False).train_step(groups)
        split = _trainer(make_cfg(f"loss.loss_agg={agg}", "trainer.micro_batch_tokens=3000"), tiny_dir,
                         log_metrics=False).train_step(groups)
        assert whole["micro_batches"] == 1 and split["micro_batches"] >= 3
        assert abs(whole["loss"] - split["loss"]) < 1e-6
        assert abs(whole["grad_norm"] - split["grad_norm"]) < 1e-5 * max(1.0, whole["grad_norm"])
        assert whole["tokens"] == split["tokens"]


def test_batch_metrics_say_what_the_episodes_did():
    """Beside the rewards, each step's row says how many tool calls, turns and frames an episode took and
    what fraction used a tool (the curve a tool-use run is watched by); FAILED episodes are not counted."""
    from learner.trainer import batch_metrics

    def traj(calls: int, status: Status = Status.COMPLETED) -> Trajectory:
        z = np.zeros(3)
        return Trajectory(z, z, z, z - 1, reward=float(calls), reward_terms={"accuracy": float(calls > 1)},
                          status=status, metrics={"tool_calls": calls, "turns": calls + 1, "frames": 4 * calls})

    m = batch_metrics([Group("g", "t", [traj(0), traj(1), traj(2), traj(3), traj(9, Status.FAILED)])], version=0)
    assert m["episode/tool_calls"] == 1.5 and m["episode/turns"] == 2.5 and m["episode/frames"] == 6.0
    assert m["episode/used_tools"] == 0.75 and m["accuracy"] == 0.5
    assert batch_metrics([], version=0)["episode/used_tools"] == 0.0


def test_docs_metrics_md_lists_every_metric():
    from pathlib import Path

    from learner.metrics import METRIC_HELP, metrics_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    assert doc.read_text() == metrics_markdown(), "regenerate docs/metrics.md from learner.metrics.metrics_markdown()"
    assert all(v.strip() and "\n" not in v for v in METRIC_HELP.values())


def _receiver(init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from learner.weights import receive_weights

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=1, world_size=2)
    try:
        version, tensors = receive_weights(device="cpu")
        torch.save({"version": version, "tensors": dict(tensors)}, out_file)
    finally:
        dist.destroy_process_group()


def test_distributed_weight_broadcast_over_gloo(tmp_path):
    """The torch.distributed sender/receiver pair, on CPU processes with gloo (NCCL on GPUs is unverified)."""
    import multiprocessing as mp

    import torch.distributed as dist

    from learner.weights import DistributedWeightSender, layer_buckets, layer_key

    rng = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    named = [("model.language_model.embed_tokens.weight", torch.randn(33, 8, generator=rng)),
             ("model.language_model.layers.0.mlp.up_proj.weight", torch.randn(5, 7, generator=rng).to(torch.bfloat16)),
             ("model.language_model.layers.0.input_layernorm.weight", torch.randn(3, generator=rng).to(torch.float16)),
             ("model.language_model.layers.1.self_attn.q_proj.bias", torch.randn(9, generator=rng)),
             ("lm_head.weight", torch.randn(33, 8, generator=rng))]
    buckets = list(layer_buckets(named, 64))
    assert len(buckets) > 1 and [n for b in buckets for n, _ in b] == [n for n, _ in named]
    where = {n: i for i, b in enumerate(buckets) for n, _ in b}
    for key in {layer_key(n) for n, _ in named}:  # a layer is never split over two buckets
        assert len({where[n] for n, _ in named if layer_key(n) == key}) == 1, key
    init, out = str(tmp_path / "init"), str(tmp_path / "got.pt")
    child = mp.get_context("spawn").Process(target=_receiver, args=(init, out))
    child.start()
    try:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=2)
        sent = DistributedWeightSender(device="cpu", bucket_bytes=64).send(7, named)
        dist.destroy_process_group()
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    got = torch.load(out, weights_only=True)
    assert got["version"] == 7 and sent == sum(t.numel() * t.element_size() for _, t in named)
    for n, t in named:
        assert got["tensors"][n].dtype == t.dtype and torch.equal(got["tensors"][n], t), n


def test_text_only_causal_lm_trains_too(tmp_path, make_cfg):
    """A plain Qwen2ForCausalLM (no vision): same trainer, random valid text-only groups."""
    from models.shim import ensure_torchvision

    ensure_torchvision()  # before transformers' model classes import torchvision
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.trainer import Trainer
    from models.hf import hf_token_logprobs
    from models.tiny import build_tokenizer
    from protos.testing import random_group

    tok = build_tokenizer(seed=0)
    model_dir = tmp_path / "text_lm"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = np.random.default_rng()
    groups = [random_group(rng, group_size=4, num_tokens=int(rng.integers(40, 90)), vocab_size=len(tok), media=0)
              for _ in range(2)]
    tr = Trainer(make_cfg("trainer.lr=1e-3", "trainer.temperature=1.3"), model_dir, log_metrics=False)
    assert tr.image_token_id is None and tr.banned_list == []
    s = tr.prepare(groups).samples[0]
    mine = tr.token_logprobs(tr.micro_batches([s])[0])[0].numpy()
    ref = hf_token_logprobs(tr.model, tr.processor, s.token_ids.tolist(), [], 1, temperature=1.3)
    assert np.abs(mine - ref)[s.loss_mask[1:]].max() < 1e-4
    before = tr.model.lm_head.weight.detach().clone()
    m = tr.train_step(groups)
    assert tr.version == 1 and m["trajectories_trained"] == 8 and not torch.equal(before, tr.model.lm_head.weight)


def test_reference_policy_kl_in_loss_and_in_reward(tiny_dir, make_cfg, groups):
    """loss.kl_coef and loss.kl_in_reward load a frozen reference (the starting model). At step 0 the
    policy is the reference, so the loss's KL is ~0 and the reward KL is sum(mu - pi_ref) over each
    trajectory's tokens, which the engine-free groups here make exactly their behaviour logprobs minus
    the model's; after a step the reference has not moved while the policy has."""
    cfg = make_cfg("trainer.lr=1e-2", "loss.kl_coef=0.5", "loss.kl_in_reward=0.01", "learner.group_size=4")
    tr = _trainer(cfg, tiny_dir)
    assert tr.ref_policy is not None and not tr.ref_policy.parameters()
    ref_before = {n: p.detach().clone() for n, p in tr.ref_policy.module.named_parameters()}
    m = tr.train_step(groups)
    assert m["skipped"] == 0 and abs(m["kl"]) < 1e-5
    assert np.isfinite(m["kl_in_reward/seq_kl_mean"]) and m["kl_in_reward/seq_kl_mean"] != 0.0
    m2 = tr.train_step(groups)
    assert m2["kl"] > 1e-6  # the policy moved away from the frozen reference
    for n, p in tr.ref_policy.module.named_parameters():
        assert torch.equal(p.detach(), ref_before[n]), n
    assert _trainer(make_cfg("learner.group_size=4"), tiny_dir).ref_policy is None  # no KL term: no copy


def test_sub_agent_trajectories_train_with_their_episodes_advantage_only_when_switched_on(tiny_dir, make_cfg, groups):
    """ParaVT's switch: an episode's sub-agent trajectories (Trajectory.children) are trained with the
    episode's advantage when trainer.train_subagents is on, never join the group's normalisation, and
    are left alone by default. They survive the wire (codec) and the learner's validation too."""
    import copy

    from learner.validate import Limits, validate_group
    from protos.codec import dumps, loads

    gs = copy.deepcopy(groups)
    for g in gs:  # each episode gets one child: a copy of another episode's tokens, as a sub-agent's
        for k, t in enumerate(g.trajectories):
            other = g.trajectories[(k + 1) % len(g.trajectories)]
            child = copy.deepcopy(other)
            child.children, child.traj_id, child.metadata = [], f"{t.traj_id}/sub0", {"role": "subagent"}
            t.children = [child]
    back = loads(dumps(gs[0]))
    assert [c.traj_id for t in back.trajectories for c in t.children] == [c.traj_id for t in gs[0].trajectories
                                                                           for c in t.children]
    assert np.array_equal(back.trajectories[0].children[0].token_ids, gs[0].trajectories[0].children[0].token_ids)
    assert validate_group(back, Limits(group_size=4, current_version=0)) is None
    off = _trainer(make_cfg("learner.group_size=4"), tiny_dir).train_step(gs)
    on_cfg = make_cfg("learner.group_size=4", "trainer.train_subagents=true")
    tr = _trainer(on_cfg, tiny_dir)
    on = tr.train_step(gs)
    assert off["subagent_trajectories_trained"] == 0
    assert on["subagent_trajectories_trained"] == on["trajectories_trained"] == off["trajectories_trained"]
    assert on["tokens"] > off["tokens"]  # the children's tokens were trained too
