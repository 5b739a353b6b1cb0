"""Checkpoints of the learner: torch.distributed.checkpoint for the weights and optimizer, saved atomically.

A checkpoint is a directory `run_dir/checkpoints/step_00000012/` holding
* `dcp/`: model and optimizer state as torch.distributed.checkpoint (DCP) writes them: every
  rank writes its own shards, and the metadata records global shapes, so a checkpoint
  written at one world size loads at any other (DCP reshards; world size 1 loads it into
  plain tensors without a process group);
* `model/`: the HF config and the processor (no weights), so a checkpoint says what model it is;
* `trainer_state.pt` (rank 0): step, version, data cursor, RNG states (python, numpy, torch,
  cuda) and the server's state (buffer seen-set and waiting groups: exactly-once across
  restarts); plain types and tensors, loadable with `torch.load(weights_only=True)`;
* `meta.json`: step, version, world size, time, written last.
It is written under a temporary name and renamed into place (atomic on one file system), so a
learner killed mid-save leaves the previous checkpoint complete; the next save removes the
leftovers. Every rank must see the same run dir (one node, or a shared file system), as for
any DCP checkpoint. The final weights are exported separately as an HF model
(`learner.policy.Policy.export_hf`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from learner.distributed import Comm

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    """A finished checkpoint: final name, meta, trainer state, DCP metadata and model config all present."""
    return (_NAME.match(path.name) is not None and (path / "meta.json").is_file()
            and (path / "trainer_state.pt").is_file() and (path / "dcp" / ".metadata").is_file()
            and (path / "model" / "config.json").is_file())


def _pre_dcp(path: Path) -> bool:
    """A checkpoint of weft before DCP (HF weights under model/, optimizer in trainer_state.pt)."""
    return ((path / "meta.json").is_file() and (path / "trainer_state.pt").is_file()
            and not (path / "dcp").exists() and any((path / "model").glob("*.safetensors")))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under run_dir, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    old = [p for p in dirs if _pre_dcp(p)]
    if old:
        raise ValueError(f"{old[0]} is a checkpoint of the old format (HF weights, no dcp/); this learner "
                         "cannot resume it: its model/ is an HF model directory, start from it with --model "
                         "and trainer.resume=never")
    return sorted((p for p in dirs if is_complete(p)), key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, run_dir: str | Path) -> Optional[Path]:
    """The checkpoint to start from: "auto" -> newest complete one (or None), "never" -> None, else that path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint directory "
                                "(need step_NNNNNNNN/ with meta.json, trainer_state.pt, dcp/ and model/config.json)")
    return path


def save_checkpoint(run_dir: str | Path, step: int, policy: Any, optimizer: Any, processor: Any,
                    state: Optional[dict[str, Any]], comm: Comm, keep: int = 3) -> Path:
    """Write checkpoint `step` (every rank calls this; `state` is rank 0's) and keep the newest `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if comm.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # a save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    comm.barrier()
    model_sd, optim_sd = get_state_dict(policy.module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    if comm.is_main:
        policy.hf.config.save_pretrained(tmp / "model")
        if processor is not None:
            processor.save_pretrained(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
        meta = {"step": int(step), "version": int(state.get("version", step)), "world_size": comm.world,
                "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run that re-did a step): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def load_checkpoint(path: str | Path, policy: Any, optimizer: Any, device: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint's weights and optimizer state into this rank's (plain or sharded) policy and
    optimizer, resharding as needed; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(policy.module, optimizer)
    saved = set(FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata)
    # A parameter that never had a gradient before the save has no optimizer state in it: leave its
    # state to be created at its first gradient, as it would have been in the uninterrupted run.
    optim_sd["state"] = {k: v for k, v in optim_sd["state"].items()
                         if any(s.startswith(f"optim.state.{k}.") for s in saved)}
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=str(path / "dcp"))
    set_state_dict(policy.module, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"],
                   options=StateDictOptions(strict=False))
    return load_state(path, device)


def _fsync_tree(path: Path) -> None:
    """Flush the files to disk before the rename makes them the checkpoint."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def load_state(path: str | Path, device: Any = "cpu") -> dict[str, Any]:
    """The trainer_state.pt of a checkpoint (tensors mapped to `device`)."""
    return torch.load(Path(path) / "trainer_state.pt", map_location=device, weights_only=True)


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (and CUDA), as types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _tuples(x: Any) -> Any:
    """random.setstate wants tuples; a round trip may have turned them into lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
