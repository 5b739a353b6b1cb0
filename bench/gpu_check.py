"""The GPU check: the CUDA paths of weft verified in one short run (scripts/gpu_check.sh runs it).

    python bench/gpu_check.py OUT_DIR [--quick]

Rows (each with its numbers, written to OUT_DIR/gpu_check.md and gpu_check.json):
  1. kernel  token logprobs, forward + backward, at T = 4096 and 16384, H = 3584, V = 152,064 (the
             Qwen2.5-VL-7B head), bf16 and fp32: the Triton kernel and the chunked torch path against
             full fp32 logits (max |d| of logprobs, d hidden, d weight; time; peak memory).
  2. liger   the same inputs through learner.loss.fused_policy_loss and Liger-Kernel's
             LigerFusedLinearGRPOLoss set to the same loss (on-policy, token-mean = Liger's "bnpo",
             no KL, symmetric clip): loss and grads agree; time and peak memory as ratios to Liger.
  3. step    a learner step on the device: the tiny model and a random model shaped like
             Qwen2.5-VL-3B (configs/models/), fp32 weights under bf16 autocast, a proximal (no-grad)
             pass then the fused loss, backward, AdamW: tokens/s and peak memory.
  4. fsdp    FSDP2 (fully_shard on NCCL, world size 1) against the plain path: two steps of the same
             batches, weights compared.
  5. publish the gRPC weight publish of the 3B-shaped model from GPU memory (LearnerServer.publish
             then a rollout worker's watch_weights stream on 127.0.0.1): seconds and GB/s.

--quick runs the same code on tiny shapes on the CPU (gloo instead of NCCL, the tiny model for the
3B one; the Triton and Liger rows are skipped without CUDA), so the script cannot rot between GPU
runs: tests/test_gpu_check.py runs it. A row that raises is recorded as an error with its message
and the run goes on; the exit code is 1 if any row failed a tolerance or raised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ROWS: list[dict[str, Any]] = []
TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}  # max |d logp| against fp32 full logits (bf16 inputs round)


def row(check: str, case: str, status: str, **numbers: Any) -> None:
    """Record one row (status: ok | FAIL | skipped | error) and print it."""
    ROWS.append({"check": check, "case": case, "status": status, **numbers})
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in numbers.items())
    print(f"[{status}] {check} {case}: {shown}", flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def guarded(check: str, case: str, fn: Callable[[], None]) -> None:
    """Run one check; an exception becomes an error row (the run goes on)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported in the table, with the traceback on stderr
        traceback.print_exc()
        row(check, case, "error", message=f"{type(e).__name__}: {str(e)[:300]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, Optional[float]]:
    """(fn's result, seconds, peak GiB allocated above what was live before; None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return out, dt, peak


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------- 1. kernel
def kernel_inputs(t: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype)
    targets = torch.randint(0, v, (t,), generator=g).to(device)
    upstream = torch.randn(t, generator=g).to(device)
    return hidden, weight, targets, upstream


def logprob_grads(fn: Callable, hidden, weight, targets, upstream):
    """fn's logprobs and the grads of sum(upstream * logp) to hidden and weight."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    logp = fn(h, w, targets)
    (logp.float() * upstream).sum().backward()
    return logp.detach().float(), h.grad, w.grad


def full_logprobs(h, w, targets):
    """The reference: [T, V] fp32 logits, log_softmax, gather."""
    return torch.log_softmax(h.float() @ w.float().t(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def check_kernel(device: torch.device, ts: list[int], h: int, v: int, dtypes: list[torch.dtype]) -> None:
    from learner.kernels.chunked import chunked_token_logprobs

    paths: dict[str, Callable] = {"chunked": lambda hh, ww, tt: chunked_token_logprobs(hh, ww, tt, chunk_size=1024)}
    if device.type == "cuda":
        from learner.kernels.triton_logprobs import triton_token_logprobs

        paths["triton"] = lambda hh, ww, tt: triton_token_logprobs(hh, ww, tt)
    for t in ts:
        for dtype in dtypes:
            name = f"T={t} H={h} V={v} {str(dtype).replace('torch.', '')}"
            guarded("1 kernel", name, lambda t=t, dtype=dtype, name=name: kernel_case(device, t, h, v, dtype, name, paths))
            if "triton" not in paths:
                row("1 kernel", f"{name} triton", "skipped", why="no CUDA device")
            if device.type == "cuda":
                torch.cuda.empty_cache()


def kernel_case(device: torch.device, t: int, h: int, v: int, dtype: torch.dtype, name: str,
                paths: dict[str, Callable]) -> None:
    """One shape and dtype: the full-logits reference, then each path against it."""
    inputs = kernel_inputs(t, h, v, dtype, device)
    ref, ref_s, ref_peak = measure(lambda: logprob_grads(full_logprobs, *inputs), device)
    row("1 kernel", f"{name} full fp32 logits (reference)", "ok", seconds=ref_s, peak_gib=ref_peak)
    for label, fn in paths.items():
        def one(fn: Callable = fn, label: str = label) -> None:
            got, s, peak = measure(lambda: logprob_grads(fn, *inputs), device)
            d = [maxdiff(a, b) for a, b in zip(got, ref)]
            row("1 kernel", f"{name} {label}", "ok" if d[0] <= TOL[dtype] else "FAIL", max_d_logp=d[0],
                max_d_dhidden=d[1], max_d_dweight=d[2], seconds=s, time_vs_full=s / ref_s, peak_gib=peak,
                peak_vs_full=None if peak is None else peak / ref_peak)
        guarded("1 kernel", f"{name} {label}", one)


# ----------------------------------------------------------------------------- 2. liger
def check_liger(device: torch.device, b: int, t: int, h: int, v: int, dtype: torch.dtype) -> None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        row("2 liger", "import", "skipped", why=f"liger-kernel not importable: {e}")
        return
    from configs.schema import LossConfig
    from learner.kernels.chunked import chunked_token_logprobs
    from learner.loss import fused_policy_loss

    hidden, weight, targets, _ = kernel_inputs(b * t, h, v, dtype, device, seed=1)
    hidden, targets = hidden.view(b, t, h), targets.view(b, t)
    g = torch.Generator(device="cpu").manual_seed(2)
    adv = torch.randn(b, generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) < 0.9).to(device)
    with torch.no_grad():  # on-policy: the proximal and behaviour logprobs are the current ones
        cur = chunked_token_logprobs(hidden.view(-1, h), weight, targets.view(-1), chunk_size=1024).view(b, t)
    cfg = LossConfig(is_mode="none", loss_agg="token-mean", kl_coef=0.0, clip_low=0.2, clip_high=0.2)

    def ours():
        hh, ww = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        loss, _ = fused_policy_loss(hh, ww, targets, adv, cur, cur, mask.float(), cfg, chunk_size=1024)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    # Liger's chunked loss is torch code: on the CPU (--quick) it runs uncompiled.
    liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", epsilon_low=0.2,
                                     epsilon_high=0.2, temperature=1.0, compiled=device.type == "cuda")

    def theirs():
        hh, ww = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        loss = liger(hh, ww, targets, mask.long(), adv)[0]
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    theirs()  # warm-up: Liger compiles its chunk function on first use
    ours()
    (a, s_ours, p_ours), (bb, s_liger, p_liger) = measure(ours, device), measure(theirs, device)
    d = [maxdiff(x, y) for x, y in zip(a, bb)]
    ok = d[0] <= 1e-2 * max(1.0, float(bb[0].abs())) and d[1] <= 5e-2 and d[2] <= 5e-2
    row("2 liger", f"B={b} T={t} H={h} V={v} {str(dtype).replace('torch.', '')}", "ok" if ok else "FAIL",
        loss_ours=float(a[0]), loss_liger=float(bb[0]), max_d_dhidden=d[1], max_d_dweight=d[2],
        seconds_ours=s_ours, seconds_liger=s_liger, time_ratio=s_ours / s_liger, peak_gib_ours=p_ours,
        peak_gib_liger=p_liger, peak_ratio=None if p_ours is None else p_ours / p_liger,
        beats_liger=None if p_ours is None else bool(s_ours < s_liger and p_ours < p_liger))


# ----------------------------------------------------------------------------- 3. learner step
def model_dir(kind: str, tmp: Path) -> Path:
    """A model directory: "tiny" (weights, made here) or a public config.json with no weights (random init)."""
    d = tmp / kind
    if (d / "config.json").exists():  # made by an earlier row of this run
        return d
    if kind == "tiny":
        from models.tiny import make_tiny_model

        return make_tiny_model(d)
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((ROOT / "configs" / "models" / f"{kind}.json").read_text())
    return d


def adamw(policy: Any, device: torch.device, lr: float = 1e-5, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    # fused on CUDA: one kernel, no foreach temporaries (the 3B step's AdamW state is 30 GB already)
    return torch.optim.AdamW(policy.parameters(), lr=lr, fused=device.type == "cuda" if fused is None else fused)


def train_steps(policy: Any, batches: list[torch.Tensor], device: torch.device, autocast: bool,
                opt: torch.optim.Optimizer) -> list[float]:
    """Per batch: a proximal pass (no grad) and the fused loss on it, backward, clip, AdamW. Returns the losses."""
    from configs.schema import LossConfig
    from learner.kernels import token_logprobs
    from learner.loss import fused_policy_loss

    cfg = LossConfig(is_mode="none", loss_agg="token-mean")
    losses = []
    for ids in batches:
        x, y = ids[:, :-1], ids[:, 1:]
        mask = torch.ones_like(y, dtype=torch.float32)
        adv = torch.linspace(-0.5, 1, ids.shape[0], device=device)  # not mean zero: a nonzero loss to compare
        def prox_head(hid, w, y=y):
            return token_logprobs(hid.reshape(-1, hid.shape[-1]), w, y.reshape(-1), chunk_size=1024).view(y.shape)

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                prox = policy({"input_ids": x}, prox_head)[0]

            def loss_head(hid, w, y=y, adv=adv, prox=prox, mask=mask):
                return fused_policy_loss(hid, w, y, adv, prox, prox, mask, cfg, chunk_size=1024)[0]

            loss = policy({"input_ids": x}, loss_head)[0]
        loss.backward()
        policy.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def check_step(device: torch.device, kind: str, rows_: int, tokens: int, tmp: Path) -> None:
    from learner.distributed import Comm
    from learner.policy import load_policy

    # The 3B shape in fp32 with AdamW holds ~60 GB of state: checkpointed layers keep activations small.
    policy = load_policy(str(model_dir(kind, tmp)), Comm(device=device), gradient_checkpointing=kind != "tiny")
    vocab = policy.module.hf.get_output_embeddings().weight.shape[0]
    g = torch.Generator(device="cpu").manual_seed(3)
    batches = [torch.randint(0, vocab - 16, (rows_, tokens + 1), generator=g).to(device) for _ in range(3)]
    opt = adamw(policy, device)
    train_steps(policy, batches[:1], device, device.type == "cuda", opt)  # warm-up: kernels, allocator, AdamW state
    losses, s, peak = measure(lambda: train_steps(policy, batches[1:], device, device.type == "cuda", opt), device)
    n_params = sum(p.numel() for p in policy.parameters())
    ok = all(torch.isfinite(torch.tensor(losses)))
    row("3 step", f"{kind} ({n_params / 1e9:.2f}B params) {rows_}x{tokens} tokens, bf16 autocast"
        + (", gradient checkpointing" if kind != "tiny" else "")
        if device.type == "cuda" else f"{kind} {rows_}x{tokens} tokens, fp32", "ok" if ok else "FAIL",
        tokens_per_s=2 * rows_ * tokens / s, step_s=s / 2, peak_gib=peak, losses=[round(x, 5) for x in losses])


# ----------------------------------------------------------------------------- 4. FSDP2 at world size 1
def check_fsdp(device: torch.device, tmp: Path) -> None:
    import torch.distributed as dist

    from learner.distributed import Comm, backend_for, serve_store
    from learner.policy import Policy, PolicyModule, load_policy, shard
    from models.hf import load_or_init_hf_model

    model = str(model_dir("tiny", tmp))
    g = torch.Generator(device="cpu").manual_seed(4)
    plain = load_policy(model, Comm(device=device))
    vocab = plain.module.hf.get_output_embeddings().weight.shape[0]
    batches = [torch.randint(0, vocab - 16, (4, 65), generator=g).to(device) for _ in range(2)]
    l_plain = train_steps(plain, batches, device, False, adamw(plain, device, lr=1e-3, fused=False))
    # init_comm gives world size 1 no process group (the plain path); this check wants FSDP2's, so it
    # makes a one-rank group itself.
    store = serve_store("127.0.0.1", 1)
    dist.init_process_group(backend_for(device), store=store, rank=0, world_size=1)
    comm = Comm(rank=0, world=1, backend=backend_for(device), device=device)
    try:
        module = PolicyModule(load_or_init_hf_model(model, str(device)).train())
        shard(module, comm, mixed_precision=False, cpu_offload=False)  # fully_shard over a 1-rank mesh
        sharded = Policy(module, comm, sharded=True)
        l_fsdp = train_steps(sharded, batches, device, False, adamw(sharded, device, lr=1e-3, fused=False))
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.state_dict().items()}
    finally:
        dist.destroy_process_group()
    ref = plain.module.state_dict()
    d = max(maxdiff(full[k], ref[k]) for k in ref)
    moved = max(maxdiff(full[k], v) for k, v in PolicyModule(load_or_init_hf_model(model, str(device))).state_dict().items())
    ok = d <= 1e-4 and moved > 1e-4 and max(abs(a - b) for a, b in zip(l_plain, l_fsdp)) <= 1e-4
    row("4 fsdp", f"tiny model, 2 steps, fully_shard on a 1-rank {comm.backend} group",
        "ok" if ok else "FAIL", max_d_weights=d, weights_moved=moved, losses_plain=l_plain, losses_fsdp=l_fsdp)


# ----------------------------------------------------------------------------- 5. weight publish
def check_publish(device: torch.device, kind: str, tmp: Path) -> None:
    from actors.learner_client import LearnerClient
    from configs.schema import LearnerConfig
    from learner.server import LearnerServer
    from models.hf import empty_hf_model

    d = model_dir(kind, tmp)
    shapes = {k: v.shape for k, v in empty_hf_model(str(d)).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(5)
    state = {k: torch.randn(s, generator=gen, device=device, dtype=torch.bfloat16) for k, s in shapes.items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    max_msg = 256 * 2**20
    server = LearnerServer(LearnerConfig(max_message_bytes=max_msg)).start()
    client = LearnerClient(f"127.0.0.1:{server.port}", max_message_bytes=max_msg)
    try:
        stream = client.watch_weights(from_version=-1, reuse_buffers=True)
        best: dict[str, float] = {}
        for version in (1, 2, 3):  # 1 warms up
            t0 = time.perf_counter()
            server.publish(version, state)
            t1 = time.perf_counter()
            got, tensors = next(stream)
            t2 = time.perf_counter()
            assert got == version and len(tensors) == len(state), (got, len(tensors))
            if version > 1:
                best = min(best or {"end_to_end_s": 1e9}, {"publish_s": t1 - t0, "end_to_end_s": t2 - t0},
                           key=lambda r: r["end_to_end_s"])
        check = dict(tensors)
        name = next(iter(state))
        exact = torch.equal(check[name].to(torch.bfloat16).cpu(), state[name].cpu())
        stream.close()
    finally:
        client.close()
        server.stop(0)
    row("5 publish", f"{kind}-shaped, {nbytes / 1e9:.2f} GB bf16 from {device.type} memory", "ok" if exact else "FAIL",
        publish_s=best["publish_s"], end_to_end_s=best["end_to_end_s"], gb_per_s=nbytes / 1e9 / best["end_to_end_s"])


# ----------------------------------------------------------------------------- report
def write_report(out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1, default=str))
    lines = [f"# weft GPU check, {meta['date']}", "", f"device: {meta['device']}; torch {meta['torch']}; "
             f"triton {meta['triton']}; liger-kernel {meta['liger']}; quick: {meta['quick']}", "",
             "| check | case | status | numbers |", "| --- | --- | --- | --- |"]
    for r in ROWS:
        nums = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in ("check", "case", "status"))
        lines.append(f"| {r['check']} | {r['case']} | {r['status']} | {nums} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return "absent"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for gpu_check.md and gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: the script's own logic only")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.quick
    device = torch.device("cuda") if cuda else torch.device("cpu")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": a.quick, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "triton": _version("triton"),
            "liger": _version("liger-kernel")}
    if not cuda and not a.quick:
        print("no CUDA device: run with --quick for the CPU dry run", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    big = "Qwen2.5-VL-3B-Instruct"
    with tempfile.TemporaryDirectory(prefix="weft-gpu-check-") as d:
        tmp = Path(d)
        if a.quick:
            guarded("1 kernel", "tiny", lambda: check_kernel(device, [64, 96], 32, 1000, [torch.float32, torch.bfloat16]))
            guarded("2 liger", "tiny", lambda: check_liger(device, 2, 32, 32, 1000, torch.float32))
            guarded("3 step", "tiny", lambda: check_step(device, "tiny", 2, 32, tmp))
            guarded("4 fsdp", "tiny", lambda: check_fsdp(device, tmp))
            guarded("5 publish", "tiny", lambda: check_publish(device, "tiny", tmp))
        else:
            guarded("1 kernel", "7B head", lambda: check_kernel(device, [4096, 16384], 3584, 152064,
                                                                [torch.bfloat16, torch.float32]))
            guarded("2 liger", "7B head", lambda: check_liger(device, 4, 1024, 3584, 152064, torch.bfloat16))
            guarded("3 step", "tiny", lambda: check_step(device, "tiny", 4, 512, tmp))
            guarded("3 step", big, lambda: check_step(device, big, 2, 2048, tmp))
            guarded("4 fsdp", "tiny", lambda: check_fsdp(device, tmp))
            guarded("5 publish", big, lambda: check_publish(device, big, tmp))
    write_report(Path(a.out), meta)
    bad = [r for r in ROWS if r["status"] in ("FAIL", "error")]
    print(f"{len(ROWS)} rows, {len(bad)} failed or raised; report in {a.out}/gpu_check.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
