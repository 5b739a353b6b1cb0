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

from configs.schema import EnvConfig, RewardConfig
from env.errors import VideoError
from env.parser import parse_action
from env.rewards import RewardFn, load_reward, weigh
from env.tool import EpisodeVideo, Tool, ToolError, ToolOutput
from env.tools import load_tools, validate_call
from env.types import IMAGE_MARKER, Episode, Frame, Observation, Task, ToolCall, ToolCallRecord
from env.video import FrameDecoder, get_decoder
from protos.records import Status

# Tool calls of one turn run in parallel on this pool (decoding releases the GIL).
_TOOL_POOL: Optional[ThreadPoolExecutor] = None
_TOOL_POOL_LOCK = threading.Lock()

# Process-wide counters (all episodes): failures by kind, crashes caught, tool errors.
COUNTERS: Counter = Counter()

MAX_SUBAGENT_FRAMES = 64  # frames one sub-agent call may show the policy (ParaVT's crop_video: 16)
_LAST_TURN = 'This is your last turn: the tools are off. Give your final answer now.'


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
    calls: list[ToolCallRecord] = dataclasses.field(default_factory=list)
    answer: Optional[str] = None
    done: bool = False
    status: Status = Status.COMPLETED
    error: str = ""
    video: Optional[EpisodeVideo] = None
    decode_s: float = 0.0
    max_turns: int = 0  # this episode's turn limit (env.max_turns, or the reset options' max_turns)
    texts: list[str] = dataclasses.field(default_factory=list)  # the model's turns as written
    # Sub-agent calls of the last turn waiting for the policy's answers (`answer`): the observation's
    # lines and frames, and per call (line index, head, tool name, index of its ToolCallRecord).
    waiting: Optional[tuple[list[str], list[Frame], list[tuple[int, str, str, int]]]] = None


class VideoToolEnv:
    """One episode at a time: `reset(task)`, then `step(text)` until terminated or truncated.

    `VideoToolEnv(**overrides)` takes EnvConfig field names (e.g. overview_frames=4);
    `cfg=`/`reward_cfg=` pass whole configs, `decoder=` a FrameDecoder (default: the
    process-wide shared one, so the G episodes of a group share decodes). The tools are
    `cfg.tools` and the reward function `reward_cfg.fn`, resolved here (`tools=` and
    `reward=` pass already-resolved ones, as the episode hosts do once per process).
    """

    def __init__(self, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None, *,
                 decoder: Optional[FrameDecoder] = None, tools: Optional[dict[str, Tool]] = None,
                 reward: Optional[RewardFn] = None, **overrides: Any):
        cfg = cfg or EnvConfig()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(EnvConfig)}
        if unknown:
            raise TypeError(f"unknown VideoToolEnv option(s) {sorted(unknown)}; see configs.EnvConfig")
        self.cfg = dataclasses.replace(cfg, **overrides)
        self.reward_cfg = reward_cfg or RewardConfig()
        self.decoder = decoder or get_decoder(self.cfg.cache_bytes, self.cfg.reader_pool_size, self.cfg.video_backend)
        self.toolset = tools if tools is not None else load_tools(self.cfg)
        self.reward_fn = reward if reward is not None else load_reward(self.reward_cfg)
        self.tools = [t.schema for t in self.toolset.values()]  # what the chat template shows the model
        self._ep: Optional[_Episode] = None

    # ---------------------------------------------------------------- reset
    def reset(self, task: Task, *, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple[Observation, dict]:
        """Start an episode: the question, options and a coarse overview of the whole video.
        `options` (gymnasium's): {"max_turns": N} gives this episode its own turn limit (validation's)."""
        turns = (options or {}).get("max_turns") or self.cfg.max_turns
        ep = self._ep = _Episode(task=task, max_turns=max(1, int(turns)))
        try:
            info = self.decoder.info(task.video)
            ep.duration, ep.fps, ep.num_frames = info.duration, info.fps, info.num_frames
            n = self.overview_count(task, seed, ep.duration)
            times = [(i + 0.5) * ep.duration / n for i in range(n)]
            frames = self._decode(ep, times, tuple(self.cfg.overview_size))
        except VideoError as e:
            return self._fail(ep, e), self._info(ep, overview_frames=0)
        ep.video = EpisodeVideo(task.video, self.decoder, self.cfg.max_pixels_per_frame, list(task.captions))
        lines = [f"Video: {ep.duration:.1f} s long. Overview: {len(frames)} frames sampled uniformly."]
        if self.toolset and not self.cfg.last_turn_tools and ep.max_turns == 1:
            lines.append(_LAST_TURN)
        lines += [f"t={fr.time:.1f}s {IMAGE_MARKER}" for fr in frames]
        lines.append(f"Question: {_clean(task.question)}")
        if task.options:
            lines.append("Options:")
            lines += [f"{chr(65 + i)}. {_clean(o)}" for i, o in enumerate(task.options)]
            lines.append("Answer with the option's letter, e.g. <answer>A</answer>.")
        else:
            lines.append("Answer inside <answer>...</answer>.")
        lines.append("The overview is coarse: use the tools to look closer before answering." if self.toolset
                     else "Answer from these frames.")
        return Observation("\n".join(lines), frames), self._info(ep, overview_frames=len(frames),
                                                                 tools=list(self.toolset))

    def overview_count(self, task: Task, seed: Optional[int] = None, duration: Optional[float] = None) -> int:
        """Overview size: drawn per task from overview_choices (stable for a seed), else duration x
        overview_fps capped at overview_frames, else overview_frames."""
        if not self.cfg.overview_choices:
            if self.cfg.overview_fps and duration:
                return max(1, min(self.cfg.overview_frames, round(duration * self.cfg.overview_fps)))
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
        except (VideoError, _RewardFailed) as e:
            return self._fail(ep, e), 0.0, True, False, self._info(ep)
        except Exception as e:  # noqa: BLE001 - an env bug must not kill a rollout worker: count it, end the episode
            COUNTERS["env_crash"] += 1
            return self._fail(ep, e, kind="env_crash"), 0.0, True, False, self._info(ep)

    def _step(self, ep: _Episode, action: str) -> tuple[Observation, float, bool, bool, dict]:
        if ep.waiting is not None:  # the driver never answered the last turn's sub-agent calls
            self.answer([])
        ep.turns += 1
        ep.texts.append(action)
        parsed = parse_action(action, max_calls=self.cfg.max_calls_per_turn)
        lines = [f"error: {e}" for e in parsed.errors]
        if parsed.answer is not None:
            ep.format_errors += bool(parsed.errors)
            ep.answer, ep.done, ep.status = parsed.answer, True, Status.COMPLETED
            reward, terms = self._score(ep)
            return Observation("\n".join(lines)), reward, True, False, self._info(ep, reward_terms=terms)
        tools_off = ep.turns >= ep.max_turns and not self.cfg.last_turn_tools
        texts, frames, refused, waiting = (self._refuse_all(ep, parsed.calls) if tools_off
                                           else self._run_calls(ep, parsed.calls))
        base = len(lines)
        lines += texts
        ep.format_errors += bool(parsed.errors or refused)  # one penalty per malformed turn, however many faults
        if ep.turns >= ep.max_turns:
            ep.done, ep.status = True, Status.TRUNCATED
            reward, terms = self._score(ep)
            lines.append("The turn budget is used up; the episode ends without an answer.")
            return Observation("\n".join(lines), frames), reward, False, True, self._info(ep, reward_terms=terms)
        lines.append(f"[{ep.max_turns - ep.turns} turn(s), {self.cfg.max_tool_calls - ep.tool_calls} tool call(s), "
                     f"{self.cfg.max_frames - ep.frames_returned} frame(s) left]")
        if ep.turns + 1 >= ep.max_turns and not self.cfg.last_turn_tools:
            lines.append(_LAST_TURN)
        if not waiting:
            return Observation("\n".join(lines), frames), 0.0, False, False, self._info(ep)
        ep.waiting = (lines, frames, [(base + i, head, name, rec) for i, head, name, rec, _ in waiting])
        asks = [{"tool": name, "prompt": q.prompt, "max_tokens": q.max_tokens, "frames": fr}
                for _, _, name, _, (q, fr) in waiting]
        return Observation("\n".join(lines), frames), 0.0, False, False, self._info(ep, subagent=asks)

    def answer(self, answers: Any) -> Observation:
        """The observation of a turn whose calls included sub-agent calls (`info["subagent"]` of its
        step), given the policy's answers in the same order. A missing answer (None, or a driver with
        no model: check-env) becomes an error saying so, and the call counts as not run."""
        ep = self._ep
        if ep is None or ep.waiting is None:
            COUNTERS["answer_without_question"] += 1
            return Observation("error: no sub-agent call is waiting for an answer")
        lines, frames, slots = ep.waiting
        ep.waiting = None
        answers = list(answers or [])
        for k, (line, head, name, rec) in enumerate(slots):
            text = answers[k] if k < len(answers) else None
            call = ep.calls[rec]
            if text is None:
                COUNTERS["subagent_unanswered"] += 1
                err = (f"{name} is answered by the policy itself as a sub-agent, and no answer came back: no model "
                       "is at hand (weft check-env and scripted policies run without one), or its generation failed")
                lines[line] = f"{head} error: {err}."
                ep.calls[rec] = dataclasses.replace(call, ok=False, error=err)
                ep.tool_calls_ok -= 1
                continue
            text = f"{call.output.text} {_clean(str(text)).strip()}".strip()
            lines[line] = f"{head} {text}"
            ep.calls[rec] = dataclasses.replace(call, output=dataclasses.replace(call.output, text=text))
        return Observation("\n".join(lines), frames)

    def truncate(self, reason: str = "budget") -> tuple[float, dict]:
        """End the episode from outside (the agent loop ran out of tokens): scored as TRUNCATED."""
        ep = self._ep
        if ep is None or ep.done:
            return 0.0, self._info(ep) if ep else {"status": "FAILED"}
        ep.done, ep.status = True, Status.TRUNCATED
        try:
            reward, terms = self._score(ep)
        except _RewardFailed as e:
            self._fail(ep, e)
            return 0.0, self._info(ep)
        return reward, self._info(ep, reward_terms=terms, truncated_by=reason)

    # ---------------------------------------------------------------- tools
    def _refuse_all(self, ep: _Episode, calls: list[ToolCall]) -> tuple[list[str], list[Frame], int, list]:
        """The last turn with env.last_turn_tools off: every call is refused."""
        err = "tools are off on the last turn; answer now"
        for call in calls:
            ep.calls.append(ToolCallRecord(ep.turns, str(call.name), call.arguments, False, error=err))
        return [f"[{c.name or 'tool call'}] error: {err}" for c in calls], [], len(calls), []

    def _run_calls(self, ep: _Episode, calls: list[ToolCall]) -> tuple[list[str], list[Frame], int, list]:
        """Validate every call against its tool's schema, check and the budgets, run the valid ones in
        parallel. Returns the observation's lines, the frames, how many calls were refused, and the
        sub-agent calls waiting for the policy (line index, head, tool, record index, (query, frames))."""
        plans: list[tuple[ToolCall, Optional[dict], Optional[str], int]] = []
        frames_left = self.cfg.max_frames - ep.frames_returned
        for call in calls:
            args, err = validate_call(call, self.toolset, ep.duration)
            cost = self.toolset[call.name].cost(args) if err is None else 0
            if err is None and ep.tool_calls >= self.cfg.max_tool_calls:
                err = f"tool-call budget exhausted ({self.cfg.max_tool_calls} per episode); answer now"
            elif err is None and cost > self.cfg.max_frames_per_call:
                err = f"{call.name} asks for {cost} frames; at most {self.cfg.max_frames_per_call} per call"
            elif err is None and cost > frames_left:
                err = f"frame budget: {call.name} asks for {cost} frame(s) but only {frames_left} are left"
            if err is None:
                frames_left -= cost
                ep.tool_calls += 1
            plans.append((call, args, err, cost))
        pool = _tool_pool(self.cfg.decode_threads)
        futures = {id(c): pool.submit(self._run_tool, ep, c.name, a, cost) for c, a, e, cost in plans if e is None}
        texts, frames, refused, waiting = [], [], 0, []
        for call, args, err, cost in plans:
            head = f"[{call.name}]" if call.name else "[tool call]"
            if err is None:
                out, fr, err = futures[id(call)].result()  # re-raises VideoError: the episode fails
                if err is not None:  # the tool refused it: nothing of the budget is spent
                    ep.tool_calls -= 1
            if err is not None:
                refused += 1
                texts.append(f"{head} error: {err}")
                ep.calls.append(ToolCallRecord(ep.turns, str(call.name), call.arguments if args is None else args,
                                               False, error=err))
                continue
            ep.tool_calls_ok += 1
            ep.calls.append(ToolCallRecord(ep.turns, call.name, args, True, output=out,
                                           label=self.toolset[call.name].describe(args)))
            if out.ask is not None:  # its frames are the sub-agent's, not the episode's
                waiting.append((len(texts), head, call.name, len(ep.calls) - 1, (out.ask, fr)))
                texts.append(f"{head} (waiting for the sub-agent's answer)")
                continue
            ep.frames_returned += len(fr)  # tool frames count against the budget; the overview is free
            texts.append(_frame_list_text(f"{head} {_clean(out.text)}", fr) if fr else f"{head} {_clean(out.text)}")
            frames += fr
        return texts, frames, refused, waiting

    def _run_tool(self, ep: _Episode, name: str, args: dict, cost: int) -> tuple[Optional[ToolOutput], list[Frame], Optional[str]]:
        """(output, its frames with refs, None), or (None, [], why it was refused). VideoError propagates."""
        t0 = time.perf_counter()
        try:
            out = self.toolset[name].run(ep.video, args)
            if not isinstance(out, ToolOutput):
                raise ToolError(f"{name} returned a {type(out).__name__}, not an env.ToolOutput")
            frames = [ep.video.frame(img) for img in out.frames]
            if out.ask is not None and len(frames) > MAX_SUBAGENT_FRAMES:
                raise ToolError(f"{name} gave its sub-agent {len(frames)} frames, more than {MAX_SUBAGENT_FRAMES}")
            if out.ask is None and len(frames) > cost:
                raise ToolError(f"{name} returned {len(frames)} frames, more than its frame_cost {cost}")
            if out.window is not None:
                a, b = (float(v) for v in out.window)
                out = dataclasses.replace(out, window=(max(0.0, min(a, b)), min(ep.duration, max(a, b))))
        except VideoError:
            raise
        except ToolError as e:
            return None, [], str(e)
        except Exception as e:  # noqa: BLE001 - a broken tool refuses its call; the episode and the run go on
            COUNTERS["tool_crash"] += 1
            COUNTERS[f"tool_crash:{name}"] += 1
            return None, [], f"{name} failed ({type(e).__name__}: {str(e)[:200]})"
        finally:
            ep.decode_s += time.perf_counter() - t0
        return out, frames, None

    def _decode(self, ep: _Episode, times: list[float], size: tuple[int, int]) -> list[Frame]:
        """The overview: frames at the given seconds (each once), with refs and hashes."""
        t0 = time.perf_counter()
        video = EpisodeVideo(ep.task.video, self.decoder, self.cfg.max_pixels_per_frame)
        images, _ = video.get_frames(times, size)
        ep.decode_s += time.perf_counter() - t0
        return [video.frame(img) for img in images]

    # --------------------------------------------------------------- scoring
    def episode(self) -> Optional[Episode]:
        """The current episode as a reward function sees it (None before reset)."""
        ep = self._ep
        if ep is None:
            return None
        return Episode(answer=ep.answer, tool_calls=list(ep.calls), turns=ep.turns, format_errors=ep.format_errors,
                       status=ep.status.value, frames_returned=ep.frames_returned, duration=ep.duration,
                       texts=list(ep.texts))

    def _score(self, ep: _Episode) -> tuple[float, dict[str, float]]:
        try:
            return weigh(self.reward_fn(self.episode(), ep.task), self.reward_cfg.weights)
        except Exception as e:  # noqa: BLE001 - a broken reward function fails this episode, not the run
            COUNTERS["reward_crash"] += 1
            raise _RewardFailed(f"reward function {self.reward_cfg.fn!r} failed: {type(e).__name__}: {e}") from None

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
                "format_errors": ep.format_errors, "decode_s": ep.decode_s, "answer": ep.answer,
                "calls": [c.to_dict() for c in ep.calls if c.turn == ep.turns]}
        if ep.error:
            info["error"] = ep.error
        info.update(extra)
        return info


class _RewardFailed(Exception):
    """The reward function raised or returned something that is not named finite numbers."""


def _frame_list_text(head: str, frames: list[Frame]) -> str:
    return head + "\n" + "\n".join(f"t={fr.time:.1f}s {IMAGE_MARKER}" for fr in frames)


def _clean(text: str) -> str:
    """Task text may not forge image slots."""
    return text.replace(IMAGE_MARKER, "<img>")
