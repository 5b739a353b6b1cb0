"""The seed papers' recipes (configs/recipes/*.yaml, recipes/*.py): reward tables computed by hand, the
recipe tools against real decoded video, the episode-shape knobs, the sub-agent protocol, and every
recipe's env under `weft check-env --policy random`. Each recipe, and a user's own tool and reward named
in config, trains for real under train.py (Ray, vLLM), two runs at a time in one module fixture."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import load_config
from env.testing import call
from env.tool import ToolOutput
from env.types import Episode, Task, ToolCallRecord
from learner.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["videozoomer", "video_o3", "paravt", "weaver", "deepeyes"]
MC = Task("t", "v.mp4", "what colour?", "B", options=["red", "blue", "green", "pink"], evidence=[(10.0, 14.0)])
OPEN = Task("o", "v.mp4", "what colour?", "blue")

THINK = "<think>look</think>"
ZOOM = call("video_zoom", segment=[10.0, 14.0], fps=2)
ANSWER_B = f"{THINK}<answer>B</answer>"


def rec(turn: int, name: str, ok: bool = True, window=(10.0, 14.0)) -> ToolCallRecord:
    return ToolCallRecord(turn, name, {}, ok, output=ToolOutput("x", window=window) if ok else None,
                          error="" if ok else "refused")


def ep(texts, answer, calls=(), format_errors=0) -> Episode:
    return Episode(answer=answer, tool_calls=list(calls), turns=len(texts), format_errors=format_errors,
                   status="COMPLETED" if answer is not None else "TRUNCATED", frames_returned=0, duration=60.0,
                   texts=list(texts))


# ------------------------------------------------------------------ reward tables (hand-computed)


@pytest.mark.parametrize("texts,answer,want", [
    ([f"{THINK}{ZOOM}", ANSWER_B], "B", {"accuracy": 1.0, "format": 1.0}),
    ([ANSWER_B], "B", {"accuracy": 1.0, "format": 1.0}),                  # one turn: just the answer
    ([f"{THINK}{ZOOM}", "<answer>B</answer>"], "B", {"accuracy": 1.0, "format": 0.0}),  # last turn lacks <think>
    ([ZOOM, ANSWER_B], "B", {"accuracy": 1.0, "format": 0.0}),            # a tool turn without <think>
    ([f"{THINK}{ZOOM}{ZOOM}", ANSWER_B], "B", {"accuracy": 1.0, "format": 0.0}),  # two zooms in one turn
    ([f"{THINK}{ZOOM}", f"{THINK}<answer>A</answer>"], "A", {"accuracy": 0.0, "format": 1.0}),
    ([f"{THINK}{ZOOM}"], None, {"accuracy": 0.0, "format": 0.0}),         # never answered
])
def test_videozoomer_reward_table(texts, answer, want):
    from recipes.videozoomer import videozoomer_reward

    assert videozoomer_reward(ep(texts, answer), MC) == want


G = call("grounding", temporal_segment=[10.0, 14.0], sampling_strategy="fine")


@pytest.mark.parametrize("texts,answer,calls,task,want", [
    # right, clean, windows exactly the clue: g = 1, R_tool = (1 + 1) / 2 = 1
    ([f"{THINK}{G}", ANSWER_B], "B", [rec(1, "grounding")], MC, {"accuracy": 1.0, "format": 1.0, "tool": 1.0}),
    # window [8, 12] vs clue [10, 14]: I = 2, U = 6, IoU = 1/3, IoP = IoG = 1/2 -> g = (2/3 + 1) / 4 = 5/12
    ([f"{THINK}{G}", ANSWER_B], "B", [rec(1, "grounding", window=(8.0, 12.0))], MC,
     {"accuracy": 1.0, "format": 1.0, "tool": (5 / 12 + 1) / 2}),
    # no tool used on a task with clues: no R_tool
    ([ANSWER_B], "B", [], MC, {"accuracy": 1.0, "format": 1.0, "tool": 0.0}),
    # one refused call in 3 turns: format 1 - 1/3, so no R_tool
    ([f"{THINK}{G}", f"{THINK}{G}", ANSWER_B], "B", [rec(1, "grounding"), rec(2, "grounding", ok=False)], MC,
     {"accuracy": 1.0, "format": 2 / 3, "tool": 0.0}),
    # wrong answer: no R_tool
    ([f"{THINK}{G}", f"{THINK}<answer>A</answer>"], "A", [rec(1, "grounding")], MC,
     {"accuracy": 0.0, "format": 1.0, "tool": 0.0}),
    # a task without clue spans: s = 1 - 2 * 0.05 * calls, g = 0.5 -> 0.9 * 1.5 / 2 = 0.675 after one call
    ([f"{THINK}{G}", f"{THINK}<answer>blue</answer>"], "blue", [rec(1, "grounding")], OPEN,
     {"accuracy": 1.0, "format": 1.0, "tool": 0.9 * 0.75}),
    ([f"{THINK}<answer>blue</answer>"], "blue", [], OPEN, {"accuracy": 1.0, "format": 1.0, "tool": 0.75}),
])
def test_video_o3_reward_table(texts, answer, calls, task, want):
    from recipes.video_o3 import video_o3_reward

    got = video_o3_reward(ep(texts, answer, calls), task)
    assert got == pytest.approx(want, abs=1e-12)


CROP = call("crop_video", start_time=10.0, end_time=14.0)


@pytest.mark.parametrize("texts,answer,calls,want", [
    # think 0.2 + <answer> 0.3 + </answer> 0.2 + anchor 0.5 * (0.4 + 0.3) + think-before-tool 0.3 = 1.35,
    # + balanced 0.1, capped at 1; tool: executed 0.3 + right 0.5
    ([f"<think>\nlook at the clip</think>{CROP}", "<think>\nso it is blue</think><answer>B</answer>"], "B",
     [rec(1, "crop_video")], {"accuracy": 1.0, "format": 1.0, "tool": 0.8}),
    # no think, no tool: <answer> 0.3 + </answer> 0.2 + balanced 0.1 = 0.6; tool 0
    (["<answer>B</answer>"], "B", [], {"accuracy": 1.0, "format": 0.6, "tool": 0.0}),
    # a think under 10 characters is not a think: 0.5 + balanced 0.1, no anchor credit
    (["<think>ok</think><answer>B</answer>"], "B", [], {"accuracy": 1.0, "format": 0.6, "tool": 0.0}),
    # an open think then a call, no answer: think 0.2 + anchor 0.5 * -0.3 + think-before-tool 0.3 = 0.35,
    # tags unbalanced; the call parses but was refused: 0.1, and the answer is not right: no +0.5
    (["<think>\nhmm, let me look closer " + CROP], None, [rec(1, "crop_video", ok=False)],
     {"accuracy": 0.0, "format": 0.35, "tool": 0.1}),
])
def test_paravt_reward_table(texts, answer, calls, want):
    from recipes.paravt import paravt_reward

    assert paravt_reward(ep(texts, answer, calls), MC) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("answer,calls,errors,want", [
    ("B", [rec(1, "temporal_zoom")], 0, {"accuracy": 1.0, "format": 1.0, "tool": 1.0}),   # 0.7 + 0.2 + 0.1 = 1.0
    ("B", [], 0, {"accuracy": 1.0, "format": 1.0, "tool": 0.0}),
    ("A", [rec(1, "temporal_zoom")], 0, {"accuracy": 0.0, "format": 1.0, "tool": 0.0}),   # tool gated on right
    ("B", [rec(1, "temporal_zoom")], 1, {"accuracy": 1.0, "format": 0.0, "tool": 1.0}),
    (None, [rec(1, "temporal_zoom")], 0, {"accuracy": 0.0, "format": 0.0, "tool": 0.0}),
])
def test_weaver_reward_table(answer, calls, errors, want):
    from configs.schema import RewardConfig
    from env.rewards import weigh
    from recipes.weaver import weaver_reward

    terms = weaver_reward(ep([f"<answer>{answer}</answer>"], answer, calls, errors), MC)
    assert terms == want
    cfg = load_config(ROOT / "configs/recipes/weaver.yaml")
    total, _ = weigh(terms, cfg.reward.weights)
    assert total == pytest.approx(0.7 * want["accuracy"] + 0.2 * want["format"] + 0.1 * want["tool"])
    assert isinstance(cfg.reward, RewardConfig)


@pytest.mark.parametrize("texts,answer,calls,errors,want_total", [
    ([ANSWER_B], "B", [rec(1, "spatial_zoom")], 0, 0.8 + 0.0 + 1.2),      # right, clean, zoomed: 2.0
    ([ANSWER_B], "B", [], 0, 0.8),                                         # right without a zoom
    ([ANSWER_B], "A", [rec(1, "spatial_zoom")], 0, 0.0),                   # wrong: no tool credit
    (["<think>x<answer>B</answer>"], "B", [rec(1, "spatial_zoom")], 0, 0.8 - 0.2 + 1.2),  # unclosed think: -1 format
    ([ANSWER_B], None, [], 0, -0.2),                                       # no answer: a format error
])
def test_deepeyes_reward_table(texts, answer, calls, errors, want_total):
    from env.rewards import weigh
    from recipes.deepeyes import deepeyes_reward

    cfg = load_config(ROOT / "configs/recipes/deepeyes.yaml")
    total, _ = weigh(deepeyes_reward(ep(texts, answer, calls, errors), MC), cfg.reward.weights)
    assert total == pytest.approx(want_total, abs=1e-12)


def test_judge_hook_falls_back_and_counts_when_the_judge_is_unreachable():
    """A judge that cannot be reached never fails the episode: the rule match is used, and counted."""
    from env.env import COUNTERS
    from recipes.common import accuracy

    before = COUNTERS["judge_error"]
    e = ep(["<answer>blue</answer>"], "blue")
    assert accuracy(e, OPEN, judge_url="http://127.0.0.1:9/v1", judge_timeout_s=2.0) == 1.0
    assert accuracy(ep(["<answer>red</answer>"], "red"), OPEN, judge_url="http://127.0.0.1:9/v1",
                    judge_timeout_s=2.0) == 0.0
    assert COUNTERS["judge_error"] == before + 2
    assert accuracy(e, MC, judge_url="http://127.0.0.1:9/v1") == 1.0  # "blue" is option B
    assert COUNTERS["judge_error"] == before + 2  # multiple choice is matched by rule, never judged


# ------------------------------------------------------------------ tools and episode shape (real video)


def _env(recipe: str, *overrides: str):
    from env import LocalEnv

    cfg = load_config(ROOT / f"configs/recipes/{recipe}.yaml", list(overrides))
    return LocalEnv(cfg.env, cfg.reward), cfg


def _run(coro):
    return asyncio.run(coro)


def test_video_zoom_returns_fps_times_span_frames_and_refuses_more_than_16(demo_tasks):
    env, _ = _env("videozoomer", "env.max_turns=4")
    task = demo_tasks[0]

    async def go():
        slot = env.episode("vz")
        obs, info = await slot.reset(task)
        assert len(obs.frames) == max(1, min(64, round(info["duration"] * 0.5)))  # the 0.5 fps overview
        obs, _, _, _, info = await slot.step(f"{THINK}{call('video_zoom', segment=[2.0, 5.0], fps=2)}")
        ok = info["calls"][0]
        assert ok["ok"] and len(obs.frames) == 6 and ok["window"] == [2.0, 5.0]
        obs, _, _, _, info = await slot.step(f"{THINK}{call('video_zoom', segment=[0.0, 9.0], fps=2)}")
        assert not info["calls"][0]["ok"] and "at most 16" in info["calls"][0]["error"] and not obs.frames
        await slot.close()

    _run(go())


def test_last_turn_has_no_tools_and_says_so(demo_tasks):
    env, _ = _env("videozoomer", "env.max_turns=2")

    async def go():
        slot = env.episode("last")
        await slot.reset(demo_tasks[0])
        obs, _, _, _, info = await slot.step(f"{THINK}{call('video_zoom', segment=[2.0, 5.0], fps=1)}")
        assert info["calls"][0]["ok"] and "last turn: the tools are off" in obs.text
        obs, _, term, trunc, info = await slot.step(f"{THINK}{call('video_zoom', segment=[2.0, 5.0], fps=1)}")
        assert trunc and not term and not obs.frames
        assert info["calls"][0]["ok"] is False and "tools are off on the last turn" in info["calls"][0]["error"]
        await slot.close()

    _run(go())


def test_grounding_shares_its_token_quota_between_2_fps_frames(demo_tasks):
    from recipes.video_o3 import PATCH_PX, plan

    assert plan({"temporal_segment": [0.0, 4.0], "sampling_strategy": "coarse"}) == (8, 128)
    assert plan({"temporal_segment": [0.0, 0.4], "sampling_strategy": "fine"}) == (1, 768)  # capped per frame
    assert plan({"temporal_segment": [0.0, 600.0], "sampling_strategy": "coarse"}) == (256, 4)  # the 4-token floor
    env, _ = _env("video_o3", "env.overview_frames=4")

    async def go():
        slot = env.episode("g")
        await slot.reset(demo_tasks[0])
        obs, _, _, _, info = await slot.step(f"{THINK}{call('grounding', temporal_segment=[1.0, 3.0], sampling_strategy='medium')}")
        assert info["calls"][0]["ok"] and len(obs.frames) == 4
        h, w = obs.frames[0].image.shape[:2]
        assert h * w <= 512 * PATCH_PX * PATCH_PX  # 2048 tokens / 4 frames, each at most 512 patches
        await slot.close()

    _run(go())


def test_crop_video_is_answered_by_the_sub_agent_or_says_there_is_none(demo_tasks):
    """Two crop_video calls in one turn: the step hands their frames (16 max, 1 fps) to the driver and
    waits; answered, the summaries become the calls' output; with no model (None) the observation says
    so and the calls count as not run. Neither costs the episode's frame budget."""
    env, _ = _env("paravt", "env.overview_choices=[4]")
    two = call("crop_video", start_time=0.0, end_time=20.0) + call("crop_video", start_time=2.0, end_time=5.0)

    async def go():
        slot = env.episode("p")
        await slot.reset(demo_tasks[0])
        obs, _, _, _, info = await slot.step(f"<think>\nx</think>{two}")
        asks = info["subagent"]
        assert [len(a["frames"]) for a in asks] == [16, 3] and all(a["max_tokens"] == 512 for a in asks)
        assert "waiting for the sub-agent" in obs.text and not obs.frames and info["frames_returned"] == 0
        obs = await slot.answer(["a red square moves", "a blue circle"])
        assert "a red square moves" in obs.text and "a blue circle" in obs.text
        obs, _, _, _, info = await slot.step(f"<think>\nx</think>{call('crop_video', start_time=1.0, end_time=3.0)}")
        obs = await slot.answer([None])
        assert "no model is at hand" in obs.text
        _, reward, term, _, info = await slot.step("<think>\nso</think><answer>B</answer>")
        assert term and info["tool_calls_ok"] == 2 and info["frames_returned"] == 0
        await slot.close()

    _run(go())


def test_eval_max_turns_gives_validation_its_own_turn_limit(demo_tasks):
    env, cfg = _env("video_o3", "env.overview_frames=2")
    assert cfg.env.max_turns == 6 and cfg.eval.max_turns == 12

    async def go():
        slot = env.episode("m")
        _, info = await slot.reset(demo_tasks[0], options={"max_turns": 12})
        for i in range(11):
            _, _, term, trunc, info = await slot.step("thinking")
            assert not (term or trunc), i
        _, _, term, trunc, info = await slot.step("thinking")
        assert trunc and info["turns"] == 12
        await slot.close()

    _run(go())
    from configs import eval_config

    assert eval_config(cfg).env.max_turns == 12


@pytest.mark.parametrize("recipe", RECIPES)
def test_check_env_random_policy_runs_every_recipe_without_a_crash(recipe, demo_dir, capsys):
    """`weft check-env --config configs/recipes/NAME.yaml --policy random` (the CLI's own entry point, in
    this process): every recipe's tools and reward run on real video with 0 crashes."""
    import weft_cli

    rc = weft_cli.main(["check-env", "--data", str(demo_dir), "--policy", "random", "--episodes", "6",
                        "--config", str(ROOT / f"configs/recipes/{recipe}.yaml")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["crashes"] == 0 and summary["episodes"] == 6, summary
    want = {"videozoomer": {"accuracy", "format"}}.get(recipe, {"accuracy", "format", "tool"})
    assert set(summary["reward_terms"]) == want, summary


# ------------------------------------------------------------------ the judge hook, served for real


@pytest.fixture(scope="module")
def judge_server(tiny_model_dir):
    """The tiny model behind vLLM's OpenAI-compatible server, as a judge would be served on the cluster
    (`vllm serve`; here `python -m vllm.entrypoints.openai.api_server`, with the torchvision shim on
    PYTHONPATH: models/shim.py)."""
    import os
    import socket
    import time
    import urllib.request

    from models.shim import _BOOT_DIR

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_BOOT_DIR, os.environ.get("PYTHONPATH", "")]),
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
                             "--enforce-eager", "--served-model-name", "tiny-judge",
                             "--limit-mm-per-prompt", '{"image": 0, "video": 0}'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"judge server did not come up: {proc.stderr.read()[-3000:]!r}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.vllm
def test_judge_hook_scores_open_ended_answers_through_a_served_model(judge_server):
    """Every recipe's reward takes judge_url: an open-ended answer is scored by the served model. The
    verdict is constrained to 1 or 0 (vLLM structured outputs), so even the random tiny judge's reply
    parses; the model is found from /models when not named."""
    from env.env import COUNTERS
    from recipes.judge import JUDGE_PROMPT, _post, judge_score
    from recipes.videozoomer import videozoomer_reward

    body = {"model": "tiny-judge", "max_tokens": 4, "temperature": 1.0,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(question="q", reference="a", prediction="b")}],
            "structured_outputs": {"choice": ["1", "0"]}}
    replies = {_post(f"{judge_server}/chat/completions", {**body, "seed": i}, 60)["choices"][0]["message"]["content"]
               for i in range(6)}
    assert replies <= {"1", "0"}, replies  # the server honoured the constraint: a random model, two strings
    before = dict(COUNTERS)
    got = [judge_score("what colour is the car?", "blue", p, url=judge_server, timeout_s=60) for p in ("blue", "red")]
    assert all(g in (0.0, 1.0) for g in got)
    assert COUNTERS["judge_calls"] == before.get("judge_calls", 0) + 2
    assert COUNTERS["judge_unparsed"] == before.get("judge_unparsed", 0)
    assert COUNTERS["judge_error"] == before.get("judge_error", 0)
    terms = videozoomer_reward(ep([f"{THINK}<answer>blue car</answer>"], "blue car"), OPEN, judge_url=judge_server)
    assert terms["accuracy"] in (0.0, 1.0) and COUNTERS["judge_calls"] == before.get("judge_calls", 0) + 3


# ------------------------------------------------------------------ each recipe trains for real (2 steps, Ray, vLLM)

# Sizes only: the tiny model on 2 CPU cores (devices, dtype, groups, tokens, frames, pixels, actors, steps).
SIZE = ["rollout.num_workers=1", "rollout.num_gpus=0", "learner.num_gpus=0", "rollout.dtype=float32",
        "rollout.group_size=4", "learner.group_size=4", "trainer.groups_per_step=1", "learner.buffer_capacity=4",
        "rollout.concurrent_groups=1", "trainer.total_steps=2", "trainer.checkpoint_every=0", "trainer.sample_every=1",
        "trainer.val_every=0", "trainer.gradient_checkpointing=false", "trainer.tensorboard=false",
        "rollout.max_tokens_per_turn=96", "rollout.max_generated_tokens=256", "rollout.max_context_tokens=4096",
        "rollout.max_model_len=4096", "rollout.kv_cache_gib=0.5", "env.num_actors=1", "env.overview_frames=4",
        "env.overview_size=[112,64]", "env.zoom_size=[112,64]", "env.crop_size=[56,56]",
        "env.max_pixels_per_frame=7168", "env.max_frames=8", "env.max_frames_per_call=4", "learner.num_cpus=0.25",
        "learner.max_staleness=0", "run.display=log", "data.val_path=null",  # synchronous: no group past the 2 steps
        # One group a batch: ParaVT's batches were zero-variance 14 of 16 times (12 in a row) in one suite
        # run, so the default cap of 20 would stop it now and then; a run stuck for good still fails.
        "trainer.max_skipped_batches=100"]
SIZE_OF = {"videozoomer": ["env.max_turns=2", "rollout.max_tokens_per_turn=64"],  # ... meets the last turn
           "paravt": ["env.overview_choices=[2,4]", "rollout.subagent_max_tokens=24", "env.max_turns=2"],
           **{r: ["env.max_turns=2", "rollout.max_tokens_per_turn=64"] for r in ("video_o3", "weaver", "deepeyes")}}


class CropVideoOracle:
    """A scripted ParaVT episode for the cold start: think, crop the evidence span, answer."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def begin(self, task, obs, info) -> None:
        self.task, self.turn = task, 0
        self.span = task.evidence[0] if task.evidence else (0.0, info["duration"] / 2)

    def act(self, obs, info) -> str:
        from env.testing import answer_text

        self.turn += 1
        if self.turn == 1:
            a, b = self.span
            return "<think>\nthe answer is brief: look at that moment</think>" + call(
                "crop_video", start_time=round(max(0.0, a - 1), 1), end_time=round(b + 1, 1))
        # Half the episodes answer wrong, so the SFT model's groups keep some reward variance for GRPO.
        options = self.task.options or [self.task.answer]
        right = options.index(self.task.answer) if self.task.answer in options else 0
        pick = options[right] if self.seed % 2 == 0 else options[(right + 1) % len(options)]
        return "<think>\nthe summary tells me which it is</think>" + answer_text(self.task, pick)


@pytest.fixture(scope="module")
def paravt_sft(tiny_model_dir, short_demo_dir, tmp_path_factory):
    """The tiny model taught ParaVT's action format on scripted crop_video episodes, so that its RL episodes
    call crop_video and the sub-agent runs (the demo's cold start teaches temporal_zoom instead)."""
    import torch

    from actors.scripted_engine import scripted_trajectories
    from env import load_tasks
    from learner.sft import SftModel, run_sft, to_samples

    cfg = load_config(ROOT / "configs/recipes/paravt.yaml",
                      SIZE + SIZE_OF["paravt"] + ["trainer.sft_lr=2e-3", "trainer.sft_batch_size=2"])
    torch.manual_seed(0)
    sm = SftModel(cfg, tiny_model_dir)
    tasks = load_tasks(short_demo_dir / "tasks.jsonl")
    trajs = scripted_trajectories(tasks, sm.processor, cfg, 6, make_policy=CropVideoOracle)
    run_sft(sm, to_samples(trajs, sm.processor, sm.image_token_id), 50, seed=0)
    out = tmp_path_factory.mktemp("paravt_sft") / "model"
    sm.model.save_pretrained(out)
    sm.processor.save_pretrained(out)
    return out


def _start(name: str, cmd: list[str], run_dir: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    import os
    import tempfile

    log = run_dir.parent / f"{name}.log"
    env = {**os.environ, **(env or {}), "RAY_TMPDIR": tempfile.mkdtemp(prefix="wtr", dir="/tmp"), "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "train.py", "--run-dir", str(run_dir), *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env), log


def _recipe_cmd(recipe: str, model: Path, data: Path) -> list[str]:
    return ["--config", f"configs/recipes/{recipe}.yaml", "--model", str(model), f"data.path={data / 'tasks.jsonl'}",
            *SIZE, *SIZE_OF[recipe]]


def _results(name: str, proc: subprocess.Popen, log: Path, run_dir: Path, steps: int) -> tuple[list[dict], list]:
    """(metrics rows, trajectories) of a finished run; it must have exited 0 after `steps` steps."""
    from protos.codec import read_trajectories

    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{name}: train.py did not finish; log tail:\n{log.read_text(errors='replace')[-4000:]}")
    assert rc == 0, f"{name}: train.py exited {rc}; log tail:\n{log.read_text(errors='replace')[-5000:]}"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in read_metrics(run_dir)][-1] == steps, rows
    trajs = [t for p in sorted((run_dir / "trajectories").iterdir()) for t in read_trajectories(p)]
    return rows, trajs


# ------------------------------------------------------------------ a user's plug-in, named in config

PLUGIN = '''
"""A user's tool and reward, outside weft's packages (written by tests/test_recipes.py)."""
import os

from env import Tool, ToolOutput
from env.rewards import match_answer

if os.environ.get("WEFT_PLUGIN_LOG"):  # the test reads which processes imported this module
    with open(os.environ["WEFT_PLUGIN_LOG"], "a") as f, open("/proc/self/cmdline", "rb") as c:
        f.write(c.read().replace(b"\\0", b" ").decode(errors="replace") + "\\n")


def _run(video, args):
    n = args["num_frames"]
    times = [args["start"] + (args["end"] - args["start"]) * (i + 0.5) / n for i in range(n)]
    frames, _ = video.get_frames(times, size=(112, 64))
    return ToolOutput(f"[plugin zoom] {len(frames)} frame(s):", frames, (args["start"], args["end"]))


def _check(args, duration):
    if args["end"] > duration + 1.0:
        return f"end is past the video ({duration:.1f} s)"
    args["end"] = min(args["end"], duration)
    return None if args["start"] < args["end"] else "end must be greater than start"


ZOOM = Tool("temporal_zoom", "Frames sampled in [start, end] seconds (a plugin's own zoom).",
            {"type": "object", "additionalProperties": False, "required": ["start", "end", "num_frames"],
             "properties": {"start": {"type": "number", "minimum": 0}, "end": {"type": "number", "minimum": 0},
                            "num_frames": {"type": "integer", "minimum": 1, "maximum": 4}}},
            run=_run, check=_check, frame_cost=lambda a: a["num_frames"], label=lambda a: "plugin zoom")


def reward(episode, task):
    plugin = sum(c.ok and c.output.text.startswith("[plugin zoom]") for c in episode.tool_calls)
    return {"right": float(match_answer(episode.answer, task.answer, task.options)), "plugin_zoom": float(plugin),
            "clean": -0.5 * episode.format_errors}
'''


# The plug-in run: the module on PYTHONPATH, named in config; the demo's sizes, 3 steps, validation on a
# held-out set before training, every 2 steps and at the last.
PLUG = ["env.tools=[my_plugin:ZOOM,spatial_zoom,temporal_search,get_frame]", "reward.fn=my_plugin:reward",
        "reward.weights={right: 1.0, plugin_zoom: 0.1, clean: 1.0}"]


def plugin_env(root: Path) -> dict:
    """PYTHONPATH with the user's module (written under root/plugins), and where the module logs its importers."""
    import os

    (root / "plugins").mkdir(parents=True, exist_ok=True)
    (root / "plugins" / "my_plugin.py").write_text(PLUGIN)
    return {"PYTHONPATH": os.pathsep.join([str(root / "plugins"), os.environ.get("PYTHONPATH", "")]),
            "WEFT_PLUGIN_LOG": str(root / "plugin_imports.txt")}


def _plugin_cmd(model: Path, data: Path, val: Path) -> list[str]:
    return ["--config", "configs/demo.yaml", "--model", str(model), f"data.path={data / 'tasks.jsonl'}",
            f"data.val_path={val / 'tasks.jsonl'}", "trainer.val_every=2", "trainer.val_before_train=true",
            "run.display=log", "trainer.tensorboard=false", "trainer.total_steps=3", "trainer.sample_every=1",
            "trainer.checkpoint_every=0", *PLUG]


RUNS = [*RECIPES, "plugin"]  # six runs, so the pool of two has no slot left empty


def _selected_runs(request) -> list[str]:
    """The runs whose tests this session collected (`-k plugin` starts one run, not six)."""
    ids = [item.nodeid for item in request.session.items]
    return [r for r in RUNS if any((f"[{r}]" in i) if r in RECIPES else ("test_a_users_tool" in i) for i in ids)]


@pytest.fixture(scope="module")
def recipe_runs(request, sft_model, paravt_sft, short_demo_dir, tmp_path_factory):
    """The five 2-step recipe runs and the plug-in's 3-step run, two at a time (each is its own Ray
    cluster; the two cores take two runs' start-ups and steps in about the time of 1.5 in a row),
    started once for the module. Each name maps to (metrics rows, trajectories, run dir), or to the
    AssertionError its run raised."""
    from env.demo import make_demo_data

    root = tmp_path_factory.mktemp("recipe_runs")
    pending, running, done = _selected_runs(request), [], {}
    while pending or running:
        while pending and len(running) < 2:
            name = pending.pop(0)
            if name == "plugin":
                val = make_demo_data(root / "heldout", videos=2, seconds=12, seed=11, size=(320, 180)).parent
                cmd, env, steps = _plugin_cmd(sft_model, short_demo_dir, val), plugin_env(root / "plugin_src"), 3
            else:
                model = paravt_sft if name == "paravt" else sft_model
                cmd, env, steps = _recipe_cmd(name, model, short_demo_dir), None, 2
            running.append((name, steps, *_start(name, cmd, root / name, env)))
        name, steps, proc, log = running.pop(0)
        try:
            done[name] = (*_results(name, proc, log, root / name, steps), root / name)
        except AssertionError as e:
            done[name] = e
    return done


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps_and_its_mechanism_happens(recipe, recipe_runs):
    """`weft train --config configs/recipes/NAME.yaml` on the demo data with the tiny model (sizes overridden,
    nothing else), 2 steps on Ray with vLLM; then the recipe's own mechanism is found in what it did."""
    if isinstance(recipe_runs[recipe], AssertionError):
        raise recipe_runs[recipe]
    _, trajs, run_dir = recipe_runs[recipe]
    steps = read_metrics(run_dir)  # the trained steps
    terms = {"videozoomer": {"accuracy", "format"}}.get(recipe, {"accuracy", "format", "tool"})
    assert all({f"reward/{k}" for k in terms} <= set(r) for r in steps) and "reward/evidence" not in steps[-1]
    ran = [t for t in trajs if t.status.value != "FAILED"]
    assert ran and all(set(t.reward_terms) == terms for t in ran)
    for t in ran:  # each weighted term is the recipe's weight times the paper's unweighted value
        assert t.reward == pytest.approx(sum(t.reward_terms.values()))
    if recipe == "videozoomer":
        # the last turn has no tools: the observation before it says so, and a call in it is refused
        notices = [o for t in ran for o in t.metadata["observation_texts"][:1] if "last turn: the tools are off" in o]
        assert notices, [t.metadata["observation_texts"] for t in ran]
        last = [c for t in ran for c in t.metadata["tool_calls"] if c["turn"] == 2]
        assert all(not c["ok"] and "tools are off" in c["error"] for c in last)
        assert all("entropy" in r and "kl" in r for r in steps)  # entropy bonus and the k3 KL loss ran
    if recipe == "video_o3":
        assert all(np.isfinite(r["kl_in_reward/seq_kl_mean"]) for r in steps)  # KL folded into the reward
        assert "kl" not in steps[-1]  # and not into the loss
        assert all(0.0 <= t.reward_terms["tool"] <= 1.0 for t in ran)
    if recipe == "paravt":
        kids = [c for t in ran for c in t.children]
        assert kids, "no crop_video call reached the sub-agent"
        for t in ran:
            for c in t.children:
                gen = c.loss_mask.astype(bool)
                assert c.metadata["role"] == "subagent" and c.traj_id.startswith(t.traj_id) and gen.any()
                assert (c.policy_version[gen] >= 0).all() and (c.behavior_logprobs[gen] < 0).any()  # engine-sampled
                assert len(c.media) >= 1 and c.group_id == t.group_id
        answered = [o for t in ran if t.children for o in t.metadata["observation_texts"] if "[crop_video] summary" in o]
        assert answered  # the sub-agent's answer reached the main episode
        first = [t for t in ran if t.metadata["turn_texts"]]
        assert all(t.metadata["turn_texts"][0].startswith("<think>\n") for t in first)  # the forced prefix
        assert all(r["subagent_trajectories_trained"] == 0 for r in steps)  # off, as ParaVT ships it
        assert all(np.isfinite(r["kl_in_reward/seq_kl_mean"]) for r in steps)
    if recipe == "weaver":
        for t in ran:
            assert t.reward_terms["accuracy"] in (0.0, 0.7) and t.reward_terms["format"] in (0.0, 0.2)
            assert t.reward_terms["tool"] in (0.0, 0.1)
            assert t.reward_terms["tool"] == 0.0 or t.reward_terms["accuracy"] == 0.7
    if recipe == "deepeyes":
        for t in ran:
            assert t.reward_terms["format"] in (0.0, -0.2) and t.reward_terms["tool"] in (0.0, 1.2)
        assert all("kl" in r for r in steps)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_a_users_tool_and_reward_run_in_check_env_and_in_train_on_ray(recipe_runs, sft_model, short_demo_dir, tmp_path):
    """A tool and a reward function in a module of the user's (not weft's), named in the config: `weft
    check-env` audits and runs them, and `weft train` runs them inside the Ray env actor (the SFT model
    calls temporal_zoom, which the plugin replaces), with no registration step. The run (in the module's
    pool, `recipe_runs`) validates on a held-out set as the demo does (before training, every 2 steps, at
    the last), each time with exactly that step's weights, through the same tools."""
    import os

    from models.hf import load_processor

    env = {**os.environ, **plugin_env(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "weft_cli", "check-env", "--data", str(short_demo_dir), "--policy",
                          "random", "--episodes", "8", "--check", "--config", "configs/demo.yaml", *PLUG],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["crashes"] == 0 and summary["check"]["ok"], summary  # the audit covered the plugin's tool too
    assert set(summary["reward_terms"]) == {"right", "plugin_zoom", "clean"}, summary
    assert summary["reward_terms"]["plugin_zoom"] > 0  # random calls of temporal_zoom ran the plugin's tool

    if isinstance(recipe_runs["plugin"], AssertionError):
        raise recipe_runs["plugin"]
    rows, trajs, run_dir = recipe_runs["plugin"]
    last = [r for r in rows if not r.get("validation")][-1]  # the last step's own row (validation rows follow it)
    assert {"reward/right", "reward/plugin_zoom", "reward/clean"} <= set(last), last
    assert "reward/accuracy" not in last  # the plugin's reward replaced weft's
    tok = load_processor(sft_model).tokenizer
    assert all("a plugin's own zoom" in tok.decode(t.token_ids[:2000].tolist()) for t in trajs)  # its schema, shown
    # The Ray env actor imported the plugin itself (env.tools and reward.fn resolve where the env runs),
    # and its reward ran there: the reward terms above are the plugin's.
    imports = (run_dir.parent / "plugin_src" / "plugin_imports.txt").read_text()
    assert "ray::EnvActor" in imports, imports
    # Every temporal_zoom call the model got right ran the plugin's code. (The tiny SFT model learned the
    # built-in's exact prompt; the plugin's description changes it, and in some runs the model then
    # writes no valid zoom call at all, so their number is not asserted. check-env above ran the tool.)
    zooms = [c for t in trajs for c in t.metadata["tool_calls"] if c["name"] == "temporal_zoom" and c["ok"]]
    assert all(c["label"] == "plugin zoom" and c["window"] is not None for c in zooms)
    shown = sum(o.count("[plugin zoom]") for t in trajs for o in t.metadata["observation_texts"])
    assert shown == len(zooms), (shown, len(zooms))
    val = [r for r in rows if r.get("validation")]
    assert [r["step"] for r in val] == [0, 2, 3], val
    version_at = {0: 0, **{r["step"]: r["version"] for r in read_metrics(run_dir)}}
    for r in val:
        assert r["val/tasks"] == 2 and 0.0 <= r["val/accuracy"] <= 1.0 and r["val/failed"] == 0, r
        assert r["val/version"] == r["val/policy_version_min"] == r["val/policy_version_max"] == version_at[r["step"]], r
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [v["step"] for v in summary["validation"]] == [0, 2, 3]
