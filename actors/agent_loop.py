"""The agent loop: one multi-turn tool-calling episode -> one `Trajectory`, token-in/token-out.

The token ids carried forward are exactly the engine's output plus the tokenised
observations: the history is never re-tokenised from text. Only the first prompt
and each observation are rendered through the chat template; an observation is
rendered as the *suffix* the template puts after an assistant turn, so a template
that adds text around tool responses (Qwen's `<|im_start|>user\n<tool_response>`)
is honoured without ever rendering the history again.

Per-token arrays: `loss_mask` is 1 on generated tokens, `behavior_logprobs` holds
the engine's logprob there, and `policy_version` the weight version that sampled
each token (a partial rollout spans versions). Images sit where their expanded
`<|image_pad|>` runs are, and `media` holds one FrameRef per image, in order.

Many episodes run concurrently as asyncio tasks over one engine. The env is anything with the
episode interface (env/episodes.py): an in-process `env.LocalEnv` or a Ray-hosted
`actors.env_actor.RemoteEnv`. The engine is anything with the vLLM engine's `generate` contract:
`actors.engine.Engine`, or a scripted policy behind `actors.scripted_engine.ScriptedEngine`, so
RL, evaluation and SFT episodes all come from `run_episode`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from env.types import IMAGE_MARKER, Observation, Task
from models.chat import DEFAULT_SYSTEM_PROMPT, ChatRenderer, observation_content  # noqa: F401 - re-exported
from protos.records import FrameRef, Status, Trajectory


@dataclass
class Budgets:
    """Per-episode limits the agent loop enforces (the env enforces turns, tool calls and frames)."""

    max_tokens_per_turn: int = 256  # generated tokens in one turn
    max_generated_tokens: int = 1024  # generated tokens in the whole episode
    max_context_tokens: int = 8192  # prompt + everything appended; must fit the engine's max_model_len
    max_turns: Optional[int] = None  # this episode's turn limit (None: the env's env.max_turns)
    assistant_prefix: str = ""  # forced at the start of every turn: prompt tokens, not policy (ParaVT's <think>)
    subagent_max_tokens: int = 512  # cap of a sub-agent's answer (a call the policy answers itself)


@dataclass
class EpisodeView:
    """What the policy of an episode sees at a turn besides tokens: its task, the last observation and
    the env's info. The vLLM engine ignores it; a scripted engine (actors/scripted_engine.py) acts on it."""

    key: str
    task: Task
    observation: Observation
    info: dict


# ----------------------------------------------------------------- the episode


@dataclass
class _Builder:
    """Per-token arrays under construction."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    media: list[FrameRef] = field(default_factory=list)

    def add_context(self, ids: list[int], obs: Optional[Observation] = None) -> None:
        self.token_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        if obs is not None:
            self.images += [fr.image for fr in obs.frames]
            self.media += [fr.ref for fr in obs.frames]

    def add_generated(self, ids: np.ndarray, logprobs: np.ndarray, versions: np.ndarray) -> None:
        self.token_ids += [int(t) for t in ids]
        self.loss_mask += [1] * len(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.versions += [int(v) for v in versions]


async def run_episode(engine: Any, env: Any, task: Task, sampling: Any, budgets: Optional[Budgets] = None, *,
                      renderer: Optional[ChatRenderer] = None, group_id: str = "", traj_id: str = "") -> Trajectory:
    """Run one episode of `task` with the engine's policy in `env`; never raises for episode failures."""
    budgets = budgets or Budgets()
    traj_id = traj_id or uuid.uuid4().hex
    slot = env.episode(f"{group_id or 'ep'}:{traj_id}")
    b, texts, obs_texts, calls, t0 = _Builder(), [], [], [], time.perf_counter()
    children: list[Trajectory] = []
    timing = {"engine_s": 0.0, "env_s": 0.0}
    status, error, reward, terms, info = Status.FAILED, "", 0.0, {}, {}
    try:
        te = time.perf_counter()
        obs, info = await slot.reset(task, options={"max_turns": budgets.max_turns} if budgets.max_turns else None)
        timing["env_s"] += time.perf_counter() - te
        if info.get("status") == "FAILED":
            raise _EpisodeFailed(info.get("error", "env reset failed"))
        renderer = renderer or ChatRenderer(engine.tokenizer, await env.tool_schemas())
        b.add_context(engine.expand_image_placeholders(renderer.prompt_ids(obs), [f.image for f in obs.frames]), obs)
        status = Status.TRUNCATED
        generated = 0
        prefix = engine.tokenizer.encode(budgets.assistant_prefix, add_special_tokens=False) if budgets.assistant_prefix else []
        while True:
            b.add_context(list(prefix))  # the forced prefix is prompt: loss mask 0
            room = min(budgets.max_tokens_per_turn, budgets.max_generated_tokens - generated,
                       budgets.max_context_tokens - len(b.token_ids) - 1)
            if room < 1:
                reward, info = await slot.truncate("token_budget")
                terms = info.get("reward_terms", {})
                break
            turn_sampling = _with_max_tokens(sampling, room)
            te = time.perf_counter()
            out = await engine.generate(b.token_ids, b.images, turn_sampling, request_id=f"{traj_id}-{len(texts)}",
                                        episode=EpisodeView(traj_id, task, obs, info))
            timing["engine_s"] += time.perf_counter() - te
            if out.finish_reason == "abort":
                status, error = Status.ABORTED, "generation aborted"
                await slot.truncate("aborted")
                break
            b.add_generated(out.token_ids, out.logprobs, out.policy_version)
            generated += len(out.token_ids)
            text = budgets.assistant_prefix + engine.tokenizer.decode(out.token_ids, skip_special_tokens=False)
            texts.append(text)
            te = time.perf_counter()
            obs, reward, terminated, truncated, info = await slot.step(text)
            timing["env_s"] += time.perf_counter() - te
            if info.get("subagent"):  # calls the policy answers itself, on this engine (ParaVT's crop_video)
                answers, subs = await run_subagents(engine, info["subagent"], sampling, budgets, task, group_id,
                                                    f"{traj_id}/t{len(texts)}")
                children += subs
                obs = await slot.answer(answers)
            obs_texts.append(obs.text)  # the tool responses, for `weft view`
            calls += info.get("calls", [])
            terms = info.get("reward_terms", terms)
            if info.get("status") == "FAILED":
                raise _EpisodeFailed(info.get("error", "env step failed"))
            if terminated or truncated:
                status = Status.COMPLETED if terminated else Status.TRUNCATED
                break
            closed = len(out.token_ids) > 0 and int(out.token_ids[-1]) == renderer.eot_id
            obs_ids = engine.expand_image_placeholders(renderer.observation_ids(obs, closed),
                                                       [f.image for f in obs.frames])
            if len(b.token_ids) + len(obs_ids) >= budgets.max_context_tokens:
                reward, info = await slot.truncate("context_budget")  # the observation does not fit
                terms = info.get("reward_terms", {})
                break
            b.add_context(obs_ids, obs)
    except _EpisodeFailed as e:
        status, error = Status.FAILED, str(e)
    except (ValueError, RuntimeError) as e:  # engine refused the prompt, template broke, ...: record, don't lose
        status, error = Status.FAILED, f"{type(e).__name__}: {e}"
    finally:
        await _close(slot)
    metrics = {"turns": float(len(texts)), "tool_calls": float(info.get("tool_calls_ok", 0)),
               "frames": float(info.get("frames_returned", 0)), "generated_tokens": float(sum(b.loss_mask)),
               "tokens": float(len(b.token_ids)), "images": float(len(b.media)),
               "episode_s": time.perf_counter() - t0, **timing}
    meta = {"turn_texts": texts, "observation_texts": obs_texts, "answer": info.get("answer"), "tool_calls": calls}
    if error:
        meta["error"] = error
    if status is Status.TRUNCATED:
        meta["truncated_by"] = info.get("truncated_by", "max_turns")  # the loop's token budgets, or the env's turns
    return Trajectory(np.asarray(b.token_ids), np.asarray(b.loss_mask), np.asarray(b.logprobs),
                      np.asarray(b.versions), media=b.media, reward=float(reward), reward_terms=dict(terms),
                      status=status, group_id=group_id, task_id=task.id, traj_id=traj_id, metrics=metrics,
                      metadata=meta, children=children)


SUBAGENT_SYSTEM_PROMPT = "You are a helpful assistant. Describe what the frames show, briefly and factually."


async def run_subagents(engine: Any, asks: list[dict], sampling: Any, budgets: Budgets, task: Task, group_id: str,
                        key: str) -> tuple[list[Optional[str]], list[Trajectory]]:
    """Answer a turn's sub-agent calls with the policy on `engine`, concurrently: one single-turn episode
    each (the call's frames, then its prompt). Returns the answers (None where there is no model to
    answer: a scripted engine) and the sub-agent trajectories, recorded under the episode's id."""
    if not engine.answers_subagents:
        return [None] * len(asks), []
    renderer = ChatRenderer(engine.tokenizer, [], SUBAGENT_SYSTEM_PROMPT)
    results = await asyncio.gather(*[_subagent(engine, renderer, ask, sampling, budgets, task, group_id, f"{key}/sub{k}")
                                     for k, ask in enumerate(asks)], return_exceptions=True)
    answers: list[Optional[str]] = []
    subs: list[Trajectory] = []
    for r in results:
        if isinstance(r, BaseException):
            if isinstance(r, asyncio.CancelledError):
                raise r
            answers.append(None)  # the env says the call got no answer; the episode goes on
            continue
        answers.append(r[0])
        subs.append(r[1])
    return answers, subs


async def _subagent(engine: Any, renderer: ChatRenderer, ask: dict, sampling: Any, budgets: Budgets, task: Task,
                    group_id: str, traj_id: str) -> tuple[str, Trajectory]:
    frames = list(ask["frames"])
    obs = Observation("\n".join(f"t={fr.time:.1f}s {IMAGE_MARKER}" for fr in frames) + "\n" + str(ask["prompt"]), frames)
    b = _Builder()
    b.add_context(engine.expand_image_placeholders(renderer.prompt_ids(obs), [f.image for f in frames]), obs)
    room = min(int(ask.get("max_tokens") or budgets.subagent_max_tokens), budgets.subagent_max_tokens,
               budgets.max_context_tokens - len(b.token_ids) - 1)
    if room < 1:
        raise ValueError("the sub-agent's prompt leaves no room to answer")
    out = await engine.generate(b.token_ids, b.images, _with_max_tokens(sampling, room), request_id=traj_id)
    if out.finish_reason == "abort":
        raise RuntimeError("sub-agent generation aborted")
    b.add_generated(out.token_ids, out.logprobs, out.policy_version)
    text = engine.tokenizer.decode(out.token_ids, skip_special_tokens=True).strip()
    traj = Trajectory(np.asarray(b.token_ids), np.asarray(b.loss_mask), np.asarray(b.logprobs), np.asarray(b.versions),
                      media=b.media, group_id=group_id, task_id=task.id, traj_id=traj_id,
                      metrics={"generated_tokens": float(len(out.token_ids)), "images": float(len(frames))},
                      metadata={"role": "subagent", "tool": ask.get("tool", ""), "turn_texts": [text]})
    return text, traj


class _EpisodeFailed(Exception):
    """The env ended the episode as FAILED (corrupt video, ...)."""


def _with_max_tokens(sampling: Any, n: int) -> Any:
    import dataclasses

    return dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, n))


async def _close(slot: Any) -> None:
    try:
        await slot.close()
    except Exception:  # noqa: BLE001 - closing a dead actor's slot must not mask the episode's result
        pass


async def run_group(engine: Any, env: Any, task: Task, sampling: Any, group_size: int,
                    budgets: Optional[Budgets] = None, group_id: str = "",
                    system_prompt: Optional[str] = None) -> list[Trajectory]:
    """The G episodes of one GRPO group, concurrently. They share one prompt and one overview, so
    vLLM's prefix cache (and encoder cache) pays their first-turn prefill once. An episode that
    raises is kept as a FAILED trajectory with the reason; the group always has G members."""
    group_id = group_id or uuid.uuid4().hex
    renderer = ChatRenderer(engine.tokenizer, await env.tool_schemas(), system_prompt or DEFAULT_SYSTEM_PROMPT)
    ids = [f"{group_id}-{i}" for i in range(group_size)]
    results = await asyncio.gather(*[
        run_episode(engine, env, task, sampling, budgets, renderer=renderer, group_id=group_id, traj_id=tid)
        for tid in ids], return_exceptions=True)
    out = []
    for tid, r in zip(ids, results):
        if isinstance(r, BaseException):
            if isinstance(r, asyncio.CancelledError):
                raise r
            exc = type(r).__name__
            r = Trajectory.failed(f"{exc}: {r}", task_id=task.id, group_id=group_id, traj_id=tid)
            r.metadata["exception"] = exc  # lets the worker tell a lost env actor (run again) from a bad episode
        out.append(r)
    return out
