"""EnvActor: a Ray actor serving many episodes on CPU; RemoteEnv: the episode interface over it.

Decoding is CPU work, so env capacity scales apart from rollout capacity. The actor keeps
episodes by id (each a `VideoToolEnv` of its process's `env.LocalEnv`: one shared decoder, the
tools and reward function resolved once, here, so a user's `module:attribute` tool or reward
runs inside the actor with no registration). It is threaded (max_concurrency), so the many
episodes a rollout worker runs at once step in parallel, and asks for a fraction of a CPU so
a small node fits it beside the other actors.

`RemoteEnv(actor)` has the methods of `env.LocalEnv` (`episode(id)`, `tool_schemas()`,
`prefetch(task)`, `stats()`), so the agent loop, the harness and check_env drive either one
the same way (env/episodes.py). A step or truncate of an episode the actor does not hold
(Ray restarted it since the reset) raises `EpisodeLost`, which the rollout worker answers by
running the group again.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Optional

import ray

from configs.schema import EnvConfig, RewardConfig
from env.env import COUNTERS, VideoToolEnv
from env.errors import EpisodeLost
from env.types import Observation, Task


def incarnation() -> tuple[str, bool]:
    """(a new id for this actor process, whether Ray restarted the actor to make it), from inside an
    actor's constructor. The driver counts restarts from these (see Dispatcher._saw): calls made
    while Ray restarts an actor wait for it rather than fail, so a restart is not always seen as a
    failed call."""
    try:
        restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not inside an actor (a test building the class directly)
        restarted = False
    return uuid.uuid4().hex, restarted


def _lost(episode_id: str) -> dict:
    """The info of a step or truncate for an episode this actor does not hold. `episode_lost` lets the
    caller tell it from an episode that failed on its own."""
    COUNTERS["unknown_episode"] += 1
    error = f"no episode {episode_id!r} in this env (reset it first; a restarted env actor has none)"
    return {"status": "FAILED", "error": error, "episode_lost": True}


@ray.remote(num_cpus=0.25, max_concurrency=16)
class EnvActor:
    def __init__(self, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None):
        from env.episodes import LocalEnv

        self.local = LocalEnv(cfg, reward_cfg)
        self.episodes: dict[str, VideoToolEnv] = {}
        self.lock = threading.Lock()
        self.incarnation = incarnation()

    def reset(self, episode_id: str, task: Task, seed: Optional[int] = None,
              options: Optional[dict] = None) -> tuple[Observation, dict]:
        env = self.local.make()
        with self.lock:
            self.episodes[episode_id] = env
        return env.reset(task, seed=seed, options=options)

    def step(self, episode_id: str, action: str):
        with self.lock:
            env = self.episodes.get(episode_id)
        if env is None:
            info = _lost(episode_id)
            return Observation(f"error: {info['error']}"), 0.0, True, False, info
        result = env.step(action)
        if result[2] or result[3]:
            self.close(episode_id)
        return result

    def answer(self, episode_id: str, answers: list) -> Observation:
        with self.lock:
            env = self.episodes.get(episode_id)
        return env.answer(answers) if env is not None else Observation(f"error: {_lost(episode_id)['error']}")

    def truncate(self, episode_id: str, reason: str = "budget") -> tuple[float, dict]:
        with self.lock:
            env = self.episodes.pop(episode_id, None)
        return env.truncate(reason) if env is not None else (0.0, _lost(episode_id))

    def close(self, episode_id: str) -> None:
        with self.lock:
            self.episodes.pop(episode_id, None)

    def prefetch(self, task: Task) -> None:
        self.local.warm(task)  # already on one of this actor's threads

    def tool_schemas(self) -> list[dict]:
        return [t.schema for t in self.local.toolset.values()]

    def stats(self) -> dict[str, Any]:
        with self.lock:
            open_eps = len(self.episodes)
        return {"open_episodes": open_eps, "decoder": self.local.decoder.stats(), "counters": dict(COUNTERS)}

    def ping(self) -> tuple[str, bool]:
        """This process's incarnation (a restarted actor answers a new one)."""
        return self.incarnation

    def apply(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `func(self, ...)`: the call RLlib's FaultTolerantActorManager makes (health pings)."""
        return func(self, *args, **kwargs)


def start_env_actors(cfg: Any) -> list:
    """M EnvActors for a `weft train` run, restarted by Ray when they die (their open episodes are
    lost; the rollout workers run those groups again)."""
    opts = dict(num_cpus=cfg.env.num_cpus, max_restarts=cfg.run.max_actor_restarts, max_task_retries=0)
    return [EnvActor.options(**opts).remote(cfg.env, cfg.reward) for _ in range(cfg.env.num_actors)]


class RemoteEnv:
    """The episode interface over an EnvActor (the methods of env.LocalEnv)."""

    def __init__(self, actor: "ray.actor.ActorHandle", cfg: Optional[EnvConfig] = None):
        self.actor, self.cfg = actor, cfg

    @classmethod
    def start(cls, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None,
              num_cpus: float = 0.25) -> "RemoteEnv":
        return cls(EnvActor.options(num_cpus=num_cpus).remote(cfg, reward_cfg), cfg)

    def episode(self, episode_id: str = "") -> "RemoteEpisode":
        return RemoteEpisode(self.actor, episode_id or f"remote-{uuid.uuid4().hex}")

    async def tool_schemas(self) -> list[dict]:
        return await self.actor.tool_schemas.remote()

    def prefetch(self, task: Task) -> None:
        self.actor.prefetch.remote(task)  # fire and forget: a hint, not a result

    async def stats(self) -> dict[str, Any]:
        return await self.actor.stats.remote()


class RemoteEpisode:
    """One episode slot on an EnvActor: awaits the actor's calls directly (no thread per call)."""

    def __init__(self, actor: Any, episode_id: str):
        self.actor, self.episode_id = actor, episode_id

    async def reset(self, task: Task, seed: Optional[int] = None, options: Optional[dict] = None):
        return await self.actor.reset.remote(self.episode_id, task, seed, options)

    async def answer(self, answers: list) -> Observation:
        return await self.actor.answer.remote(self.episode_id, answers)

    async def step(self, action: str):
        result = await self.actor.step.remote(self.episode_id, action)
        _check_lost(result[4])
        return result

    async def truncate(self, reason: str = "budget"):
        result = await self.actor.truncate.remote(self.episode_id, reason)
        _check_lost(result[1])
        return result

    async def close(self) -> None:
        await self.actor.close.remote(self.episode_id)


def _check_lost(info: dict) -> None:
    if info.get("episode_lost"):
        raise EpisodeLost(info.get("error", "episode lost"))
