"""`weft view`: a run dir of real oracle episodes rendered to HTML, and that page rendered by headless Chromium.

The trajectories come from real episodes (OraclePolicy with the demo perception through
VideoToolEnv on real H.264 demo videos), so their FrameRefs, turn texts, observation texts
and reward terms are what the env produces. Their token arrays are one placeholder token:
the viewer reads no tokens, and building real ones needs a tokenizer (actors/scripted_engine.py's
`scripted_trajectories` does that through the agent loop; tests/learner/test_sft.py covers it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import WeftConfig, to_yaml
from env import load_tasks
from env.rewards import POINT_HALF_WIDTH_S
from env.view import (EVIDENCE_COLOUR, ZOOM_COLOUR, highlight_turn, load_view, nice_step, render_page, write_view,
                      zoom_windows)
from protos.codec import write_trajectories
from protos.records import FrameRef, Status, Trajectory

ROOT = Path(__file__).resolve().parents[2]


def episode_trajectory(env, task, policy, traj_id: str) -> Trajectory:
    """One scripted episode as a Trajectory with the agent loop's media and metadata (tokens: a placeholder)."""
    obs, info = env.reset(task)
    policy.begin(task, obs, info)
    media, texts, obs_texts = [f.ref for f in obs.frames], [], []
    reward, terms, status = 0.0, {}, Status.TRUNCATED
    while True:
        action = policy.act(obs, info)
        texts.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        obs_texts.append(obs.text)
        terms = info.get("reward_terms", terms)
        media += [f.ref for f in obs.frames]
        if terminated or truncated:
            status = Status.COMPLETED if terminated else Status.TRUNCATED
            break
    one = np.zeros(1)
    return Trajectory(one, one, one, one - 1, media=media, reward=float(reward), reward_terms=dict(terms),
                      status=status, group_id=f"g-{task.id}", task_id=task.id, traj_id=traj_id,
                      metrics={"turns": float(len(texts)), "frames": float(info["frames_returned"])},
                      metadata={"turn_texts": texts, "observation_texts": obs_texts, "answer": info.get("answer")})


def make_run_dir(root: Path, tasks_path: Path, trajs: list[Trajectory], step: int = 10) -> Path:
    """config.yaml (data.path = the tasks) + trajectories/step_NNNNNN.msgpack, as the trainer writes them."""
    cfg = WeftConfig()
    cfg.data = dataclasses.replace(cfg.data, path=str(tasks_path))
    (root / "trajectories").mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    if trajs:
        write_trajectories(root / "trajectories" / f"step_{step:06d}.msgpack", trajs)
    rows = [{"step": s, "reward_mean": 0.1 * s} for s in range(1, 6)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def oracle_run(short_demo_dir, tmp_path_factory):
    from env.demo import demo_perception
    from env.env import VideoToolEnv
    from env.testing import OraclePolicy

    tasks_path = short_demo_dir / "tasks.jsonl"
    tasks = load_tasks(tasks_path)
    env, (locate, read) = VideoToolEnv(), demo_perception()
    trajs = [episode_trajectory(env, t, OraclePolicy(locate, read, seed=i), f"oracle-{i}") for i, t in enumerate(tasks)]
    return make_run_dir(tmp_path_factory.mktemp("run"), tasks_path, trajs), tasks, trajs


def _weft(*args: str) -> subprocess.CompletedProcess:
    exe = ROOT / ".venv" / "bin" / "weft"
    cmd = [str(exe)] if exe.exists() else [sys.executable, str(ROOT / "weft_cli.py")]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, cwd=ROOT)


# ------------------------------------------------------------------ units


def test_hostile_turn_text_is_escaped(oracle_run, tmp_path):
    run, tasks, trajs = oracle_run
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>' \
              '<tool_call>{"name": "get_frame", "arguments": {"time": 1}}</tool_call></pre><script>'
    assert "<script>" not in highlight_turn(hostile)
    assert '<span class="call">&lt;tool_call&gt;' in highlight_turn(hostile)
    t = dataclasses.replace(trajs[0], task_id=trajs[0].task_id, traj_id="<script>id</script>",
                            metadata={**trajs[0].metadata, "turn_texts": [hostile], "answer": "<script>a</script>",
                                      "observation_texts": ["</pre><script>obs</script>"]})
    view = load_view(run)
    view.trajectories = [t]
    page = render_page(view)
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert page.count("&lt;script&gt;") >= 4


def test_missing_video_shows_placeholder(oracle_run, tmp_path):
    run, tasks, trajs = oracle_run
    gone = str(tmp_path / "gone.mp4")
    bad = dataclasses.replace(trajs[0], task_id="unknown-task",
                              media=[FrameRef(gone, 3, 0.3, size=(160, 90), content_hash="00")] + trajs[0].media[:1])
    wrong_hash = dataclasses.replace(trajs[1], media=[dataclasses.replace(trajs[1].media[0], content_hash="ff" * 16)])
    view = load_view(run)
    failed = Trajectory.failed("VideoCorrupt: <moov atom not found>", task_id=tasks[0].id, traj_id="f")
    view.trajectories = [bad, wrong_hash, failed]
    page = render_page(view)
    assert "frame unavailable" in page and "VideoNotFound" in page
    assert "VideoCorrupt: &lt;moov atom not found&gt;" in page and "no model turns recorded" in page
    assert "task not found" in page
    assert page.count("data:image/jpeg;base64,") == 2  # the good frame of `bad` and the mismatched one, flagged
    assert "hash mismatch" in page
    assert view.problems["frame_unreadable"] == 1 and view.problems["frame_hash_mismatch"] == 1


def test_no_trajectories_says_so(tmp_path, short_demo_dir):
    run = make_run_dir(tmp_path / "run", short_demo_dir / "tasks.jsonl", [])
    summary = write_view(run, tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert summary["trajectories"] == 0
    assert 'id="empty"' in page and "has no step_*.msgpack files" in page


def test_zoom_windows_follow_the_parser_and_validation():
    texts = ['<tool_call>{"name": "temporal_zoom", "arguments": {"start": 2, "end": 6, "num_frames": 4}}</tool_call>'
             '<tool_call>{"name": "get_frame", "arguments": {"time": 10}}</tool_call>',
             '<tool_call>{"name": "temporal_zoom", "arguments": {"start": 15, "end": 99, "num_frames": 4}}</tool_call>',
             "<answer>B</answer>"]
    from protos.records import Trajectory

    old = Trajectory([], [], [], [], metadata={"turn_texts": texts})  # recorded before tools reported windows
    z = zoom_windows(old, duration=20.0)
    assert [(w.turn, w.name, w.start) for w in z] == [(1, "temporal_zoom", 2.0), (1, "get_frame", 10.0 - POINT_HALF_WIDTH_S),
                                                      (2, "temporal_zoom", 15.0)]
    assert z[0].end == 6.0 and not z[0].error and not z[1].error and z[2].error  # 99 s is past the end
    # Since then the env records every call with its window and label, a user's tool's too.
    new = Trajectory([], [], [], [], metadata={"turn_texts": texts, "tool_calls": [
        {"turn": 1, "name": "crop_video", "arguments": {}, "ok": True, "error": "", "label": "crop 3-7s", "window": [3, 7]},
        {"turn": 2, "name": "crop_video", "arguments": {}, "ok": False, "error": "too long", "label": "", "window": None}]})
    assert [(w.turn, w.name, w.start, w.end, w.error) for w in zoom_windows(new, 20.0)] == [(1, "crop 3-7s", 3.0, 7.0, "")]
    assert nice_step(20.0) == 2.0 and nice_step(3600.0) == 300.0


def test_cli_writes_a_self_contained_page(oracle_run, tmp_path):
    run, tasks, trajs = oracle_run
    r = _weft("view", str(run), "--out", str(tmp_path / "page.html"), "--max", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["trajectories"] == 1 and summary["total"] == len(trajs) and summary["step"] == 10
    assert summary["problems"] == {}, summary
    page = (tmp_path / "page.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("data:image/jpeg;base64,") == len(trajs[0].media)
    assert page.count('class="call"') >= 2 and "tool response" in page and "reward/accuracy" in page
    assert _weft("view", str(tmp_path / "nope"), "--out", str(tmp_path / "x.html")).returncode == 2


# ------------------------------------------------------------------ headless Chromium


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (scripts/install.sh installs it where apt-get is available)")
    return exe


def _screenshot(exe: str, page: Path, png: Path) -> np.ndarray:
    from PIL import Image

    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", "--hide-scrollbars", "--force-color-profile=srgb",
           f"--screenshot={png}", "--window-size=1400,1800", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def _pixels_of(img: np.ndarray, hex_colour: str, tol: int = 6) -> np.ndarray:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return np.all(np.abs(img - rgb) <= tol, axis=-1)


def test_chromium_renders_the_timeline(oracle_run, tmp_path):
    exe = _chromium()
    run, tasks, trajs = oracle_run
    page = tmp_path / "page.html"
    assert _weft("view", str(run), "--out", str(page)).returncode == 0
    img = _screenshot(exe, page, tmp_path / "page.png")
    evidence, zoom = _pixels_of(img, EVIDENCE_COLOUR), _pixels_of(img, ZOOM_COLOUR)
    # Timeline: 810 px for the video; the first task's evidence band is 16 px tall and its
    # zoom band (the oracle zooms into the evidence) 12 px; legend swatches are 100 px each.
    ev = tasks[0].evidence[0]
    want_ev = 810 * (ev[1] - ev[0]) / 20.0 * 16
    assert evidence.sum() > 0.6 * want_ev + 100, (evidence.sum(), want_ev)
    assert zoom.sum() > 0.6 * want_ev * 12 / 16 + 100, zoom.sum()
    # The evidence band sits on the zoom band's rows' x range: both cover the evidence seconds.
    ev_cols, zoom_cols = np.flatnonzero(evidence.sum(0) >= 10), np.flatnonzero(zoom.sum(0) >= 8)
    assert len(ev_cols) and len(np.intersect1d(ev_cols, zoom_cols)) > 0.5 * len(ev_cols)

    empty = make_run_dir(tmp_path / "empty", run / "x.jsonl", [])
    assert _weft("view", str(empty), "--out", str(tmp_path / "empty.html")).returncode == 0
    blank = _screenshot(exe, tmp_path / "empty.html", tmp_path / "empty.png")
    assert _pixels_of(blank, EVIDENCE_COLOUR).sum() == 0 and _pixels_of(blank, ZOOM_COLOUR).sum() == 0
