"""End to end: asynchronous (max_staleness=2) vs synchronous (max_staleness=0) GRPO, in one run.

Runs `train.py` twice with the same config, model, data and step count, changing only
learner.max_staleness, and reports for each, over the steady state (from the second
trained step to the last, so engine start-up is left out):

* trajectories/s: trajectories trained / wall time;
* learner idle fraction: 1 - (time inside train steps) / wall time, i.e. how long the
  learner waited for rollouts;
* mean staleness of the trained groups.

The ratio async/sync of trajectories/s is the number to read. With s = 0 the learner waits
for every group of a step to be generated from its newest weights, and the rollout workers
wait while it trains; with s = 2 each side works while the other does. On a 2-core CPU the
rollout workers and the learner share the same two cores, so overlapping them gains little
here; on a GPU node (separate devices) it is the point.

    .venv/bin/python bench/e2e.py                       # builds demo data + tiny SFT model in a temp dir
    .venv/bin/python bench/e2e.py --model DIR --data DIR --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(work: Path) -> tuple[Path, Path]:
    """Demo data, the tiny model, its perception pretraining and its demo SFT (on the cold-start set), as
    scripts/demo.sh makes them."""
    from env.flash import DEMO_COLDSTART, DEMO_RL, make_flash_data

    data, cold, tiny, see, sft = work / "data", work / "coldstart", work / "tiny", work / "see", work / "sft"
    make_flash_data(data, **DEMO_RL)
    make_flash_data(cold, **DEMO_COLDSTART)
    weft = [sys.executable, "-m", "weft_cli"]
    subprocess.run([*weft, "make-tiny-model", "--out", str(tiny)], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([*weft, "pretrain-vision", "--model", str(tiny), "--out", str(see), "--config", "configs/demo.yaml",
                    "trainer.tensorboard=false"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([*weft, "sft", "--model", str(see), "--data", str(cold), "--config", "configs/demo.yaml",
                    "--out", str(sft), "trainer.sft_eval_turns=0", "trainer.tensorboard=false"], cwd=ROOT, check=True,
                   capture_output=True)
    return data, sft


def run(staleness: int, data: Path, model: Path, steps: int, work: Path, extra: list[str]) -> dict:
    run_dir = work / f"run_s{staleness}"
    cmd = [sys.executable, "train.py", "--config", "configs/demo.yaml", "--model", str(model), "--run-dir", str(run_dir),
           f"data.path={data / 'tasks.jsonl'}", "data.val_path=null", f"learner.max_staleness={staleness}", f"trainer.total_steps={steps}",
           "trainer.checkpoint_every=0", "trainer.sample_every=0", "trainer.tensorboard=false", "run.display=none", *extra]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="wbe", dir="/tmp")}
    t0 = time.time()
    with open(work / f"run_s{staleness}.log", "wb") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return measure(run_dir, time.time() - t0)


def measure(run_dir: Path, total_s: float) -> dict:
    from learner.metrics import read_metrics

    rows = read_metrics(run_dir)
    if len(rows) < 3:
        raise SystemExit(f"{run_dir}: only {len(rows)} trained steps; run more --steps")
    steady = rows[1:]  # from the end of the first step: engine start-up and the first fill are out
    wall = steady[-1]["time"] - rows[0]["time"]
    busy = sum(r["time/step_s"] for r in steady)
    trajs = sum(r["trajectories"] for r in steady)
    return {"trajectories_per_s": trajs / wall, "learner_idle_frac": max(0.0, 1.0 - busy / wall),
            "staleness_mean": sum(r["staleness_mean"] for r in steady) / len(steady), "steady_wall_s": wall,
            "steps": len(rows), "total_wall_s": total_s,
            "reward_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir (default: build the demo SFT model in a temp dir).")
    ap.add_argument("--data", default=None, help="Demo data dir holding tasks.jsonl (default: build it).")
    ap.add_argument("--steps", type=int, default=12, help="Trained steps per run.")
    ap.add_argument("--async-staleness", type=int, default=2, help="max_staleness of the asynchronous run.")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weft-e2e-"))
    if args.model and args.data:
        data, model = Path(args.data), Path(args.model)
    else:
        data, model = prepare(work)
    sync = run(0, data, model, args.steps, work, args.overrides)
    asyn = run(args.async_staleness, data, model, args.steps, work, args.overrides)
    print(json.dumps({"sync": sync, "async": asyn, "work_dir": str(work)}, indent=2))
    print(f"async (max_staleness={args.async_staleness}) vs sync (0): trajectories/s "
          f"{asyn['trajectories_per_s']:.3f} vs {sync['trajectories_per_s']:.3f} = "
          f"{asyn['trajectories_per_s'] / sync['trajectories_per_s']:.2f}x; learner idle "
          f"{asyn['learner_idle_frac']:.2f} vs {sync['learner_idle_frac']:.2f}; staleness "
          f"{asyn['staleness_mean']:.2f} vs {sync['staleness_mean']:.2f}")


if __name__ == "__main__":
    main()
