"""learner/runtime.py: the learner process's gc and malloc settings, each checked in a fresh process."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A buffer filled with 50 received groups (0.43 MB each) and drained, 20 times: minor page faults.
REFILL = """
import resource, sys
from learner.runtime import tune_process
if sys.argv[1] == "tuned":
    print(tune_process(gc_freeze=False, gc_threshold0=0, malloc_keep_mb=1024), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [bytearray(434_000) for _ in range(50)]  # the first fill maps the memory either way
del blocks
f0 = faults()
for _ in range(20):
    blocks = [bytearray(434_000) for _ in range(50)]
    del blocks
print(faults() - f0)
"""


def run(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_settings_keep_freed_memory_for_reuse():
    untuned, tuned = int(run(REFILL, "default")), int(run(REFILL, "tuned"))
    # Default glibc returns the drained 21 MB to the OS and faults every page in again (~5000 a fill).
    assert untuned > 20 * 2000, untuned
    assert tuned < untuned / 20, (tuned, untuned)


def test_gc_freeze_and_threshold():
    code = """
import gc, json
from learner.runtime import tune_process
import torch  # long-lived objects, as in a learner process
done = tune_process(gc_freeze=True, gc_threshold0=50_000, malloc_keep_mb=0)
print(json.dumps([gc.get_freeze_count(), gc.get_threshold()[0], sorted(done)]))
"""
    frozen, threshold, keys = __import__("json").loads(run(code))
    assert frozen > 10_000 and threshold == 50_000 and keys == ["gc_frozen_objects", "gc_threshold0"]
