"""Plain data types of the environment: tasks, observations, frames, parsed actions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from protos.records import FrameRef

# Where an observation's text places each of its frames, in order. The agent loop
# replaces each marker with the model's vision tokens (e.g. Qwen's
# <|vision_start|><|image_pad|>...<|vision_end|>); task text never contains it.
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Caption:
    """A caption or subtitle for one segment of a video, in seconds."""

    start: float
    end: float
    text: str


@dataclass
class Task:
    """One question about one video. `video` is an absolute path after `load_tasks`."""

    id: str
    video: str
    question: str
    answer: str
    options: Optional[list[str]] = None
    evidence: list[tuple[float, float]] = field(default_factory=list)
    captions: list[Caption] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Frame:
    """One image shown to the model: pixels, the second it shows, and how to re-decode it."""

    image: np.ndarray  # uint8 [H, W, 3] RGB
    time: float
    ref: FrameRef


@dataclass
class Observation:
    """What the model sees after reset or a step: text, and frames in the order they appear."""

    text: str
    frames: list[Frame] = field(default_factory=list)


@dataclass
class ToolCall:
    """One `<tool_call>` block as parsed: the tool name and its raw arguments."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""


@dataclass
class ParsedAction:
    """A model turn taken apart. `errors` says, in words, every way the turn was malformed."""

    think: Optional[str] = None
    calls: list[ToolCall] = field(default_factory=list)
    answer: Optional[str] = None
    errors: list[str] = field(default_factory=list)


@dataclass
class ToolCallRecord:
    """One tool call of an episode as the env handled it: what a reward function and the viewer read."""

    turn: int
    name: str
    arguments: Any  # normalised when the call was valid, else as the model wrote them
    ok: bool  # it ran and returned
    output: Any = None  # the tool's env.ToolOutput when ok
    error: str = ""  # why it was refused, when not ok
    label: str = ""  # how the viewer names it

    @property
    def window(self) -> Optional[tuple[float, float]]:
        return None if self.output is None else self.output.window

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a trajectory's metadata (and so for `weft view`)."""
        return {"turn": self.turn, "name": self.name, "arguments": self.arguments, "ok": self.ok,
                "error": self.error, "label": self.label,
                "window": None if self.window is None else [float(self.window[0]), float(self.window[1])]}


@dataclass
class Episode:
    """A finished episode as a reward function sees it (`fn(episode, task) -> dict[str, float]`)."""

    answer: Optional[str]  # the parsed answer, or None if the episode ended without one
    tool_calls: list[ToolCallRecord]
    turns: int
    format_errors: int  # malformed turns (bad JSON, unknown tool, refused arguments, over budget)
    status: str  # COMPLETED | TRUNCATED | ...
    frames_returned: int  # frames the tools returned (the overview excluded)
    duration: float = 0.0
    texts: list[str] = field(default_factory=list)  # the model's turns as written (a forced prefix included)

    @property
    def windows(self) -> list[tuple[float, float]]:
        """The (start, end) seconds every successful call looked at."""
        return [c.window for c in self.tool_calls if c.ok and c.window is not None]
