"""Weaver ("Weaver: End-to-End Agentic System Training for Video Interleaved Reasoning", arXiv 2602.05829):
the policy interleaves frame selection and spatial grounding tools (weft's temporal_zoom, get_frame
and spatial_zoom) with its reasoning; reward 0.7 acc + 0.2 format + 0.1 tool, the tool term paid only
with a right answer. Weaver's code was not in the index this recipe was checked against; the weights
are the paper's as the issue quotes them (see configs/recipes/weaver.yaml).
"""

from __future__ import annotations

from typing import Optional

from env.types import Episode, Task
from recipes.common import accuracy, tool_used


def weaver_reward(episode: Episode, task: Task, judge_url: Optional[str] = None,
                  judge_model: str = "") -> dict[str, float]:
    """{accuracy, format, tool}: format 1 when every turn parsed and the episode answered; tool 1 when the
    answer is right and at least one call ran."""
    acc = accuracy(episode, task, judge_url, judge_model)
    fmt = 1.0 if episode.answer is not None and episode.format_errors == 0 else 0.0
    return {"accuracy": acc, "format": fmt, "tool": 1.0 if acc > 0 and tool_used(episode) else 0.0}
