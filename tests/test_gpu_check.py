"""scripts/gpu_check.sh --quick: the GPU check's own logic on tiny shapes on the CPU, so it cannot rot
between GPU runs. The rows that need CUDA (the Triton kernel) report themselves skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_gpu_check_runs_every_row(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--quick", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    by_check = {r["check"] for r in rows if r["status"] == "ok"}
    assert {"1 kernel", "3 step", "4 fsdp", "5 publish"} <= by_check, rows
    assert not [r for r in rows if r["status"] in ("FAIL", "error")], rows
    kernel = [r for r in rows if r["check"] == "1 kernel" and r["case"].endswith("chunked")]
    assert len(kernel) == 4 and all(r["max_d_logp"] < 1e-2 for r in kernel)
    fsdp = next(r for r in rows if r["check"] == "4 fsdp")
    assert fsdp["max_d_weights"] <= 1e-4 < fsdp["weights_moved"]
    md = (out / "gpu_check.md").read_text()
    assert "| check | case | status | numbers |" in md and md.count("\n| ") >= len(rows)


def test_wheels_script_names_what_the_check_installs():
    """Every package gpu_check.sh may install is one gpu_wheels.sh fetches."""
    check = (ROOT / "scripts" / "gpu_check.sh").read_text()
    wheels = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    for pkg in ("omegaconf", "protobuf", "decord", "pillow", "liger-kernel"):
        assert f'"{pkg}' in check or f': "{pkg}"' in check, pkg
        assert f'"{pkg}' in wheels, pkg
