"""learner/loss.py: the fused entry point against full float64 logits and the formulas, written here.

The reference below is vectorised over the batch (test_grpo.py's walks sequence by
sequence); it calls nothing from learner/. Fresh random inputs each run; a failure
prints the seed (WEFT_TEST_SEED replays it). fp32 implementation vs float64 reference:
relative error < 1e-5 (the loss relative to the aggregated |per-token loss|).
"""

from __future__ import annotations

import itertools
import os
import secrets

import pytest
import torch

from configs.schema import LossConfig
from learner.grpo import policy_loss
from learner.loss import fused_policy_loss

IS_MODES = ["none", "token_tis", "seq_tis", "token_mis", "geo_mask"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("WEFT_TEST_SEED", secrets.randbits(31)))
    print(f"seed={seed} (WEFT_TEST_SEED={seed} replays this run)")
    return torch.Generator().manual_seed(seed)


def reference(hidden, weight, targets, adv, prox, behav, mask, cfg: LossConfig, temperature=1.0, ref=None):
    """(loss, scale) in float64 from full logits; scale aggregates |token loss| the same way."""
    m = mask.double()
    logits = hidden.double() @ weight.double().t() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    prox, behav = prox.double().where(mask, 0.0), behav.double().where(mask, 0.0)
    lw = prox - behav
    seq_w = torch.exp((lw * m).sum(1) / m.sum(1).clamp(min=1))[:, None]
    weight_by_mode = {
        "none": torch.ones_like(lw),
        "token_tis": lw.exp().clamp(max=cfg.is_cap),
        "seq_tis": seq_w.clamp(max=cfg.is_cap).expand_as(lw),
        "token_mis": ((lw.exp() >= cfg.is_low) & (lw.exp() <= cfg.is_high)).double(),
        "geo_mask": ((seq_w >= cfg.is_low) & (seq_w <= cfg.is_high)).double().expand_as(lw),
    }
    a = adv.double()[:, None]
    ratio = torch.exp(logp - prox)
    pg = torch.maximum(-ratio * a, -ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)
    if cfg.dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -cfg.dual_clip * a), pg)
    tok = weight_by_mode[cfg.is_mode] * pg
    if cfg.kl_coef > 0:
        x = ref.double().where(mask, 0.0) - logp
        tok = tok + cfg.kl_coef * {"k1": -x, "k2": 0.5 * x * x, "k3": x.exp() - 1 - x}[cfg.kl_estimator]

    def agg(t):
        t = t.where(mask, 0.0)
        rows = m.sum(1) > 0
        if cfg.loss_agg == "token-mean":
            return t.sum() / m.sum()
        if cfg.loss_agg == "seq-mean-token-mean":
            return (t.sum(1) / m.sum(1).clamp(min=1))[rows].mean()
        return (t.sum(1) / cfg.max_len)[rows].mean()

    return agg(tok), float(agg(tok.detach().abs()))


def make_batch(gen, cfg: LossConfig, b=5, t=13, h=16, v=300, temperature=1.0):
    """fp32 hidden/W/targets with padding, and prox/behav/ref logprobs near the model's own."""
    for _ in range(100):
        hidden = torch.randn(b, t, h, generator=gen)
        weight = torch.randn(v, h, generator=gen) * 0.5
        targets = torch.randint(0, v, (b, t), generator=gen)
        mask = torch.arange(t)[None, :] < torch.randint(2, t + 1, (b,), generator=gen)[:, None]
        mask[0, :4] = False  # prompt tokens
        mask[-1] = False  # an all-padding row
        targets[~mask] = -100  # padding ids need not be valid tokens
        with torch.no_grad():
            logits = hidden.double() @ weight.double().t() / temperature
            lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        prox = lp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        behav = prox - torch.linspace(-1.5, 1.5, b, dtype=torch.float64)[:, None] - 0.4 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        ref = lp + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        adv = torch.randn(b, generator=gen)
        prox, behav, ref = prox.float(), behav.float(), ref.float()
        # Keep every ratio 1e-4 away from a clip/mask threshold, where fp32 and fp64 could branch apart.
        u = torch.exp(lp - prox.double())[mask]
        lw = (prox.double() - behav.double()).where(mask, 0.0)
        w, seq_w = lw.exp()[mask], torch.exp(lw.sum(1) / mask.sum(1).clamp(min=1))
        bounds_u = [1 - cfg.clip_low, 1 + cfg.clip_high] + ([cfg.dual_clip] if cfg.dual_clip else [])
        bounds_w = [cfg.is_cap, cfg.is_low, cfg.is_high]
        near = any(bool(((x / c - 1).abs() < 1e-4).any()) for x, bs in ((u, bounds_u), (w, bounds_w), (seq_w, bounds_w)) for c in bs)
        if not near:
            return hidden, weight, targets, adv, prox, behav, mask, ref
    raise AssertionError("could not draw a batch away from the thresholds")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def check_against_reference(gen, cfg: LossConfig, temperature=1.0, chunk_size=7):
    hidden, weight, targets, adv, prox, behav, mask, ref = make_batch(gen, cfg, temperature=temperature)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = fused_policy_loss(h, w, targets, adv, prox, behav, mask, cfg, chunk_size=chunk_size,
                                      temperature=temperature, ref_logp=ref)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    want, scale = reference(h64, w64, targets, adv, prox, behav, mask, cfg, temperature, ref)
    dh64, dw64 = torch.autograd.grad(want, (h64, w64))
    assert loss.dtype == torch.float32 and dh.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-5 * scale, (loss.item(), want.item(), scale)
    assert rel(dh, dh64) < 1e-5 and rel(dw, dw64) < 1e-5
    assert float(dh[~mask].abs().max()) == 0.0  # no gradient through prompt / padding positions
    return metrics


@pytest.mark.parametrize("is_mode,agg", list(itertools.product(IS_MODES, AGGS)))
def test_fused_loss_matches_float64_reference(gen, is_mode, agg):
    cfg = LossConfig(is_mode=is_mode, loss_agg=agg, is_cap=1.5, is_low=0.5, is_high=2.0, max_len=16)
    check_against_reference(gen, cfg)


@pytest.mark.parametrize("extra", ["dual_clip", "k1", "k2", "k3"])
@pytest.mark.parametrize("agg", AGGS)
def test_fused_loss_dual_clip_kl_temperature(gen, extra, agg):
    cfg = LossConfig(is_mode="token_tis", loss_agg=agg, is_cap=1.5, max_len=16)
    if extra == "dual_clip":
        cfg.dual_clip = 1.6
    else:
        cfg.kl_coef, cfg.kl_estimator = 0.2, extra
    check_against_reference(gen, cfg, temperature=0.8, chunk_size=4)


def test_fused_metrics_equal_policy_loss_on_full_logits(gen):
    cfg = LossConfig(is_mode="token_mis", kl_coef=0.1, dual_clip=2.0)
    hidden, weight, targets, adv, prox, behav, mask, ref = make_batch(gen, cfg)
    hidden, weight = hidden.double(), weight.double()
    loss, got = fused_policy_loss(hidden, weight, targets, adv, prox, behav, mask, cfg, chunk_size=5, ref_logp=ref)
    logp_all = torch.log_softmax(hidden @ weight.t(), -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    want_loss, want = policy_loss(logp, prox.double(), behav.double(), adv.double(), mask, cfg, ref_logp=ref.double(), entropy=entropy)
    assert abs(loss.item() - want_loss.item()) < 1e-12
    assert set(got) == set(want)
    for k in want:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-9, abs=1e-12), k


def test_no_grad_frozen_head_and_scaled_backward(gen):
    cfg = LossConfig()
    hidden, weight, targets, adv, prox, behav, mask, _ = make_batch(gen, cfg)
    args = (targets, adv, prox, behav, mask, cfg)
    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_policy_loss(h, weight, *args, chunk_size=8)  # frozen LM head
    (3.0 * loss).backward()
    with torch.no_grad():
        loss_ng, _ = fused_policy_loss(h, weight, *args, chunk_size=8)
    assert loss_ng.grad_fn is None and loss_ng.item() == pytest.approx(loss.item(), rel=1e-6)
    h2 = hidden.clone().requires_grad_(True)
    loss2, _ = fused_policy_loss(h2, weight, *args, chunk_size=8)
    loss2.backward()
    assert rel(h.grad, 3.0 * h2.grad) < 1e-6


def test_fused_loss_holds_only_chunk_logits(gen, largest_tensor):
    cfg = LossConfig()
    b, t, h, v, chunk = 4, 32, 4, 400, 8
    hidden, weight, targets, adv, prox, behav, mask, _ = make_batch(gen, cfg, b=b, t=t, h=h, v=v)
    hidden.requires_grad_(True), weight.requires_grad_(True)
    with largest_tensor() as probe:
        loss, _ = fused_policy_loss(hidden, weight, targets, adv, prox, behav, mask, cfg, chunk_size=chunk)
        loss.backward()
    assert probe.largest == chunk * v  # > V*H and B*T*H here; full logits would be B*T*V


def test_bad_inputs_raise_clear_errors(gen):
    cfg = LossConfig()
    hidden, weight, targets, adv, prox, behav, mask, _ = make_batch(gen, cfg)
    bad_targets = targets.clone()
    bad_targets[mask.nonzero()[0].tolist()] = weight.shape[0]  # an out-of-vocab id on a loss token
    with pytest.raises(ValueError, match="targets must be in"):
        fused_policy_loss(hidden, weight, bad_targets, adv, prox, behav, mask, cfg, chunk_size=4)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        fused_policy_loss(hidden[0], weight, targets, adv, prox, behav, mask, cfg, chunk_size=4)
    with pytest.raises(ValueError, match="mask"):
        fused_policy_loss(hidden, weight, targets, adv, prox, behav, mask[:, 1:], cfg, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_policy_loss(hidden, weight, targets, adv, prox, behav, mask, cfg, chunk_size=0)
    with pytest.raises(ValueError, match="ref_logp"):
        fused_policy_loss(hidden, weight, targets, adv, prox, behav, mask, LossConfig(kl_coef=0.1), chunk_size=4)


@pytest.mark.gpu
def test_fused_loss_on_cuda_bf16(gen):
    """Unverified in development (no GPU): bf16 on CUDA against the float64 CPU reference."""
    cfg = LossConfig(is_mode="token_tis", kl_coef=0.05)
    hidden, weight, targets, adv, prox, behav, mask, ref = make_batch(gen, cfg, b=4, t=256, h=256, v=8000)
    h = hidden.cuda().bfloat16().requires_grad_(True)
    w = weight.cuda().bfloat16().requires_grad_(True)
    loss, _ = fused_policy_loss(h, w, *(x.cuda() for x in (targets, adv, prox, behav, mask)), cfg, chunk_size=128, ref_logp=ref.cuda())
    loss.backward()
    h64, w64 = h.detach().cpu().double().requires_grad_(True), w.detach().cpu().double().requires_grad_(True)
    want, scale = reference(h64, w64, targets, adv, prox, behav, mask, cfg, 1.0, ref)
    want.backward()
    assert abs(loss.item() - want.item()) <= 2e-2 * scale
    assert rel(h.grad.cpu(), h64.grad) < 3e-2 and rel(w.grad.cpu(), w64.grad) < 3e-2


# ---------------------------------------------------------------- the recipes' loss variants
# References written from the papers' formulas, in float64 from full logits, with autograd through
# every ratio (GSPO's sequence ratio included): the fused loss's stop-gradient forms must agree.


def variant_reference(hidden, weight, targets, adv, prox, mask, cfg: LossConfig):
    """GSPO (Zheng et al. 2025, eq. 5-7), CISPO (MiniMax-M1, eq. 4) or PPO, plus the entropy bonus."""
    m = mask.double()
    logits = hidden.double() @ weight.double().t()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).where(mask, 0.0)
    prox = prox.double().where(mask, 0.0)
    a = adv.double()
    n_tok = m.sum(1)
    rows = n_tok > 0
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
    if cfg.policy_loss == "gspo":
        s = torch.exp(((logp - prox) * m).sum(1) / n_tok.clamp(min=1))
        per_seq = -torch.minimum(s * a, s.clamp(lo, hi) * a)
        if cfg.loss_agg == "seq-mean-token-mean":
            loss = per_seq[rows].mean()
        else:  # token-mean: each sequence's term counted once per token
            loss = (per_seq * n_tok).sum() / n_tok.sum()
    elif cfg.policy_loss == "cispo":
        r = torch.exp(logp - prox)
        loss = -((r.detach().clamp(lo, hi) * a[:, None] * logp) * m).sum() / m.sum()
    else:
        r = torch.exp(logp - prox)
        tok = torch.maximum(-r * a[:, None], -r.clamp(lo, hi) * a[:, None])
        loss = (tok * m).sum() / m.sum()
    if cfg.entropy_coef:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        loss = loss - cfg.entropy_coef * (ent * m).sum() / m.sum()
    return loss


def _away_from_gspo_bounds(hidden, weight, targets, prox, mask, cfg) -> bool:
    with torch.no_grad():
        logp = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(
            -1, targets.clamp(min=0)[..., None]).squeeze(-1)
        m = mask.double()
        s = torch.exp(((logp - prox.double()) * m).sum(1) / m.sum(1).clamp(min=1))[m.sum(1) > 0]
    return all(bool(((s / c - 1).abs() > 1e-3).all()) for c in (1 - cfg.clip_low, 1 + cfg.clip_high))


VARIANTS = [
    LossConfig(policy_loss="gspo", is_mode="none", loss_agg="seq-mean-token-mean", clip_low=0.05, clip_high=0.08),
    LossConfig(policy_loss="gspo", is_mode="none", loss_agg="token-mean", clip_low=0.05, clip_high=0.08),
    LossConfig(policy_loss="cispo", is_mode="none", loss_agg="token-mean", clip_low=0.2, clip_high=0.28),
    LossConfig(policy_loss="ppo", is_mode="none", loss_agg="token-mean", entropy_coef=0.01),
    LossConfig(policy_loss="cispo", is_mode="none", loss_agg="token-mean", entropy_coef=0.003),
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.policy_loss}-{c.loss_agg}-ent{c.entropy_coef}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_variants_match_their_float64_formulas(gen, cfg, dtype):
    """Value and gradients of the fused loss and of policy_loss (full logits) against the formula: 1e-6
    relative in float64 (the acceptance bar), 1e-5 from float32 inputs."""
    from learner.kernels.chunked import chunked_token_logprobs

    for _ in range(50):
        hidden, weight, targets, adv, prox, behav, mask, _ = make_batch(gen, cfg)
        if cfg.policy_loss != "gspo" or _away_from_gspo_bounds(hidden, weight, targets, prox, mask, cfg):
            break
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    want = variant_reference(h64, w64, targets, adv, prox, mask, cfg)
    dh64, dw64 = torch.autograd.grad(want, (h64, w64))
    h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    p, b_ = prox.to(dtype), prox.to(dtype)  # on-policy behaviour: is_mode none, weights exactly 1
    loss, metrics = fused_policy_loss(h, w, targets, adv.to(dtype), p, b_, mask, cfg, chunk_size=7)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item())), (loss.item(), want.item())
    assert rel(dh, dh64) < tol and rel(dw, dw64) < tol, (rel(dh, dh64), rel(dw, dw64))
    # policy_loss on full logits (the unfused path) agrees too, entropy bonus included
    h2, w2 = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    rows = mask.reshape(-1)
    lp, ent = chunked_token_logprobs(h2.reshape(-1, h2.shape[-1])[rows], w2, targets.reshape(-1)[rows], chunk_size=7,
                                     return_entropy=True)
    full_lp = torch.zeros(mask.shape, dtype=lp.dtype).masked_scatter(mask, lp)
    full_ent = torch.zeros(mask.shape, dtype=ent.dtype).masked_scatter(mask, ent)
    loss2, m2 = policy_loss(full_lp, p, b_, adv.to(dtype), mask, cfg, entropy=full_ent)
    dh2, dw2 = torch.autograd.grad(loss2, (h2, w2))
    assert abs(loss2.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    assert rel(dh2, dh64) < tol and rel(dw2, dw64) < tol
    assert abs(float(metrics["loss"]) - want.item()) <= tol * max(1.0, abs(want.item()))
    if cfg.policy_loss == "gspo":
        assert "seq_ratio_mean" in metrics


def test_cispo_keeps_the_gradient_of_clipped_tokens(gen):
    """The point of CISPO: a token whose ratio is far outside the clip range still gets gradient (PPO's is 0)."""
    cfg_c = LossConfig(policy_loss="cispo", is_mode="none", clip_low=0.2, clip_high=0.28)
    cfg_p = LossConfig(policy_loss="ppo", is_mode="none", clip_low=0.2, clip_high=0.28)
    hidden, weight, targets, adv, prox, behav, mask, _ = make_batch(gen, cfg_c)
    adv = torch.ones_like(adv)
    prox = prox - 5.0  # every ratio exp(5) >> 1.28: PPO clips all of them
    grads = {}
    for name, cfg in (("cispo", cfg_c), ("ppo", cfg_p)):
        h = hidden.clone().requires_grad_(True)
        loss, _ = fused_policy_loss(h, weight, targets, adv, prox, prox, mask, cfg, chunk_size=7)
        (grads[name],) = torch.autograd.grad(loss, (h,))
    assert float(grads["ppo"].abs().max()) == 0.0
    assert float(grads["cispo"][mask].abs().min(dim=-1).values.max()) > 0.0
