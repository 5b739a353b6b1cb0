"""Process settings for the learner: the Python collector and glibc's allocator.

Both matter because the learner receives a few hundred kB a group, keeps it until a
step trains on it, and rebuilds a weight snapshot every step:

* gc: a learner process holds hundreds of thousands of long-lived objects (torch,
  transformers, the model's modules). Every received group allocates a few hundred
  short-lived ones, which triggers collections that re-walk all of them. `gc.freeze()`
  after start-up moves what exists to the permanent generation, and a larger gen-0
  threshold collects less often (Megatron-LM's manual-gc option exists for the same cost).
* malloc: glibc returns freed heap memory to the OS once more than M_TRIM_THRESHOLD
  (by default twice the largest freed chunk) sits free at the top, and maps chunks over
  M_MMAP_THRESHOLD on their own. The next group or snapshot then faults every page in
  again: on this machine ~2 us a 4 kB page, 0.2 ms for a 0.43 MB group, 0.3 s per
  snapshot of a 0.5B model. Raising both keeps freed memory mapped for reuse.

bench/transport.py applies the same settings to its learner process (and so to the raw
gRPC baseline that shares it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Any

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on a 64-bit system; mallopt refuses more


def tune_process(gc_freeze: bool, gc_threshold0: int, malloc_keep_mb: int) -> dict[str, Any]:
    """Apply the settings (see the module docstring); returns what was applied, for the log."""
    done: dict[str, Any] = {}
    if gc_freeze:
        gc.collect()
        gc.freeze()
        done["gc_frozen_objects"] = gc.get_freeze_count()
    if gc_threshold0 > 0:
        _, t1, t2 = gc.get_threshold()
        gc.set_threshold(gc_threshold0, t1, t2)
        done["gc_threshold0"] = gc_threshold0
    if malloc_keep_mb > 0:
        done.update(_tune_malloc(malloc_keep_mb * 2**20))
    log.info("process tuning: %s", done)
    return done


def _tune_malloc(keep_bytes: int) -> dict[str, Any]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return {"malloc": f"not glibc ({name}): left alone"}
    trim_ok = mallopt(_M_TRIM_THRESHOLD, keep_bytes) == 1
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, min(keep_bytes, _MMAP_THRESHOLD_MAX)) == 1
    return {"malloc_trim_threshold": keep_bytes if trim_ok else "refused",
            "malloc_mmap_threshold": min(keep_bytes, _MMAP_THRESHOLD_MAX) if mmap_ok else "refused"}
