"""The `weft` command. Subcommands import their heavy modules lazily so `weft --help` answers at once."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        import train

        return train.main(argv[1:])
    parser = argparse.ArgumentParser(prog="weft", description="RL for video-reasoning VLMs with tools, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-demo-data", help="Encode procedurally generated videos and tasks with known answers.")
    p.add_argument("--out", required=True, help="Output directory (tasks.jsonl + videos/).")
    p.add_argument("--videos", type=int, default=8, help="Number of videos (one task each).")
    p.add_argument("--seconds", type=float, default=30.0, help="Length of each video in seconds (flash: at least 30).")
    p.add_argument("--seed", type=int, default=0, help="Seed: same seed, same data.")
    p.add_argument("--family", choices=["flash", "digits"], default="flash",
                   help="flash: the colour of a brief shape flash, which only the tools show (env/flash.py, the "
                        "demo's); digits: the digit in a small circle, legible only at native resolution (env/demo.py).")
    p.set_defaults(func=_make_demo_data)

    p = sub.add_parser("check-env", help="Run scripted policies through the environment; print a JSON summary last.")
    p.add_argument("--data", required=True, help="A tasks.jsonl file or a directory holding one.")
    p.add_argument("--policy", choices=["oracle", "blind", "random", "fuzz"], default="oracle")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="Also run the full contract check (check_env) first.")
    p.add_argument("--config", default=None, help="YAML config file (its env and reward sections are used).")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. env.overview_frames=4")
    p.set_defaults(func=_check_env)

    p = sub.add_parser("make-tiny-model", help="Train a tokenizer and save a random tiny Qwen-VL model (HF format), offline.")
    p.add_argument("--out", required=True, help="Output model directory.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"],
                   help="Model family (models/adapters.py): qwen2_5_vl or qwen3_vl.")
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("rollout", help="Run GRPO groups with a model through vLLM; write trajectories (msgpack).")
    p.add_argument("--model", required=True, help="HF model directory (tiny or real).")
    p.add_argument("--data", required=True, help="A tasks.jsonl file or a directory holding one.")
    p.add_argument("--groups", type=int, default=2, help="Groups to run.")
    p.add_argument("--group-size", type=int, default=None, help="G, episodes per group (default: rollout.group_size).")
    p.add_argument("--out", required=True, help="Output file of trajectories (protos.read_trajectories reads it).")
    p.add_argument("--config", default=None, help="YAML config file.")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. rollout.temperature=0.8")
    p.set_defaults(func=_rollout)

    p = sub.add_parser("convert", help="Convert a benchmark's annotation files into a weft task file; a JSON summary last.")
    p.add_argument("format", choices=["videomme", "lvbench", "mlvu", "longvideobench"], help="The benchmark.")
    p.add_argument("--annotations", required=True, help="As distributed: Video-MME's parquet (or its JSON/JSONL export), "
                   "LVBench's video_info.meta.jsonl, MLVU's json/ folder of per-task files, LongVideoBench's lvb_val.json.")
    p.add_argument("--videos", required=True, help="Folder holding the benchmark's videos (searched by relative path, then by name).")
    p.add_argument("--out", required=True, help="The task file to write (JSONL; video paths relative to it).")
    p.add_argument("--subtitles", default=None, help="Subtitle folder (Video-MME .srt, LongVideoBench .json); default: "
                   "the benchmark's own folder beside the annotations (subtitle/, subtitles/).")
    p.set_defaults(func=_convert)

    p = sub.add_parser("eval", help="Evaluate a model (or a scripted policy) with the training agent loop; results + summary.")
    p.add_argument("--model", default=None, help="HF model directory (tiny or real). Not needed with --policy.")
    p.add_argument("--data", required=True, help="A tasks.jsonl (e.g. from `weft convert`) or a directory holding one.")
    p.add_argument("--config", default=None, help="YAML config file: its env, reward, rollout budgets and eval sections are used.")
    p.add_argument("--samples", type=int, default=None, help="K episodes per task (default eval.samples): mean@K and pass@k.")
    p.add_argument("--temperature", type=float, default=None, help="Sampling temperature (default eval.temperature: 0, greedy).")
    p.add_argument("--out", default=None, help="Output folder (default runs/eval-<time>). A rerun with the same --out resumes.")
    p.add_argument("--no-tools", action="store_true", help="The no-tools baseline: one turn, --frames uniform frames, answer.")
    p.add_argument("--frames", type=int, default=None, help="Overview frames (default env.overview_frames).")
    p.add_argument("--policy", choices=["oracle", "blind"], default=None,
                   help="Evaluate the env's scripted policy instead of a model (checks the harness; no --model needed).")
    p.add_argument("--ray", action="store_true", help="Spread tasks over rollout.num_workers engines on Ray (RAY_ADDRESS or a local cluster).")
    p.add_argument("--max-tasks", type=int, default=None, help="Only the first N tasks of the file.")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. env.max_turns=12")
    p.set_defaults(func=_eval)

    p = sub.add_parser("learner", help="Run the learner on its own: gRPC service + trainer + weight publishing.")
    add_learner_args(p)
    p.set_defaults(func=_learner)

    p = sub.add_parser("pretrain-vision", help="Teach a tiny random model to see (caption synthetic flash frames) "
                       "before its cold start: it stands in for a pretrained VLM (learner/sft.py).")
    p.add_argument("--model", required=True, help="The model directory to start from (a tiny random model).")
    p.add_argument("--out", required=True, help="Where to save the pretrained model.")
    p.add_argument("--config", default=None, help="YAML config file (env.zoom_size sets the frame size; seed).")
    p.add_argument("--steps", type=int, default=300, help="Optimizer steps.")
    p.add_argument("--examples", type=int, default=2000, help="Captioned examples to train on.")
    p.add_argument("--held-out", type=int, default=64, help="Fresh examples the accuracy is measured on.")
    p.add_argument("--lr", type=float, default=1e-3, help="Learning rate.")
    p.add_argument("--batch-size", type=int, default=16, help="Examples per step.")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. seed=1")
    p.set_defaults(func=_pretrain_vision)

    p = sub.add_parser("sft", help="Cold-start SFT on scripted-policy (oracle) trajectories: teaches the action format.")
    add_sft_args(p)
    p.set_defaults(func=_sft)

    p = sub.add_parser("view", help="Render a run dir's sampled trajectories as one self-contained HTML page.")
    p.add_argument("run_dir", help="Run directory (config.yaml, trajectories/step_*.msgpack) or one .msgpack file.")
    p.add_argument("--out", required=True, help="The HTML file to write (inline CSS, SVG and images; no script).")
    p.add_argument("--max", type=int, default=32, help="Show at most this many trajectories (the file's first N).")
    p.add_argument("--step", type=int, default=None, help="Which step's sample to show (default: the newest).")
    p.add_argument("--data", default=None, help="Task file to use instead of the run config's data.path.")
    p.set_defaults(func=_view)

    p = sub.add_parser("plan", help="Per-rank memory of the sharded learner for a model config (no weights needed).")
    p.add_argument("--model-config", default=None, help="A config.json (default: every one shipped in configs/models/).")
    p.add_argument("--world-size", type=int, default=8, help="Learner ranks (FSDP2 data parallel).")
    p.add_argument("--tokens", type=int, default=16384, help="Tokens of the longest micro-batch (prompt + turns + observations).")
    p.add_argument("--image-tokens", type=int, default=None, help="Of those, image tokens (default: half).")
    p.add_argument("--gradient-checkpointing", action="store_true", help="With activation checkpointing of every layer and block.")
    p.add_argument("--reference", action="store_true",
                   help="With the frozen reference policy a KL term loads (loss.kl_coef or loss.kl_in_reward > 0; every paper recipe).")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to compare the total with.")
    p.set_defaults(func=_plan)

    # `weft train ...` is handed to train.py whole (see the top of main); listed here for --help.
    sub.add_parser("train", help="A GRPO training run on Ray (train.py): learner, env actors, rollout workers.")

    p = sub.add_parser("rollout-worker", help="Attach a rollout worker to a running learner (another job or node).")
    p.add_argument("--learner", required=True, help="HOST:PORT of the learner's gRPC service.")
    p.add_argument("--model", default=None, help="HF model directory of the run's base model (overrides `model`); "
                   "the learner's current weights replace its weights before the first group.")
    p.add_argument("--data", default=None, help="Tasks (a tasks.jsonl or a directory holding one; default data.path).")
    p.add_argument("--groups", type=int, default=0, help="Groups to run before leaving; 0 = until stopped (Ctrl-C).")
    p.add_argument("--token", default=None, help="The learner's shared secret (prefer learner.token_env).")
    p.add_argument("--config", default=None, help="YAML config file (the run's, so budgets and group size match).")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. rollout.concurrent_groups=4")
    p.set_defaults(func=_rollout_worker)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _make_demo_data(args: argparse.Namespace) -> int:
    from env.demo import make_demo_data
    from env.flash import make_flash_data

    make = make_flash_data if args.family == "flash" else make_demo_data
    path = make(args.out, videos=args.videos, seconds=args.seconds, seed=args.seed)
    print(json.dumps({"tasks": str(path)}))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from env.benchmarks import convert

    summary = convert(args.format, args.annotations, args.videos, args.out, subtitles=args.subtitles)
    for reason, n in sorted(summary["skipped"].items()):
        print(f"skipped {n} ({reason}), e.g. {'; '.join(summary['skipped_examples'][reason][:2])}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import functools
    import logging
    import os

    from actors.evaluator import print_summary, run_eval
    from configs import eval_config
    from configs import load_config
    from env import load_tasks

    logging.basicConfig(level=logging.WARNING)
    if args.model is None and args.policy is None:
        raise SystemExit("weft eval needs --model DIR, or --policy oracle|blind")
    cfg = eval_config(load_config(args.config, args.overrides), samples=args.samples, temperature=args.temperature,
                      no_tools=args.no_tools, frames=args.frames)
    data = _tasks_path(args.data)
    bad: list[str] = []
    tasks = load_tasks(data, bad_lines=bad)[: args.max_tasks]
    for problem in bad[:20]:
        print(f"skipped a bad task line: {problem}", file=sys.stderr)
    factory = None
    if args.policy:
        from actors.scripted_engine import scripted_engine

        factory = functools.partial(scripted_engine, args.policy, args.model, cfg.trainer.sft_zoom_frames, cfg.seed)
    if args.ray:
        import ray

        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    out = args.out or f"runs/eval-{__import__('time').strftime('%Y%m%d-%H%M%S')}"
    summary = run_eval(cfg, tasks, out, model_dir=args.model, engine_factory=factory, use_ray=args.ray, data_path=str(data))
    print_summary({**summary, "out": out, "bad_task_lines": len(bad)})
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from models.tiny import make_tiny_model

    print(json.dumps({"model": str(make_tiny_model(args.out, seed=args.seed, family=args.family))}))
    return 0


def _rollout(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from actors.rollout_worker import FileSink, RolloutCore, summarize_groups
    from configs import load_config
    from env import load_tasks

    cfg = load_config(args.config, args.overrides)
    if args.group_size:
        cfg.rollout = dataclasses.replace(cfg.rollout, group_size=args.group_size)
    tasks = load_tasks(_tasks_path(args.data))
    sink = FileSink(args.out)
    groups = []

    class _Keep:
        async def put(self, group):
            groups.append(group)
            await sink.put(group)

    async def go():
        core = RolloutCore(args.model, tasks, cfg.rollout, cfg.env, cfg.reward)
        try:
            return await core.run(args.groups, _Keep())
        finally:
            await core.shutdown()

    run = asyncio.run(go())
    sink.close()
    print(json.dumps({**summarize_groups(groups), "out": args.out, "seconds": round(run["seconds"], 2),
                      "generated_tokens_per_s": round(run["generated_tokens_per_s"], 1)}, sort_keys=True))
    return 0


def add_learner_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `weft learner` (main_learner reads exactly these)."""
    p.add_argument("--model", default=None, help="HF model directory to start from (unless a checkpoint is resumed).")
    p.add_argument("--port", type=int, default=None, help="Port of the learner service (overrides learner.port).")
    p.add_argument("--host", default=None, help="Address to bind (overrides learner.host).")
    p.add_argument("--token", default=None, help="Shared secret of the service (prefer learner.token_env).")
    p.add_argument("--run-dir", default=None, help="Checkpoints and metrics (overrides trainer.run_dir).")
    p.add_argument("--replay", default=None, help="Train on the groups of this trajectory file (`weft rollout --out`) "
                   "instead of serving: no gRPC, no rollout; needs --steps and --out.")
    p.add_argument("--steps", type=int, default=None, help="--replay: train until this step (resumed steps count).")
    p.add_argument("--out", default=None, help="--replay: where the trained model goes (an HF model directory).")
    p.add_argument("--world-size", type=int, default=None, help="Learner ranks (overrides learner.world_size); "
                   "--replay spawns them locally.")
    p.add_argument("--config", default=None, help="YAML config file.")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.lr=1e-6")
    return p

def add_sft_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `weft sft` (main_sft reads exactly these)."""
    p.add_argument("--model", required=True, help="HF model directory to fine-tune.")
    p.add_argument("--data", required=True, help="Tasks (a tasks.jsonl or a directory holding one: episodes are "
                   "generated with --policy) or a msgpack file of trajectories (protos.write_trajectories, `weft rollout --out`).")
    p.add_argument("--policy", choices=["oracle"], default="oracle", help="Scripted policy that plays the tasks.")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps (overrides trainer.sft_steps).")
    p.add_argument("--out", required=True, help="Output HF model directory (weights + processor).")
    p.add_argument("--config", default=None, help="YAML config file.")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.sft_lr=1e-4")
    return p

def _rollout_worker(args: argparse.Namespace) -> int:
    from actors.rollout_worker import main_rollout_worker

    return main_rollout_worker(args)


def _learner(args: argparse.Namespace) -> int:
    from learner.trainer import main_learner

    return main_learner(args)


def _plan(args: argparse.Namespace) -> int:
    from learner.plan import main_plan

    return main_plan(args)


def _pretrain_vision(args: argparse.Namespace) -> int:
    from learner.sft import main_pretrain_vision

    return main_pretrain_vision(args)


def _sft(args: argparse.Namespace) -> int:
    from actors.scripted_engine import scripted_trajectories
    from learner.sft import main_sft

    return main_sft(args, scripted_trajectories)


def _view(args: argparse.Namespace) -> int:
    from pathlib import Path

    from env.view import write_view

    if not Path(args.run_dir).exists():
        print(f"weft view: {args.run_dir}: no such run directory or file", file=sys.stderr)
        return 2
    summary = write_view(args.run_dir, args.out, step=args.step, max_trajectories=max(0, args.max), data=args.data)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _tasks_path(data: str):
    from pathlib import Path

    p = Path(data)
    return p / "tasks.jsonl" if p.is_dir() else p


def _check_env(args: argparse.Namespace) -> int:
    import asyncio

    from configs import load_config
    from env import LocalEnv, load_tasks
    from env.demo import demo_perception
    from env.testing import BlindPolicy, FuzzPolicy, OraclePolicy, RandomPolicy, check_env, run_episodes

    cfg = load_config(args.config, args.overrides)
    tasks = load_tasks(_tasks_path(args.data))
    env = LocalEnv(cfg.env, cfg.reward)  # the run's tools and reward function, a user's included
    report = None
    if args.check:
        report = check_env(tasks, cfg=cfg.env, env=env, seed=args.seed)
    locate, read = demo_perception()
    policy = {
        "oracle": lambda: OraclePolicy(locate, read, zoom_frames=min(8, cfg.env.max_frames_per_call), seed=args.seed),
        "blind": lambda: BlindPolicy(locate, read, seed=args.seed),
        "random": lambda: RandomPolicy(asyncio.run(env.tool_schemas()), seed=args.seed),
        "fuzz": lambda: FuzzPolicy(seed=args.seed, tools=asyncio.run(env.tool_schemas())),
    }[args.policy]()
    summary = run_episodes(tasks, policy, args.episodes, env=env)
    summary = {"policy": args.policy, **summary, **({"check": report} if report else {})}
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
