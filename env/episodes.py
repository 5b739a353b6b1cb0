"""The one episode interface everything drives episodes through, and its in-process implementation.

An *env* hands out episodes and says what tools they have:

    env.episode(episode_id) -> episode       # async reset(task, seed=None, options=None), step(action),
                                             # answer(answers), truncate(reason), close()
    await env.tool_schemas()                 # the tools as the chat template shows them
    env.prefetch(task)                       # warm the shared frame cache with the task's overview (returns at once)
    await env.stats()                        # open episodes, decoder cache, env counters

`LocalEnv` is the in-process one: a `VideoToolEnv` per episode, stepped on a worker thread
(decoding releases the GIL) over the process's shared FrameDecoder, so the G episodes of a
group decode their common overview once. `actors.env_actor.RemoteEnv` is the Ray-hosted one:
an EnvActor serving many episodes, with the same methods. The agent loop, the SFT data path,
the harness (env/testing.py) and `weft check-env` use only this interface; `VideoToolEnv`
keeps its synchronous gymnasium-style reset/step for users and outside checks.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from configs.schema import EnvConfig, RewardConfig
from env.env import COUNTERS, VideoToolEnv
from env.tools import load_tools
from env.rewards import load_reward
from env.types import Observation, Task

StepResult = tuple[Observation, float, bool, bool, dict]


class LocalEnv:
    """Episodes in this process (see the module notes). Tools and the reward function are resolved once."""

    def __init__(self, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None) -> None:
        from env.video import get_decoder

        self.cfg = cfg or EnvConfig()
        self.reward_cfg = reward_cfg or RewardConfig()
        self.decoder = get_decoder(self.cfg.cache_bytes, self.cfg.reader_pool_size, self.cfg.video_backend)
        self.toolset = load_tools(self.cfg)
        self.reward = load_reward(self.reward_cfg)
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.decode_threads), thread_name_prefix="weft-env")
        self._open = 0
        self._lock = threading.Lock()

    def make(self) -> VideoToolEnv:
        """A fresh one-episode env sharing this process's decoder, tools and reward function."""
        return VideoToolEnv(self.cfg, self.reward_cfg, decoder=self.decoder, tools=self.toolset, reward=self.reward)

    def episode(self, episode_id: str = "") -> "LocalEpisode":
        return LocalEpisode(self, episode_id)

    async def tool_schemas(self) -> list[dict]:
        return [t.schema for t in self.toolset.values()]

    def prefetch(self, task: Task) -> None:
        """Decode a task's overview into the shared cache on a worker thread (a hint: errors are left
        to the real reset)."""
        self._pool.submit(self.warm, task)

    def warm(self, task: Task) -> None:
        """`prefetch`, on the caller's thread."""
        try:
            self.make().reset(task)
        except Exception:  # noqa: BLE001 - a prefetch is a hint; the real reset reports any error
            pass

    async def stats(self) -> dict[str, Any]:
        with self._lock:
            open_eps = self._open
        return {"open_episodes": open_eps, "decoder": self.decoder.stats(), "counters": dict(COUNTERS)}

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _opened(self, delta: int) -> None:
        with self._lock:
            self._open += delta


class LocalEpisode:
    """One episode of a LocalEnv."""

    def __init__(self, host: LocalEnv, episode_id: str) -> None:
        self.host, self.episode_id = host, episode_id
        self.env: Optional[VideoToolEnv] = None

    async def reset(self, task: Task, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple[Observation, dict]:
        if self.env is None:
            self.env = self.host.make()
            self.host._opened(1)
        return await self.host._run(lambda: self.env.reset(task, seed=seed, options=options))

    async def answer(self, answers: list) -> Observation:
        """The policy's answers to the last step's sub-agent calls (`info["subagent"]`); the turn's observation."""
        if self.env is None:
            return Observation("error: answer() before reset()")
        return await self.host._run(self.env.answer, answers)

    async def step(self, action: str) -> StepResult:
        if self.env is None:
            COUNTERS["step_before_reset"] += 1
            return Observation("error: step() called before reset()"), 0.0, True, False, {"status": "FAILED"}
        return await self.host._run(self.env.step, action)

    async def truncate(self, reason: str = "budget") -> tuple[float, dict]:
        if self.env is None:
            return 0.0, {"status": "FAILED", "error": "truncate() before reset()"}
        return await self.host._run(self.env.truncate, reason)

    async def close(self) -> None:
        if self.env is not None:
            self.env = None
            self.host._opened(-1)
