"""learner/grpo.py against a float64 reference written here from the formulas, on fresh random inputs.

The reference walks sequence by sequence with its own code (it calls nothing from
learner/). Each run draws a new seed; a failure prints it (set WEFT_TEST_SEED to replay).
Tolerances: fp32 implementation vs float64 reference, relative error < 1e-5, where the
loss is compared relative to the aggregated |per-token loss| (GRPO losses sit near 0
by construction, so a plain relative error would measure cancellation, not accuracy).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets

import pytest
import torch

from configs.schema import LossConfig
from learner.grpo import group_advantages, policy_loss, zero_variance_groups

IS_MODES = ["none", "token_tis", "seq_tis", "token_mis", "geo_mask"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
EXTRAS = ["plain", "dual_clip", "kl_k1", "kl_k2", "kl_k3"]


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("WEFT_TEST_SEED", secrets.randbits(31)))
    print(f"seed={seed} (WEFT_TEST_SEED={seed} replays this run)")
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- reference (float64, per sequence)


def ref_policy_loss(logp, prox, behav, adv, mask, cfg: LossConfig, ref=None):
    """(loss, scale, clipped_count, rejected_count); scale = same aggregation of |token loss|."""
    per_seq, per_seq_abs, clipped, rejected = [], [], 0, 0
    for i in range(logp.shape[0]):
        keep = mask[i] != 0
        if not bool(keep.any()):
            continue
        lp, px, bh, a = logp[i][keep], prox[i][keep], behav[i][keep], float(adv[i])
        log_w = px - bh
        if cfg.is_mode == "none":
            weight = torch.ones_like(lp)
        elif cfg.is_mode == "token_tis":
            weight = torch.clamp(torch.exp(log_w), max=cfg.is_cap)
        elif cfg.is_mode == "seq_tis":
            weight = torch.full_like(lp, min(math.exp(float(log_w.mean())), cfg.is_cap))
        elif cfg.is_mode == "token_mis":
            w = torch.exp(log_w)
            weight = ((w >= cfg.is_low) & (w <= cfg.is_high)).double()
        else:  # geo_mask
            g = math.exp(float(log_w.mean()))
            weight = torch.full_like(lp, 1.0 if cfg.is_low <= g <= cfg.is_high else 0.0)
        rejected += int((weight == 0).sum())
        ratio = torch.exp(lp - px)
        unclipped = ratio * a
        clipped_obj = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a
        clipped += int((clipped_obj < unclipped).sum())
        pg = -torch.minimum(unclipped, clipped_obj)
        if cfg.dual_clip is not None and a < 0:
            pg = torch.clamp(pg, max=-cfg.dual_clip * a)
        tok = weight * pg
        if cfg.kl_coef > 0:
            x = ref[i][keep] - lp  # log(pi_ref / pi)
            kl = {"k1": -x, "k2": x**2 / 2, "k3": torch.exp(x) - 1 - x}[cfg.kl_estimator]
            tok = tok + cfg.kl_coef * kl
        per_seq.append(tok)
        per_seq_abs.append(tok.detach().abs())

    def agg(seqs):
        if cfg.loss_agg == "token-mean":
            return torch.cat(seqs).sum() / sum(len(s) for s in seqs)
        if cfg.loss_agg == "seq-mean-token-mean":
            return torch.stack([s.mean() for s in seqs]).mean()
        return torch.stack([s.sum() / cfg.max_len for s in seqs]).mean()

    return agg(per_seq), float(agg(per_seq_abs)), clipped, rejected


def plain_grpo_loss(logp, old, adv, mask, cfg: LossConfig):
    """On-policy GRPO: clipped ratio to the sampling policy, no importance weights at all."""
    seqs = []
    for i in range(logp.shape[0]):
        keep = mask[i] != 0
        if bool(keep.any()):
            r = torch.exp(logp[i][keep] - old[i][keep])
            a = float(adv[i])
            seqs.append(-torch.minimum(r * a, torch.clamp(r, 1 - cfg.clip_low, 1 + cfg.clip_high) * a))
    if cfg.loss_agg == "token-mean":
        return torch.cat(seqs).mean()
    if cfg.loss_agg == "seq-mean-token-mean":
        return torch.stack([s.mean() for s in seqs]).mean()
    return torch.stack([s.sum() / cfg.max_len for s in seqs]).mean()


# ---------------------------------------------------------------- random batches


def _near(x: torch.Tensor, bounds) -> bool:
    return any(bool(((x / b - 1).abs() < 1e-4).any()) for b in bounds if b is not None and b > 0)


def make_batch(gen: torch.Generator, cfg: LossConfig, b: int = 8, t: int = 24):
    """fp32 inputs with padding (one empty row, junk values at padding) and varied IS ratios.

    Redrawn while any ratio sits within 1e-4 of a threshold, where fp32 and fp64 could
    take different branches of a clip or mask.
    """
    for _ in range(100):
        prox = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 4
        logp = prox + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        shift = torch.linspace(-1.5, 1.5, b, dtype=torch.float64)[:, None]  # some sequences far off-policy
        behav = prox - shift - 0.4 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        ref = logp + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        adv = torch.randn(b, generator=gen, dtype=torch.float64)
        lengths = torch.randint(1, t + 1, (b,), generator=gen)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        mask[0] = False  # an empty row must not count as a sequence
        mask[1, :3] = False  # a prompt before the generated tokens
        pad = ~mask
        logp[pad], prox[pad], behav[pad], ref[pad] = 50.0, 1e4, -torch.inf, 7.0
        logp, prox, behav, ref, adv = (x.float() for x in (logp, prox, behav, ref, adv))
        m = mask
        u = torch.exp(logp.double() - prox.double())[m]
        lw = (prox.double() - behav.double()).where(m, torch.zeros(()))
        w, seq_w = torch.exp(lw[m]), torch.exp(lw.sum(1) / m.sum(1).clamp(min=1))
        if not (_near(u, [1 - cfg.clip_low, 1 + cfg.clip_high, cfg.dual_clip])
                or _near(w, [cfg.is_cap, cfg.is_low, cfg.is_high]) or _near(seq_w, [cfg.is_cap, cfg.is_low, cfg.is_high])):
            return logp, prox, behav, ref, adv, mask
    raise AssertionError("could not draw a batch away from the thresholds")


def _cfg(is_mode: str, agg: str, extra: str) -> LossConfig:
    cfg = LossConfig(is_mode=is_mode, loss_agg=agg, is_cap=1.5, is_low=0.5, is_high=2.0, max_len=32)
    if extra == "dual_clip":
        cfg.dual_clip = 1.6
    elif extra.startswith("kl_"):
        cfg.kl_coef, cfg.kl_estimator = 0.1, extra[3:]
    return cfg


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


# ---------------------------------------------------------------- policy_loss


@pytest.mark.parametrize("is_mode,agg,extra", list(itertools.product(IS_MODES, AGGS, EXTRAS)))
def test_policy_loss_matches_float64_reference(gen, is_mode, agg, extra):
    cfg = _cfg(is_mode, agg, extra)
    logp, prox, behav, ref, adv, mask = make_batch(gen, cfg)
    lp32 = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp32, prox, behav, adv, mask, cfg, ref_logp=ref)
    (g32,) = torch.autograd.grad(loss, lp32)

    lp64 = logp.double().requires_grad_(True)
    want, scale, clipped, rejected = ref_policy_loss(lp64, prox.double(), behav.double(), adv.double(), mask, cfg, ref.double())
    (g64,) = torch.autograd.grad(want, lp64)

    assert abs(loss.item() - want.item()) <= 1e-5 * scale, (loss.item(), want.item(), scale)
    assert rel(g32, g64) < 1e-5
    assert float(g32[~mask].abs().max()) == 0.0  # padding gets no gradient
    n = int(mask.sum())
    assert int(metrics["tokens"]) == n
    assert abs(float(metrics["clip_frac"]) - clipped / n) < 1e-6
    assert abs(float(metrics["is_masked_frac"]) - rejected / n) < 1e-6
    assert abs(metrics["loss"].item() - loss.item()) <= 1e-6 * scale
    if is_mode in ("token_mis", "geo_mask"):
        assert 0 < rejected < n, "the batch should exercise both kept and rejected tokens"


def test_dual_clip_caps_negative_advantages(gen):
    """A huge ratio with A < 0: the loss is exactly -c*A and carries no gradient."""
    cfg = LossConfig(is_mode="none", dual_clip=3.0)
    logp = torch.tensor([[2.0, 0.0]], requires_grad=True)  # ratio e^2 > 3 on the first token
    zeros = torch.zeros(1, 2)
    loss, metrics = policy_loss(logp, zeros, zeros, torch.tensor([-0.5]), torch.tensor([[1, 0]]), cfg)
    loss.backward()
    assert loss.item() == pytest.approx(1.5)
    assert float(logp.grad[0, 0]) == 0.0
    assert float(metrics["dual_clip_frac"]) == 1.0


@pytest.mark.parametrize("is_mode", IS_MODES)
@pytest.mark.parametrize("agg", AGGS)
def test_on_policy_is_plain_grpo(gen, is_mode, agg):
    cfg = _cfg(is_mode, agg, "plain")
    logp, prox, _, _, adv, mask = make_batch(gen, cfg)
    lp32 = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp32, prox, prox, adv, mask, cfg)  # prox_logp is behavior_logp
    (g32,) = torch.autograd.grad(loss, lp32)
    lp64 = logp.double().requires_grad_(True)
    want = plain_grpo_loss(lp64, prox.double(), adv.double(), mask, cfg)
    (g64,) = torch.autograd.grad(want, lp64)
    _, scale, _, _ = ref_policy_loss(lp64, prox.double(), prox.double(), adv.double(), mask, cfg)
    assert abs(loss.item() - want.item()) <= 1e-5 * scale
    assert rel(g32, g64) < 1e-5
    assert float(metrics["is_weight_mean"]) == 1.0 and float(metrics["mismatch_kl"]) == 0.0
    assert float(metrics["is_masked_frac"]) == 0.0 and float(metrics["is_capped_frac"]) == 0.0


def test_metrics_match_their_definitions(gen):
    cfg = LossConfig(is_mode="token_tis", is_cap=1.5, kl_coef=0.05, kl_estimator="k2")
    logp, prox, behav, ref, adv, mask = make_batch(gen, cfg)
    entropy = torch.rand(logp.shape, generator=gen) * 3
    _, m = policy_loss(logp, prox, behav, adv, mask, cfg, ref_logp=ref, entropy=entropy)
    w = torch.exp(prox.double() - behav.double())[mask]
    assert float(m["is_weight_mean"]) == pytest.approx(float(w.mean()), rel=1e-5)
    assert float(m["is_weight_max"]) == pytest.approx(float(w.max()), rel=1e-5)
    assert float(m["is_capped_frac"]) == pytest.approx(float((w > 1.5).double().mean()), abs=1e-6)
    assert float(m["mismatch_kl"]) == pytest.approx(float((w - 1 - w.log()).mean()), rel=1e-4)
    assert float(m["kl"]) == pytest.approx(float(((ref.double() - logp.double())[mask] ** 2 / 2).mean()), rel=1e-4)
    assert float(m["entropy"]) == pytest.approx(float(entropy.double()[mask].mean()), rel=1e-5)
    assert all(not v.requires_grad for v in m.values())


def test_constants_get_no_gradient(gen):
    cfg = LossConfig(is_mode="token_tis", kl_coef=0.1)
    logp, prox, behav, ref, adv, mask = make_batch(gen, cfg)
    consts = [x.clone().requires_grad_(True) for x in (prox, behav, ref, adv)]
    loss, _ = policy_loss(logp.clone().requires_grad_(True), consts[0], consts[1], consts[3], mask, cfg, ref_logp=consts[2])
    loss.backward()
    assert all(c.grad is None for c in consts)


def test_bad_inputs_raise_clear_errors():
    z, a, m = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    cfg = LossConfig()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(z, z, z, torch.zeros(3), m, cfg)
    with pytest.raises(ValueError, match="prox_logp"):
        policy_loss(z, torch.zeros(2, 4), z, a, m, cfg)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(z, z, z, a, m, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="NaN.*behavior_logp"):
        policy_loss(z, z, torch.full((2, 3), float("nan")), a, m, cfg)
    with pytest.raises(ValueError, match="is_mode"):
        policy_loss(z, z, z, a, m, LossConfig(is_mode="tis"))
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(z, z, z, a, m, LossConfig(dual_clip=0.9))
    with pytest.raises(ValueError, match="is_low"):
        policy_loss(z, z, z, a, m, LossConfig(is_low=1.2))
    # NaN on padding is fine: it never reaches the loss.
    nan_pad = torch.zeros(2, 3)
    nan_pad[:, 2] = float("nan")
    loss, _ = policy_loss(z, z, nan_pad, a, torch.tensor([[1, 1, 0], [1, 0, 0]]), cfg)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- advantages


def ref_advantages(rewards, groups, mode, eps):
    out = torch.empty_like(rewards, dtype=torch.float64)
    for g in set(groups.tolist()):
        idx = (groups == g).nonzero().squeeze(1)
        r = rewards[idx].double()
        mean = r.mean()
        std = r.std() if len(r) > 1 else torch.tensor(0.0, dtype=torch.float64)
        out[idx] = (r - mean) if mode == "drgrpo" else (r - mean) / (std + eps)
    return out


@pytest.mark.parametrize("mode", ["grpo", "drgrpo"])
def test_group_advantages_match_reference(gen, mode):
    n_groups = 6
    labels = torch.randperm(1000, generator=gen)[:n_groups] * 7 - 3000  # arbitrary, non-contiguous ids
    sizes = torch.randint(1, 9, (n_groups,), generator=gen)
    groups = torch.repeat_interleave(labels, sizes)
    perm = torch.randperm(len(groups), generator=gen)
    groups = groups[perm]
    rewards = torch.randint(0, 3, (len(groups),), generator=gen).float() + 0.1 * torch.randn(len(groups), generator=gen)
    rewards[groups == labels[0]] = 0.7  # a flat group: advantage exactly 0
    got = group_advantages(rewards, groups, mode=mode)
    want = ref_advantages(rewards, groups, mode, 1e-6)
    assert got.dtype == torch.float32
    assert rel(got, want) < 1e-6
    assert float(got[groups == labels[0]].abs().max()) == 0.0


def test_zero_variance_groups_are_found_and_counted(gen):
    groups = torch.tensor([5, 5, 5, 9, 9, 2, 2, 2, 40])
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.3, 0.3, 0.3, 1.0])
    perm = torch.randperm(len(groups), generator=gen)
    flat, count = zero_variance_groups(rewards[perm], groups[perm])
    assert count == 3  # groups 5, 2 and the single-sample group 40
    assert flat.tolist() == [int(g) in (5, 2, 40) for g in groups[perm]]


def test_advantage_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        group_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), mode="ppo")
    with pytest.raises(ValueError, match="group_index"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        zero_variance_groups(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long))
