"""The driver's resource check: a run whose actors cannot all be placed fails at once on a local cluster
(an unschedulable rollout worker would otherwise hold its groups until the end of the run)."""

from __future__ import annotations

import pytest

from actors.cluster import check_resources
from configs import load_config


def test_actors_that_do_not_fit_a_local_cluster_stop_the_run_with_the_numbers():
    cfg = load_config(None, ["learner.world_size=2", "learner.num_cpus=0.5", "rollout.num_workers=2",
                             "rollout.num_cpus=0.5", "env.num_cpus=0.25"])
    with pytest.raises(SystemExit, match=r"2.25 CPU \(the cluster has 2\)"):
        check_resources(cfg, {"CPU": 2.0}, local=True)
    check_resources(cfg, {"CPU": 2.0}, local=False)  # an existing cluster may autoscale: a warning only
    check_resources(cfg, {"CPU": 2.25}, local=True)
    gpu = load_config(None, ["learner.world_size=4", "learner.num_gpus=1", "rollout.num_gpus=1"])
    with pytest.raises(SystemExit, match=r"5 GPU \(the cluster has 4\)"):
        check_resources(gpu, {"CPU": 64.0, "GPU": 4.0}, local=True)
