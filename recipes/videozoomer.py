"""VideoZoomer (zsgvivo/VideoZoomer): a low-frame-rate overview, then `video_zoom` calls that return a
clip at a higher frame rate, the last turn without tools; reward 0.9 acc + 0.1 format.

The tool takes `segment = [start, end]` and `fps`, and returns int((end - start) * fps) frames
spaced evenly over the segment, at most 16 (verl/workers/rollout/vllm_rollout/function_tools.py,
`extract_video_clip`: np.linspace over the segment, frame count int(fps * (end - start)) checked
against tool_call_max_frames=16). VideoZoomer writes the call as `<video_zoom>{json}</video_zoom>`;
weft's models write every tool the same way (a tool-call block), so the call's text differs, not its
arguments or what it returns.
"""

from __future__ import annotations

import math
from typing import Optional

from env.tool import Tool, ToolOutput
from env.types import Episode, Task
from recipes.common import accuracy, answer_turn_ok, call_turn_ok, thinks_first

MAX_CLIP_FRAMES = 16  # scripts/train_video.sh: actor_rollout_ref.rollout.tool_call_max_frames=16


def _frames(args: dict) -> int:
    start, end = args["segment"]
    return int(args["fps"] * (end - start))


def _check(args: dict, duration: float) -> Optional[str]:
    start, end = args["segment"]
    if start > duration + 0.05:
        return f"segment starts at {start:g} s, past the end of the video ({duration:.1f} s)"
    args["segment"] = [start, min(end, duration)]
    start, end = args["segment"]
    if not start < end:
        return f"segment [{start:g}, {end:g}] is empty: it is [start, end] with start < end"
    n = _frames(args)
    if n < 1:
        return f"(end - start) * fps = {(end - start) * args['fps']:.2f} gives no frame; raise fps or widen the segment"
    if n > MAX_CLIP_FRAMES:
        return f"(end - start) * fps = {n} frames; at most {MAX_CLIP_FRAMES}"
    return None


def _run(video, args: dict) -> ToolOutput:
    start, end = args["segment"]
    n = _frames(args)
    times = [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [(start + end) / 2]
    frames, shown = video.get_frames(times)
    return ToolOutput(f"{len(frames)} frame(s) of {start:.1f}-{end:.1f}s at {args['fps']:g} fps:", frames, (start, end))


VIDEO_ZOOM = Tool(
    "video_zoom",
    "Watch a segment of the video at a higher frame rate: returns int((end - start) * fps) frames spread "
    f"evenly over [start, end] seconds; (end - start) * fps must be at most {MAX_CLIP_FRAMES}.",
    {"type": "object", "additionalProperties": False, "required": ["segment", "fps"],
     "properties": {"segment": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number", "minimum": 0},
                                "description": "[start, end] in seconds."},
                    "fps": {"type": "number", "exclusiveMinimum": 0, "maximum": 30,
                            "description": "Frames per second to sample the segment at."}}},
    run=_run, check=_check, frame_cost=lambda a: max(0, _frames(a)),
    label=lambda a: f"zoom {a['segment'][0]:.1f}-{a['segment'][1]:.1f}s @{a['fps']:g}fps")


def format_ok(episode: Episode) -> bool:
    """VideoZoomer's binary format (verl/utils/reward_score/toolcall_format.py, `format_reward`): every
    turn but the last is <think>...</think> then exactly one zoom call and no answer; the last is
    <think>...</think> then the answer; a one-turn episode is just the latter."""
    texts = episode.texts
    if not texts or episode.answer is None:
        return False
    calls_ok = all(thinks_first(t) and call_turn_ok(t, 1) for t in texts[:-1])
    return calls_ok and thinks_first(texts[-1]) and answer_turn_ok(texts[-1])


def videozoomer_reward(episode: Episode, task: Task, judge_url: Optional[str] = None,
                       judge_model: str = "") -> dict[str, float]:
    """{accuracy, format}; the recipe weighs them 0.9 and 0.1 (scripts/train_video.sh:
    reward_model.acc_reward_weight=0.9, format_reward_weight=0.1)."""
    return {"accuracy": accuracy(episode, task, judge_url, judge_model), "format": float(format_ok(episode))}


def clip_frames(segment: list[float], fps: float) -> int:
    """Frames a video_zoom call returns (for tests and the viewer)."""
    return int(fps * (segment[1] - segment[0])) if math.isfinite(fps) else 0
