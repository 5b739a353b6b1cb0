"""weft's driver: one GRPO training run on Ray, as a table of contents.

    python train.py --config configs/demo.yaml [--model DIR] [--run-dir DIR] [key=value ...]
    weft train      --config configs/demo.yaml ...                        (the same thing)
    ray job submit --working-dir . -- python train.py --config configs/demo.yaml ...

1. config: schema defaults <- YAML <- key=value; the run dir is fixed and the config saved in it
2. Ray: a local cluster, or the one RAY_ADDRESS names (set by `ray job submit`)
3. the learner: learner.world_size rank actors in a placement group (FSDP2 over torch.distributed
   when more than one); rank 0 serves gRPC and trains (learner/service.py); resumed from run_dir
4. M EnvActors and N RolloutWorkers, sized apart (env.num_actors, rollout.num_workers)
5. the dispatcher paces groups to the workers within the staleness bound, re-runs lost ones,
   restarts a learner that lost a rank, validates on data.val_path every trainer.val_every steps,
   until trainer.total_steps (actors/dispatcher.py)
6. final checkpoint, workers down, summary (printed, and run_dir/summary.json)

Everything a run writes is under the run dir: config.yaml, metrics.jsonl, tb/, checkpoints/,
trajectories/ (sampled every trainer.sample_every steps; `weft view RUN_DIR` renders them),
summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("weft.train")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="weft train", description="GRPO on Ray: learner + env actors + rollout workers.")
    p.add_argument("--config", default=None, help="YAML config file (configs/demo.yaml, configs/qwen2_5_vl_7b.yaml).")
    p.add_argument("--model", default=None, help="HF model directory to start from (overrides `model`).")
    p.add_argument("--run-dir", default=None, help="Where the run writes everything (default runs/<timestamp>).")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. rollout.num_workers=4")
    return p.parse_args(argv)


def load_run_config(args: argparse.Namespace) -> Any:
    """The run's config, checked, with its run dir created and the config saved there."""
    from configs import load_config
    from configs.loader import to_yaml
    from learner.trainer import default_run_dir

    cfg = load_config(args.config, args.overrides)
    cfg.model = args.model or cfg.model
    cfg.trainer.run_dir = args.run_dir or cfg.trainer.run_dir or default_run_dir()
    if not cfg.model or not (Path(cfg.model) / "config.json").is_file():
        raise SystemExit(f"model {cfg.model!r} is not an HF model directory (set `model` or --model)")
    if cfg.trainer.total_steps < 1:
        raise SystemExit("trainer.total_steps must be > 0 for `weft train`")
    if cfg.rollout.group_size != cfg.learner.group_size:
        raise SystemExit(f"rollout.group_size {cfg.rollout.group_size} != learner.group_size {cfg.learner.group_size}")
    # Absolute, so actors on any node (or in a job's working dir) find them.
    cfg.model, cfg.data.path = str(Path(cfg.model).resolve()), str(Path(cfg.data.path).resolve())
    cfg.data.val_path = str(Path(cfg.data.val_path).resolve()) if cfg.data.val_path else None
    run_dir = Path(cfg.trainer.run_dir).resolve()
    cfg.trainer.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    return cfg


def init_ray(cfg: Any) -> None:
    """Join RAY_ADDRESS's cluster if it is set, else start a local one (run.ray_num_cpus CPUs)."""
    import ray

    # Actors' logs reach this terminal; vLLM's per-request INFO lines would drown the progress display.
    env_vars = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env_vars})
    else:
        ray.init(num_cpus=cfg.run.ray_num_cpus, include_dashboard=False, runtime_env={"env_vars": env_vars})
    log.info("ray: %s", ray.cluster_resources())
    from actors.cluster import check_resources

    check_resources(cfg, ray.cluster_resources(), local=not os.environ.get("RAY_ADDRESS"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import ray

    from actors.cluster import shutdown_workers, stop_all
    from actors.dispatcher import Dispatcher
    from actors.display import display, print_summary
    from actors.env_actor import start_env_actors
    from actors.learner_actor import LearnerGroup
    from actors.rollout_worker import start_rollout_workers
    from env import load_tasks
    from learner.metrics import learning_summary, read_metrics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_run_config(parse_args(argv))                                   # 1
    init_ray(cfg)                                                              # 2
    learner = LearnerGroup(cfg, cfg.model)                                     # 3
    address = learner.start()
    envs = start_env_actors(cfg)                                               # 4
    workers = start_rollout_workers(cfg, cfg.model, address, envs)
    resumed = learner.progress()
    dispatcher = Dispatcher(cfg, load_tasks(cfg.data.path), workers, envs, learner,
                            start_index=resumed["accepted"] + resumed["stale_at_put"],
                            val_tasks=load_tasks(cfg.data.val_path) if cfg.data.val_path else None)
    try:                                                                       # 5
        with display(cfg.run.display, cfg.trainer.total_steps) as update:
            accounting = dispatcher.run(cfg.trainer.total_steps, on_tick=update)
    except BaseException:
        stop_all(learner, workers)  # best effort (a last checkpoint if the learner lives); the error is what counts
        raise
    final, _ = learner.stop(), shutdown_workers(workers)                      # 6
    rows = read_metrics(cfg.trainer.run_dir)
    summary = {"run_dir": cfg.trainer.run_dir, "steps": final["step"], "version": final["version"],
               "stopped": final.get("stopped"),
               "groups": accounting, "learner": {k: final[k] for k in ("accepted", "groups_consumed", "buffer",
                                                                        "stale_at_put", "stale_at_take", "duplicate",
                                                                        "rejected", "idle_frac")},
               "learning": learning_summary(rows),
               "validation": dispatcher.val.history if dispatcher.val is not None else []}
    Path(cfg.trainer.run_dir, "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print_summary(summary)
    ray.shutdown()
    if summary["stopped"]:  # checkpoint and export are saved; the run still did not do what was asked
        log.error("stopped at step %d of %d: %s", final["step"], cfg.trainer.total_steps, summary["stopped"])
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
