"""The loss entry point: hidden states + LM head + the batch's per-token data -> GRPO loss.

`fused_policy_loss` gives the value and gradients of `grpo.policy_loss` applied to
`log_softmax(hidden @ W^T / temperature)[targets]`, without `[B*T, V]` logits:
  * only loss-mask tokens get logits (prompt and observation tokens are skipped);
  * the behaviour weights w = pi_prox/mu and the aggregation coefficients depend
    on the batch only, so they are fixed first and every token's loss is local;
    the loss is then a sum over chunks, and each chunk's gradient dL/dlogp is known
    as soon as its logits are (the IS weights are inside the gradient: the bug of
    Liger-Kernel#1082 was a fused loss that left them out);
  * so the forward computes dL/dhidden and dL/dW chunk by chunk (three matmuls,
    the same as full logits) and the backward only scales them by the incoming
    gradient. Without grad (eval), only the loss is computed.
Runs on every device with torch matmuls; the Triton kernel is used by
`learner.kernels.token_logprobs`, not here. `banned` token ids (the engine's
placeholder ban) are left out of the softmax, as in the engine's processed logprobs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from configs.schema import LossConfig
from learner import grpo
from learner.kernels.chunked import (accumulate_grads_, acc_dtype, check_banned, check_logprob_inputs, chunk_buffers,
                                     chunk_logits_, chunked_token_logprobs, logit_grad_, mask_banned_, softmax_stats_)

ChunkLoss = Callable[[Tensor, int, int], Tensor]  # (logp of rows [s:e] with grad, s, e) -> scalar loss of those rows


class _FusedChunkLoss(torch.autograd.Function):
    """sum over chunks of chunk_loss(logp_chunk); gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_loss: ChunkLoss, chunk_size: int,
                inv_temp: float, want: tuple[bool, bool], banned: Optional[Tensor] = None,
                ent_w: Optional[Tensor] = None):  # type: ignore[override]
        # ent_w `[N]`: each row's weight on its entropy in the loss (the entropy bonus: -coef * beta), or None.
        n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty_like(logp)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if want[0] else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want[1] else None
        want_grad = want[0] or want[1]
        zbuf, pbuf = chunk_buffers(n, chunk_size, weight.shape[0], acc, hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z, p = zbuf[: e - s], pbuf[: e - s]
            mask_banned_(chunk_logits_(z, hidden[s:e], weight, inv_temp), banned)
            logp[s:e], _, ent[s:e] = softmax_stats_(z, targets[s:e], p)
            if ent_w is not None:
                total += (ent_w[s:e] * ent[s:e]).sum()
            if not want_grad:
                total += chunk_loss(logp[s:e], s, e)
                continue
            with torch.enable_grad():
                lp = logp[s:e].detach().requires_grad_(True)
                loss_c = chunk_loss(lp, s, e)
                (g,) = torch.autograd.grad(loss_c, lp)
            total += loss_c.detach()
            if ent_w is not None:  # z is logits - rowmax: log p + H = z - (z[target] - logp) + H
                shift = z.gather(1, targets[s:e, None]).squeeze(1) - logp[s:e]
                z.sub_(shift[:, None]).add_(ent[s:e, None])
                G = logit_grad_(p, targets[s:e], g, inv_temp, z, ent_w[s:e])
            else:
                G = logit_grad_(p, targets[s:e], g, inv_temp)
            accumulate_grads_(G, hidden[s:e], weight, None if dh is None else dh[s:e], dw)
        # Plain attributes, not save_for_backward: these are results, not inputs to recompute from.
        ctx.grads = (dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logp, ent)
        return total, logp, ent

    @staticmethod
    def backward(ctx, g_total: Tensor, _g_logp: Tensor, _g_ent: Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("fused_policy_loss supports one backward per forward (its gradients are precomputed)")
        (dh, dw), (dt_h, dt_w) = ctx.grads, ctx.dtypes
        ctx.grads = None  # drop our references: autograd can then adopt dw as W.grad without a copy
        # In place: a second [V, H] copy of the weight gradient would raise the peak.
        gh = None if dh is None else dh.mul_(g_total).to(dt_h)
        gw = None if dw is None else dw.mul_(g_total).to(dt_w)
        return gh, gw, None, None, None, None, None, None, None


def fused_policy_loss(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, advantages: Tensor, prox_logp: Tensor,
                      behavior_logp: Tensor, mask: Tensor, cfg: LossConfig, *, chunk_size: int, temperature: float = 1.0,
                      ref_logp: Optional[Tensor] = None, banned: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss of hidden `[B, T, H]`, W `[V, H]`, targets `[B, T]` (the token at each position).

    advantages `[B]`; prox_logp, behavior_logp, mask, ref_logp `[B, T]`; banned: token ids
    left out of the softmax. Returns the loss (grad to hidden and W) and policy_loss's
    metrics plus the mean entropy of the policy.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
    b, t, h = hidden.shape
    if tuple(targets.shape) != (b, t):
        raise ValueError(f"targets must be [B, T] = [{b}, {t}], got {tuple(targets.shape)}")
    # The batch-only parts, checked and fixed before any logits exist.
    acc = acc_dtype(hidden.dtype) if hidden.dtype.is_floating_point else torch.float32
    zeros = torch.zeros(b, t, dtype=acc, device=hidden.device)
    grpo.check_loss_inputs(zeros, prox_logp, behavior_logp, advantages, mask, cfg, ref_logp, None)
    valid = mask != 0
    rows = valid.reshape(-1).nonzero().squeeze(1)
    tg = targets.reshape(-1)[rows]
    h_rows = hidden.reshape(-1, h)[rows].contiguous()  # only loss tokens get logits (and need valid ids)
    check_logprob_inputs(h_rows, lm_head_weight, tg, chunk_size, temperature)
    prox = torch.where(valid, prox_logp, 0).to(acc)
    behav = torch.where(valid, behavior_logp, 0).to(acc)
    ref = None if ref_logp is None else torch.where(valid, ref_logp, 0).to(acc)
    corr = grpo.behavior_correction(prox, behav, mask, cfg)
    coef = grpo.aggregation_weights(mask, cfg, acc)
    adv_tok = advantages.detach().to(acc)[:, None].expand(b, t)

    def flat(x: Tensor) -> Tensor:
        return x.reshape(-1)[rows]

    prox_s, adv_s, rho_s, coef_s = flat(prox), flat(adv_tok), flat(corr.rho.to(acc)), flat(coef)
    ref_s = None if ref is None else flat(ref)
    seq = seq_s = None
    if cfg.policy_loss == "gspo":  # s_i needs every token's current logprob first: one forward-only logits pass
        with torch.no_grad():
            now = chunked_token_logprobs(h_rows.detach(), lm_head_weight.detach(), tg, chunk_size=chunk_size,
                                         temperature=temperature, banned=banned).to(acc)
        seq = grpo.sequence_ratio(zeros.reshape(-1).index_copy(0, rows, now).view(b, t), prox, mask)
        seq_s = flat(seq[:, None].expand(b, t))

    def chunk_loss(lp: Tensor, s: int, e: int) -> Tensor:
        tok = grpo.token_losses(lp, prox_s[s:e], adv_s[s:e], rho_s[s:e], cfg, None if ref_s is None else ref_s[s:e],
                                None if seq_s is None else seq_s[s:e])
        return (coef_s[s:e] * tok.total).sum()

    grad_on = torch.is_grad_enabled()
    want = (grad_on and hidden.requires_grad, grad_on and lm_head_weight.requires_grad)
    ent_w = -cfg.entropy_coef * coef_s if cfg.entropy_coef > 0 else None
    loss, logp_s, ent_s = _FusedChunkLoss.apply(h_rows, lm_head_weight.contiguous(), tg.long().contiguous(), chunk_loss,
                                                chunk_size, 1.0 / float(temperature), want,
                                                check_banned(banned, lm_head_weight), ent_w)
    # Metrics from the same pieces policy_loss uses, on the (detached) logprobs.
    logp = zeros.reshape(-1).index_copy(0, rows, logp_s).view(b, t)
    ent = zeros.reshape(-1).index_copy(0, rows, ent_s).view(b, t)
    tok = grpo.token_losses(torch.where(valid, logp, prox), prox, adv_tok, corr.rho.to(acc), cfg, ref,
                            None if seq is None else seq[:, None].expand(b, t))
    return loss, grpo.loss_metrics(tok, corr, coef, mask, ent, seq, cfg.entropy_coef)
