"""Many episodes at once: `VectorVideoEnv` keeps episodes by id and steps them on a thread pool.

Decoding releases the GIL, so a thread pool overlaps the episodes' decodes, and the
shared frame cache means the G episodes of one GRPO group decode the overview once.
`SerialVectorEnv` has the same API with no threads (for debugging and tests);
`actors/env_actor.py` hosts a VectorVideoEnv in a Ray actor with the same methods.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from configs.schema import EnvConfig, RewardConfig
from env.env import COUNTERS, VideoToolEnv
from env.types import Observation, Task
from env.video import get_decoder

StepResult = tuple[Observation, float, bool, bool, dict]


class VectorVideoEnv:
    """Episodes keyed by a caller-chosen id; `reset`/`step` one, or `*_batch` many in parallel."""

    def __init__(self, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None,
                 threads: Optional[int] = None):
        self.cfg = cfg or EnvConfig()
        self.reward_cfg = reward_cfg or RewardConfig()
        self.decoder = get_decoder(self.cfg.cache_bytes, self.cfg.reader_pool_size)
        n = self.cfg.decode_threads if threads is None else threads
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="weft-env") if n > 0 else None
        self._envs: dict[str, VideoToolEnv] = {}
        self._lock = threading.Lock()

    def reset(self, episode_id: str, task: Task, seed: Optional[int] = None) -> tuple[Observation, dict]:
        env = VideoToolEnv(self.cfg, self.reward_cfg, decoder=self.decoder)
        with self._lock:
            self._envs[episode_id] = env
        return env.reset(task, seed=seed)

    def step(self, episode_id: str, action: str) -> StepResult:
        with self._lock:
            env = self._envs.get(episode_id)
        if env is None:
            info = _lost(episode_id)
            return Observation(f"error: {info['error']}"), 0.0, True, False, info
        result = env.step(action)
        if result[2] or result[3]:
            self.close(episode_id)
        return result

    def prefetch(self, task: Task) -> None:
        """Decode a task's overview into the shared frame cache (an unkept reset); never raises."""
        try:
            VideoToolEnv(self.cfg, self.reward_cfg, decoder=self.decoder).reset(task)
        except Exception:  # noqa: BLE001 - a prefetch is a hint; the real reset reports any error
            pass

    def truncate(self, episode_id: str, reason: str = "budget") -> tuple[float, dict]:
        """End an episode from outside and score it as TRUNCATED."""
        with self._lock:
            env = self._envs.pop(episode_id, None)
        return env.truncate(reason) if env is not None else (0.0, _lost(episode_id))

    def reset_batch(self, items: Sequence[tuple[str, Task]]) -> list[tuple[Observation, dict]]:
        return self._map(lambda it: self.reset(it[0], it[1]), items)

    def step_batch(self, items: Sequence[tuple[str, str]]) -> list[StepResult]:
        return self._map(lambda it: self.step(it[0], it[1]), items)

    def close(self, episode_id: str) -> None:
        with self._lock:
            self._envs.pop(episode_id, None)

    def stats(self) -> dict[str, Any]:
        """Open episodes, decoder cache statistics and the process-wide env counters."""
        with self._lock:
            open_eps = len(self._envs)
        return {"open_episodes": open_eps, "decoder": self.decoder.stats(), "counters": dict(COUNTERS)}

    def tool_schemas(self) -> list[dict]:
        return VideoToolEnv(self.cfg, self.reward_cfg, decoder=self.decoder).tools

    def _map(self, fn, items):
        if self._pool is None:
            return [fn(it) for it in items]
        return list(self._pool.map(fn, items))


class SerialVectorEnv(VectorVideoEnv):
    """The same API, every call on the caller's thread."""

    def __init__(self, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None):
        super().__init__(cfg, reward_cfg, threads=0)


def _lost(episode_id: str) -> dict:
    """The info of a step or truncate for an episode this env does not hold: never reset here, or
    this process was restarted since (its state is gone). `episode_lost` lets the agent loop tell
    it from an episode that failed on its own."""
    COUNTERS["unknown_episode"] += 1
    error = f"no episode {episode_id!r} in this env (reset it first; a restarted env actor has none)"
    return {"status": "FAILED", "error": error, "episode_lost": True}
