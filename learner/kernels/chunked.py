"""Per-token logprobs from hidden states and the LM head, a chunk of tokens at a time (plain torch).

Never holds `[N, V]` float32 logits: a chunk of `chunk_size` rows is `[chunk, V]`, and
two such buffers are reused for every chunk (fresh big tensors cost page faults on
the CPU). The autograd function saves only the inputs and per-token `lse` and
entropy, and recomputes each chunk's logits in backward (four matmuls in all, one
more than full logits; learner/loss.py avoids that one when it knows the loss).

Low-precision inputs (bf16/fp16): the logits matmul runs in the input dtype and is
upcast, as the model's own forward does; softmax, gradients and the weight
gradient's accumulation are fp32. float64 inputs stay float64 (for tests).
The chunk helpers here are shared with learner/loss.py.

`banned` token ids (vision placeholders the engine never samples) get a logit of
BANNED_LOGIT before the softmax, so the distribution is the engine's processed one
over the remaining vocabulary; a finite value rather than -inf keeps the entropy's
p * logit products at 0 instead of NaN, and exp() of it is exactly 0 all the same.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


BANNED_LOGIT = -1e30  # exp(BANNED_LOGIT - max) == 0 exactly in fp32 and fp64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of logits, softmax and accumulators for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logprob_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, temperature: float) -> None:
    """ValueError naming what is wrong with token_logprobs' arguments."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and lm_head_weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and lm_head_weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, lm_head_weight and targets must be on one device, got {hidden.device}, {weight.device}, {targets.device}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}), got range [{int(targets.min())}, {int(targets.max())}]")


def chunk_logits_(out: Tensor, h_c: Tensor, weight: Tensor, inv_temp: float) -> Tensor:
    """Write the chunk's tempered logits `[c, V]` into `out` (acc dtype)."""
    if h_c.dtype == out.dtype:
        torch.mm(h_c, weight.t(), out=out)
    else:
        out.copy_(torch.mm(h_c, weight.t()))
    if inv_temp != 1.0:
        out.mul_(inv_temp)
    return out


def check_banned(banned: Optional[Tensor], weight: Tensor) -> Optional[Tensor]:
    """None, or the banned ids as a 1-D int64 tensor on the weight's device; ValueError if out of range."""
    if banned is None:
        return None
    banned = torch.as_tensor(banned, device=weight.device).reshape(-1)
    if banned.dtype.is_floating_point or banned.dtype == torch.bool:
        raise ValueError(f"banned must hold integer token ids, got {banned.dtype}")
    if banned.numel() and (int(banned.min()) < 0 or int(banned.max()) >= weight.shape[0]):
        raise ValueError(f"banned ids must be in [0, {weight.shape[0]})")
    return banned.long() if banned.numel() else None


def mask_banned_(z: Tensor, banned: Optional[Tensor]) -> Tensor:
    """Give the banned columns of logits z `[c, V]` the logit BANNED_LOGIT, in place."""
    if banned is not None:
        z.index_fill_(1, banned, BANNED_LOGIT)
    return z


def softmax_stats_(z: Tensor, tgt: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From logits z `[c, V]`: (target logprob, lse, entropy), each `[c]`.

    In place: z becomes z - rowmax, and p receives the softmax probabilities.
    """
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)
    torch.exp(z, out=p)
    s = p.sum(dim=1)
    log_s = s.log()
    logp = z.gather(1, tgt[:, None]).squeeze(1) - log_s
    p.div_(s[:, None])
    # H = -sum p (z' - log s) = log s - sum p z'; bmm is a row-wise dot without a [c, V] temporary.
    ent = log_s - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
    return logp, m.squeeze(1) + log_s, ent


def logit_grad_(p: Tensor, tgt: Tensor, g: Tensor, inv_temp: float, logp_all_plus_h: Optional[Tensor] = None,
                g_ent: Optional[Tensor] = None) -> Tensor:
    """Turn probabilities p `[c, V]` in place into dL/d(raw logits).

    dlogp_t/dz = onehot_t - p; dH/dz = -p * (log p + H); z = logits * inv_temp.
    `logp_all_plus_h` (log p + H, `[c, V]`, overwritten) is needed only with g_ent.
    """
    g = g * inv_temp
    if g_ent is not None:
        logp_all_plus_h.mul_(p)
        p.mul_(-g[:, None]).addcmul_(logp_all_plus_h, (g_ent * inv_temp)[:, None], value=-1.0)
    else:
        p.mul_(-g[:, None])
    p.scatter_add_(1, tgt[:, None], g[:, None])
    return p


def accumulate_grads_(G: Tensor, h_c: Tensor, weight: Tensor, dh_c: Optional[Tensor], dw: Optional[Tensor]) -> None:
    """dh_c = G @ W and dw += G^T @ h_c (dw in the acc dtype)."""
    if dh_c is not None:
        if weight.dtype == G.dtype:
            torch.mm(G, weight, out=dh_c)
        else:
            dh_c.copy_(torch.mm(G.to(weight.dtype), weight))
    if dw is not None:
        dw.addmm_(G.t(), h_c.to(G.dtype))


def chunk_buffers(n: int, chunk_size: int, vocab: int, dtype: torch.dtype, device: torch.device, count: int = 2) -> list[Tensor]:
    """`count` reusable `[min(chunk, n), V]` buffers."""
    rows = max(1, min(chunk_size, n))
    return [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(count)]


class _ChunkedLogprobs(torch.autograd.Function):
    """(logp, entropy) `[N]` each; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, inv_temp: float,
                banned: Optional[Tensor] = None):  # type: ignore[override]
        n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse, ent = torch.empty_like(logp), torch.empty_like(logp)
        zbuf, pbuf = chunk_buffers(n, chunk_size, weight.shape[0], acc, hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z, p = zbuf[: e - s], pbuf[: e - s]
            mask_banned_(chunk_logits_(z, hidden[s:e], weight, inv_temp), banned)
            logp[s:e], lse[s:e], ent[s:e] = softmax_stats_(z, targets[s:e], p)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.chunk_size, ctx.inv_temp, ctx.banned = chunk_size, inv_temp, banned
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Optional[Tensor], g_ent: Optional[Tensor]):  # type: ignore[override]
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        n, acc = hidden.shape[0], lse.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(acc)
        g_ent = None if g_ent is None else g_ent.to(acc)
        dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        zbuf, pbuf = chunk_buffers(n, ctx.chunk_size, weight.shape[0], acc, hidden.device)
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            z, p = zbuf[: e - s], pbuf[: e - s]
            mask_banned_(chunk_logits_(z, hidden[s:e], weight, ctx.inv_temp), ctx.banned)
            z.sub_(lse[s:e, None])  # log p of every token
            torch.exp(z, out=p)
            if g_ent is not None:
                z.add_(ent[s:e, None])  # log p + H
            G = logit_grad_(p, targets[s:e], g_logp[s:e], ctx.inv_temp, z, None if g_ent is None else g_ent[s:e])
            accumulate_grads_(G, hidden[s:e], weight, None if dh is None else dh[s:e], dw)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None, None, None, None)


def chunked_token_logprobs(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, *, chunk_size: int,
                           temperature: float = 1.0, return_entropy: bool = False, banned: Optional[Tensor] = None):
    """log softmax(hidden @ W^T / temperature)[targets] `[N]` (fp32; fp64 for fp64 inputs).

    With return_entropy, also the entropy `[N]` of each row's distribution; both outputs
    carry gradients to hidden and lm_head_weight. `banned` ids are left out of the softmax.
    """
    check_logprob_inputs(hidden, lm_head_weight, targets, chunk_size, temperature)
    logp, ent = _ChunkedLogprobs.apply(hidden.contiguous(), lm_head_weight.contiguous(), targets.long().contiguous(),
                                       chunk_size, 1.0 / float(temperature), check_banned(banned, lm_head_weight))
    return (logp, ent) if return_entropy else logp
