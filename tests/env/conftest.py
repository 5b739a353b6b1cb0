"""Demo data for env tests: real H.264 videos encoded once per test session."""

from __future__ import annotations

import pytest

from env import load_tasks


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from env.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, videos=6, seconds=40, seed=123)
    return out


@pytest.fixture(scope="session")
def demo_tasks(demo_dir):
    return load_tasks(demo_dir / "tasks.jsonl")
