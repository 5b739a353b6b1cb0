"""What the recipes' reward functions share: accuracy (rule match, or the judge for open-ended
answers) and the shape of a turn as the papers' format rewards check it."""

from __future__ import annotations

import re
from typing import Optional

from env.parser import parse_action
from env.rewards import match_answer
from env.types import Episode, Task

_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>", re.DOTALL)


def accuracy(episode: Episode, task: Task, judge_url: Optional[str] = None, judge_model: str = "",
             judge_timeout_s: float = 60.0) -> float:
    """1.0 if the answer is right: by rule (env.rewards.match_answer); for an open-ended task (no
    options) by the judge when `judge_url` is set, as VideoZoomer and DeepEyes score free-form answers."""
    if episode.answer is None:
        return 0.0
    if judge_url and not task.options:
        from recipes.judge import judge_score

        return judge_score(task.question, task.answer, episode.answer, url=judge_url, model=judge_model,
                           timeout_s=judge_timeout_s, fallback=match_answer(episode.answer, task.answer, None))
    return 1.0 if match_answer(episode.answer, task.answer, task.options) else 0.0


def thinks_first(text: str) -> bool:
    """The turn opens with a closed, non-empty <think>...</think> block."""
    m = _THINK_RE.match(text)
    return bool(m and m.group(1).strip())


def call_turn_ok(text: str, max_calls: int = 1) -> bool:
    """A clean tool turn: it parses, has 1..max_calls calls and no answer."""
    p = parse_action(text, max_calls=max(max_calls, 1))
    return not p.errors and 1 <= len(p.calls) <= max_calls and p.answer is None


def answer_turn_ok(text: str) -> bool:
    """A clean final turn: it parses, answers, and calls nothing."""
    p = parse_action(text)
    return not p.errors and p.answer is not None and not p.calls


def tool_used(episode: Episode) -> bool:
    return any(c.ok for c in episode.tool_calls)
