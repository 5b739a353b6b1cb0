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
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Protocol

import msgpack

from configs.schema import EnvConfig, RewardConfig, RolloutConfig
from env.types import Task
from protos.codec import to_map
from protos.records import Group, Status, Trajectory


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
        if not tasks:
            raise ValueError("no tasks to draw from")
        self.tasks, self.seed, self.cursor = tasks, seed, cursor

    def next(self) -> Task:
        task = self.peek()
        self.cursor += 1
        return task

    def peek(self, ahead: int = 0) -> Task:
        """The task `ahead` draws after the next one, without drawing it."""
        epoch, i = divmod(self.cursor + ahead, len(self.tasks))
        order = list(range(len(self.tasks)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return self.tasks[order[i]]


class RolloutCore:
    """Owns one engine; runs GRPO groups concurrently and hands them to a sink."""

    def __init__(self, model_dir: str, tasks: list[Task], cfg: RolloutConfig, env_cfg: Optional[EnvConfig] = None,
                 reward_cfg: Optional[RewardConfig] = None, env: Any = None, worker_id: str = "",
                 cursor: int = 0):
        self.model_dir, self.cfg = model_dir, cfg
        self.sampler = TaskSampler(tasks, cfg.seed, cursor)
        if env is None:
            from env.vector import VectorVideoEnv

            env = VectorVideoEnv(env_cfg, reward_cfg)
        self.env = env
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        self.engine: Any = None
        self.counters: Counter = Counter()
        self._groups_started = 0

    async def start(self) -> None:
        """Start the engine (idempotent). Separate from __init__ so a Ray actor builds it on its own loop."""
        if self.engine is None:
            from actors.engine import Engine

            self.engine = await Engine.create(self.model_dir, dtype=self.cfg.dtype, max_model_len=self.cfg.max_model_len,
                                              seed=self.cfg.seed, kv_cache_gib=self.cfg.kv_cache_gib,
                                              gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                                              enable_prefix_caching=self.cfg.enable_prefix_caching)

    def _sampling(self) -> Any:
        from actors.engine import SamplingConfig

        return SamplingConfig(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              max_tokens=self.cfg.max_tokens_per_turn)

    def _budgets(self) -> Any:
        from actors.agent_loop import Budgets

        return Budgets(max_tokens_per_turn=self.cfg.max_tokens_per_turn,
                       max_generated_tokens=self.cfg.max_generated_tokens,
                       max_context_tokens=min(self.cfg.max_context_tokens, self.cfg.max_model_len))

    async def run_group(self, task: Optional[Task] = None, group_id: Optional[str] = None) -> Group:
        """One GRPO group of the next task (or the given one). Never raises for episode failures."""
        from actors.agent_loop import run_group

        await self.start()
        task = task or self.sampler.next()
        self._prefetch(self.sampler.peek())
        gid = group_id or f"{self.worker_id}-{self._groups_started}-{uuid.uuid4().hex[:8]}"
        self._groups_started += 1
        t0 = time.perf_counter()
        trajs = await run_group(self.engine, self.env, task, self._sampling(), self.cfg.group_size,
                                self._budgets(), group_id=gid, system_prompt=self.cfg.system_prompt)
        for t in trajs:
            self.counters[f"status:{t.status.value}"] += 1
        self.counters["groups"] += 1
        return Group(group_id=gid, task_id=task.id, trajectories=trajs,
                     metadata={"worker": self.worker_id, "group_s": time.perf_counter() - t0})

    def _prefetch(self, task: Task) -> None:
        """Decode the next task's overview into the env's cache while this group generates:
        otherwise the engine idles through every group's first decode (bench/rollout.py). A task
        already cached costs only cache hits; concurrent decodes of one frame are deduplicated."""
        prefetch = getattr(self.env, "prefetch", None)
        if prefetch is not None:
            fut = asyncio.ensure_future(asyncio.to_thread(prefetch, task))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # errors surface at reset instead

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
