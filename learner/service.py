"""The learner as one object: gRPC service + trainer + the training thread.

`LearnerService` is what `weft learner` runs in its own process and what train.py's
Learner actor hosts (actors/learner_actor.py wraps it for Ray; nothing here knows
Ray). It starts the server (rollout workers submit groups and watch weights),
trains on a background thread until `trainer.total_steps` or `stop()`, and answers
`progress()` for the driver, which paces rollout against it:

    svc = LearnerService(cfg, model_dir)
    address = svc.start()
    while not svc.join(timeout=1.0): print(svc.progress())
    summary = svc.stop()          # final checkpoint, server down
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

from configs.schema import WeftConfig
from learner.runtime import tune_process
from learner.server import LearnerServer, TrainerHooks
from learner.trainer import Trainer, default_run_dir, fill_learner_limits

log = logging.getLogger(__name__)

PROGRESS_METRICS = ("step", "skipped", "reward_mean", "accuracy", "episode/tool_calls", "staleness_mean",
                    "tokens_per_s", "loss", "time/step_s")


class LearnerService:
    """Server and trainer of one learner; training runs on a thread so calls stay answerable."""

    def __init__(self, cfg: WeftConfig, model_dir: Optional[str | Path] = None, *, comm: Any = None) -> None:
        if cfg.trainer.run_dir is None:
            cfg.trainer.run_dir = default_run_dir()
        fill_learner_limits(cfg, model_dir)
        self.cfg = cfg
        self.server = LearnerServer(cfg.learner, TrainerHooks(status_metrics=self._numbers))
        # comm: rank 0 of a sharded learner (the other ranks run Trainer.follow, actors/learner_actor.py).
        self.trainer = Trainer(cfg, model_dir, server=self.server, comm=comm)
        lc = cfg.learner  # after the model and optimizer exist, so that gc.freeze covers them
        tune_process(lc.gc_freeze, lc.gc_threshold0, lc.malloc_keep_mb)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None
        self._t0 = time.monotonic()
        self._idle_s = 0.0

    def start(self) -> str:
        """Bind the service and start training; returns the address rollout workers dial."""
        self.server.start()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._train, name="weft-trainer", daemon=True)
        self._thread.start()
        log.info("learner listening on %s (step %d, version %d)", self.server.address, self.trainer.step,
                 self.trainer.version)
        return self.server.address

    def _train(self) -> None:
        try:
            self.trainer.run(self._stop, on_wait=self._count_idle)
        except BaseException as e:  # noqa: BLE001 - reported through progress(), the driver decides
            log.exception("trainer stopped with an error")
            self._error = f"{type(e).__name__}: {e}"

    def _count_idle(self, seconds: float) -> None:
        self._idle_s += seconds

    @property
    def address(self) -> str:
        return self.server.address

    def progress(self) -> dict[str, Any]:
        """What the driver paces rollout with, plus the numbers the live display shows."""
        stats = self.server.buffer.stats()
        c = stats["counters"]
        m = self.trainer.last_metrics
        wall = max(time.monotonic() - self._t0, 1e-9)
        return {"step": self.trainer.step, "version": self.trainer.version,
                "batches": self.trainer.cursor["batches"], "groups_consumed": self.trainer.cursor["groups_consumed"],
                "accepted": c["accepted"], "stale_at_take": c["stale_at_take"], "stale_at_put": c["stale_at_put"],
                "duplicate": c["duplicate"], "rejected": c["rejected"], "buffer": stats["size"],
                "subscribers": self.server.status().subscribers, "idle_frac": min(self._idle_s / wall, 1.0),
                "done": self.done(), "error": self._error, "stopped": self.trainer.stopped,
                "metrics": {k: m[k] for k in PROGRESS_METRICS if k in m}}

    def seen_group_ids(self) -> list[str]:
        """Group ids this learner has accepted (restored from its checkpoint after a restart)."""
        return self.server.buffer.seen_ids()

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Metrics the driver measured (validation, `validation: 1` rows) into the run's metrics.jsonl and
        TensorBoard, beside the steps' own."""
        if self.trainer.metrics is not None:
            self.trainer.metrics.log(step, {**metrics, "validation": 1})

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for training to end (total_steps reached, stopped, or failed); True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def request_stop(self) -> None:
        """Ask the training thread to finish its current step (safe from a signal handler)."""
        self._stop.set()
        self.server.buffer.close()  # wakes a get_batch that is waiting

    def stop(self, grace_s: float = 600.0) -> dict[str, Any]:
        """Finish the current step, save the final checkpoint, stop serving; returns the last progress."""
        self.request_stop()
        self.join(grace_s)
        out = self.progress()
        self.server.stop()
        return out

    def _numbers(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.trainer.last_metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
