"""EnvActor: a Ray actor hosting a `VectorVideoEnv` on CPU.

Decoding is CPU work, so env capacity scales apart from rollout capacity. The
actor is threaded (max_concurrency) so the many episodes a rollout worker runs
concurrently step in parallel; it asks for a fraction of a CPU so that on a small
node it does not starve other actors. `EnvHandle` hides the `.remote()` calls and
has the same methods as a VectorVideoEnv.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional

import ray

from configs.schema import EnvConfig, RewardConfig
from env.types import Observation, Task
from env.vector import VectorVideoEnv


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


@ray.remote(num_cpus=0.25, max_concurrency=16)
class EnvActor:
    def __init__(self, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None):
        self.venv = VectorVideoEnv(cfg, reward_cfg)
        self.incarnation = incarnation()

    def reset(self, episode_id: str, task: Task, seed: Optional[int] = None) -> tuple[Observation, dict]:
        return self.venv.reset(episode_id, task, seed)

    def step(self, episode_id: str, action: str):
        return self.venv.step(episode_id, action)

    def truncate(self, episode_id: str, reason: str = "budget"):
        return self.venv.truncate(episode_id, reason)

    def prefetch(self, task: Task) -> None:
        self.venv.prefetch(task)

    def reset_batch(self, items):
        return self.venv.reset_batch(items)

    def step_batch(self, items):
        return self.venv.step_batch(items)

    def close(self, episode_id: str) -> None:
        self.venv.close(episode_id)

    def stats(self) -> dict[str, Any]:
        return self.venv.stats()

    def tool_schemas(self) -> list[dict]:
        return self.venv.tool_schemas()

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


class EnvHandle:
    """Driver-side handle: VectorVideoEnv's methods, each a blocking call on the actor."""

    def __init__(self, actor: "ray.actor.ActorHandle"):
        self.actor = actor

    @classmethod
    def start(cls, cfg: Optional[EnvConfig] = None, reward_cfg: Optional[RewardConfig] = None,
              num_cpus: float = 0.25) -> "EnvHandle":
        return cls(EnvActor.options(num_cpus=num_cpus).remote(cfg, reward_cfg))

    def reset(self, episode_id: str, task: Task, seed: Optional[int] = None):
        return ray.get(self.actor.reset.remote(episode_id, task, seed))

    def step(self, episode_id: str, action: str):
        return ray.get(self.actor.step.remote(episode_id, action))

    def truncate(self, episode_id: str, reason: str = "budget"):
        return ray.get(self.actor.truncate.remote(episode_id, reason))

    def prefetch(self, task: Task) -> None:
        self.actor.prefetch.remote(task)  # fire and forget: a hint, not a result

    def reset_batch(self, items):
        return ray.get(self.actor.reset_batch.remote(list(items)))

    def step_batch(self, items):
        return ray.get(self.actor.step_batch.remote(list(items)))

    def close(self, episode_id: str) -> None:
        ray.get(self.actor.close.remote(episode_id))

    def stats(self) -> dict[str, Any]:
        return ray.get(self.actor.stats.remote())

    def tool_schemas(self) -> list[dict]:
        return ray.get(self.actor.tool_schemas.remote())


class RemoteEpisodeEnv:
    """A VideoToolEnv-shaped view of one episode slot on an EnvActor.

    Lets `env.testing.check_env(make_env=...)` and scripted policies run unchanged
    through Ray, which is how the EnvActor is held to the same contract.
    """

    def __init__(self, handle: EnvHandle, cfg: Optional[EnvConfig] = None):
        self.handle, self.cfg = handle, cfg or EnvConfig()
        self.episode_id = f"remote-{uuid.uuid4().hex}"
        self.tools = handle.tool_schemas()

    def reset(self, task: Task, *, seed: Optional[int] = None):
        return self.handle.reset(self.episode_id, task, seed)

    def step(self, action: str):
        return self.handle.step(self.episode_id, action)
