"""Scripted policies behind the rollout engine's `generate` contract, and the SFT episodes they play.

`ScriptedEngine(processor, make_policy)` puts a policy of env/testing.py (oracle, blind, random,
fuzz: `begin(task, obs, info)`, `act(obs, info) -> text`) where the vLLM engine goes, so the one
agent loop (`actors.agent_loop.run_episode`) plays it: the same chat rendering, image expansion,
budgets and token bookkeeping as an RL or evaluation episode. Each episode (the loop's
`EpisodeView.key`) gets its own policy. For the text a policy writes, the engine returns what
the model engine would return had the model written it: the tokenizer's ids, cut at the first
stop the sampling asks for (end of turn; `</answer>` when `stop_on_answer`) with the stop
included, an end-of-turn appended when the text has none (a model ends its turn with one), and at
most `max_tokens` (finish "length"). Logprobs are 0 and every token carries `version`: no model
sampled them, which is what an SFT trajectory says.

`scripted_trajectories` is the cold-start SFT's data (`weft sft`): scripted episodes of some tasks in
an in-process env, as ordinary Trajectories. `scripted_engine` builds one for `weft eval --policy`
(a picklable factory, so a Ray rollout worker can build it too).
"""

from __future__ import annotations

import asyncio
import zlib
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import numpy as np

from actors.engine import ANSWER_END, STOP_TOKENS, GenResult
from models.hf import expand_image_placeholders
from protos.records import Trajectory

MAX_OPEN_POLICIES = 4096  # episodes that end without an answer never say goodbye: keep the newest


class ScriptedEngine:
    """A scripted policy as an engine (see the module notes)."""

    answers_subagents = False  # no model to answer a sub-agent call: the env says so in the observation

    def __init__(self, processor: Any, make_policy: Callable[[str], Any], version: int = 0) -> None:
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.make_policy, self.version = make_policy, version
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
        self.eot_id = vocab[STOP_TOKENS[0]]
        self.answer_end_id = vocab.get(ANSWER_END)
        self._policies: OrderedDict[str, Any] = OrderedDict()

    def expand_image_placeholders(self, token_ids: Sequence[int], images: Sequence[np.ndarray]) -> list[int]:
        return expand_image_placeholders(token_ids, images, self.processor)

    def _policy(self, view: Any) -> Any:
        policy = self._policies.get(view.key)
        if policy is None:
            policy = self._policies[view.key] = self.make_policy(view.key)
            policy.begin(view.task, view.observation, view.info)
            while len(self._policies) > MAX_OPEN_POLICIES:
                self._policies.popitem(last=False)
        return policy

    async def generate(self, prompt_token_ids: Sequence[int], images: Sequence[np.ndarray] = (), sampling: Any = None,
                       request_id: Optional[str] = None, episode: Any = None) -> GenResult:
        if episode is None:
            raise ValueError("a scripted engine acts on the episode's observation: pass episode= (the agent loop does)")
        text = self._policy(episode).act(episode.observation, episode.info)
        ids, finish = self.turn_ids(text, sampling)
        if ANSWER_END in text:
            self._policies.pop(episode.key, None)  # the episode ends with this turn
        n = len(ids)
        return GenResult(token_ids=np.asarray(ids, np.int32), logprobs=np.zeros(n, np.float32),
                         policy_version=np.full(n, self.version, np.int32), finish_reason=finish,
                         stop_reason=ids[-1] if finish == "stop" and ids else None,
                         num_prompt_tokens=len(prompt_token_ids))

    async def shutdown(self) -> None:
        self._policies.clear()

    def turn_ids(self, text: str, sampling: Any = None) -> tuple[list[int], str]:
        """(the ids the engine would return for a turn reading `text`, finish reason)."""
        stops = set(self.stop_ids)
        if (sampling is None or sampling.stop_on_answer) and self.answer_end_id is not None:
            stops.add(self.answer_end_id)
        ids = [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
        cut = next((i for i, t in enumerate(ids) if t in stops), None)
        ids = ids[:cut + 1] if cut is not None else ids + [self.eot_id]
        limit = sampling.max_tokens if sampling is not None else len(ids)
        return (ids, "stop") if len(ids) <= limit else (ids[:limit], "length")


POLICIES = ("oracle", "blind")


def scripted_engine(policy: str, model_dir: Optional[str] = None, zoom_frames: int = 4, seed: int = 0) -> ScriptedEngine:
    """The demo-perception oracle or blind policy (env.testing, env.demo) as an engine. The processor is the
    model's when `model_dir` is given, else a tiny model's built on the spot (no weights are needed)."""
    from env.demo import demo_perception
    from env.testing import BlindPolicy, OraclePolicy

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
    if model_dir:
        from models.hf import load_processor

        processor = load_processor(model_dir)
    else:
        from models.tiny import tiny_processor

        processor = tiny_processor()
    locate, read = demo_perception()

    def make(key: str) -> Any:
        i = seed + zlib.crc32(key.encode())  # the episode's own seed: the same whatever order episodes run in
        return OraclePolicy(locate, read, zoom_frames=zoom_frames, seed=i) if policy == "oracle" \
            else BlindPolicy(locate, read, seed=i)

    return ScriptedEngine(processor, make)


def scripted_trajectories(tasks: Sequence[Any], processor: Any, cfg: Any, episodes: int, *,
                          make_policy: Optional[Callable[[int], Any]] = None, seed: int = 0,
                          env: Any = None) -> list[Trajectory]:
    """`episodes` scripted episodes cycling over `tasks` through the agent loop, in `env` (default: an
    in-process env of cfg.env / cfg.reward). The default policy is the oracle with the demo's perception
    (env.demo.demo_perception), asking temporal_zoom for trainer.sft_zoom_frames frames. Episode i is
    trajectory and group `sft-{seed}-{i}`."""
    from actors.agent_loop import Budgets, run_episode
    from actors.engine import SamplingConfig
    from env.episodes import LocalEnv
    from models.chat import DEFAULT_SYSTEM_PROMPT, ChatRenderer

    if not tasks:
        raise ValueError("scripted_trajectories needs at least one task")
    if make_policy is None:
        from env.demo import demo_perception
        from env.testing import OraclePolicy

        locate, read = demo_perception()

        def make_policy(i: int) -> Any:
            return OraclePolicy(locate, read, zoom_frames=cfg.trainer.sft_zoom_frames, seed=seed + i)

    env = env or LocalEnv(cfg.env, cfg.reward)
    ids = [f"sft-{seed}-{i}" for i in range(episodes)]
    by_id = {tid: i for i, tid in enumerate(ids)}
    engine = ScriptedEngine(processor, lambda key: make_policy(by_id[key]))
    # The budgets are the rollout's, except a turn's tokens: a scripted turn is what it is, never cut.
    long = cfg.rollout.max_context_tokens
    budgets = Budgets(max_tokens_per_turn=long, max_generated_tokens=long, max_context_tokens=long)
    sampling = SamplingConfig(max_tokens=long)

    async def play() -> list[Trajectory]:
        renderer = ChatRenderer(processor.tokenizer, await env.tool_schemas(),
                                cfg.rollout.system_prompt or DEFAULT_SYSTEM_PROMPT)
        gate = asyncio.Semaphore(8)

        async def one(i: int, tid: str) -> Trajectory:
            async with gate:
                return await run_episode(engine, env, tasks[i % len(tasks)], sampling, budgets, renderer=renderer,
                                         group_id=tid, traj_id=tid)

        return list(await asyncio.gather(*[one(i, tid) for i, tid in enumerate(ids)]))

    return asyncio.run(play())
