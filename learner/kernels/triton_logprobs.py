"""Triton kernel for per-token logprobs (and entropy) fused with the LM-head matmul.

Forward: each program owns BLOCK_N tokens and walks the vocabulary in BLOCK_V tiles;
a tile's logits come from a K-loop of `tl.dot` with fp32 accumulation, then an online
logsumexp (running max m, sum s, and sum of e*(z-m) for the entropy) and the target's
logit are updated. No logits leave the chip; only lse and entropy `[N]` are stored.

Backward recomputes logit tiles in two kernels, each owning what it writes, so there
are no atomics and the result is deterministic:
  * dh: programs own token blocks, loop over vocab tiles, dh += G @ W_tile;
  * dW: programs own vocab blocks, loop over token blocks, dW += G^T @ h_tile;
with G = g*(onehot - p) - g_ent*p*(log p + H), scaled by 1/temperature. dh and dW are
accumulated in fp32 buffers and cast to the input dtype.

bf16/fp16 inputs feed tl.dot directly (fp32 accumulation); fp32 inputs use IEEE
precision (no TF32) to match torch. Outputs are fp32 whatever the input dtype.
Under TRITON_INTERPRET=1 (Triton 3.9) tl.dot on bf16 operands returns garbage (~1e10 off
on a 16x16 tile), so there 16-bit operands are multiplied in fp32 (UPCAST), which is exact
for their products; loads, rounding of G to bf16 and the fp32 accumulation are unchanged. Written for CUDA; checked on CPU only under
TRITON_INTERPRET=1 at small shapes: it has NOT been run on a GPU yet.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from learner.kernels.chunked import check_logprob_inputs


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter only): multiply 16-bit
    operands in fp32, exact for their products, because the interpreter's bf16 dot is wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, offs_n, n_ok, offs_v, v_ok, H, stride_h, stride_w, inv_temp,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Tempered logits of a [BLOCK_N, BLOCK_V] tile, fp32."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(h_ptr + offs_n[:, None] * stride_h + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, DOT_PRECISION, UPCAST)
    return acc * inv_temp


@triton.jit
def _grad_tile(z, offs_v, v_ok, n_ok, tgt, lse, ent, g, ge, HAS_ENT: tl.constexpr):
    """dL/dz of a tile: g*(onehot - p) - ge*p*(log p + H), zero outside the valid tile."""
    logp_all = z - lse[:, None]
    p = tl.exp(logp_all)
    G = tl.where(offs_v[None, :] == tgt[:, None], g[:, None], 0.0) - p * g[:, None]
    if HAS_ENT:
        G = G - ge[:, None] * p * (logp_all + ent[:, None])
    return tl.where(n_ok[:, None] & v_ok[None, :], G, 0.0)


@triton.jit
def _load_ge(ge_ptr, rows, n_ok, inv_temp, HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Entropy output gradient (scaled by 1/temperature), zeros when entropy gets no gradient."""
    if HAS_ENT:
        ge = tl.load(ge_ptr + rows, mask=n_ok, other=0.0) * inv_temp
    else:
        ge = tl.zeros([BLOCK_N], dtype=tl.float32)
    return ge


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, N, V, H, stride_h, stride_w, inv_temp,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=n_ok, other=0)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of exp(z - m) * (z - m)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, rows, n_ok, offs_v.to(tl.int64), v_ok, H, stride_h, stride_w, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)
        shift = tl.where(s > 0, m - m_new, 0.0)  # first tile: m = -inf and s = t = 0
        e = tl.exp(z - m_new[:, None])
        d = tl.where(v_ok[None, :], z - m_new[:, None], 0.0)
        t = alpha * (t + shift * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    log_s = tl.log(s)
    tl.store(logp_ptr + rows, zt - m - log_s, mask=n_ok)
    tl.store(lse_ptr + rows, m + log_s, mask=n_ok)
    tl.store(ent_ptr + rows, log_s - t / s, mask=n_ok)


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr, dh_ptr, N, V, H, stride_h, stride_w, stride_dh,
                   inv_temp, HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=n_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=n_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=n_ok, other=0.0) * inv_temp
    ent = tl.load(ent_ptr + rows, mask=n_ok, other=0.0)
    ge = _load_ge(ge_ptr, rows, n_ok, inv_temp, HAS_ENT, BLOCK_N)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        cols = offs_v.to(tl.int64)
        z = _logits_tile(h_ptr, w_ptr, rows, n_ok, cols, v_ok, H, stride_h, stride_w, inv_temp, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)
        G = _grad_tile(z, offs_v, v_ok, n_ok, tgt, lse, ent, g, ge, HAS_ENT).to(w_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            b = tl.load(w_ptr + cols[:, None] * stride_w + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            ptrs = dh_ptr + rows[:, None] * stride_dh + offs_k[None, :]
            io = n_ok[:, None] & k_ok[None, :]
            tl.store(ptrs, _dot(G, b, tl.load(ptrs, mask=io, other=0.0), DOT_PRECISION, UPCAST), mask=io)


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr, dw_ptr, N, V, H, stride_h, stride_w, stride_dw,
                   inv_temp, HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    cols = offs_v.to(tl.int64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = offs_n.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows, mask=n_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=n_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=n_ok, other=0.0) * inv_temp
        ent = tl.load(ent_ptr + rows, mask=n_ok, other=0.0)
        ge = _load_ge(ge_ptr, rows, n_ok, inv_temp, HAS_ENT, BLOCK_N)
        z = _logits_tile(h_ptr, w_ptr, rows, n_ok, cols, v_ok, H, stride_h, stride_w, inv_temp, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)
        Gt = tl.trans(_grad_tile(z, offs_v, v_ok, n_ok, tgt, lse, ent, g, ge, HAS_ENT)).to(h_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            a = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            ptrs = dw_ptr + cols[:, None] * stride_dw + offs_k[None, :]
            io = v_ok[:, None] & k_ok[None, :]
            tl.store(ptrs, _dot(Gt, a, tl.load(ptrs, mask=io, other=0.0), DOT_PRECISION, UPCAST), mask=io)


def default_blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K): fp32 IEEE dots need more registers, so smaller tiles."""
    return (64, 128, 32) if dtype == torch.float32 else (64, 128, 64)


class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, inv_temp: float, blocks: tuple[int, int, int]):  # type: ignore[override]
        (n, h), v = hidden.shape, weight.shape[0]
        bn, bv, bk = blocks
        prec = "ieee"  # no TF32 for fp32 operands (torch's default); 16-bit operands are unaffected
        upcast = bool(triton.knobs.runtime.interpret)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse, ent = torch.empty_like(logp), torch.empty_like(logp)
        if n:
            _fwd_kernel[(triton.cdiv(n, bn),)](hidden, weight, targets, logp, lse, ent, n, v, h, hidden.stride(0), weight.stride(0),
                                               inv_temp, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PRECISION=prec, UPCAST=upcast)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_temp, ctx.blocks, ctx.prec, ctx.upcast = inv_temp, blocks, prec, upcast
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Optional[Tensor], g_ent: Optional[Tensor]):  # type: ignore[override]
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        (n, h), v = hidden.shape, weight.shape[0]
        bn, bv, bk = ctx.blocks
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w) or n == 0:
            return None, None, None, None, None
        g = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        has_ent = g_ent is not None
        ge = g_ent.float().contiguous() if has_ent else g  # a valid pointer; never read without HAS_ENT
        common = dict(HAS_ENT=has_ent, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PRECISION=ctx.prec, UPCAST=ctx.upcast)
        dh = dw = None
        if need_h:
            dh = torch.zeros(n, h, dtype=torch.float32, device=hidden.device)
            _bwd_dh_kernel[(triton.cdiv(n, bn),)](hidden, weight, targets, lse, ent, g, ge, dh, n, v, h, hidden.stride(0),
                                                  weight.stride(0), dh.stride(0), ctx.inv_temp, **common)
        if need_w:
            dw = torch.zeros(v, h, dtype=torch.float32, device=weight.device)
            _bwd_dw_kernel[(triton.cdiv(v, bv),)](hidden, weight, targets, lse, ent, g, ge, dw, n, v, h, hidden.stride(0),
                                                  weight.stride(0), dw.stride(0), ctx.inv_temp, **common)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype), None, None, None)


def triton_token_logprobs(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, *, chunk_size: Optional[int] = None,
                          temperature: float = 1.0, return_entropy: bool = False,
                          blocks: Optional[tuple[int, int, int]] = None):
    """Same contract as chunked_token_logprobs; fp32 outputs. chunk_size is unused (tiles
    replace chunks); `blocks` = (BLOCK_N, BLOCK_V, BLOCK_K), each a power of two >= 16."""
    check_logprob_inputs(hidden, lm_head_weight, targets, chunk_size or 1, temperature)
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton kernel takes fp32/bf16/fp16, got {hidden.dtype}")
    blocks = blocks or default_blocks(hidden.dtype)
    if any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"blocks must be powers of two >= 16, got {blocks}")
    logp, ent = _TritonLogprobs.apply(hidden.contiguous(), lm_head_weight.contiguous(), targets.long().contiguous(),
                                      1.0 / float(temperature), tuple(blocks))
    return (logp, ent) if return_entropy else logp
