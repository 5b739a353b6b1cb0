"""Unit-test a video-tool environment without a model.

* `check_env(tasks, ...)`: a gymnasium-checker-like audit: API shapes, determinism
  under a seed, budgets, every tool's schema against what the env accepts (a user's tools
  as well as the built-ins), and a fuzzing pass. Raises `EnvCheckError` listing every problem.
* Scripted policies: `OraclePolicy` (search -> zoom -> answer, from the evidence),
  `BlindPolicy` (answers from the overview alone), `RandomPolicy` (random valid
  tool calls, then a random answer), `FuzzPolicy` (malformed and adversarial text).
* `run_episodes(tasks, policy, ...)`: the summary `weft check-env` prints.
Both drive episodes through the one episode interface (env/episodes.py), so the same audit runs
on an in-process LocalEnv and on a Ray-hosted env actor (actors.env_actor.RemoteEnv).

Policies answer from pixels when given perception functions (`locate`, `read`):
the oracle is then honest evidence that the tools return the right frames, and the
blind policy that the overview alone does not answer the question.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from configs.schema import EnvConfig, RewardConfig
from env.env import COUNTERS
from env.episodes import LocalEnv
from env.fuzz import fuzz_actions
from env.tools import TOOL_NAMES, sample_invalid_args, sample_valid_args
from env.types import IMAGE_MARKER, Frame, Observation, Task
from protos.records import FrameRef, content_hash

# locate(image, task) -> normalised bbox of the thing the question asks about, or None
Locate = Callable[[np.ndarray, Task], Optional[tuple[float, float, float, float]]]
# read(image, task) -> the answer read off an image, or None
Read = Callable[[np.ndarray, Task], Optional[str]]


class Policy(Protocol):
    """A scripted policy: `begin` at reset, then `act` once per turn with the last observation."""

    def begin(self, task: Task, obs: Observation, info: dict) -> None: ...

    def act(self, obs: Observation, info: dict) -> str: ...


def call(name: str, **arguments: Any) -> str:
    """One tool call in the action format."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def answer_text(task: Task, value: str) -> str:
    """The answer action; maps an answer to its option letter when the task has options."""
    if task.options:
        for i, opt in enumerate(task.options):
            if opt.strip().lower() == str(value).strip().lower():
                return f"<answer>{chr(65 + i)}</answer>"
    return f"<answer>{value}</answer>"


class OraclePolicy:
    """Uses the evidence: turn 1 searches the captions and zooms into the evidence span,
    turn 2 crops where `locate` finds the target, turn 3 answers what `read` reads.
    Without perception functions it answers the ground truth after zooming. A task whose metadata
    says "oracle_plan": "search_then_zoom" (env.flash) is played as a model could: search, zoom
    into the segment found, answer from the zoomed frames."""

    def __init__(self, locate: Optional[Locate] = None, read: Optional[Read] = None, zoom_frames: int = 8,
                 seed: int = 0):
        self.locate, self.read, self.zoom_frames = locate, read, zoom_frames
        self.rng = random.Random(seed)  # only for the fallback guess when perception finds nothing

    def begin(self, task: Task, obs: Observation, info: dict) -> None:
        self.task, self.duration, self.turn = task, info["duration"], 0
        self.blind = None if info.get("tools", True) else BlindPolicy(self.locate, self.read, seed=self.rng.randrange(2**31))
        if self.blind is not None:  # no tools at all (the no-tools baseline): answer from the frames shown
            self.blind.begin(task, obs, info)

    def act(self, obs: Observation, info: dict) -> str:
        self.turn += 1
        task = self.task
        if self.blind is not None:
            return self.blind.act(obs, info)
        if (task.metadata or {}).get("oracle_plan") == "search_then_zoom" and task.captions:
            return self._search_then_zoom(obs)
        if self.turn == 1:
            acts = [call("temporal_search", query=task.question, top_k=3)] if task.captions else []
            if task.evidence:
                start, end = task.evidence[0]
                pad = max(0.0, (0.5 - (end - start)) / 2)  # zoom at least a 0.5 s window
                acts.append(call("temporal_zoom", start=max(0.0, start - pad), end=min(self.duration, end + pad),
                                 num_frames=self.zoom_frames))
            return "<think>Search the captions and zoom into the moment.</think>" + "".join(acts)
        if self.turn == 2 and self.locate is not None:
            for fr in obs.frames:
                box = self.locate(fr.image, task)
                if box is not None:
                    return call("spatial_zoom", time=round(fr.time, 3), bbox=_pad_box(box, 0.02))
            return f"<answer>{_guess(task, self.rng)}</answer>"
        if self.read is None:
            return answer_text(task, task.answer)
        return self._answer_read(obs)

    def _answer_read(self, obs: Observation) -> str:
        """The answer `read` reads in the observation's frames (the first it reads), else a guess."""
        for fr in obs.frames if self.read is not None else ():
            value = self.read(fr.image, self.task)
            if value is not None:
                return answer_text(self.task, value)
        return f"<answer>{_guess(self.task, self.rng)}</answer>"

    def _search_then_zoom(self, obs: Observation) -> str:
        """What a model can do without the evidence: search with the question, zoom into the segment
        the search returns (its first hit), answer what `read` reads in the zoomed frames."""
        if self.turn == 1:
            return call("temporal_search", query=self.task.question, top_k=1)
        hit = FIRST_HIT.search(obs.text) if self.turn == 2 else None
        if hit:
            return call("temporal_zoom", start=float(hit.group(1)), end=float(hit.group(2)), num_frames=self.zoom_frames)
        return self._answer_read(obs)


FIRST_HIT = re.compile(r"^1\. (\d+(?:\.\d+)?)s-(\d+(?:\.\d+)?)s", re.MULTILINE)  # env.tools' search rows


class BlindPolicy:
    """Answers from the overview alone: reads the overview frames if it can, else guesses."""

    def __init__(self, locate: Optional[Locate] = None, read: Optional[Read] = None, seed: int = 0):
        self.locate, self.read, self.rng = locate, read, random.Random(seed)

    def begin(self, task: Task, obs: Observation, info: dict) -> None:
        self.task, self.overview = task, obs.frames

    def act(self, obs: Observation, info: dict) -> str:
        for fr in self.overview:
            box = self.locate(fr.image, self.task) if self.locate else None
            if box is not None and self.read is not None:
                value = self.read(_crop(fr.image, box), self.task)
                if value is not None:
                    return answer_text(self.task, value)
        return f"<answer>{_guess(self.task, self.rng)}</answer>"


class RandomPolicy:
    """Random valid tool calls drawn from the schemas, then a random answer."""

    def __init__(self, tools: list[dict], seed: int = 0, answer_prob: float = 0.25):
        self.tools, self.rng, self.answer_prob = tools, random.Random(seed), answer_prob

    def begin(self, task: Task, obs: Observation, info: dict) -> None:
        self.task, self.duration = task, info["duration"]

    def act(self, obs: Observation, info: dict) -> str:
        if self.rng.random() < self.answer_prob:
            return f"<answer>{_guess(self.task, self.rng)}</answer>"
        usable = [t for t in self.tools if t["function"]["name"] != "temporal_search" or self.task.captions]
        tool = self.rng.choice(usable or self.tools)
        return call(tool["function"]["name"], **sample_valid_args(tool, self.rng, self.duration))


class FuzzPolicy:
    """Malformed and adversarial turns from env.fuzz, mixed with some valid ones."""

    def __init__(self, seed: int = 0, batch: int = 64, tools: Optional[list[dict]] = None):
        self.rng, self.batch, self.queue, self.tools = random.Random(seed), batch, [], tools

    def begin(self, task: Task, obs: Observation, info: dict) -> None:
        self.duration = info["duration"] or 60.0

    def act(self, obs: Observation, info: dict) -> str:
        if not self.queue:
            self.queue = fuzz_actions(self.rng, self.batch, duration=self.duration, tools=self.tools)
        return self.queue.pop()


def _guess(task: Task, rng: random.Random) -> str:
    """A uniform guess among the options ("0" when there are none)."""
    return chr(65 + rng.randrange(len(task.options))) if task.options else "0"


def _pad_box(box: Sequence[float], pad: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [round(max(0.0, x1 - pad), 4), round(max(0.0, y1 - pad), 4),
            round(min(1.0, x2 + pad), 4), round(min(1.0, y2 + pad), 4)]


def _crop(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    return image[int(y1 * h):max(int(y1 * h) + 1, int(np.ceil(y2 * h))),
                 int(x1 * w):max(int(x1 * w) + 1, int(np.ceil(x2 * w)))]


# --------------------------------------------------------------------------- running


@dataclass
class EpisodeRecord:
    """What one scripted episode did."""

    task_id: str
    status: str
    reward: float
    reward_terms: dict[str, float]
    correct: bool
    tool_calls: int
    frames: int
    turns: int
    step_latencies: list[float] = field(default_factory=list)
    error: str = ""


async def run_episode(env: Any, task: Task, policy: Policy, episode_id: str = "") -> EpisodeRecord:
    """One episode of a scripted policy through the episode interface (env/episodes.py); exceptions from
    the env are recorded, not raised."""
    latencies: list[float] = []
    ep = env.episode(episode_id or f"harness-{task.id}-{time.monotonic_ns()}")
    try:
        t0 = time.perf_counter()
        obs, info = await ep.reset(task)
        latencies.append(time.perf_counter() - t0)
        reward, terms, done = 0.0, {}, info["status"] == "FAILED"
        if not done:
            policy.begin(task, obs, info)
        while not done:
            action = policy.act(obs, info)
            t0 = time.perf_counter()
            obs, reward, terminated, truncated, info = await ep.step(action)
            if info.get("subagent"):  # no model here to answer a sub-agent call: the env says so
                obs = await ep.answer([None] * len(info["subagent"]))
            latencies.append(time.perf_counter() - t0)
            done = terminated or truncated
            terms = info.get("reward_terms", terms)
    except Exception as e:  # noqa: BLE001 - the harness reports env crashes instead of dying on them
        COUNTERS["harness_caught_crash"] += 1
        return EpisodeRecord(task.id, "CRASH", 0.0, {}, False, 0, 0, 0, latencies, f"{type(e).__name__}: {e}")
    finally:
        await ep.close()
    return EpisodeRecord(task.id, info["status"], float(reward), dict(terms), terms.get("accuracy", 0.0) > 0,
                         info["tool_calls_ok"], info["frames_returned"], info["turns"], latencies, info.get("error", ""))


def run_episodes(tasks: Sequence[Task], policy: Policy, episodes: int, *, cfg: Optional[EnvConfig] = None,
                 reward_cfg: Optional[RewardConfig] = None, env: Any = None) -> dict[str, Any]:
    """Run `episodes` episodes (cycling over tasks) in `env` (default: a LocalEnv of `cfg`) and summarise
    them as `weft check-env` prints."""
    env = env or LocalEnv(cfg, reward_cfg)

    async def go() -> tuple[dict, list[EpisodeRecord], dict]:
        before = await env.stats()
        records = [await run_episode(env, tasks[i % len(tasks)], policy, f"harness-{i}") for i in range(episodes)]
        return before["decoder"], records, (await env.stats())["decoder"]

    before, records, after = asyncio.run(go())
    return summarize(records, before, after)


def summarize(records: list[EpisodeRecord], before: dict, after: dict) -> dict[str, Any]:
    lat = np.asarray([x for r in records for x in r.step_latencies] or [0.0])
    ok = [r for r in records if r.status not in ("FAILED", "CRASH")]
    names = sorted({k for r in ok for k in r.reward_terms})
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {
        "episodes": len(records),
        "accuracy": float(np.mean([r.correct for r in ok])) if ok else 0.0,
        "reward_mean": float(np.mean([r.reward for r in ok])) if ok else 0.0,
        "reward_terms": {k: float(np.mean([r.reward_terms.get(k, 0.0) for r in ok])) for k in names},
        "crashes": sum(r.status == "CRASH" for r in records),
        "failed": sum(r.status == "FAILED" for r in records),
        "failure_reasons": sorted({r.error for r in records if r.error})[:10],
        "mean_tool_calls": float(np.mean([r.tool_calls for r in ok])) if ok else 0.0,
        "mean_turns": float(np.mean([r.turns for r in ok])) if ok else 0.0,
        "frames_decoded": after["frames_decoded"] - before["frames_decoded"],
        "cache_hit_rate": hits / max(1, hits + misses),
        "step_latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
        "step_latency_p95_ms": float(np.percentile(lat, 95) * 1e3),
    }


# --------------------------------------------------------------------------- checking


USER_TOOL_TRIES = 50  # schema-valid calls of a user's tool, of which its own check must let one through


class EnvCheckError(AssertionError):
    """The environment broke its contract; the message lists every problem."""


def check_env(tasks: Sequence[Task], *, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None,
              seed: int = 0, fuzz_actions_count: int = 500, env: Any = None) -> dict[str, Any]:
    """Audit an environment on some tasks: its episodes (`env`: a LocalEnv of `cfg` by default, or an
    actors.env_actor.RemoteEnv) and every tool it has, built-in or a user's. Returns a report; raises
    EnvCheckError on any problem."""
    env = env or LocalEnv(cfg, reward_cfg)
    cfg = cfg or getattr(env, "cfg", None) or EnvConfig()
    problems: list[str] = []
    counts: dict[str, int] = {}

    async def go() -> None:
        tools = await env.tool_schemas()
        for name, check in (("api", _check_api), ("determinism", _check_determinism), ("budgets", _check_budgets),
                            ("schemas", _check_schemas), ("fuzz", _check_fuzz)):
            try:
                counts[name] = await check(_Audit(env, cfg, tools, list(tasks), seed, problems, fuzz_actions_count))
            except Exception as e:  # noqa: BLE001 - a crash is itself a finding
                problems.append(f"{name}: raised {type(e).__name__}: {e}")

    asyncio.run(go())
    report = {"ok": not problems, "problems": problems, "checked": counts}
    if problems:
        raise EnvCheckError("environment check failed:\n  " + "\n  ".join(problems))
    return report


@dataclass
class _Audit:
    env: Any
    cfg: EnvConfig
    tools: list[dict]
    tasks: list[Task]
    seed: int
    problems: list[str]
    fuzz_n: int

    def episode(self) -> Any:
        return self.env.episode(f"check-{time.monotonic_ns()}-{random.random()}")

    def a_valid_call(self, rng: random.Random, task: Task, duration: float) -> str:
        """One schema-valid call of a tool this task can use (search needs captions)."""
        usable = [t for t in self.tools if t["function"]["name"] != "temporal_search" or task.captions] or self.tools
        tool = rng.choice(usable)
        return call(tool["function"]["name"], **sample_valid_args(tool, rng, duration))


def _check_obs(obs: Any, where: str, problems: list[str]) -> None:
    if not isinstance(obs, Observation) or not isinstance(obs.text, str) or not isinstance(obs.frames, list):
        problems.append(f"{where}: observation is not Observation(text: str, frames: list)")
        return
    if obs.text.count(IMAGE_MARKER) != len(obs.frames):
        problems.append(f"{where}: {obs.text.count(IMAGE_MARKER)} image markers in the text for {len(obs.frames)} frames")
    for fr in obs.frames:
        img = getattr(fr, "image", None)
        if not isinstance(fr, Frame) or not isinstance(img, np.ndarray) or img.dtype != np.uint8 \
                or img.ndim != 3 or img.shape[2] != 3:
            problems.append(f"{where}: a frame is not uint8 HxWx3")
            continue
        if not isinstance(fr.ref, FrameRef) or fr.ref.content_hash != content_hash(img) \
                or tuple(fr.ref.size) != (img.shape[1], img.shape[0]):
            problems.append(f"{where}: a frame's FrameRef does not describe its pixels")
        if not np.isfinite(fr.time) or fr.time < 0:
            problems.append(f"{where}: a frame has a bad time {fr.time}")


async def _check_api(a: _Audit) -> int:
    rng = random.Random(a.seed)
    for task in a.tasks:
        ep = a.episode()
        try:
            out = await ep.reset(task)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
                a.problems.append(f"reset({task.id}) must return (obs, info)")
                continue
            _check_obs(out[0], f"reset({task.id})", a.problems)
            res = await ep.step(a.a_valid_call(rng, task, out[1].get("duration") or 1.0))
            if not (isinstance(res, tuple) and len(res) == 5):
                a.problems.append("step must return (obs, reward, terminated, truncated, info)")
                continue
            obs, reward, term, trunc, info = res
            _check_obs(obs, f"step({task.id})", a.problems)
            if not isinstance(reward, float) or not np.isfinite(reward) or not isinstance(term, bool) \
                    or not isinstance(trunc, bool) or not isinstance(info, dict):
                a.problems.append(f"step({task.id}): reward must be a finite float, terminated/truncated bools, "
                                  "info a dict")
        finally:
            await ep.close()
    return len(a.tasks)


def _fingerprint(obs: Observation) -> tuple:
    return obs.text, tuple(fr.ref.content_hash for fr in obs.frames)


async def _check_determinism(a: _Audit) -> int:
    for task in a.tasks[:3]:
        runs = []
        for _ in range(2):
            ep, pol = a.episode(), RandomPolicy(a.tools, seed=a.seed, answer_prob=0.0)
            try:
                obs, info = await ep.reset(task, seed=a.seed)
                trace = [_fingerprint(obs)]
                if info["status"] != "FAILED":
                    pol.begin(task, obs, info)
                    for _ in range(3):
                        obs, r, term, trunc, info = await ep.step(pol.act(obs, info))
                        trace.append((_fingerprint(obs), r))
                        if term or trunc:
                            break
            finally:
                await ep.close()
            runs.append(trace)
        if runs[0] != runs[1]:
            a.problems.append(f"determinism: task {task.id} gave different observations for the same seed and actions")
    return min(3, len(a.tasks))


async def _check_budgets(a: _Audit) -> int:
    cfg, rng = a.cfg, random.Random(a.seed + 1)
    for task in a.tasks[:3]:
        ep = a.episode()
        try:
            obs, info = await ep.reset(task)
            if info["status"] == "FAILED":
                continue
            for _ in range(cfg.max_turns + 2):
                greedy = "".join(a.a_valid_call(rng, task, info["duration"]) for _ in range(cfg.max_calls_per_turn))
                obs, r, term, trunc, info = await ep.step(greedy)
                if term or trunc:
                    break
        finally:
            await ep.close()
        if not trunc or info["turns"] != cfg.max_turns:
            a.problems.append(f"budgets: an episode without an answer must truncate after max_turns={cfg.max_turns}")
        if info["frames_returned"] > cfg.max_frames or info["tool_calls"] > cfg.max_tool_calls:
            a.problems.append(f"budgets: frames {info['frames_returned']}/{cfg.max_frames}, "
                              f"tool calls {info['tool_calls']}/{cfg.max_tool_calls} over budget")
    return min(3, len(a.tasks))


async def _check_schemas(a: _Audit) -> int:
    """Every tool refuses each way of breaking its schema. A built-in runs every call its schema and
    rules allow; a user's tool (whose `check` may say more than its schema) must run at least one of
    USER_TOOL_TRIES schema-valid calls, and what it returns must fit the observation contract."""
    rng, checked = random.Random(a.seed), 0
    task = next((t for t in a.tasks if t.captions), a.tasks[0])
    for spec in a.tools:
        name = spec["function"]["name"]
        if name == "temporal_search" and not task.captions:
            continue
        ep = a.episode()
        try:
            obs, info = await ep.reset(task)
            if info["status"] == "FAILED":
                a.problems.append(f"schemas: task {task.id} failed at reset: {info.get('error')}")
                return checked
            builtin = name in TOOL_NAMES
            cases = [("valid", sample_valid_args(spec, rng, info["duration"])) for _ in range(5 if builtin else USER_TOOL_TRIES)]
            cases += sample_invalid_args(spec, rng, info["duration"])
            ran, first_refusal = 0, ""
            for kind, args in cases:
                await ep.reset(task)
                obs, *_ = await ep.step(f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>")
                _check_obs(obs, f"schemas: {name}", a.problems)
                refused = f"[{name}] error" in obs.text or obs.text.startswith("error")
                if kind == "valid" and refused:
                    first_refusal = first_refusal or f"{args} -> {obs.text[:200]}"
                    if builtin:
                        a.problems.append(f"schemas: {name} refused arguments its schema allows: {args} -> {obs.text[:200]}")
                elif kind == "valid":
                    ran += 1
                elif not refused:
                    a.problems.append(f"schemas: {name} accepted arguments breaking it ({kind}): {args}")
                checked += 1
            if not builtin and ran == 0:
                a.problems.append(f"schemas: {name} ran none of {USER_TOOL_TRIES} schema-valid calls (its check refuses "
                                  f"what its schema allows?) first: {first_refusal}")
        finally:
            await ep.close()
    return checked


async def _check_fuzz(a: _Audit) -> int:
    rng, done = random.Random(a.seed), 0
    crashes_before = COUNTERS.get("env_crash", 0)
    actions = fuzz_actions(rng, a.fuzz_n, duration=60.0, tools=a.tools)
    ep = a.episode()
    try:
        obs, info = await ep.reset(a.tasks[0])
        for action in actions:
            if info.get("status") != "RUNNING":
                obs, info = await ep.reset(a.tasks[done % len(a.tasks)])
            obs, r, term, trunc, info = await ep.step(action)
            _check_obs(obs, "fuzz", a.problems)
            if not np.isfinite(r):
                a.problems.append(f"fuzz: non-finite reward for {action[:80]!r}")
            done += 1
            if len(a.problems) > 20:
                break
    finally:
        await ep.close()
    crashes = COUNTERS.get("env_crash", 0) - crashes_before
    if crashes:
        a.problems.append(f"fuzz: the env caught {crashes} internal crash(es)")
    return done
