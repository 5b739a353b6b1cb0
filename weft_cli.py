"""The `weft` command. Subcommands import their heavy modules lazily so `weft --help` answers at once."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="weft", description="RL for video-reasoning VLMs with tools, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-demo-data", help="Encode procedurally generated videos and tasks with known answers.")
    p.add_argument("--out", required=True, help="Output directory (tasks.jsonl + videos/).")
    p.add_argument("--videos", type=int, default=8, help="Number of videos (one task each).")
    p.add_argument("--seconds", type=float, default=60.0, help="Length of each video in seconds.")
    p.add_argument("--seed", type=int, default=0, help="Seed: same seed, same data.")
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

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _make_demo_data(args: argparse.Namespace) -> int:
    from env.demo import make_demo_data

    path = make_demo_data(args.out, videos=args.videos, seconds=args.seconds, seed=args.seed)
    print(json.dumps({"tasks": str(path)}))
    return 0


def _tasks_path(data: str):
    from pathlib import Path

    p = Path(data)
    return p / "tasks.jsonl" if p.is_dir() else p


def _check_env(args: argparse.Namespace) -> int:
    from configs import load_config
    from env import load_tasks
    from env.demo import demo_perception
    from env.testing import BlindPolicy, FuzzPolicy, OraclePolicy, RandomPolicy, check_env, run_episodes
    from env.tools import tool_schemas

    cfg = load_config(args.config, args.overrides)
    tasks = load_tasks(_tasks_path(args.data))
    report = None
    if args.check:
        report = check_env(tasks, cfg=cfg.env, reward_cfg=cfg.reward, seed=args.seed)
    locate, read = demo_perception()
    policy = {
        "oracle": lambda: OraclePolicy(locate, read, seed=args.seed),
        "blind": lambda: BlindPolicy(locate, read, seed=args.seed),
        "random": lambda: RandomPolicy(tool_schemas(cfg.env), seed=args.seed),
        "fuzz": lambda: FuzzPolicy(seed=args.seed),
    }[args.policy]()
    summary = run_episodes(tasks, policy, args.episodes, cfg=cfg.env, reward_cfg=cfg.reward)
    summary = {"policy": args.policy, **summary, **({"check": report} if report else {})}
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
