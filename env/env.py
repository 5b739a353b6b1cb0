"""The video-tool environment: one episode of question answering over a long video.

`VideoToolEnv` follows gymnasium's reset/step conventions with a text action and a
multimodal observation. The action is the model's raw turn text; the parser pulls
out tool calls (run in parallel) and a final answer. Nothing the model writes
raises: every malformation becomes an observation that says what was wrong and a
format penalty. A video that cannot be decoded ends the episode as FAILED with a
reason, counted in `VideoToolEnv.counters`; it never takes the process down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from configs.schema import EnvConfig, RewardConfig
from env.errors import VideoError
from env.parser import parse_action
from env.rewards import EpisodeSummary, compute_reward, point_window
from env.search import CaptionIndex
from env.tools import tool_schemas, validate_call
from env.types import IMAGE_MARKER, Frame, Observation, Task, ToolCall
from env.video import FrameDecoder, get_decoder, resize_to_fit
from protos.records import FrameRef, Status, content_hash

# Tool calls of one turn run in parallel on this pool (decoding releases the GIL).
_TOOL_POOL: Optional[ThreadPoolExecutor] = None
_TOOL_POOL_LOCK = threading.Lock()

# Process-wide counters (all episodes): failures by kind, crashes caught, tool errors.
COUNTERS: Counter = Counter()


def _tool_pool(threads: int) -> ThreadPoolExecutor:
    global _TOOL_POOL
    with _TOOL_POOL_LOCK:
        if _TOOL_POOL is None:
            _TOOL_POOL = ThreadPoolExecutor(max_workers=max(2, threads), thread_name_prefix="weft-tool")
        return _TOOL_POOL


@dataclasses.dataclass
class _Episode:
    """The mutable state of one episode."""

    task: Task
    duration: float = 0.0
    fps: float = 0.0
    num_frames: int = 0
    turns: int = 0
    tool_calls: int = 0
    tool_calls_ok: int = 0
    frames_returned: int = 0
    format_errors: int = 0
    zoom_windows: list = dataclasses.field(default_factory=list)
    answer: Optional[str] = None
    done: bool = False
    status: Status = Status.COMPLETED
    error: str = ""
    index: Optional[CaptionIndex] = None
    decode_s: float = 0.0


class VideoToolEnv:
    """One episode at a time: `reset(task)`, then `step(text)` until terminated or truncated.

    `VideoToolEnv(**overrides)` takes EnvConfig field names (e.g. overview_frames=4);
    `cfg=`/`reward_cfg=` pass whole configs, `decoder=` a FrameDecoder (default: the
    process-wide shared one, so the G episodes of a group share decodes).
    """

    def __init__(self, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None, *,
                 decoder: Optional[FrameDecoder] = None, **overrides: Any):
        cfg = cfg or EnvConfig()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(EnvConfig)}
        if unknown:
            raise TypeError(f"unknown VideoToolEnv option(s) {sorted(unknown)}; see configs.EnvConfig")
        self.cfg = dataclasses.replace(cfg, **overrides)
        self.reward_cfg = reward_cfg or RewardConfig()
        self.decoder = decoder or get_decoder(self.cfg.cache_bytes, self.cfg.reader_pool_size)
        self.tools = tool_schemas(self.cfg)
        self._ep: Optional[_Episode] = None

    # ---------------------------------------------------------------- reset
    def reset(self, task: Task, *, seed: Optional[int] = None) -> tuple[Observation, dict]:
        """Start an episode: the question, options and a coarse overview of the whole video."""
        ep = self._ep = _Episode(task=task)
        n = self.overview_count(task, seed)
        try:
            info = self.decoder.info(task.video)
            ep.duration, ep.fps, ep.num_frames = info.duration, info.fps, info.num_frames
            times = [(i + 0.5) * ep.duration / n for i in range(n)]
            frames = self._decode(ep, times, tuple(self.cfg.overview_size))
        except VideoError as e:
            return self._fail(ep, e), self._info(ep, overview_frames=0)
        ep.index = CaptionIndex(task.captions) if task.captions else None
        lines = [f"Video: {ep.duration:.1f} s long. Overview: {len(frames)} frames sampled uniformly."]
        lines += [f"t={fr.time:.1f}s {IMAGE_MARKER}" for fr in frames]
        lines.append(f"Question: {_clean(task.question)}")
        if task.options:
            lines.append("Options:")
            lines += [f"{chr(65 + i)}. {_clean(o)}" for i, o in enumerate(task.options)]
            lines.append("Answer with the option's letter, e.g. <answer>A</answer>.")
        else:
            lines.append("Answer inside <answer>...</answer>.")
        lines.append("The overview is coarse: use the tools to look closer before answering.")
        return Observation("\n".join(lines), frames), self._info(ep, overview_frames=len(frames))

    def overview_count(self, task: Task, seed: Optional[int] = None) -> int:
        """Overview size: fixed, or drawn per task from overview_choices (stable for a seed)."""
        if not self.cfg.overview_choices:
            return self.cfg.overview_frames
        key = f"{self.cfg.seed if seed is None else seed}:{task.id}".encode()
        rng = random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
        return rng.choice(list(self.cfg.overview_choices))

    # ----------------------------------------------------------------- step
    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict]:
        """Apply one model turn: run its tool calls, or score its answer."""
        ep = self._ep
        if ep is None:
            COUNTERS["step_before_reset"] += 1
            return Observation("error: step() called before reset()"), 0.0, True, False, {"status": "FAILED"}
        if ep.done:
            COUNTERS["step_after_done"] += 1
            return Observation("error: the episode is over; call reset()"), 0.0, True, False, self._info(ep)
        try:
            return self._step(ep, action if isinstance(action, str) else str(action))
        except VideoError as e:
            return self._fail(ep, e), 0.0, True, False, self._info(ep)
        except Exception as e:  # noqa: BLE001 - an env bug must not kill a rollout worker: count it, end the episode
            COUNTERS["env_crash"] += 1
            return self._fail(ep, e, kind="env_crash"), 0.0, True, False, self._info(ep)

    def _step(self, ep: _Episode, action: str) -> tuple[Observation, float, bool, bool, dict]:
        ep.turns += 1
        parsed = parse_action(action, max_calls=self.cfg.max_calls_per_turn)
        lines = [f"error: {e}" for e in parsed.errors]
        if parsed.answer is not None:
            ep.format_errors += bool(parsed.errors)
            ep.answer, ep.done, ep.status = parsed.answer, True, Status.COMPLETED
            reward, terms = self._score(ep)
            return Observation("\n".join(lines)), reward, True, False, self._info(ep, reward_terms=terms)
        text, frames, refused = self._run_calls(ep, parsed.calls)
        if text:
            lines.append(text)
        ep.format_errors += bool(parsed.errors or refused)  # one penalty per malformed turn, however many faults
        if ep.turns >= self.cfg.max_turns:
            ep.done, ep.status = True, Status.TRUNCATED
            reward, terms = self._score(ep)
            lines.append("The turn budget is used up; the episode ends without an answer.")
            return Observation("\n".join(lines), frames), reward, False, True, self._info(ep, reward_terms=terms)
        lines.append(f"[{self.cfg.max_turns - ep.turns} turn(s), {self.cfg.max_tool_calls - ep.tool_calls} tool call(s), "
                     f"{self.cfg.max_frames - ep.frames_returned} frame(s) left]")
        return Observation("\n".join(lines), frames), 0.0, False, False, self._info(ep)

    def truncate(self, reason: str = "budget") -> tuple[float, dict]:
        """End the episode from outside (the agent loop ran out of tokens): scored as TRUNCATED."""
        ep = self._ep
        if ep is None or ep.done:
            return 0.0, self._info(ep) if ep else {"status": "FAILED"}
        ep.done, ep.status = True, Status.TRUNCATED
        reward, terms = self._score(ep)
        return reward, self._info(ep, reward_terms=terms, truncated_by=reason)

    # ---------------------------------------------------------------- tools
    def _run_calls(self, ep: _Episode, calls: list[ToolCall]) -> tuple[str, list[Frame], int]:
        """Validate every call against schema and budgets, run the valid ones in parallel.
        Returns the observation text, the frames, and how many calls were refused."""
        plans: list[tuple[ToolCall, Optional[dict], Optional[str]]] = []
        frames_left = self.cfg.max_frames - ep.frames_returned
        for call in calls:
            args, err = validate_call(call, cfg=self.cfg, duration=ep.duration, has_captions=ep.index is not None)
            if err is None and ep.tool_calls >= self.cfg.max_tool_calls:
                err = f"tool-call budget exhausted ({self.cfg.max_tool_calls} per episode); answer now"
            if err is None:
                need = _frames_needed(call.name, args)
                if need > frames_left:
                    err = f"frame budget: {call.name} asks for {need} frame(s) but only {frames_left} are left"
                else:
                    frames_left -= need
                    ep.tool_calls += 1
            plans.append((call, args, err))
        runnable = [(c, a) for c, a, e in plans if e is None]
        pool = _tool_pool(self.cfg.decode_threads)
        futures = {id(c): pool.submit(self._run_tool, ep, c.name, a) for c, a in runnable}
        texts, frames = [], []
        for call, args, err in plans:
            head = f"[{call.name}]" if call.name else "[tool call]"
            if err is not None:
                texts.append(f"{head} error: {err}")
                continue
            text, fr = futures[id(call)].result()  # re-raises VideoError: the episode fails
            ep.tool_calls_ok += 1
            ep.frames_returned += len(fr)  # tool frames count against the budget; the overview is free
            texts.append(f"{head} {text}")
            frames += fr
        return "\n".join(texts), frames, sum(e is not None for _, _, e in plans)

    def _run_tool(self, ep: _Episode, name: str, args: dict) -> tuple[str, list[Frame]]:
        if name == "temporal_zoom":
            start, end, n = args["start"], args["end"], args["num_frames"]
            times = [start + (end - start) * (i + 0.5) / n for i in range(n)]
            frames = self._decode(ep, times, tuple(self.cfg.zoom_size))
            ep.zoom_windows.append((start, end))
            return _frame_list_text(f"{len(frames)} frame(s) from {start:.1f}s to {end:.1f}s:", frames), frames
        if name == "get_frame":
            frames = self._decode(ep, [args["time"]], tuple(self.cfg.zoom_size))
            ep.zoom_windows.append(_clip(point_window(args["time"]), ep.duration))
            return _frame_list_text("1 frame:", frames), frames
        if name == "spatial_zoom":
            frames = self._decode(ep, [args["time"]], None, crop=tuple(args["bbox"]))
            ep.zoom_windows.append(_clip(point_window(args["time"]), ep.duration))
            x1, y1, x2, y2 = args["bbox"]
            return _frame_list_text(f"crop [{x1:.2f}, {y1:.2f}, {x2:.2f}, {y2:.2f}]:", frames), frames
        if name == "temporal_search":
            hits = ep.index.search(args["query"], args["top_k"])
            if not hits:
                return "no matching moment found.", []
            rows = [f"{i + 1}. {c.start:.1f}s-{c.end:.1f}s (score {s:.2f}): {_clean(c.text)}" for i, (c, s) in enumerate(hits)]
            return "best matches:\n" + "\n".join(rows), []
        raise ValueError(f"validated call to unknown tool {name!r}")  # validate_call guarantees this is unreachable

    def _decode(self, ep: _Episode, times: list[float], size: Optional[tuple[int, int]],
                crop: Optional[tuple[float, ...]] = None) -> list[Frame]:
        """Frames at the given seconds (deduplicated by frame index), with refs and hashes."""
        indices = sorted({min(max(int(np.floor(t * ep.fps)), 0), ep.num_frames - 1) for t in times})
        if crop is not None:
            x1, y1, x2, y2 = crop
            info = self.decoder.info(ep.task.video)
            cw, ch = max(1, round((x2 - x1) * info.width)), max(1, round((y2 - y1) * info.height))
            box_w, box_h = self.cfg.crop_size
            scale = min(box_w / cw, box_h / ch)  # fit the crop in the box, upscaling small crops
            size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        size = resize_to_fit(size[0], size[1], self.cfg.max_pixels_per_frame)
        t0 = time.perf_counter()
        images = self.decoder.frames(ep.task.video, indices, size=size, crop=crop)
        ep.decode_s += time.perf_counter() - t0
        out = []
        for idx, img in zip(indices, images):
            ref = FrameRef(video=ep.task.video, frame_index=idx, time=idx / ep.fps,
                           crop=tuple(crop) if crop else (0.0, 0.0, 1.0, 1.0),
                           size=(img.shape[1], img.shape[0]), content_hash=content_hash(img))
            out.append(Frame(image=img, time=idx / ep.fps, ref=ref))
        return out

    # --------------------------------------------------------------- scoring
    def _score(self, ep: _Episode) -> tuple[float, dict[str, float]]:
        summary = EpisodeSummary(
            answer=ep.answer, task_answer=ep.task.answer, options=ep.task.options, evidence=ep.task.evidence,
            format_errors=ep.format_errors, tool_calls_ok=ep.tool_calls_ok, zoom_windows=list(ep.zoom_windows),
            frames_returned=ep.frames_returned, turns=ep.turns, status=ep.status.value)
        return compute_reward(summary, self.reward_cfg)

    def _fail(self, ep: _Episode, err: Exception, kind: Optional[str] = None) -> Observation:
        ep.done, ep.status = True, Status.FAILED
        ep.error = f"{type(err).__name__}: {err}"
        COUNTERS["failed_episodes"] += 1
        COUNTERS[f"failed:{kind or type(err).__name__}"] += 1
        return Observation(f"error: the episode cannot continue ({ep.error})")

    def _info(self, ep: _Episode, **extra: Any) -> dict:
        info = {"task_id": ep.task.id, "status": ep.status.value if ep.done else "RUNNING",
                "duration": ep.duration, "fps": ep.fps, "turns": ep.turns, "tool_calls": ep.tool_calls,
                "tool_calls_ok": ep.tool_calls_ok, "frames_returned": ep.frames_returned,
                "format_errors": ep.format_errors, "decode_s": ep.decode_s, "answer": ep.answer}
        if ep.error:
            info["error"] = ep.error
        info.update(extra)
        return info


def _frames_needed(name: str, args: dict) -> int:
    return args["num_frames"] if name == "temporal_zoom" else (0 if name == "temporal_search" else 1)


def _clip(window: tuple[float, float], duration: float) -> tuple[float, float]:
    return max(0.0, window[0]), min(duration, window[1])


def _frame_list_text(head: str, frames: list[Frame]) -> str:
    return head + "\n" + "\n".join(f"t={fr.time:.1f}s {IMAGE_MARKER}" for fr in frames)


def _clean(text: str) -> str:
    """Task text may not forge image slots."""
    return text.replace(IMAGE_MARKER, "<img>")
