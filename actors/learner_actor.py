"""LearnerActor: the learner (gRPC service + trainer, learner/service.py) as a Ray actor.

Threaded (max_concurrency), so `progress()` answers while the trainer's thread
trains. It talks to rollout workers over gRPC only; Ray is just how train.py
places it (one GPU on a cluster, a fraction of a CPU here) and asks how far it is.
It is not restarted by Ray: a learner that dies ends the run, and running train.py
again with the same `--run-dir` resumes from its newest checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional

import ray

from configs.schema import WeftConfig


@ray.remote(max_concurrency=8)
class LearnerActor:
    def __init__(self, cfg: WeftConfig, model_dir: Optional[str]) -> None:
        import logging

        from learner.service import LearnerService

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.svc = LearnerService(cfg, model_dir)

    def start(self) -> str:
        """Start serving and training; returns the address rollout workers dial (host:port)."""
        address = self.svc.start()
        host, port = address.rsplit(":", 1)
        if host in ("0.0.0.0", "::", "[::]"):  # bound to all interfaces: workers on other nodes dial this node
            host = ray.util.get_node_ip_address()
        return f"{host}:{port}"

    def progress(self) -> dict[str, Any]:
        return self.svc.progress()

    def stop(self) -> dict[str, Any]:
        """Finish the step, save the final checkpoint, stop serving."""
        return self.svc.stop()

    def run_dir(self) -> str:
        return str(self.svc.trainer.run_dir)


def start_learner(cfg: WeftConfig, model_dir: Optional[str]) -> tuple[Any, str]:
    """The Learner actor, started; returns (handle, gRPC address)."""
    actor = LearnerActor.options(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus,
                                 max_restarts=0).remote(cfg, model_dir)
    return actor, ray.get(actor.start.remote())
