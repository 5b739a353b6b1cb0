"""Shared fixtures. The repo root is on sys.path (pytest rootdir), so tests import packages directly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ray_temp_dir():
    """A short temp dir for a private Ray cluster: Ray's socket paths must stay under 107 bytes,
    which pytest's tmp_path can exceed. Never `ray stop` in tests: it kills every Ray process."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="wray", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# Demo data: real H.264 videos encoded once per test session.


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from env.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, videos=6, seconds=40, seed=123)
    return out


@pytest.fixture(scope="session")
def demo_tasks(demo_dir):
    from env import load_tasks

    return load_tasks(demo_dir / "tasks.jsonl")


@pytest.fixture(scope="session")
def small_demo_tasks(tmp_path_factory):
    """One short low-resolution video: every frame fits the cache, so tests that step the env
    thousands of times measure the env's handling of actions, not cold decoding."""
    from env.demo import make_demo_data

    out = tmp_path_factory.mktemp("small_demo")
    make_demo_data(out, videos=1, seconds=12, seed=7, size=(320, 180))
    from env import load_tasks

    return load_tasks(out / "tasks.jsonl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random Qwen2.5-VL (tokenizer trained on the spot), made once per session."""
    from models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def short_demo_dir(tmp_path_factory):
    """Two short 320x180 demo videos for rollout tests (the engine, not decoding, is under test)."""
    from env.demo import make_demo_data

    out = tmp_path_factory.mktemp("short_demo")
    make_demo_data(out, videos=2, seconds=20, seed=5, size=(320, 180))
    return out


def _coldstart_sft(base, tmp_path_factory, name: str):
    """`base` after a short cold start: the digit family (8 videos of 12 s, seed 7), the four built-in tools,
    the oracle's 2-frame zooms, 60 steps of 2. Not the demo's flash cold start (300 steps, scripts/demo.sh):
    60 steps of that taught a model whose episodes in some recipes all scored the same, so every group
    was filtered and no step trained. No test needs the flash family's model."""
    import subprocess
    import sys

    from env.demo import make_demo_data

    root = tmp_path_factory.mktemp(name)
    make_demo_data(root / "coldstart", videos=8, seconds=12, seed=7)
    out = root / "model"
    subprocess.run([sys.executable, "-m", "weft_cli", "sft", "--model", str(base), "--data",
                    str(root / "coldstart"), "--config", "configs/demo.yaml", "--out", str(out),
                    "trainer.sft_eval_turns=0", "trainer.tensorboard=false", "trainer.sft_steps=60",
                    "trainer.sft_batch_size=2", "trainer.sft_episodes=16", "trainer.sft_no_tools_episodes=0",
                    "trainer.sft_zoom_frames=2", "env.tools=[temporal_zoom,spatial_zoom,temporal_search,get_frame]",
                    # Pinned: configs/demo.yaml's cold start is the flash demo's (after pretrain-vision).
                    "trainer.sft_lr=1e-3", "trainer.sft_answer_first_episodes=0", "trainer.sft_freeze_vision=false"],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    return out


@pytest.fixture(scope="session")
def seeing_model(tiny_model_dir, tmp_path_factory):
    """(model dir, summary): the session's tiny model after `weft pretrain-vision` at the demo's frame size,
    shortened (150 steps of 16 on 1200 captioned frames; the demo runs 300 on 2000)."""
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("seeing") / "model"
    run = subprocess.run([sys.executable, "-m", "weft_cli", "pretrain-vision", "--model", str(tiny_model_dir), "--out",
                          str(out), "--config", "configs/demo.yaml", "--steps", "150", "--examples", "1200",
                          "trainer.tensorboard=false"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    return out, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def sft_model_qwen3(tmp_path_factory):
    """A tiny random Qwen3-VL after the tests' cold start, as `sft_model` is for Qwen2.5-VL."""
    from models.tiny import make_tiny_model

    base = make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3") / "model", seed=0, family="qwen3_vl")
    return _coldstart_sft(base, tmp_path_factory, "sft_qwen3")


@pytest.fixture(scope="session")
def sft_model(tiny_model_dir, tmp_path_factory):
    """The tiny model after the tests' cold start (`_coldstart_sft`): it writes real tool calls and answers,
    so its episodes have observation frames and rewards that differ within a group. Made once per
    session for every test that needs a model that acts (agent loop, eval, replay, recipes, train.py);
    they offer it the four tools it was taught."""
    return _coldstart_sft(tiny_model_dir, tmp_path_factory, "sft")
