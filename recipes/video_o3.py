"""Video-o3 (ZZQ987/Video-o3-Qwen3VL): a 128-frame global pass, then `grounding` calls that re-sample a
segment at 2 fps under a visual-token quota per strategy; reward acc + fmt + R_tool.

From RL/scripts/train/train_RL_video_single.sh: crop_frames_sample_fps=2.0, quotas
CROP_MAX_TOKENS_{COARSE,MEDIUM,FINE} = 1024, 2048, 3072 visual tokens per call, at most 768 tokens per
frame (crop_max_tokens_per_frame_cap), max_generation_round=6 (training) and val_max_generation_round=12.
From RL/verl/utils/reward_score/tool_reward_without_round_penalty.py (`compute_score`): R_tool =
s * (g + 1) / 2, paid only when a tool was used and format and answer are right, with g = (2 IoU + IoP +
IoG) / 4 of the merged called windows against the merged clue spans and s = 1; the single-clue
variant (tool_penalty_single_turn.py), used where the clue spans most of the video, pays it with g =
0.5 and s = 1 - 2 * decay_penalty * calls (decay_penalty_weight=0.05) whether or not a tool was used.
Here the clue count decides which: a task with evidence spans gets the first, one without the second.
"""

from __future__ import annotations

import math
from typing import Optional

from env.rewards import overlap_score
from env.tool import Tool, ToolOutput
from env.types import Episode, Task
from env.video import resize_to_fit
from recipes.common import accuracy, answer_turn_ok, thinks_first

SAMPLE_FPS = 2.0
TOKEN_QUOTA = {"coarse": 1024, "medium": 2048, "fine": 3072}
TOKENS_PER_FRAME_CAP = 768
MIN_TOKENS_PER_FRAME = 4  # below this a frame is a few patches: fewer frames instead
PATCH_PX = 28  # one visual token is a 28x28 patch after Qwen2.5-VL's 2x2 merge (Qwen3-VL: 32)
DECAY_PENALTY = 0.05


def plan(args: dict) -> tuple[int, int]:
    """(frames, visual tokens per frame) of a grounding call: 2 fps over the segment, the quota shared
    between the frames, each capped; when the share would fall below MIN_TOKENS_PER_FRAME, fewer frames."""
    start, end = args["temporal_segment"]
    quota = TOKEN_QUOTA[args["sampling_strategy"]]
    n = max(1, math.ceil((end - start) * SAMPLE_FPS))
    n = min(n, quota // MIN_TOKENS_PER_FRAME)
    return n, min(TOKENS_PER_FRAME_CAP, quota // n)


def _check(args: dict, duration: float) -> Optional[str]:
    start, end = args["temporal_segment"]
    if start > duration + 0.05:
        return f"temporal_segment starts at {start:g} s, past the end of the video ({duration:.1f} s)"
    args["temporal_segment"] = [start, min(end, duration)]
    if not args["temporal_segment"][0] < args["temporal_segment"][1]:
        return f"temporal_segment [{start:g}, {end:g}] is empty: it is [start, end] with start < end"
    return None


def _run(video, args: dict) -> ToolOutput:
    start, end = args["temporal_segment"]
    n, tokens = plan(args)
    size = resize_to_fit(video.width, video.height, tokens * PATCH_PX * PATCH_PX)
    frames, _ = video.get_frames([start + (end - start) * (i + 0.5) / n for i in range(n)], size)
    return ToolOutput(f"{len(frames)} frame(s) of {start:.1f}-{end:.1f}s ({args['sampling_strategy']}):", frames,
                      (start, end))


GROUNDING = Tool(
    "grounding",
    "Look again at a segment: returns frames sampled at 2 fps over temporal_segment = [start, end] seconds. "
    "sampling_strategy trades frames for detail: coarse, medium and fine get 1024, 2048 and 3072 visual "
    "tokens for the whole segment.",
    {"type": "object", "additionalProperties": False, "required": ["temporal_segment", "sampling_strategy"],
     "properties": {"temporal_segment": {"type": "array", "minItems": 2, "maxItems": 2,
                                         "items": {"type": "number", "minimum": 0}, "description": "[start, end] in seconds."},
                    "sampling_strategy": {"type": "string", "enum": ["coarse", "medium", "fine"],
                                          "description": "How many visual tokens the segment gets."}}},
    run=_run, check=_check, frame_cost=lambda a: plan(a)[0],
    label=lambda a: f"ground {a['temporal_segment'][0]:.1f}-{a['temporal_segment'][1]:.1f}s {a['sampling_strategy']}")


def format_score(episode: Episode) -> float:
    """Video-o3's format (`grounding_format_reward`): 0 unless every turn but the last is <think>...</think>
    then a tool call, and the last <think>...</think> then the answer; else 1 minus 1/turns per refused call."""
    texts = episode.texts
    if not texts or episode.answer is None or not (thinks_first(texts[-1]) and answer_turn_ok(texts[-1])):
        return 0.0
    for turn, t in enumerate(texts[:-1], start=1):
        if not thinks_first(t) or "<answer>" in t or not any(c.turn == turn for c in episode.tool_calls):
            return 0.0
    refused = sum(1 for c in episode.tool_calls if not c.ok)
    return max(0.0, 1.0 - refused / len(texts))


def tool_score(episode: Episode, task: Task, acc: float, fmt: float, decay_penalty: float = DECAY_PENALTY) -> float:
    """R_tool = s (g + 1) / 2 when answer and format are right (see the module notes for s and g)."""
    if acc != 1.0 or fmt != 1.0:
        return 0.0
    calls = sum(1 for c in episode.tool_calls if c.ok)
    if task.evidence:
        return (overlap_score(episode.windows, task.evidence) + 1) / 2 if calls else 0.0
    return (1.0 - 2 * decay_penalty * calls) * (0.5 + 1) / 2


def video_o3_reward(episode: Episode, task: Task, decay_penalty: float = DECAY_PENALTY,
                    judge_url: Optional[str] = None, judge_model: str = "") -> dict[str, float]:
    """{accuracy, format, tool}, each weighted 1 (data.acc_reward_weight=1.0, format_reward_weight=1.0)."""
    acc = accuracy(episode, task, judge_url, judge_model)
    fmt = format_score(episode)
    return {"accuracy": acc, "format": fmt, "tool": tool_score(episode, task, acc, fmt, decay_penalty)}
