"""Checkpoints: a learner killed after a checkpoint and restarted resumes at the same step, version,
weights, optimizer state, RNG and buffer (seen-set included), and its next step equals the
uninterrupted run's; a save killed half-way leaves the previous checkpoint in use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch


def _server(cfg):
    from learner.server import LearnerServer

    return LearnerServer(cfg.learner)  # not started: the trainer restores its state before it serves


def _flat_optimizer_state(opt):
    sd = opt.state_dict()
    return {(i, k): v for i, st in sd["state"].items() for k, v in st.items()}


def test_kill_and_resume_continues_exactly(tiny_dir, make_cfg, make_groups, tmp_path):
    from learner.checkpoint import latest_checkpoint
    from learner.trainer import Trainer
    from protos import learner_pb2 as pb

    run_dir = tmp_path / "run"
    overrides = ("trainer.lr=1e-3", "trainer.checkpoint_every=2", "learner.group_size=4", "learner.buffer_capacity=8",
                 "trainer.groups_per_step=1", "learner.max_staleness=8", "trainer.tensorboard=true")
    cfg = make_cfg(*overrides, "trainer.resume=auto", run_dir=run_dir)
    groups = make_groups(3, 4, seed=7)  # one group per step

    # The uninterrupted run: three steps, a checkpoint after the second.
    server_a = _server(cfg)
    for g in groups:
        assert server_a.buffer.put(g, 0).kind == pb.ACCEPTED
    a = Trainer(cfg, tiny_dir, server=server_a)
    assert a.resumed_from is None
    for _ in range(2):
        a.train_step(server_a.get_batch(1, timeout=1))
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step_00000002"
    weights_2 = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    optim_2 = {k: v.clone() if torch.is_tensor(v) else v for k, v in _flat_optimizer_state(a.optimizer).items()}
    rng_after_save = torch.rand(4)
    m3 = a.train_step(server_a.get_batch(1, timeout=1))
    weights_3 = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    a.close()

    # "Kill": the process dies after step 3 but before its checkpoint; step 3's metric line was written.
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    server_b = _server(cfg)
    b = Trainer(cfg, tiny_dir, server=server_b)
    # Step 2's weights, but not version 2: the lost learner had published version 3 (rollout workers may
    # hold those weights), so the resumed one continues above it and no version names two weight sets.
    assert b.resumed_from == ckpt and b.step == 2 and b.version == 4 and server_b.version == 4
    for n, p in b.model.named_parameters():
        assert torch.equal(p.detach(), weights_2[n]), n
    optim_b = _flat_optimizer_state(b.optimizer)
    assert optim_b.keys() == optim_2.keys()
    for k, v in optim_2.items():
        assert torch.equal(optim_b[k], v) if torch.is_tensor(v) else optim_b[k] == v, k
    assert torch.equal(torch.rand(4), rng_after_save)
    # Exactly-once: a group accepted before the checkpoint is a duplicate; the one waiting is still there.
    assert server_b.buffer.put(groups[0], b.version).kind == pb.DUPLICATE
    assert len(server_b.buffer) == 1
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    m3b = b.train_step(server_b.get_batch(1, timeout=1))
    assert abs(m3b["loss"] - m3["loss"]) < 1e-6 and abs(m3b["grad_norm"] - m3["grad_norm"]) < 1e-6
    for n, p in b.model.named_parameters():
        torch.testing.assert_close(p.detach(), weights_3[n], rtol=0, atol=1e-6)
    assert b.step == 3 and b.version == 5
    b.close()


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tiny_dir, make_cfg, make_groups, tmp_path):
    from learner.checkpoint import latest_checkpoint, list_checkpoints, resolve_resume
    from learner.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = make_cfg("trainer.lr=1e-3", "trainer.keep_checkpoints=2", run_dir=run_dir)
    t = Trainer(cfg, tiny_dir, log_metrics=False)
    groups = make_groups(1, 4, seed=3)
    paths = []
    for _ in range(3):
        t.train_step(groups)
        paths.append(t.save())
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002", "step_00000003"]  # keep=2
    good = paths[-1]
    # A kill during the next save: its temp dir is half-written, and (worse) a final-named dir without meta.
    half = good.parent / ".tmp-step_00000004-999"
    shutil.copytree(good / "model", half / "model")
    broken = good.parent / "step_00000005"
    (broken / "model").mkdir(parents=True)
    assert latest_checkpoint(run_dir) == good
    assert resolve_resume("auto", run_dir) == good
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(broken), run_dir)
    resumed = Trainer(make_cfg("trainer.resume=auto", run_dir=run_dir), tiny_dir, log_metrics=False)
    assert resumed.step == 3 and resumed.version == 3
    resumed.train_step(groups)
    resumed.save()
    assert not half.exists()  # leftovers of the killed save are cleaned up by the next one
    assert resolve_resume("never", run_dir) is None


def test_weft_learner_killed_and_restarted_resumes_at_the_same_step(tiny_dir, make_groups, small_overrides, tmp_path):
    """The `weft learner` process: SIGKILL after its second checkpoint, restart, same step and version,
    no group trained twice; SIGTERM saves a last checkpoint and exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from actors.learner_client import LearnerClient
    from learner.checkpoint import latest_checkpoint
    from protos import learner_pb2 as pb

    root = Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "run"
    code = ("import argparse, sys; from learner.trainer import main_learner; from weft_cli import add_learner_args; "
            "sys.exit(main_learner(add_learner_args(argparse.ArgumentParser()).parse_args(sys.argv[1:])))")
    overrides = [o for o in small_overrides if not o.startswith("trainer.resume")] + [
        "trainer.lr=1e-3", "trainer.groups_per_step=1", "learner.group_size=4", "trainer.checkpoint_every=1",
        "trainer.batch_timeout_s=0.5", "rollout.dtype=float32"]

    def start():
        proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(tiny_dir), "--port", "0", "--run-dir",
                                 str(run_dir), *overrides], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline()
        assert line.startswith("learner listening on "), (line, proc.stderr.read()[-3000:] if proc.poll() else "")
        address = line.split()[3]
        step = int(line.split("step ")[1].rstrip(")\n"))
        return proc, address, step

    def wait_for(pred, what, timeout=120):
        t0 = time.monotonic()
        while not pred():
            assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
            time.sleep(0.2)

    groups = make_groups(3, 4, seed=21)
    proc, address, step = start()
    try:
        assert step == 0
        with LearnerClient(address) as client:
            assert [a.kind for a in client.submit(groups[:2])] == [pb.ACCEPTED] * 2
            wait_for(lambda: client.status().version == 2, "version 2")
        wait_for(lambda: (latest_checkpoint(run_dir) or Path("x")).name == "step_00000002", "checkpoint 2")
        os.kill(proc.pid, signal.SIGKILL)  # no chance to save anything more
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, address, step = start()
    try:
        assert step == 2
        with LearnerClient(address) as client:
            status = client.status()
            assert status.version == 2 and status.step == 2
            # Exactly-once across the restart: the groups trained before the kill are duplicates now.
            acks = client.submit(groups)
            assert [a.kind for a in acks] == [pb.DUPLICATE, pb.DUPLICATE, pb.ACCEPTED]
            wait_for(lambda: client.status().version == 3, "version 3")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert latest_checkpoint(run_dir).name == "step_00000003"
