"""What the driver (train.py) asks of the cluster besides its actors: do they fit, and tear them down.

Kept out of train.py so the driver stays a table of contents.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("weft.train")


def check_resources(cfg: Any, have: dict, local: bool) -> None:
    """Fail at once when the run's actors cannot all be placed: an actor Ray cannot schedule would hold
    the groups handed to it until the end of the run. (A cluster that autoscales may grow: a warning.)"""
    need = {"CPU": cfg.learner.world_size * cfg.learner.num_cpus + cfg.env.num_actors * cfg.env.num_cpus
            + cfg.rollout.num_workers * cfg.rollout.num_cpus,
            "GPU": cfg.learner.world_size * cfg.learner.num_gpus + cfg.rollout.num_workers * cfg.rollout.num_gpus}
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    words = ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
    msg = (f"the run's actors need {words}: learner.world_size x learner.num_cpus/num_gpus + env.num_actors x "
           "env.num_cpus + rollout.num_workers x rollout.num_cpus/num_gpus")
    if local:
        raise SystemExit(msg + "; lower them, or raise run.ray_num_cpus")
    log.warning("%s; waiting for the cluster to grow", msg)


def shutdown_workers(workers: list) -> None:
    """Stop the rollout workers' engines. One that is dead or being restarted by Ray (killed at the very
    end of a run) has nothing to stop: logged, not raised, so the run that just finished still ends cleanly."""
    import ray

    refs = [w.shutdown.remote() for w in workers]
    for i, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=120)
        except Exception as e:  # noqa: BLE001 - Ray takes the actor down with the job either way
            log.warning("rollout worker %d did not shut down cleanly: %s: %s", i, type(e).__name__, str(e)[:200])


def stop_all(learner: Any, workers: list) -> None:
    """Stop the learner (final checkpoint) and the workers, logging instead of raising: called while
    another error is on its way up."""
    for what, stop in (("learner", learner.stop), ("rollout workers", lambda: shutdown_workers(workers))):
        try:
            stop()
        except Exception as e:  # noqa: BLE001 - the error being raised matters more than this one
            log.error("stopping the %s failed too: %s: %s", what, type(e).__name__, e)
