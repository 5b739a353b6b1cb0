"""Task files: JSONL, one task a line, video paths relative to the file.

    {"id", "video", "question", "answer", "options"?: [str], "evidence"?: [[start, end], ...],
     "captions"?: [{"start", "end", "text"}], "metadata"?: {...}}

`load_tasks` validates every line and reports all bad lines by number at once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from env.types import Caption, Task

_KEYS = {"id", "video", "question", "answer", "options", "evidence", "captions", "metadata"}


class TaskFileError(ValueError):
    """A task file has bad lines; the message lists each by line number."""


def load_tasks(path: str | Path, *, bad_lines: Optional[list[str]] = None) -> list[Task]:
    """Read and validate a JSONL task file. Raises TaskFileError naming every bad line, unless `bad_lines`
    is a list: then they are appended there and the good tasks returned (`weft eval` goes on without them)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file")
    tasks, problems, seen = [], [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            task = parse_task(json.loads(line), base=path.parent)
        except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
            problems.append(f"line {lineno}: {e}")
            continue
        if task.id in seen:
            problems.append(f"line {lineno}: duplicate task id {task.id!r}")
            continue
        seen.add(task.id)
        tasks.append(task)
    if problems and bad_lines is not None:
        bad_lines.extend(problems)
    elif problems:
        raise TaskFileError(f"{path}: {len(problems)} bad line(s):\n  " + "\n  ".join(problems))
    return tasks


def parse_task(obj: Any, base: Path) -> Task:
    """One task from its JSON object; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("a task must be a JSON object")
    unknown = set(obj) - _KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    for key in ("id", "video", "question", "answer"):
        if key not in obj:
            raise ValueError(f"missing required key {key!r}")
    for key in ("video", "question"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"{key!r} must be a non-empty string")
    if not isinstance(obj["answer"], (str, int, float)) or isinstance(obj["answer"], bool):
        raise ValueError("'answer' must be a string or a number")
    options = obj.get("options")
    if options is not None and (not isinstance(options, list) or len(options) < 2
                                or not all(isinstance(o, str) and o.strip() for o in options)):
        raise ValueError("'options' must be a list of at least 2 non-empty strings")
    return Task(
        id=str(obj["id"]),
        video=str((base / obj["video"]).resolve()),
        question=obj["question"],
        answer=str(obj["answer"]),
        options=options,
        evidence=[_span(s, "evidence") for s in obj.get("evidence") or []],
        captions=[_caption(c) for c in obj.get("captions") or []],
        metadata=dict(obj.get("metadata") or {}),
    )


def _span(s: Any, what: str) -> tuple[float, float]:
    if not isinstance(s, (list, tuple)) or len(s) != 2:
        raise ValueError(f"each {what} span must be [start, end]")
    start, end = _seconds(s[0], what), _seconds(s[1], what)
    if end < start:
        raise ValueError(f"{what} span [{start}, {end}] ends before it starts")
    return start, end


def _caption(c: Any) -> Caption:
    if not isinstance(c, dict) or not {"start", "end", "text"} <= set(c):
        raise ValueError("each caption must be {start, end, text}")
    start, end = _span([c["start"], c["end"]], "caption")
    if not isinstance(c["text"], str):
        raise ValueError("caption text must be a string")
    return Caption(start, end, c["text"])


def _seconds(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{what} times must be finite non-negative numbers, got {x!r}")
    return float(x)


def write_tasks(path: str | Path, tasks: list[dict]) -> Path:
    """Write task dicts as JSONL (used by the demo generator and tests)."""
    path = Path(path)
    path.write_text("".join(json.dumps(t, sort_keys=True) + "\n" for t in tasks), encoding="utf-8")
    return path
