"""Peak memory and time of the GRPO loss, forward + backward: full fp32 logits vs the chunked paths.

Variants (same inputs, same loss: grpo.policy_loss with token_tis, token-mean):
  full    log_softmax over the whole [T, V] fp32 logits, gather, policy_loss (one expression,
          so no extra reference keeps the logits alive: the leanest naive version);
  fused   learner.loss.fused_policy_loss (the entry point; gradients computed chunk by chunk
          in forward, three matmuls like full);
  chunked learner.kernels.token_logprobs + policy_loss (recompute in backward: four matmuls).
The goals (<= 1/8 the memory, <= 1.3x the time of full) are checked on `fused`.

How memory is measured: each variant runs in a fresh subprocess. After the inputs exist
(hidden, the LM head and its fp32 weight are shared by all variants) and a tiny warm-up
has started the thread pools, the child reads its RSS; after one forward+backward it reads
the kernel's RSS high-water mark (getrusage ru_maxrss, the same as VmHWM). Peak = high-water
minus that baseline: every byte torch touched during the step, including the [V, H] weight
gradient, seen by the OS (tracemalloc cannot see torch's allocations). The child fails
loudly if the high-water mark was already above the step's peak before it started. torch's CPU allocator
does not cache, and big blocks are mmapped, so RSS follows torch's live tensors. Time is
one wall-clock forward+backward (this machine is shared: expect noise of 10-20%).

Run: .venv/bin/python bench/loss.py [--tokens 4096 --vocab 151936 --hidden 896 --chunk-size 128]
Prints one line per variant, the ratios, then a final JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("full", "fused", "chunked")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(tokens: int, vocab: int, hidden: int, seqs: int):
    import torch

    from configs.schema import LossConfig

    g = torch.Generator().manual_seed(0)
    t = tokens // seqs
    h = torch.randn(seqs, t, hidden, generator=g).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=g).mul_(hidden**-0.5).requires_grad_(True)  # in place: no [V, H] temporary
    targets = torch.randint(0, vocab, (seqs, t), generator=g)
    behav = -torch.rand(seqs, t, generator=g) * 5
    prox = behav + 0.1 * torch.randn(seqs, t, generator=g)
    adv = torch.randn(seqs, generator=g)
    mask = torch.ones(seqs, t, dtype=torch.bool)  # every token a loss token: the worst case for both
    return h, w, targets, adv, prox, behav, mask, LossConfig(is_mode="token_tis", loss_agg="token-mean")


def _step(variant: str, h, w, targets, adv, prox, behav, mask, cfg, chunk_size: int) -> float:
    import torch

    from learner.grpo import policy_loss
    from learner.kernels import token_logprobs
    from learner.loss import fused_policy_loss

    if variant == "full":
        logp = torch.log_softmax(h @ w.t(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        loss, _ = policy_loss(logp, prox, behav, adv, mask, cfg)
    elif variant == "fused":
        loss, _ = fused_policy_loss(h, w, targets, adv, prox, behav, mask, cfg, chunk_size=chunk_size)
    else:
        b, t, hd = h.shape
        logp = token_logprobs(h.reshape(-1, hd), w, targets.reshape(-1), chunk_size=chunk_size).view(b, t)
        loss, _ = policy_loss(logp, prox, behav, adv, mask, cfg)
    loss.backward()
    return float(loss)


def child(variant: str, tokens: int, vocab: int, hidden: int, seqs: int, chunk_size: int) -> dict:
    """One variant in this (fresh) process: baseline RSS, then one timed forward+backward."""
    import torch

    h, w, targets, adv, prox, behav, mask, cfg = _inputs(tokens, vocab, hidden, seqs)
    small = [x[:, :2] for x in (h.detach(), targets, prox, behav, mask)]  # warm-up: 2 tokens per sequence
    _step(variant, small[0].clone().requires_grad_(True), w, small[1], adv, small[2], small[3], small[4], cfg, chunk_size)
    w.grad = None
    gc.collect()
    base, hwm_before = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = _step(variant, h, w, targets, adv, prox, behav, mask, cfg, chunk_size)
    seconds = time.perf_counter() - t0
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if hwm <= hwm_before:  # the step never rose above an earlier high-water mark: its peak is unknown
        raise RuntimeError(f"{variant}: RSS high-water mark {hwm} was already reached before the step; peak not measurable")
    return {"variant": variant, "seconds": seconds, "peak_bytes": hwm - base, "baseline_bytes": base,
            "hwm_before_bytes": hwm_before, "loss": loss, "threads": torch.get_num_threads()}


def run_bench(tokens: int = 4096, vocab: int = 151_936, hidden: int = 896, seqs: int = 4, chunk_size: int = 128,
              variants: tuple[str, ...] = VARIANTS) -> dict:
    """Run each variant in its own subprocess; return the results and the fused/full ratios."""
    out: dict = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk_size": chunk_size}
    for v in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", v, "--tokens", str(tokens), "--vocab", str(vocab),
               "--hidden", str(hidden), "--seqs", str(seqs), "--chunk-size", str(chunk_size)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"variant {v} failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out[v] = res
        print(f"{v:8s} peak {res['peak_bytes'] / 2**30:6.2f} GiB   time {res['seconds']:6.1f} s   loss {res['loss']:.6f}", flush=True)
    if "full" in out:
        for v in variants:
            if v != "full":
                out[f"{v}_mem_ratio"] = out[v]["peak_bytes"] / out["full"]["peak_bytes"]
                out[f"{v}_time_ratio"] = out[v]["seconds"] / out["full"]["seconds"]
                print(f"{v}/full: memory {out[f'{v}_mem_ratio']:.3f} (goal <= 0.125)   time {out[f'{v}_time_ratio']:.2f}x (goal <= 1.3x)")
        if "fused" in out:
            out["goals_met"] = out["fused_mem_ratio"] <= 1 / 8 and out["fused_time_ratio"] <= 1.3
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--seqs", type=int, default=4, help="sequences the tokens are split into")
    p.add_argument("--chunk-size", type=int, default=128, help="128 meets both goals at the default shape (measured)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tokens % a.seqs:
        p.error("--tokens must be a multiple of --seqs")
    if a.child:
        print(json.dumps(child(a.child, a.tokens, a.vocab, a.hidden, a.seqs, a.chunk_size)))
        return
    variants = tuple(v for v in a.variants.split(",") if v)
    if not set(variants) <= set(VARIANTS):
        p.error(f"--variants must be among {VARIANTS}")
    print(json.dumps(run_bench(a.tokens, a.vocab, a.hidden, a.seqs, a.chunk_size, variants)))


if __name__ == "__main__":
    main()
