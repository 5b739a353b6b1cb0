"""A tool is one plain object: what the model is told, what is checked, what a call costs, what it does.

    Tool(name, description, parameters, run, check=None, frame_cost=None, label=None)

* `parameters`: the JSON schema of the arguments (OpenAI tool format; `Tool.schema` is the whole
  entry the chat template shows). Arguments are checked against it (env/tools.py's small
  JSON-Schema interpreter) before anything else.
* `check(args, duration)`: the rules a schema cannot say; returns an error message or None. It
  may normalise `args` in place (the built-ins clamp a time a hair past the end).
* `frame_cost(args)`: frames the call will return at most, charged to the episode's frame budget
  before it runs (a call over budget is refused, as is one over `env.max_frames_per_call`).
* `run(video, args) -> ToolOutput(text, frames=(), window=None)`: `video` is the episode's
  video (`EpisodeVideo`: `.duration`, `.get_frames(times, size=None, crop=None) -> (frames,
  timestamps)` through the process's shared decoded-frame cache, `.captions`, `.search(query,
  top_k)`); `frames` are images it got from `video.get_frames`, shown to the model in order
  (each is recorded with a FrameRef, so the learner re-decodes exactly those pixels);
  `window` is the (start, end) seconds it looked at, for the evidence reward and the viewer.
  Raising `ToolError(message)` refuses the call with that message (a format error, nothing
  charged); any other exception is counted (`tool_crash`) and refused the same way.
* A tool whose call the policy itself answers (a sub-agent, ParaVT's crop_video) returns
  `ToolOutput(text, frames, window, ask=SubQuery(prompt, max_tokens))`: its frames go to the
  sub-agent, not to the episode, and cost nothing of the episode's frame budget. The agent loop
  runs the sub-agent's episode on the same engine and its answer becomes the call's output; a
  driver with no model (`weft check-env`) gets an error observation instead.
* `label(args)`: the short text the viewer shows for a call (default: name(arguments)).
`env.tools` in the config lists a run's tools: built-in names or `module:attribute`, resolved
(`resolve_tools`) in the process that runs the env, so a user's tool works inside a Ray env
actor without any registration.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from env.types import Caption, Frame
from protos.records import FrameRef, content_hash


class ToolError(Exception):
    """A call its tool cannot run; the message goes to the model as the call's error."""


@dataclass(frozen=True)
class SubQuery:
    """What a sub-agent tool asks the policy: a prompt shown after the call's frames, and an answer cap."""

    prompt: str
    max_tokens: int = 512


@dataclass(frozen=True)
class ToolOutput:
    text: str
    frames: Sequence[np.ndarray] = ()  # images from video.get_frames, in the order the model sees them
    window: Optional[tuple[float, float]] = None  # seconds looked at (evidence reward, viewer)
    ask: Optional[SubQuery] = None  # set: the policy answers this call as a sub-agent, from `frames`


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    run: Callable[["EpisodeVideo", dict], ToolOutput]
    check: Optional[Callable[[dict, float], Optional[str]]] = None
    frame_cost: Optional[Callable[[dict], int]] = None
    label: Optional[Callable[[dict], str]] = None

    @property
    def schema(self) -> dict:
        """The tool as the chat template lists it (OpenAI function format)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": copy.deepcopy(self.parameters)}}

    def validate(self, arguments: Any, duration: float) -> tuple[Optional[dict], Optional[str]]:
        """(normalised arguments, None) if the call may run, else (None, an error message). Never raises."""
        from env.tools import check_schema, looks_like_pixels, normalise

        try:
            err = check_schema(arguments, self.parameters, "arguments")
            if err is not None:
                if err.startswith("bbox") and looks_like_pixels(arguments.get("bbox")):
                    err += " (bbox values are fractions of the frame width and height, not pixels)"
                return None, f"{self.name}: {err}."
            args = normalise(arguments, self.parameters)
            err = self.check(args, float(duration)) if self.check is not None else None
            return (None, f"{self.name}: {err}.") if err else (args, None)
        except Exception as exc:  # noqa: BLE001 - odd input or a user's check must never escape
            return None, f"{self.name}: invalid tool call ({type(exc).__name__}: {str(exc)[:100]})."

    def cost(self, args: dict) -> int:
        return max(0, int(self.frame_cost(args))) if self.frame_cost is not None else 0

    def describe(self, args: dict) -> str:
        if self.label is not None:
            try:
                return str(self.label(args))
            except Exception:  # noqa: BLE001 - a label is decoration
                pass
        return f"{self.name}({', '.join(f'{k}={json.dumps(v)}' for k, v in args.items())})"


@dataclass
class EpisodeVideo:
    """The episode's video as a tool sees it. Frames come from the process's shared FrameDecoder
    (cache, GOP-ordered decoding, in-flight dedupe, timeouts); every frame handed out is recorded
    with its FrameRef so the env can tell the learner how to re-decode it."""

    path: str
    decoder: Any
    max_pixels: int
    captions: list[Caption] = field(default_factory=list)
    _served: dict[int, Frame] = field(default_factory=dict)
    _index: Any = None

    def __post_init__(self) -> None:
        self.info = info = self.decoder.info(self.path)
        self.duration, self.fps, self.num_frames = info.duration, info.fps, info.num_frames
        self.width, self.height = info.width, info.height

    def index_for_time(self, t: float) -> int:
        """The index of the frame shown at t seconds: the last frame whose pts <= t (clamped into the video)."""
        t = float(t)
        if not math.isfinite(t):
            raise ToolError(f"time must be finite, got {t!r}")
        return self.info.index_at(t)

    def get_frames(self, times: Sequence[float], size: Optional[tuple[int, int]] = None,
                   crop: Optional[tuple[float, float, float, float]] = None) -> tuple[list[np.ndarray], np.ndarray]:
        """The frames shown at `times` (seconds), each once, in time order: (uint8 HxWx3 images, their times).

        `size` (width, height) defaults to the video's (or the crop's) own; it is scaled down to fit
        env.max_pixels_per_frame. `crop` is (x1, y1, x2, y2) as fractions of the frame."""
        from env.video import resize_to_fit

        indices = sorted({self.index_for_time(t) for t in times})
        if size is None:
            x1, y1, x2, y2 = crop or (0.0, 0.0, 1.0, 1.0)
            size = (max(1, round((x2 - x1) * self.width)), max(1, round((y2 - y1) * self.height)))
        size = resize_to_fit(int(size[0]), int(size[1]), self.max_pixels)
        images = self.decoder.frames(self.path, indices, size=size, crop=crop)
        crop_t = tuple(float(c) for c in crop) if crop else (0.0, 0.0, 1.0, 1.0)
        shown = [self.info.time_of(i) for i in indices]
        for idx, t, img in zip(indices, shown, images):
            ref = FrameRef(video=self.path, frame_index=idx, time=t, crop=crop_t,
                           size=(img.shape[1], img.shape[0]), content_hash=content_hash(img))
            self._served[id(img)] = Frame(image=img, time=t, ref=ref)
        return list(images), np.asarray(shown, np.float64)

    def search(self, query: str, top_k: int) -> list[tuple[Caption, float]]:
        """The captions that best match `query` (BM25), best first; ToolError when there are none."""
        from env.search import CaptionIndex

        if not self.captions:
            raise ToolError("this video has no captions or subtitles to search; look at frames instead")
        if self._index is None:
            self._index = CaptionIndex(self.captions)
        return self._index.search(query, top_k)

    def frame(self, image: Any) -> Frame:
        """The recorded Frame of an image this video handed out (ToolError for any other image)."""
        fr = self._served.get(id(image))
        if fr is None:
            raise ToolError("a tool returned an image that did not come from video.get_frames")
        return fr


# ------------------------------------------------------------------ naming tools and functions in config


def load_object(spec: str, what: str) -> Any:
    """The object `module:attribute` names (a dotted attribute path is allowed); ValueError saying why not.
    The current directory is importable too (as under `python train.py` or `ray job submit`)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} {spec!r} must be 'module:attribute'")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - name the spec in the error
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve_tools(specs: Sequence[str], builtins: dict[str, Tool]) -> dict[str, Tool]:
    """The tools of a run by name, in the order given: built-in names or `module:attribute` Tools."""
    out: dict[str, Tool] = {}
    for spec in specs:
        tool = builtins.get(spec) if spec in builtins else load_object(spec, "env.tools entry")
        if not isinstance(tool, Tool):
            raise ValueError(f"env.tools entry {spec!r} is a {type(tool).__name__}, not an env.Tool")
        if tool.name in out:
            raise ValueError(f"env.tools names the tool {tool.name!r} twice")
        out[tool.name] = tool
    return out  # empty is allowed: the no-tools baseline (`weft eval --no-tools`) answers from the overview
