"""`weft plan` on the shipped public configs: the models are built on the meta device (no weights), their
parameter counts are the published ones, and the sharded rows scale with 1 / world size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from learner.plan import GIB, plan, shipped_model_configs

ROOT = Path(__file__).resolve().parents[2]
# Sizes as the model cards state them (Hugging Face: 8.29B, 33.5B, 8.77B parameters).
PUBLISHED = {"Qwen2.5-VL-3B-Instruct": 3.75e9, "Qwen2.5-VL-7B-Instruct": 8.29e9, "Qwen2.5-VL-32B-Instruct": 33.45e9, "Qwen3-VL-8B-Instruct": 8.77e9}


def test_shipped_configs_have_the_published_sizes():
    names = {p.stem for p in shipped_model_configs()}
    assert names == set(PUBLISHED)
    for cfg in shipped_model_configs():
        p = plan(cfg, 8, 16384)
        assert abs(p.params - PUBLISHED[cfg.stem]) / PUBLISHED[cfg.stem] < 0.005, (cfg.stem, p.params)


@pytest.mark.parametrize("cfg", shipped_model_configs(), ids=lambda p: p.stem)
def test_sharded_state_scales_with_world_size_and_checkpointing_cuts_activations(cfg):
    one, eight = plan(cfg, 1, 16384), plan(cfg, 8, 16384)
    for k in ("parameters (fp32, sharded)", "gradients (fp32, sharded)", "AdamW state (fp32, sharded)"):
        assert eight.rows[k] == pytest.approx(one.rows[k] / 8)
    assert one.rows["AdamW state (fp32, sharded)"] == 8 * one.params  # two fp32 moments a parameter
    ckpt = plan(cfg, 8, 16384, gradient_checkpointing=True)
    text = "activations, text (16384 tokens, bf16)"
    assert ckpt.rows[text] < eight.rows[text] / 5
    assert eight.total > ckpt.total
    ref = plan(cfg, 8, 16384, reference=True)  # a KL term's frozen reference: its sharded fp32 weights more
    assert ref.rows["reference policy (fp32, sharded)"] == eight.rows["parameters (fp32, sharded)"]
    assert ref.total - eight.total == pytest.approx(4 * eight.params / 8)


def test_weft_plan_prints_the_three_tables_at_world_size_8():
    out = subprocess.run([sys.executable, "-m", "weft_cli", "plan", "--world-size", "8", "--gradient-checkpointing",
                          "--reference"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300).stdout
    for name in PUBLISHED:
        assert f"{name}: " in out and "world size 8" in out
    rows = json.loads(out.strip().splitlines()[-1])
    seven = next(r for r in rows if r["model"] == "Qwen2.5-VL-7B-Instruct")
    assert 20 < seven["total_gib"] < 80  # fits an 80 GB GPU at world size 8 with checkpointing and a reference
    assert seven["rows_gib"]["reference policy (fp32, sharded)"] == seven["rows_gib"]["parameters (fp32, sharded)"]
    assert seven["total_gib"] * GIB == pytest.approx(sum(seven["rows_gib"].values()) * GIB, rel=1e-2)
