"""Evaluation throughput: `weft eval` episodes/s against `weft rollout` generating the same episodes.

Both run in one process on one started vLLM engine (the tiny demo SFT model), with the demo
config, the same tasks, K episodes a task, the same temperature and the same number of tasks in
flight. The baseline is `RolloutCore.run` (what `weft rollout` does: groups into a sink); the
measured side is `actors.evaluator.evaluate` on the same core (the eval loop: resume bookkeeping,
per-episode records appended and fsynced a task at a time, the summary, the viewer page). Engine
start-up and a warm-up pass over the tasks (cold video decoding) are paid once, before both. The two alternate for --rounds rounds (this machine is
shared and noisy); the ratio is eval / rollout in episodes per second, and in generated tokens per
second (sampling makes episode lengths differ run to run). Goal: >= 0.9.

    .venv/bin/python bench/eval.py                      # builds demo data + tiny SFT model in a temp dir
    .venv/bin/python bench/eval.py --model DIR --data DIR --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def bench(model: Path, data: Path, samples: int, rounds: int, work: Path) -> dict:
    from actors.evaluator import evaluate, local_core
    from configs import eval_config
    from actors.rollout_worker import QueueSink
    from configs import load_config
    from env import load_tasks

    cfg = eval_config(load_config(ROOT / "configs/demo.yaml", ["trainer.tensorboard=false"]), samples=samples,
                      temperature=0.7)
    cfg.eval.concurrent_tasks = cfg.rollout.concurrent_groups = 2
    tasks = load_tasks(data / "tasks.jsonl")
    core = local_core(cfg, str(model))
    core.sampler.tasks = tasks  # the rollout side draws these same tasks (a shuffle of them, once each)
    await core.start()
    await core.run(len(tasks), QueueSink())  # warm-up, not measured: the decoded-frame cache and the engine's caches
    out: dict[str, list[float]] = {"rollout_eps": [], "eval_eps": [], "rollout_tok_s": [], "eval_tok_s": []}
    for r in range(rounds):
        for side in ("rollout", "eval") if r % 2 == 0 else ("eval", "rollout"):
            t0 = time.perf_counter()
            if side == "rollout":
                sink = QueueSink()
                core.sampler.cursor = 0
                await core.run(len(tasks), sink)
                episodes = [t for g in sink.drain() for t in g.trajectories]
                tokens = sum(int(t.loss_mask.sum()) for t in episodes)
                n = len(episodes)
            else:
                summary = await evaluate(cfg, tasks, work / f"eval{r}", model_dir=str(model), core=core, progress=False)
                n, tokens = summary["episodes"], summary["mean_generated_tokens"] * summary["episodes"]
            dt = time.perf_counter() - t0
            out[f"{side}_eps"].append(n / dt)
            out[f"{side}_tok_s"].append(tokens / dt)
    await core.shutdown()
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"tasks": len(tasks), "samples": samples, "rounds": rounds, **{k: [round(x, 3) for x in v] for k, v in out.items()},
            "ratio_episodes_per_s": med["eval_eps"] / med["rollout_eps"],
            "ratio_tokens_per_s": med["eval_tok_s"] / med["rollout_tok_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="The tiny demo SFT model (default: built in a temp dir).")
    p.add_argument("--data", default=None, help="Demo data dir (default: built in a temp dir).")
    p.add_argument("--samples", type=int, default=4, help="K episodes per task on both sides.")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weft-bench-eval-"))
    if args.model and args.data:
        model, data = Path(args.model), Path(args.data)
    else:
        from bench.e2e import prepare

        data, model = prepare(work)
    r = asyncio.run(bench(model, data, args.samples, args.rounds, work))
    print(f"eval vs rollout, {r['tasks']} tasks x {r['samples']} episodes, {r['rounds']} rounds (median):")
    print(f"  episodes/s  eval {r['eval_eps']}  rollout {r['rollout_eps']}  ratio {r['ratio_episodes_per_s']:.3f}")
    print(f"  tokens/s    eval {r['eval_tok_s']}  rollout {r['rollout_tok_s']}  ratio {r['ratio_tokens_per_s']:.3f}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
