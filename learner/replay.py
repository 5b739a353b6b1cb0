"""`weft learner --replay FILE`: train on recorded trajectories, with no gRPC and no rollout.

Users replay a run's groups to reproduce a step exactly, to debug a loss, or to compare
world sizes (the tests do: the same file at world size 1 and 2 must give the same weights).
The file is what `weft rollout --out` (or a run's trajectories/ samples) writes. Groups are
taken in file order (the order their group ids first appear), trainer.groups_per_step per
step, after the same validation the learner's server applies to submitted groups (an invalid
group is skipped and counted, never trained). `--steps K` trains until step K, counting steps
resumed from trainer.run_dir's newest checkpoint (trainer.resume=auto); a resumed replay
continues in the file where the checkpoint's cursor says. The model is written to `--out` as
an HF model (config.json, safetensors, processor). `--world-size N` runs N local ranks
(torch.distributed, gloo on the CPU, NCCL on CUDA) of the same sharded learner `weft train`
runs with learner.world_size=N.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def load_groups(path: str | Path) -> list[Any]:
    """The groups of a trajectory file, in the order their group ids first appear."""
    from protos.codec import read_trajectories
    from protos.records import Group

    groups: dict[str, Group] = {}
    for t in read_trajectories(path):
        g = groups.setdefault(t.group_id, Group(t.group_id, t.task_id, []))
        g.trajectories.append(t)
    return list(groups.values())


def valid_groups(groups: list[Any], vocab_size: Optional[int], image_token_id: Optional[int]) -> tuple[list[Any], Counter]:
    """The groups that pass the server's validation (learner/validate.py); the rest counted by reason."""
    from learner.validate import Limits, reason_of, validate_group

    kept, rejected = [], Counter()
    for g in groups:
        # Any version is "known" here: a replay has no live learner version to check against.
        err = validate_group(g, Limits(len(g.trajectories), 2**31 - 1, vocab_size, image_token_id))
        if err is None:
            kept.append(g)
        else:
            rejected[reason_of(err)] += 1
            log.warning("replay skips group %s: %s", g.group_id, err)
    return kept, rejected


def run_rank(comm: Any, cfg: Any, model_dir: Optional[str], path: str, steps: int, out: str) -> Optional[dict[str, Any]]:
    """One rank of a replay; rank 0 drives and returns the summary."""
    from learner.trainer import Trainer

    trainer = Trainer(cfg, model_dir, comm=comm)
    if not comm.is_main:
        trainer.follow()
        return None
    groups, rejected = valid_groups(load_groups(path), len(trainer.tokenizer), trainer.image_token_id)
    per_step = cfg.trainer.groups_per_step
    history = []
    while trainer.step < steps:
        start = trainer.cursor["groups_consumed"]
        batch = groups[start:start + per_step]
        if len(batch) < per_step:
            log.warning("replay: the file has %d valid groups, step %d would need %d more", len(groups),
                        trainer.step + 1, per_step - len(batch))
            break
        m = trainer.train_step(batch)
        history.append({k: m.get(k) for k in ("step", "loss", "grad_norm", "reward_mean", "trajectories_trained",
                                                "skipped", "time/step_s")})
    trainer.finish(export_dir=out)
    trainer.close()
    return {"out": out, "steps": trainer.step, "version": trainer.version, "world_size": comm.world,
            "groups_in_file": len(groups) + sum(rejected.values()), "rejected": dict(rejected),
            "groups_consumed": trainer.cursor["groups_consumed"], "history": history,
            "run_dir": str(trainer.run_dir)}


def _spawned_rank(rank: int, world: int, host: str, port: int, cfg: Any, model_dir: Optional[str], path: str,
                  steps: int, out: str, result: str) -> None:
    import torch

    from learner.distributed import init_comm

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    comm = init_comm(rank, world, host, port, device, cfg.learner.dist_timeout_s)
    try:
        summary = run_rank(comm, cfg, model_dir, path, steps, out)
        if summary is not None:
            Path(result).write_text(json.dumps(summary))
    finally:
        comm.close()


def replay(cfg: Any, model_dir: Optional[str], path: str, steps: int, out: str, world_size: int = 1) -> dict[str, Any]:
    """Train `steps` steps on the groups of `path` at `world_size` ranks; returns rank 0's summary."""
    import tempfile

    from learner.distributed import Comm, spawn
    from learner.trainer import resolve_device

    if world_size <= 1:
        return run_rank(Comm(device=resolve_device(cfg.trainer.device)), cfg, model_dir, path, steps, out)
    with tempfile.TemporaryDirectory(prefix="weft-replay-") as tmp:
        result = str(Path(tmp) / "summary.json")
        spawn(_spawned_rank, world_size, (cfg, model_dir, path, steps, out, result))
        return json.loads(Path(result).read_text())
