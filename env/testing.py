"""Unit-test a video-tool environment without a model.

* `check_env(tasks, ...)`: a gymnasium-checker-like audit: API shapes, determinism
  under a seed, budgets, every tool's schema against what the env accepts, and a
  fuzzing pass. Raises `EnvCheckError` listing every problem.
* Scripted policies: `OraclePolicy` (search -> zoom -> answer, from the evidence),
  `BlindPolicy` (answers from the overview alone), `RandomPolicy` (random valid
  tool calls, then a random answer), `FuzzPolicy` (malformed and adversarial text).
* `run_episodes(tasks, policy, ...)`: the summary `weft check-env` prints.

Policies answer from pixels when given perception functions (`locate`, `read`):
the oracle is then honest evidence that the tools return the right frames, and the
blind policy that the overview alone does not answer the question.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from configs.schema import EnvConfig, RewardConfig
from env.env import COUNTERS, VideoToolEnv
from env.fuzz import fuzz_actions
from env.tools import sample_invalid_args, sample_valid_args
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
    Without perception functions it answers the ground truth after zooming."""

    def __init__(self, locate: Optional[Locate] = None, read: Optional[Read] = None, zoom_frames: int = 8,
                 seed: int = 0):
        self.locate, self.read, self.zoom_frames = locate, read, zoom_frames
        self.rng = random.Random(seed)  # only for the fallback guess when perception finds nothing

    def begin(self, task: Task, obs: Observation, info: dict) -> None:
        self.task, self.duration, self.turn = task, info["duration"], 0

    def act(self, obs: Observation, info: dict) -> str:
        self.turn += 1
        task = self.task
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
        for fr in obs.frames:
            value = self.read(fr.image, task)
            if value is not None:
                return answer_text(task, value)
        return f"<answer>{_guess(task, self.rng)}</answer>"


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
        tool = self.rng.choice(self.tools)
        if tool["function"]["name"] == "temporal_search" and not self.task.captions:
            tool = next(t for t in self.tools if t["function"]["name"] == "get_frame")
        return call(tool["function"]["name"], **sample_valid_args(tool, self.rng, self.duration))


class FuzzPolicy:
    """Malformed and adversarial turns from env.fuzz, mixed with some valid ones."""

    def __init__(self, seed: int = 0, batch: int = 64):
        self.rng, self.batch, self.queue = random.Random(seed), batch, []

    def begin(self, task: Task, obs: Observation, info: dict) -> None:
        self.duration = info["duration"] or 60.0

    def act(self, obs: Observation, info: dict) -> str:
        if not self.queue:
            self.queue = fuzz_actions(self.rng, self.batch, duration=self.duration)
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


def run_episode(env: VideoToolEnv, task: Task, policy: Policy) -> EpisodeRecord:
    """One episode of a scripted policy; exceptions from the env are recorded, not raised."""
    latencies: list[float] = []
    try:
        t0 = time.perf_counter()
        obs, info = env.reset(task)
        latencies.append(time.perf_counter() - t0)
        reward, terms, done = 0.0, {}, info["status"] == "FAILED"
        if not done:
            policy.begin(task, obs, info)
        while not done:
            action = policy.act(obs, info)
            t0 = time.perf_counter()
            obs, reward, terminated, truncated, info = env.step(action)
            latencies.append(time.perf_counter() - t0)
            done = terminated or truncated
            terms = info.get("reward_terms", terms)
    except Exception as e:  # noqa: BLE001 - the harness reports env crashes instead of dying on them
        COUNTERS["harness_caught_crash"] += 1
        return EpisodeRecord(task.id, "CRASH", 0.0, {}, False, 0, 0, 0, latencies, f"{type(e).__name__}: {e}")
    return EpisodeRecord(task.id, info["status"], float(reward), dict(terms), terms.get("accuracy", 0.0) > 0,
                         info["tool_calls_ok"], info["frames_returned"], info["turns"], latencies, info.get("error", ""))


def run_episodes(tasks: Sequence[Task], policy: Policy, episodes: int, *, cfg: Optional[EnvConfig] = None,
                 reward_cfg: Optional[RewardConfig] = None) -> dict[str, Any]:
    """Run `episodes` episodes (cycling over tasks) and summarise them as `weft check-env` prints."""
    env = VideoToolEnv(cfg, reward_cfg)
    before = env.decoder.stats()
    records = [run_episode(env, tasks[i % len(tasks)], policy) for i in range(episodes)]
    after = env.decoder.stats()
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


class EnvCheckError(AssertionError):
    """The environment broke its contract; the message lists every problem."""


def check_env(tasks: Sequence[Task], *, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None,
              seed: int = 0, fuzz_actions_count: int = 500, make_env: Optional[Callable[[], VideoToolEnv]] = None
              ) -> dict[str, Any]:
    """Audit an environment on some tasks. Returns a report; raises EnvCheckError on any problem."""
    make_env = make_env or (lambda: VideoToolEnv(cfg, reward_cfg))
    problems: list[str] = []
    counts: dict[str, int] = {}
    for name, check in (("api", _check_api), ("determinism", _check_determinism), ("budgets", _check_budgets),
                        ("schemas", _check_schemas), ("fuzz", _check_fuzz)):
        try:
            counts[name] = check(make_env, list(tasks), seed, problems, fuzz_actions_count)
        except Exception as e:  # noqa: BLE001 - a crash is itself a finding
            problems.append(f"{name}: raised {type(e).__name__}: {e}")
    report = {"ok": not problems, "problems": problems, "checked": counts}
    if problems:
        raise EnvCheckError("environment check failed:\n  " + "\n  ".join(problems))
    return report


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


def _check_api(make_env, tasks, seed, problems, _n) -> int:
    env = make_env()
    for task in tasks:
        out = env.reset(task)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            problems.append(f"reset({task.id}) must return (obs, info)")
            continue
        _check_obs(out[0], f"reset({task.id})", problems)
        res = env.step(call("get_frame", time=0.0))
        if not (isinstance(res, tuple) and len(res) == 5):
            problems.append("step must return (obs, reward, terminated, truncated, info)")
            continue
        obs, reward, term, trunc, info = res
        _check_obs(obs, f"step({task.id})", problems)
        if not isinstance(reward, float) or not np.isfinite(reward) or not isinstance(term, bool) \
                or not isinstance(trunc, bool) or not isinstance(info, dict):
            problems.append(f"step({task.id}): reward must be a finite float, terminated/truncated bools, info a dict")
    return len(tasks)


def _fingerprint(obs: Observation) -> tuple:
    return obs.text, tuple(fr.ref.content_hash for fr in obs.frames)


def _check_determinism(make_env, tasks, seed, problems, _n) -> int:
    tools = make_env().tools
    for task in tasks[:3]:
        runs = []
        for _ in range(2):
            env, pol = make_env(), RandomPolicy(tools, seed=seed, answer_prob=0.0)
            obs, info = env.reset(task, seed=seed)
            trace = [_fingerprint(obs)]
            if info["status"] != "FAILED":
                pol.begin(task, obs, info)
                for _ in range(3):
                    obs, r, term, trunc, info = env.step(pol.act(obs, info))
                    trace.append((_fingerprint(obs), r))
                    if term or trunc:
                        break
            runs.append(trace)
        if runs[0] != runs[1]:
            problems.append(f"determinism: task {task.id} gave different observations for the same seed and actions")
    return min(3, len(tasks))


def _check_budgets(make_env, tasks, seed, problems, _n) -> int:
    env = make_env()
    cfg = env.cfg
    for task in tasks[:3]:
        obs, info = env.reset(task)
        if info["status"] == "FAILED":
            continue
        greedy = "".join(call("temporal_zoom", start=0.0, end=info["duration"], num_frames=cfg.max_frames_per_call)
                         for _ in range(cfg.max_calls_per_turn))
        for turn in range(cfg.max_turns + 2):
            obs, r, term, trunc, info = env.step(greedy)
            if term or trunc:
                break
        if not trunc or info["turns"] != cfg.max_turns:
            problems.append(f"budgets: an episode without an answer must truncate after max_turns={cfg.max_turns}")
        if info["frames_returned"] > cfg.max_frames or info["tool_calls"] > cfg.max_tool_calls:
            problems.append(f"budgets: frames {info['frames_returned']}/{cfg.max_frames}, "
                            f"tool calls {info['tool_calls']}/{cfg.max_tool_calls} over budget")
    return min(3, len(tasks))


def _check_schemas(make_env, tasks, seed, problems, _n) -> int:
    """Every tool accepts what its schema allows and refuses each way of breaking it."""
    rng, env, checked = random.Random(seed), make_env(), 0
    task = next((t for t in tasks if t.captions), tasks[0])
    for spec in env.tools:
        name = spec["function"]["name"]
        if name == "temporal_search" and not task.captions:
            continue
        obs, info = env.reset(task)
        if info["status"] == "FAILED":
            problems.append(f"schemas: task {task.id} failed at reset: {info.get('error')}")
            return checked
        cases = [("valid", sample_valid_args(spec, rng, info["duration"])) for _ in range(5)]
        cases += sample_invalid_args(spec, rng, info["duration"])
        for kind, args in cases:
            env.reset(task)
            obs, *_ = env.step(f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>")
            refused = "error" in obs.text
            if kind == "valid" and refused:
                problems.append(f"schemas: {name} refused arguments its schema allows: {args} -> {obs.text[:200]}")
            elif kind != "valid" and not refused:
                problems.append(f"schemas: {name} accepted arguments breaking it ({kind}): {args}")
            checked += 1
    return checked


def _check_fuzz(make_env, tasks, seed, problems, n) -> int:
    env, rng, done = make_env(), random.Random(seed), 0
    crashes_before = COUNTERS.get("env_crash", 0)
    actions = fuzz_actions(rng, n, duration=60.0)
    obs, info = env.reset(tasks[0])
    for action in actions:
        if info.get("status") != "RUNNING":
            obs, info = env.reset(tasks[done % len(tasks)])
        obs, r, term, trunc, info = env.step(action)
        _check_obs(obs, "fuzz", problems)
        if not np.isfinite(r):
            problems.append(f"fuzz: non-finite reward for {action[:80]!r}")
        done += 1
        if len(problems) > 20:
            break
    crashes = COUNTERS.get("env_crash", 0) - crashes_before
    if crashes:
        problems.append(f"fuzz: the env caught {crashes} internal crash(es)")
    return done
