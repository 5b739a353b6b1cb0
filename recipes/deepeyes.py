"""DeepEyes (Visual-Agent/DeepEyes): "thinking with images" by zooming into regions (weft's get_frame
and spatial_zoom on video frames); reward 0.8 acc + 0.2 format + 1.2 tool.

From verl/utils/reward_score/vl_agent.py (`compute_score`): format is 0, or -1 on a format error
(unbalanced <think> or <answer> tags); tool is 1 only when a zoom-in image was used and the answer
is right (acc > 0.5); open-ended answers are judged by a served model (the judge hook here).
"""

from __future__ import annotations

from typing import Optional

from env.types import Episode, Task
from recipes.common import accuracy, tool_used


def format_error(episode: Episode) -> bool:
    """No answer, a malformed turn, or unbalanced think/answer tags in any turn."""
    if episode.answer is None or episode.format_errors:
        return True
    return any(t.count("<think>") != t.count("</think>") or t.count("<answer>") != t.count("</answer>")
               for t in episode.texts)


def deepeyes_reward(episode: Episode, task: Task, judge_url: Optional[str] = None,
                    judge_model: str = "") -> dict[str, float]:
    """{accuracy, format, tool}; the recipe weighs them 0.8, 0.2 and 1.2."""
    acc = accuracy(episode, task, judge_url, judge_model)
    return {"accuracy": acc, "format": -1.0 if format_error(episode) else 0.0,
            "tool": 1.0 if tool_used(episode) and acc > 0.5 else 0.0}
