"""VideoToolEnv on real demo videos: observations, tools, budgets, rewards, failures, shared decoding."""

from __future__ import annotations


import numpy as np
import pytest

from env import IMAGE_MARKER, VideoReader, VideoToolEnv, get_decoder
from env.env import COUNTERS
from env.testing import call
from protos import content_hash


def test_reset_gives_question_options_and_overview(demo_tasks):
    task = demo_tasks[0]
    env = VideoToolEnv(overview_frames=6)
    obs, info = env.reset(task)
    assert len(obs.frames) == 6 and obs.text.count(IMAGE_MARKER) == 6
    assert task.question in obs.text and all(o in obs.text for o in task.options)
    assert all(fr.image.shape == (90, 160, 3) and fr.image.dtype == np.uint8 for fr in obs.frames)
    times = [fr.time for fr in obs.frames]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= info["duration"]
    assert info["status"] == "RUNNING" and info["frames_returned"] == 0  # the overview is free


def test_overview_choices_drawn_per_task_and_stable(demo_tasks):
    env = VideoToolEnv(overview_choices=[2, 4, 8, 16])
    counts = [len(env.reset(t)[0].frames) for t in demo_tasks]
    assert counts == [len(env.reset(t)[0].frames) for t in demo_tasks]  # stable for a seed
    assert all(c in (2, 4, 8, 16) for c in counts)
    other = [len(VideoToolEnv(overview_choices=[2, 4, 8, 16], seed=99).reset(t)[0].frames) for t in demo_tasks]
    assert len(set(counts + other)) > 1


def test_parallel_tool_calls_in_one_turn(demo_tasks):
    task = demo_tasks[0]
    env = VideoToolEnv()
    env.reset(task)
    (s, e) = task.evidence[0]
    action = ("<think>look</think>" + call("temporal_zoom", start=s, end=e, num_frames=4)
              + call("get_frame", time=1.0) + call("spatial_zoom", time=s, bbox=[0, 0, 0.5, 0.5])
              + call("temporal_search", query="circle number", top_k=2))
    obs, r, term, trunc, info = env.step(action)
    assert not term and not trunc and r == 0.0
    assert "error" not in obs.text, obs.text
    assert obs.text.count(IMAGE_MARKER) == len(obs.frames) == info["frames_returned"]
    assert 3 <= len(obs.frames) <= 6 and info["tool_calls_ok"] == 4 and "best matches" in obs.text
    zoom = [fr for fr in obs.frames if s - 0.2 <= fr.time <= e + 0.2]
    assert len(zoom) >= 3
    crop = next(fr for fr in obs.frames if fr.ref.crop != (0.0, 0.0, 1.0, 1.0))
    assert max(crop.image.shape[:2]) == 224  # a crop is shown bigger than the zoom frames


def test_frame_refs_re_decode_to_the_same_pixels(demo_tasks):
    """The learner re-materialises pixels from FrameRefs: a fresh reader must reproduce the hash."""
    env = VideoToolEnv()
    obs, info = env.reset(demo_tasks[1])
    obs2, *_ = env.step(call("temporal_zoom", start=2.0, end=9.0, num_frames=3))
    for fr in obs.frames + obs2.frames:
        assert fr.ref.content_hash == content_hash(fr.image)
        assert fr.time == pytest.approx(fr.ref.frame_index / info["fps"])
        reader = VideoReader(fr.ref.video)
        frames, ts = reader.get_frames([fr.ref.time], size=fr.ref.size)
        assert ts[0] == pytest.approx(fr.time) and content_hash(frames[0]) == fr.ref.content_hash


@pytest.mark.parametrize("action,expect", [
    ("", "neither"), ("<tool_call>{bad json</tool_call>", "JSON"),
    (call("teleport", x=1), "teleport"), (call("temporal_zoom", start=5, end=1, num_frames=4), "start"),
    (call("temporal_zoom", start=0, end=5, num_frames=99), "num_frames"),
    (call("spatial_zoom", time=1, bbox=[0.5, 0.5, 0.2, 0.9]), "bbox"), (call("get_frame", time=1e9), "time"),
])
def test_malformed_actions_explain_and_cost_format(demo_tasks, action, expect):
    env = VideoToolEnv()
    env.reset(demo_tasks[0])
    obs, r, term, trunc, info = env.step(action)
    assert "error" in obs.text and expect.lower() in obs.text.lower(), obs.text
    assert info["format_errors"] >= 1 and not term
    obs, r, term, trunc, info = env.step("<answer>A</answer>")
    assert term and info["reward_terms"]["format"] < env.reward_cfg.weights["format"]  # penalised


def test_budgets_refuse_and_truncate(demo_tasks):
    env = VideoToolEnv(max_turns=3, max_frames=10, max_tool_calls=3)
    env.reset(demo_tasks[0])
    obs, *_ , info = env.step(call("temporal_zoom", start=0, end=10, num_frames=8))
    assert info["frames_returned"] == 8
    obs, *_ , info = env.step(call("temporal_zoom", start=0, end=10, num_frames=8))
    assert "frame budget" in obs.text and info["frames_returned"] == 8
    # a refused call costs no budget: calls so far 1; these are calls 2 and 3, then the 4th is refused
    obs, r, term, trunc, info = env.step(call("get_frame", time=1) + call("get_frame", time=2) + call("get_frame", time=3))
    assert trunc and not term and info["status"] == "TRUNCATED" and info["turns"] == 3
    assert "tool-call budget" in obs.text and info["tool_calls"] == 3 and info["frames_returned"] == 10
    assert info["reward_terms"]["accuracy"] == 0.0


def test_right_answer_scores_all_terms(demo_tasks):
    task = demo_tasks[0]
    env = VideoToolEnv()
    env.reset(task)
    s, e = task.evidence[0]
    env.step(call("temporal_zoom", start=s, end=e, num_frames=4))
    letter = chr(65 + task.options.index(task.answer)) if task.answer in task.options else task.answer
    obs, r, term, trunc, info = env.step(f"<answer>{letter}</answer>")
    terms = info["reward_terms"]
    assert term and terms["accuracy"] > 0 and terms["tool"] > 0 and terms["evidence"] > 0
    assert r == pytest.approx(sum(terms.values()))
    env.reset(task)
    wrong = next(chr(65 + i) for i, o in enumerate(task.options) if o != task.answer)
    obs, r, *_, info = env.step(f"<answer>{wrong}</answer>")
    assert info["reward_terms"]["accuracy"] == 0 and info["reward_terms"]["tool"] == 0


def test_group_decodes_overview_once(demo_tasks):
    """The G episodes of a GRPO group share the overview decode through the process-wide cache."""
    dec = get_decoder()
    task = demo_tasks[2]
    VideoToolEnv(overview_frames=8, overview_size=[152, 86]).reset(task)  # a size nothing else uses
    before = dec.stats()
    for _ in range(7):
        VideoToolEnv(overview_frames=8, overview_size=[152, 86]).reset(task)
    after = dec.stats()
    assert after["misses"] == before["misses"] and after["hits"] - before["hits"] >= 7 * 8


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated"])
def test_broken_video_is_failed_episode_with_counter(demo_tasks, tmp_path, kind):
    task = demo_tasks[3]
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng().bytes(50_000))
    elif kind == "truncated":
        data = open(task.video, "rb").read()
        path.write_bytes(data[: len(data) // 3])
    broken = type(task)(**{**task.__dict__, "id": f"broken-{kind}", "video": str(path)})
    before = COUNTERS["failed_episodes"]
    env = VideoToolEnv()
    obs, info = env.reset(broken)
    if info["status"] != "FAILED":  # a truncated file may open and fail at the first tool that reaches the cut
        obs, r, term, trunc, info = env.step(call("temporal_zoom", start=0, end=info["duration"], num_frames=16))
    assert info["status"] == "FAILED" and "Video" in info["error"], info
    assert COUNTERS["failed_episodes"] == before + 1
    obs, r, term, trunc, info = env.step("<answer>A</answer>")  # the episode stays over, nothing raises
    assert term and r == 0.0


def test_step_before_reset_and_after_done_do_not_raise(demo_tasks):
    env = VideoToolEnv()
    assert env.step("<answer>A</answer>")[2]
    env.reset(demo_tasks[0])
    env.step("<answer>A</answer>")
    obs, r, term, trunc, info = env.step(call("get_frame", time=0))
    assert term and "over" in obs.text


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="overveiw"):
        VideoToolEnv(overveiw_frames=3)
