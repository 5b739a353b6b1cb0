"""Checkpoints of the learner: save atomically, find the newest complete one, restore RNG state.

A checkpoint is a directory `run_dir/checkpoints/step_00000012/` holding
* `model/`: the weights in HF format (`save_pretrained`) with the processor, so it
  loads like any HF checkpoint (and a rollout engine can start from it);
* `trainer_state.pt`: optimizer state, step, version, data cursor, RNG states
  (python, numpy, torch, cuda) and the server's state (buffer seen-set and waiting
  groups: exactly-once across restarts); plain types and tensors only, so it
  loads with `torch.load(weights_only=True)`;
* `meta.json`: step, version, time, written last.
It is written under a temporary name and renamed into place (atomic on one file
system), so a learner killed mid-save leaves the previous checkpoint complete and
usable; leftovers of such a save are removed at the next save.
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

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    """A finished checkpoint: final name, meta, trainer state and model config all present."""
    return (_NAME.match(path.name) is not None and (path / "meta.json").is_file()
            and (path / "trainer_state.pt").is_file() and (path / "model" / "config.json").is_file())


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under run_dir, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


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
                                "(need step_NNNNNNNN/ with meta.json, trainer_state.pt and model/config.json)")
    return path


def save_checkpoint(run_dir: str | Path, step: int, model: Any, processor: Any, state: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; returns its path."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # a save that was killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    model.save_pretrained(tmp / "model")
    if processor is not None:
        processor.save_pretrained(tmp / "model")
    torch.save(state, tmp / "trainer_state.pt")
    meta = {"step": int(step), "version": int(state.get("version", step)), "time": time.time()}
    (tmp / "meta.json").write_text(json.dumps(meta))
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (a resumed run that re-did a step): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
