"""ParaVT (EvolvingLMMs-Lab/ParaVT): `crop_video` calls, several in one turn, each answered by the policy
itself as a sub-agent (16 frames of the clip at 1 fps, a text summary back); a forced `<think>\\n`
prefix; reward acc + format + tiered tool.

From paravt/rl/subagents/crop_video/cropped_video.py: the clip is sampled at fps 1, at most 16 frames,
at most 50176 pixels each, and the sub-agent is asked for a summary. From paravt/rl/rewards/tool.py
(`compute_tool_reward`): 0 without a parseable call, 0.1 for one, 0.3 once a call executed, +0.5 when
the answer is right, at most 1. From paravt/rl/rewards/format.py (`compute_format_reward`) with the
recipe's knobs (paravt/rl/configs/paragrpo_8b.yaml: think_prefix, answer_suffix, anchoring.weight 0.5,
reward.format_weight 1.0): the constrained-format credit and the think-anchor bonus below. From
paravt/rl/rewards/compose.py: reward = acc + format_weight * format + tool.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from env.tool import SubQuery, Tool, ToolOutput
from env.types import Episode, Task
from env.video import resize_to_fit
from recipes.common import accuracy, tool_used

CLIP_FPS = 1.0
CLIP_MAX_FRAMES = 16
CLIP_MAX_PIXELS = 50176
ANCHOR_WEIGHT = 0.5  # paragrpo_8b.yaml: anchoring.weight

_ANSWER_BODY_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_CLOSED_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_THINK_OPEN_RE = re.compile(r"<think>(.*?)(?:<tool_|<answer>|<\|im_end\|>|$)", re.DOTALL)
_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_TAGS = (("<think>", "</think>"), ("<tool_call>", "</tool_call>"), ("<answer>", "</answer>"))
MIN_THINK_CHARS = 10  # paravt/rl/rewards/utils.py: has_substantive_think(min_chars=10)


def parseable_call(text: str) -> bool:
    """A real call, not just the tags: a tool-call block (closed or cut off) holding a JSON object with a
    name (ParaVT's guard against the empty-tag exploit)."""
    for body in _CALL_RE.findall(text):
        try:
            obj = json.loads(body.strip())
        except ValueError:
            continue
        if isinstance(obj, dict) and "name" in obj:
            return True
    return False


def substantive_think(text: str) -> bool:
    """A think block (the first closed one, else an open one up to a tool or answer tag) of >= 10 characters."""
    m = _THINK_CLOSED_RE.search(text) or _THINK_OPEN_RE.search(text)
    return bool(m) and len(m.group(1).strip()) >= MIN_THINK_CHARS


def think_before_tool(text: str) -> bool:
    think, tool = text.find("<think>"), text.find("<tool_call>")
    return think != -1 and tool != -1 and think < tool


def _check(args: dict, duration: float) -> Optional[str]:
    start, end = args["start_time"], args["end_time"]
    if start >= duration:
        return f"start_time ({start:g} s) is past the end of the video ({duration:.1f} s)"
    args["end_time"] = min(end, duration)
    if not start < args["end_time"]:
        return f"start_time ({start:g}) must be less than end_time ({end:g})"
    return None


def _run(video, args: dict) -> ToolOutput:
    start, end = args["start_time"], args["end_time"]
    n = max(1, min(CLIP_MAX_FRAMES, int((end - start) * CLIP_FPS)))
    size = resize_to_fit(video.width, video.height, min(CLIP_MAX_PIXELS, video.max_pixels))
    frames, _ = video.get_frames([start + (end - start) * (i + 0.5) / n for i in range(n)], size)
    prompt = (f"These frames are sampled from the video between {start:.1f}s and {end:.1f}s. Summarise what happens "
              "in them: the key actions, objects and changes, in order, as facts.")
    return ToolOutput(f"summary of {start:.1f}-{end:.1f}s:", frames, (start, end), ask=SubQuery(prompt, 512))


CROP_VIDEO = Tool(
    "crop_video",
    "Have a segment of the video summarised: a helper watches up to 16 frames of [start_time, end_time] "
    "seconds and returns a text summary. Several calls in one turn run in parallel.",
    {"type": "object", "additionalProperties": False, "required": ["start_time", "end_time"],
     "properties": {"start_time": {"type": "number", "minimum": 0, "description": "Segment start, in seconds."},
                    "end_time": {"type": "number", "minimum": 0, "description": "Segment end, in seconds."}}},
    run=_run, check=_check, frame_cost=lambda a: 0,  # the frames go to the sub-agent, not into the episode
    label=lambda a: f"crop {a['start_time']:.1f}-{a['end_time']:.1f}s")


def format_score(completion: str, anchor_weight: float = ANCHOR_WEIGHT, answer_suffix: bool = True) -> float:
    """ParaVT's continuous format credit in [0, 1] of the whole completion (its turns joined in order)."""
    think = substantive_think(completion)
    answer = any(b.strip() for b in _ANSWER_BODY_RE.findall(completion))
    w_think, w_open, w_close = (0.2, 0.3, 0.2) if answer_suffix else (0.3, 0.2, 0.1)
    score = w_think if think else 0.0
    if answer:
        score += (w_open if "<answer>" in completion else 0.0) + (w_close if "</answer>" in completion else 0.0)
    if anchor_weight > 0:  # the think anchor: credit for closing the think block, debit for leaving it open
        bonus = 0.0
        if think and "</think>" in completion:
            bonus += 0.4 + (0.3 if answer and "</answer>" in completion else 0.0)
        if "<think>" in completion and "</think>" not in completion:
            bonus -= 0.3
        score += anchor_weight * bonus
    if think and parseable_call(completion) and think_before_tool(completion):
        score += 0.3
    if score > 0 and all(completion.count(a) == completion.count(b) for a, b in _TAGS):
        score += 0.1
    return min(score, 1.0)


def tool_score(episode: Episode, acc: float) -> float:
    """0 without a parseable call; 0.1 with one; 0.3 once a call ran; +0.5 if the answer is right; <= 1."""
    if not any(parseable_call(t) for t in episode.texts):
        return 0.0
    score = 0.3 if tool_used(episode) else 0.1
    return min(1.0, score + (0.5 if acc > 0 else 0.0))


def paravt_reward(episode: Episode, task: Task, anchor_weight: float = ANCHOR_WEIGHT, answer_suffix: bool = True,
                  judge_url: Optional[str] = None, judge_model: str = "") -> dict[str, float]:
    """{accuracy, format, tool}; the recipe weighs format by reward.format_weight (1.0 in paragrpo_8b.yaml)."""
    acc = accuracy(episode, task, judge_url, judge_model)
    return {"accuracy": acc, "format": format_score("\n".join(episode.texts), anchor_weight, answer_suffix),
            "tool": tool_score(episode, acc)}
