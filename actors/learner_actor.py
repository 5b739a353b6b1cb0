"""The learner on Ray: `learner.world_size` rank actors in one placement group, handled as one group.

`LearnerActor` is one rank. Rank 0 serves the rendezvous (a TCPStore on a free port of its
node), hosts `learner.service.LearnerService` (the gRPC server, the buffer and the trainer on a
thread) and drives the steps; ranks 1..N-1 run `Trainer.follow` on their share of each step.
The ranks form one torch.distributed group (NCCL on CUDA, gloo on the CPU) and shard the policy
with FSDP2 (learner/policy.py). Actors are threaded, so `progress()` answers while the trainer
trains. They talk to rollout workers over gRPC only; Ray places them (one GPU each on a
cluster, a fraction of a CPU here) and reports their deaths.

`LearnerGroup` is the driver's handle. A rank that dies takes the group down (its collectives
cannot go on without it): `restart()` kills the others and starts the group again in the same
placement group, resumed from the newest checkpoint, serving on the same port where it can, so
the rollout workers' clients reconnect on their own. Which groups that loses, and how the
driver runs them again, is the dispatcher's business (actors/dispatcher.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import ray

from actors.env_actor import incarnation
from configs.schema import WeftConfig

log = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """A learner rank died or the learner's training failed; the group has to be restarted."""


@ray.remote(max_concurrency=8)
class LearnerActor:
    def __init__(self, cfg: WeftConfig, model_dir: Optional[str], rank: int, world: int) -> None:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
        self.cfg, self.model_dir, self.rank, self.world = cfg, model_dir, rank, world
        self.store: Any = None
        self.svc: Any = None  # rank 0: LearnerService
        self.trainer: Any = None  # the others: a Trainer that follows rank 0
        self.incarnation = incarnation()

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: serve the group's TCPStore on a free port of this node; returns (host, port)."""
        from learner.distributed import serve_store

        host = ray.util.get_node_ip_address()
        if self.world > 1:
            self.store = serve_store(host, self.world)
            return host, int(self.store.port)
        return host, 0

    def setup(self, host: str, port: int) -> None:
        """Join the process group and build this rank's part of the learner (every rank at once: loading
        the policy is a collective)."""
        from learner.distributed import init_comm, local_device
        from learner.service import LearnerService
        from learner.trainer import Trainer

        device = local_device(self.cfg.trainer.device)
        comm = init_comm(self.rank, self.world, host, port, device, self.cfg.learner.dist_timeout_s, store=self.store)
        if self.rank == 0:
            self.svc = LearnerService(self.cfg, self.model_dir, comm=comm)
        else:
            self.trainer = Trainer(self.cfg, self.model_dir, comm=comm, log_metrics=False)

    def start(self) -> str:
        """Rank 0: start serving and training; returns the address rollout workers dial (host:port)."""
        address = self.svc.start()
        host, port = address.rsplit(":", 1)
        if host in ("0.0.0.0", "::", "[::]"):  # bound to all interfaces: workers on other nodes dial this node
            host = ray.util.get_node_ip_address()
        return f"{host}:{port}"

    def follow(self) -> None:
        """Ranks > 0: train each step's share until rank 0 says stop (returns then; raises if the group broke)."""
        try:
            self.trainer.follow()
        finally:
            self.trainer.comm.close()

    def progress(self) -> dict[str, Any]:
        return self.svc.progress()

    def seen_group_ids(self) -> list[str]:
        return self.svc.seen_group_ids()

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self.svc.log_metrics(step, metrics)

    def stop(self) -> dict[str, Any]:
        """Rank 0: finish the step, save the final checkpoint (and export), release the other ranks, stop serving."""
        out = self.svc.stop()
        self.svc.trainer.comm.close()
        return out

    def ping(self) -> tuple[str, bool]:
        return self.incarnation


class LearnerGroup:
    """The driver's handle on the learner's rank actors (see the module notes)."""

    def __init__(self, cfg: WeftConfig, model_dir: Optional[str]) -> None:
        from ray.util.placement_group import placement_group

        self.cfg, self.model_dir = cfg, model_dir
        lc = cfg.learner
        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(lc.world_size)],
                                  strategy="PACK" if lc.placement == "pack" else "SPREAD")
        ray.get(self.pg.ready(), timeout=600)
        self.ranks: list[Any] = []
        self.followers: list[Any] = []  # the ranks' follow() calls: one that ends early is a lost rank
        self.address: Optional[str] = None
        self.restarts = 0

    @property
    def rank0(self) -> Any:
        return self.ranks[0]

    def start(self, port: Optional[int] = None) -> str:
        """Start the ranks (resuming from the run dir's newest checkpoint) and return rank 0's address."""
        import copy

        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = copy.deepcopy(self.cfg)
        if port is not None:
            cfg.learner.port = port
        if self.restarts:
            cfg.trainer.resume = "auto"  # a restarted group continues from its newest checkpoint
        world = cfg.learner.world_size
        self.ranks = [LearnerActor.options(
            num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
        ).remote(cfg, self.model_dir, r, world) for r in range(world)]
        host, store_port = ray.get(self.rank0.rendezvous.remote())
        ray.get([a.setup.remote(host, store_port) for a in self.ranks])
        self.address = ray.get(self.rank0.start.remote())
        self.followers = [a.follow.remote() for a in self.ranks[1:]]
        return self.address

    def progress(self) -> dict[str, Any]:
        """Rank 0's progress; raises LearnerLost when a rank died or training failed."""
        try:
            p = ray.get(self.rank0.progress.remote(), timeout=120)
        except (ray.exceptions.RayError, TimeoutError) as e:
            raise LearnerLost(f"learner rank 0 is gone: {type(e).__name__}: {str(e)[:300]}") from None
        if p["error"]:
            raise LearnerLost(f"learner failed: {p['error']}")
        if p["done"]:  # rank 0 ended training cleanly and released the other ranks: their ending is not a loss
            return p
        done, _ = ray.wait(self.followers, num_returns=len(self.followers), timeout=0) if self.followers else ([], [])
        for ref in done:
            try:
                ray.get(ref)
                raise LearnerLost("a learner rank stopped following rank 0")
            except ray.exceptions.RayError as e:
                raise LearnerLost(f"a learner rank failed: {type(e).__name__}: {str(e)[:300]}") from None
        return p

    def restart(self) -> str:
        """Kill every rank and start the group again from the newest checkpoint; returns the new address."""
        self.restarts += 1
        port = int(self.address.rsplit(":", 1)[1]) if self.address else None
        self.kill()
        time.sleep(1.0)  # let the dead ranks' ports and sockets go
        try:
            return self.start(port=port)
        except Exception as e:  # noqa: BLE001 - the old port is taken: any free one, the driver tells the workers
            log.warning("learner restart on port %s failed (%s); taking a free port", port, e)
            self.kill()
            return self.start(port=0)

    def seen_group_ids(self) -> set[str]:
        return set(ray.get(self.rank0.seen_group_ids.remote()))

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """A row of the driver's own metrics (validation) in the run's metrics.jsonl and TensorBoard."""
        ray.get(self.rank0.log_metrics.remote(step, metrics), timeout=120)

    def stop(self) -> dict[str, Any]:
        """The final checkpoint and export, every rank released; returns rank 0's last progress."""
        out = ray.get(self.rank0.stop.remote())
        ray.get(self.followers, timeout=600)
        self.kill()
        return out

    def kill(self) -> None:
        for a in self.ranks:
            ray.kill(a, no_restart=True)
        self.ranks, self.followers = [], []

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self.kill()
        remove_placement_group(self.pg)
