"""RolloutWorker: one vLLM engine, many concurrent GRPO groups, finished groups handed to a sink.

The worker draws tasks (a seeded shuffle, cycled; the cursor is part of its state),
runs G episodes per task with the agent loop, and hands each finished `Group` to a
sink. Episodes that fail are kept in their group as FAILED trajectories with a
reason, never dropped. Sinks are plain objects with `async put(group)`:
`QueueSink` (in-process, the driver pulls), `FileSink` (msgpack trajectories, for
`weft rollout`); the learner's gRPC client is a sink too.

`RolloutCore` is the plain class (used in-process by `weft rollout` and tests);
`RolloutWorker` is the same class as a Ray actor (async actor: its methods run on
the actor's event loop, where the engine lives).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import msgpack

from configs.schema import EnvConfig, RewardConfig, RolloutConfig
from env.types import Task
from protos.codec import to_map
from protos.records import Group, Status

log = logging.getLogger(__name__)


class Sink(Protocol):
    async def put(self, group: Group) -> None: ...


class QueueSink:
    """Finished groups wait in an asyncio queue; a full queue slows the worker (backpressure)."""

    def __init__(self, maxsize: int = 0):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    async def put(self, group: Group) -> None:
        await self.queue.put(group)

    def drain(self) -> list[Group]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


class FileSink:
    """Appends every trajectory of every group to a msgpack file (readable by protos.read_trajectories)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fh = open(self.path, "wb")

    async def put(self, group: Group) -> None:
        for t in group.trajectories:
            self.fh.write(msgpack.packb(to_map(t), use_bin_type=True))
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class GrpcSink:
    """Submits each finished group to the learner over gRPC (LearnerClient: reconnects, backs off,
    resubmits safely thanks to the learner's exactly-once). Counts acks by kind."""

    def __init__(self, client: Any):
        self.client, self.acks = client, Counter()

    async def put(self, group: Group) -> None:
        from protos import learner_pb2 as pb

        (ack,) = await asyncio.to_thread(self.client.submit, [group])
        self.acks[pb.AckKind.Name(ack.kind)] += 1


async def follow_weights(engine: Any, client: Any, from_version: int = -1) -> int:
    """Apply every weight version the learner publishes to the engine (pause(keep) -> load -> resume),
    until the client is closed. Returns the last version loaded.

    The blocking gRPC stream is read on a thread; each version is loaded on the engine's loop
    before the next is read, so the client may reuse its receive buffers (no per-version
    allocation of a whole state dict), and a slow engine makes the learner skip versions for
    this worker instead of queueing them."""
    loop = asyncio.get_running_loop()

    def pump() -> int:
        last = from_version
        for version, tensors in client.watch_weights(from_version, reuse_buffers=True):
            asyncio.run_coroutine_threadsafe(engine.load_weights(tensors, version), loop).result()
            last = version
        return last

    return await asyncio.to_thread(pump)


class TaskSampler:
    """An endless seeded shuffle of the tasks; `cursor` counts tasks drawn (checkpointable)."""

    def __init__(self, tasks: list[Task], seed: int, cursor: int = 0):
        self.tasks, self.seed, self.cursor = tasks, seed, cursor

    def next(self) -> Task:
        task = self.peek()
        self.cursor += 1
        return task

    def peek(self, ahead: int = 0) -> Task:
        """The task `ahead` draws after the next one, without drawing it."""
        if not self.tasks:
            raise ValueError("no tasks to draw from (this worker is fed tasks by a driver)")
        epoch, i = divmod(self.cursor + ahead, len(self.tasks))
        order = list(range(len(self.tasks)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return self.tasks[order[i]]


class RolloutCore:
    """Owns one engine; runs GRPO groups concurrently and hands them to a sink."""

    def __init__(self, model_dir: str, tasks: list[Task], cfg: RolloutConfig, env_cfg: Optional[EnvConfig] = None,
                 reward_cfg: Optional[RewardConfig] = None, env: Any = None, worker_id: str = "",
                 cursor: int = 0, engine_factory: Optional[Callable[[], Any]] = None):
        self.model_dir, self.cfg = model_dir, cfg
        self.engine_factory = engine_factory  # something else with the engine's contract (a scripted policy)
        self.sampler = TaskSampler(tasks, cfg.seed, cursor)
        if env is None:
            from env.episodes import LocalEnv

            env = LocalEnv(env_cfg, reward_cfg)
        self.env = env
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        self.engine: Any = None
        self._start_lock = asyncio.Lock()
        self.counters: Counter = Counter()
        self._groups_started = 0

    async def start(self) -> None:
        """Start the engine (idempotent, and safe to call concurrently: one engine, built once). Separate
        from __init__ so a Ray actor builds it on its own loop."""
        async with self._start_lock:
            if self.engine is None:
                self.engine = await self._create_engine()

    async def _create_engine(self) -> Any:
        if self.engine_factory is not None:
            return self.engine_factory()
        from actors.engine import Engine

        return await Engine.create(self.model_dir, dtype=self.cfg.dtype, max_model_len=self.cfg.max_model_len,
                                   seed=self.cfg.seed, kv_cache_gib=self.cfg.kv_cache_gib,
                                   gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                                   enable_prefix_caching=self.cfg.enable_prefix_caching)

    def _sampling(self) -> Any:
        from actors.engine import SamplingConfig

        return SamplingConfig(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              max_tokens=self.cfg.max_tokens_per_turn)

    def _budgets(self, max_turns: Optional[int] = None) -> Any:
        from actors.agent_loop import Budgets

        return Budgets(max_tokens_per_turn=self.cfg.max_tokens_per_turn,
                       max_generated_tokens=self.cfg.max_generated_tokens,
                       max_context_tokens=min(self.cfg.max_context_tokens, self.cfg.max_model_len),
                       max_turns=max_turns, assistant_prefix=self.cfg.assistant_prefix,
                       subagent_max_tokens=self.cfg.subagent_max_tokens)

    async def run_group(self, task: Optional[Task] = None, group_id: Optional[str] = None, *, env: Any = None,
                        prefetch: Optional[Task] = None, group_size: Optional[int] = None,
                        temperature: Optional[float] = None, max_turns: Optional[int] = None) -> Group:
        """One GRPO group of the next task (or the given one), in this core's env (or the given one).
        `prefetch` is the task to warm the env's cache with (default: the sampler's next); `group_size`
        and `temperature` replace the config's (validation plays K episodes at eval.temperature), and
        `max_turns` the env's turn limit (eval.max_turns). Never raises for episode failures."""
        from actors.agent_loop import run_group

        await self.start()
        env = env or self.env
        task = task or self.sampler.next()
        prefetch = prefetch or (self.sampler.peek() if self.sampler.tasks else None)
        if prefetch is not None:
            # Decode the next task's overview while this group generates: otherwise the engine idles
            # through every group's first decode (bench/rollout.py). A task already cached costs only
            # cache hits; concurrent decodes of one frame are deduplicated.
            env.prefetch(prefetch)
        gid = group_id or f"{self.worker_id}-{self._groups_started}-{uuid.uuid4().hex[:8]}"
        self._groups_started += 1
        t0 = time.perf_counter()
        sampling = self._sampling()
        if temperature is not None:
            sampling = dataclasses.replace(sampling, temperature=temperature)
        trajs = await run_group(self.engine, env, task, sampling, group_size or self.cfg.group_size,
                                self._budgets(max_turns), group_id=gid, system_prompt=self.cfg.system_prompt)
        for t in trajs:
            self.counters[f"status:{t.status.value}"] += 1
        self.counters["groups"] += 1
        return Group(group_id=gid, task_id=task.id, trajectories=trajs,
                     metadata={"worker": self.worker_id, "group_s": time.perf_counter() - t0})

    async def run(self, num_groups: int, sink: Sink) -> dict[str, Any]:
        """Run `num_groups` groups, `cfg.concurrent_groups` at a time, each put to the sink as it finishes."""
        await self.start()
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.cfg.concurrent_groups)
        tokens = Counter()

        async def one() -> None:
            async with sem:
                group = await self.run_group()
            tokens["generated"] += sum(int(t.loss_mask.sum()) for t in group.trajectories)
            tokens["total"] += sum(t.num_tokens for t in group.trajectories)
            await sink.put(group)

        await asyncio.gather(*[one() for _ in range(num_groups)])
        elapsed = time.perf_counter() - t0
        return {"worker": self.worker_id, "groups": num_groups, "seconds": elapsed,
                "generated_tokens": tokens["generated"], "tokens": tokens["total"],
                "generated_tokens_per_s": tokens["generated"] / max(elapsed, 1e-9),
                "task_cursor": self.sampler.cursor, "counters": dict(self.counters),
                "engine_version": self.engine.version}

    async def collect(self, num_groups: int) -> list[Group]:
        """Run `num_groups` groups and return them (the in-process queue, drained for a Ray caller)."""
        sink = QueueSink()
        await self.run(num_groups, sink)
        return sink.drain()

    async def load_weights(self, named_tensors: Any, version: int) -> dict[str, float]:
        """pause(keep) -> load -> resume; in-flight episodes continue with the new weights."""
        await self.start()
        return await self.engine.load_weights(named_tensors, version)

    def status(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "cursor": self.sampler.cursor, "counters": dict(self.counters),
                "version": None if self.engine is None else self.engine.version}

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()
            self.engine = None


def remote_worker_class(num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
    """RolloutCore as a Ray actor class (async actor)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RolloutCore)


def summarize_groups(groups: list[Group]) -> dict[str, Any]:
    """The JSON summary `weft rollout` prints."""
    trajs = [t for g in groups for t in g.trajectories]
    ok = [t for t in trajs if t.status is not Status.FAILED]
    status = Counter(t.status.value for t in trajs)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    return {"groups": len(groups), "trajectories": len(trajs), "status": dict(status),
            "reward_mean": mean([t.reward for t in ok]),
            "accuracy": mean([float(t.reward_terms.get("accuracy", 0.0) > 0) for t in ok]),
            "turns_mean": mean([t.metrics.get("turns", 0.0) for t in ok]),
            "tool_calls_mean": mean([t.metrics.get("tool_calls", 0.0) for t in ok]),
            "generated_tokens": int(sum(t.loss_mask.sum() for t in trajs)),
            "failure_reasons": sorted({t.metadata.get("error", "") for t in trajs if t.status is Status.FAILED})[:10]}


# ------------------------------------------------------------------ the Ray actor of `weft train`

# Exceptions that mean the env actor hosting an episode died (Ray restarts it): the episode
# was not the policy's fault, so its group is run again rather than trained on. EpisodeLost is
# the restarted actor saying it has never heard of the episode (it died between two calls).
ENV_LOST = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "EpisodeLost"})


def env_lost(group: Group) -> list[str]:
    """Reasons of the group's episodes that failed because their env actor died."""
    return [t.metadata.get("error", "") for t in group.trajectories if t.metadata.get("exception") in ENV_LOST]


class RolloutWorker:
    """A rollout worker of `weft train`: the driver hands it work items (task, group id, the weight
    version to start from); it runs the group on one of the shared EnvActors, submits it to the
    learner over gRPC and follows the learner's weights in the background.

    If it dies, the driver runs its unfinished groups again elsewhere under the same group ids,
    so a group that did reach the learner is answered DUPLICATE and never trained twice. Every
    call from the driver goes through `apply` (RLlib's FaultTolerantActorManager protocol)."""

    def __init__(self, model_dir: str, cfg: Any, learner_address: str, env_actors: list, worker_id: str = ""):
        from actors.env_actor import RemoteEnv, incarnation
        from actors.learner_client import LearnerClient

        self.cfg = cfg
        self.envs = [RemoteEnv(a, cfg.env) for a in env_actors]
        self.core = RolloutCore(model_dir, [], cfg.rollout, cfg.env, cfg.reward,
                                env=self.envs[0] if self.envs else None, worker_id=worker_id)
        self.client = LearnerClient.from_config(cfg.learner, address=learner_address)
        self._follow: Optional[asyncio.Task] = None
        self._closing = False
        self.incarnation = incarnation()  # how the driver counts restarts

    async def apply(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        out = func(self, *args, **kwargs)
        return await out if asyncio.iscoroutine(out) else out

    async def ping(self) -> tuple[str, bool]:
        """This process's incarnation, once the engine is up and following the learner's weights
        (a restarted worker is taken back into service only then, and answers a new id)."""
        await self._ready()
        return self.incarnation

    async def _ready(self) -> None:
        await self.core.start()
        if self._follow is None or self._follow.done():
            self._follow = asyncio.ensure_future(self._follow_weights())

    async def _follow_weights(self) -> None:
        while not self._closing:
            try:
                await follow_weights(self.core.engine, self.client, from_version=self.core.engine.version)
            except Exception as e:  # noqa: BLE001 - the learner may be restarting; keep trying
                self._exit_if_engine_dead(e)
                if not self._closing:
                    log.warning("weight stream broke (%s); reconnecting", e)
                    await asyncio.sleep(1.0)

    def _exit_if_engine_dead(self, err: BaseException) -> None:
        """A dead vLLM engine cannot be revived in place: end this process so Ray restarts the worker
        with a fresh one (the driver re-runs the groups it held)."""
        if self.core.engine is not None and self.core.engine.dead and not self._closing:
            log.error("engine died (%s): restarting this rollout worker", err)
            os._exit(70)

    async def _wait_version(self, version: int) -> float:
        """Wait until the engine holds weights of at least `version` (bounded); returns the seconds waited."""
        t0 = time.perf_counter()
        while self.core.engine.version < version and time.perf_counter() - t0 < self.cfg.rollout.min_version_wait_s:
            await asyncio.sleep(0.02)
        return time.perf_counter() - t0

    async def _play(self, item: dict[str, Any], **kwargs: Any) -> tuple[Optional[Group], dict[str, Any]]:
        """Run an item's group from at least its weight version on its env actor: (group, the numbers the
        driver keeps), or (None, an env_lost outcome) when the env actor died under it."""
        await self._ready()
        waited = await self._wait_version(item["min_version"])
        env = self.envs[item["env"] % len(self.envs)] if self.envs else None
        try:
            group = await self.core.run_group(item["task"], group_id=item["group_id"], env=env,
                                              prefetch=item.get("next_task"), **kwargs)
        except Exception as e:  # noqa: BLE001 - sorted below: env actor lost, engine dead, or a bug
            self._exit_if_engine_dead(e)
            if type(e).__name__ in ENV_LOST:  # e.g. the env actor died before the episodes began
                return None, {"group_id": item["group_id"], "outcome": "env_lost",
                              "reason": f"{type(e).__name__}: {e}", "incarnation": self.incarnation}
            raise
        self._exit_if_engine_dead(RuntimeError("engine died during the group"))  # its episodes hold no data
        out = {"group_id": group.group_id, "worker": self.core.worker_id, "version_wait_s": waited,
               "incarnation": self.incarnation, **group_numbers(group)}
        lost = env_lost(group)
        return (None, {**out, "outcome": "env_lost", "reason": lost[0]}) if lost else (group, out)

    async def run_item(self, item: dict[str, Any]) -> dict[str, Any]:
        """Run one work item and submit its group; the outcome is the learner's ack (or env_lost)."""
        from protos import learner_pb2 as pb

        group, out = await self._play(item)
        if group is None:
            return out
        (ack,) = await asyncio.to_thread(self.client.submit, [group])
        return {**out, "outcome": pb.AckKind.Name(ack.kind).lower(), "reason": ack.reason,
                "learner_version": int(ack.learner_version)}

    async def run_eval(self, item: dict[str, Any]) -> dict[str, Any]:
        """Play one validation task (eval.samples episodes at eval.temperature) and return its episode
        records (env.scoring); nothing goes to the learner."""
        from env.scoring import episode_record

        group, out = await self._play(item, group_size=self.cfg.eval.samples, temperature=self.cfg.eval.temperature,
                                      max_turns=self.cfg.eval.max_turns)
        if group is None:
            return out
        return {**out, "outcome": "done",
                "records": [episode_record(item["task"], t, s) for s, t in enumerate(group.trajectories)]}

    def set_learner(self, address: str) -> None:
        """Talk to the learner at `address` from now on (a restarted learner that could not have its
        old port); the weight stream reconnects there."""
        from actors.learner_client import LearnerClient

        if address != self.client.address:
            old, self.client = self.client, LearnerClient.from_config(self.cfg.learner, address=address)
            old.close()

    def status(self) -> dict[str, Any]:
        return self.core.status()

    async def shutdown(self) -> None:
        self._closing = True
        self.client.close()
        if self._follow is not None:
            self._follow.cancel()
        await self.core.shutdown()


def group_numbers(group: Group) -> dict[str, Any]:
    """The few numbers the driver keeps per group (rewards, tokens, the versions that sampled it)."""
    ran = [t for t in group.trajectories if t.status is not Status.FAILED]
    gen = [t.policy_version[t.loss_mask.astype(bool)] for t in ran]
    versions = [int(v.min()) for v in gen if v.size] + [int(v.max()) for v in gen if v.size]
    return {"reward_mean": float(sum(t.reward for t in ran) / len(ran)) if ran else 0.0,
            "generated_tokens": int(sum(int(t.loss_mask.sum()) for t in group.trajectories)),
            "failed": len(group.trajectories) - len(ran), "seconds": float(group.metadata.get("group_s", 0.0)),
            "min_version": min(versions) if versions else -1, "max_version": max(versions) if versions else -1}


def start_rollout_workers(cfg: Any, model_dir: str, learner_address: str, env_actors: list) -> list:
    """N RolloutWorker actors (fractional CPUs, GPUs when configured), restarted by Ray when they die."""
    import ray

    cls = ray.remote(RolloutWorker).options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                                            max_restarts=cfg.run.max_actor_restarts, max_task_retries=0,
                                            max_concurrency=1000)
    return [cls.remote(model_dir, cfg, learner_address, env_actors, worker_id=f"w{i}")
            for i in range(cfg.rollout.num_workers)]


# ------------------------------------------------------------------ `weft rollout-worker`


async def attach(cfg: Any, model_dir: str, tasks: list[Task], address: str, groups: int = 0) -> dict[str, Any]:
    """A rollout worker outside any driver: joins a running learner at `address`, follows its weights,
    and submits groups of its own tasks until `groups` are done (0 = until stopped). Another job or
    another node can run it; the learner's buffer slows it down when it is ahead, and its staleness
    bound drops what comes too late (counted)."""
    from actors.learner_client import LearnerClient

    client = LearnerClient.from_config(cfg.learner, address=address)
    core = RolloutCore(model_dir, tasks, cfg.rollout, cfg.env, cfg.reward, worker_id=f"ext-{uuid.uuid4().hex[:6]}")
    sink = GrpcSink(client)
    follow = None
    try:
        status = await asyncio.to_thread(client.status)
        if status.group_size != cfg.rollout.group_size:
            raise ValueError(f"learner wants groups of {status.group_size}, rollout.group_size is {cfg.rollout.group_size}")
        await core.start()
        follow = asyncio.ensure_future(follow_weights(core.engine, client, from_version=core.engine.version))
        t0 = time.monotonic()  # the learner's current weights before the first group (bounded wait)
        while core.engine.version < status.version and time.monotonic() - t0 < cfg.rollout.min_version_wait_s:
            await asyncio.sleep(0.05)
        done = 0
        while groups == 0 or done < groups:
            n = cfg.rollout.concurrent_groups if groups == 0 else min(cfg.rollout.concurrent_groups, groups - done)
            await core.run(n, sink)
            done += n
        return {"worker": core.worker_id, "groups": done, "acks": dict(sink.acks), "version": core.engine.version}
    finally:
        client.close()
        if follow is not None:
            follow.cancel()
        await core.shutdown()


def main_rollout_worker(args: Any) -> int:
    import json

    from configs import load_config
    from env import load_tasks

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    if args.token is not None:
        cfg.learner.token = args.token
    data = Path(args.data or cfg.data.path)
    tasks = load_tasks(data / "tasks.jsonl" if data.is_dir() else data)
    out = asyncio.run(attach(cfg, args.model or cfg.model, tasks, args.learner, args.groups))
    print(json.dumps(out, sort_keys=True))
    return 0
