"""Sharded learner memory and time: FSDP2 at world size 2 against one process, in the same run.

    .venv/bin/python bench/learner.py [--hidden 512 --layers 8 --vocab 32000 --rows 4 --tokens 512 --steps 3]

Builds a random Qwen2.5-VL-shaped model (text hidden/layers/vocab as given, a 2-block vision
tower), saves it as an HF directory, and runs the same steps at world size 1 (no process group)
and 2 (gloo ranks on this machine) through weft's own `learner.policy.load_policy` (rank 0
loads, the others build on meta, FSDP2 shards, weights broadcast), AdamW and the chunked
logprob head. The global batch is the same: `rows` rows of `tokens` tokens, split between the
ranks. Per rank it reports the bytes of parameters, gradients (after backward) and optimizer
state it holds, its peak RSS and the step time; the printed ratios are world 2 over world 1
(goal for the state bytes: <= 0.55). The two ranks share this machine's cores, so the time
ratio says what sharding costs here, not what it gains on a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_model(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    from models.shim import ensure_torchvision

    ensure_torchvision()
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = max(1, hidden // 64)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab,
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=hidden),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out)
    return out


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def rank_main(rank: int, world: int, host: str, port: int, model: str, rows: int, tokens: int, steps: int,
              vocab: int, out: str) -> None:
    import torch

    from learner.distributed import init_comm
    from learner.kernels.chunked import chunked_token_logprobs
    from learner.policy import load_policy

    comm = init_comm(rank, world, host, port, torch.device("cpu"))
    policy = load_policy(model, comm)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 8, (rows, tokens), generator=g)
    mine = ids[rank::world]

    def head(hidden, weight):
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return -chunked_token_logprobs(h, weight, mine[:, 1:].reshape(-1), chunk_size=256).sum() / ids[:, 1:].numel()

    times, grad_bytes = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = policy({"input_ids": mine}, head)
        loss.backward()
        grad_bytes = local_bytes(p.grad for p in policy.parameters() if p.grad is not None)
        policy.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    stats = {"rank": rank, "params": local_bytes(policy.parameters()), "grads": grad_bytes,
             "optimizer": local_bytes(state), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "step_s": min(times[1:] or times)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(stats))
    comm.close()


def run_world(world: int, model: Path, args: argparse.Namespace, tmp: Path) -> list[dict]:
    from learner.distributed import spawn

    out = tmp / f"w{world}"
    out.mkdir()
    spawn(rank_main, world, (str(model), args.rows, args.tokens, args.steps, args.vocab, str(out)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="weft-bench-learner-") as d:
        tmp = Path(d)
        model = make_model(tmp / "model", args.hidden, args.layers, args.vocab)
        one, two = run_world(1, model, args, tmp), run_world(2, model, args, tmp)
    n_params = one[0]["params"] // 4
    state = lambda s: s["params"] + s["grads"] + s["optimizer"]  # noqa: E731
    r_state = max(state(s) for s in two) / state(one[0])
    r_rss = max(s["peak_rss"] for s in two) / one[0]["peak_rss"]
    r_time = max(s["step_s"] for s in two) / one[0]["step_s"]
    gib = 2**30
    print(f"model: {n_params / 1e6:.1f}M parameters; global batch {args.rows} x {args.tokens} tokens")
    print(f"world 1: params+grads+optimizer {state(one[0]) / gib:.3f} GiB, peak RSS {one[0]['peak_rss'] / gib:.2f} GiB, "
          f"step {one[0]['step_s']:.2f} s")
    for s in two:
        print(f"world 2 rank {s['rank']}: params+grads+optimizer {state(s) / gib:.3f} GiB, peak RSS "
              f"{s['peak_rss'] / gib:.2f} GiB, step {s['step_s']:.2f} s")
    print(f"ratio world 2 / world 1 (max over ranks): state bytes {r_state:.3f} (goal <= 0.55), "
          f"peak RSS {r_rss:.3f}, step time {r_time:.3f}")
    print(json.dumps({"state_bytes_ratio": round(r_state, 4), "peak_rss_ratio": round(r_rss, 4),
                      "step_time_ratio": round(r_time, 4), "world1": one, "world2": two}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
