"""Fixtures of the trainer, checkpoint and SFT tests: a tiny Qwen2.5-VL, demo videos, real GRPO groups.

Groups are played by scripted policies in the real env (oracle and blind alternate
in a group, so rewards differ) and rendered through the chat template exactly as
the agent loop renders episodes; images travel as FrameRefs only, so the trainer
re-decodes them from the videos.
"""

from __future__ import annotations

import pytest

# Short episodes: one small overview frame, small zooms and crops (a few image tokens each).
SMALL_EPISODES = ["env.overview_frames=2", "env.overview_size=[112,64]", "env.zoom_size=[112,64]",
                  "env.crop_size=[56,56]", "trainer.sft_zoom_frames=2", "trainer.resume=never",
                  "trainer.dtype=float32", "trainer.tensorboard=false"]


@pytest.fixture(scope="session")
def small_overrides():
    """The config overrides of short episodes (for tests that build their own command line)."""
    return list(SMALL_EPISODES)


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="session")
def demo_tasks(tmp_path_factory):
    from env.demo import make_demo_data
    from env.tasks import load_tasks

    out = tmp_path_factory.mktemp("demo")
    return load_tasks(make_demo_data(out, videos=6, seconds=8, seed=11, size=(320, 180)))


@pytest.fixture
def make_cfg(tmp_path):
    """cfg(*overrides) -> a WeftConfig for short episodes, its run_dir in this test's tmp dir."""
    from configs import load_config

    def make(*overrides: str, run_dir=None):
        return load_config(overrides=[*SMALL_EPISODES, f"trainer.run_dir={run_dir or tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from models.hf import load_processor

    return load_processor(tiny_dir)


@pytest.fixture(scope="session")
def make_groups(processor, demo_tasks):
    """groups(n_groups, group_size, seed) -> real groups (oracle/blind alternating), FrameRefs only."""
    from configs import load_config
    from env.demo import demo_perception
    from env.testing import BlindPolicy, OraclePolicy
    from actors.scripted_engine import scripted_trajectories
    from protos.records import Group

    cfg = load_config(overrides=SMALL_EPISODES)
    locate, read = demo_perception()

    def policy(i: int):
        return OraclePolicy(locate, read, zoom_frames=2, seed=i) if i % 2 == 0 else BlindPolicy(seed=i)

    def make(n_groups: int = 2, group_size: int = 4, seed: int = 0):
        groups = []
        for g in range(n_groups):
            task = demo_tasks[(seed + g) % len(demo_tasks)]
            gid = f"g{seed}-{g}"
            trajs = scripted_trajectories([task], processor, cfg, group_size, make_policy=policy,
                                          seed=1000 * seed + g)
            for k, t in enumerate(trajs):
                t.group_id, t.traj_id = gid, f"{gid}/{k}"
            groups.append(Group(gid, task.id, trajs))
        return groups

    return make


@pytest.fixture(scope="session")
def largest_tensor():
    """A dispatch mode that records the most elements of any tensor an op returns (forward and
    backward): how the kernel tests prove no [N, V] logits tensor is ever built."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    return LargestTensor
