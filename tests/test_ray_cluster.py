"""A simulated 2-node Ray cluster (``ray.cluster_utils.Cluster``): losing a worker node mid-run.

The pretraining is driven by ``dino-ray pretrain`` in its own process, connected to the cluster
as a user's driver would be; this test process owns the cluster, removes the node that hosts one
training worker after a checkpoint, and adds a replacement node (the autoscaler's job on a real
cluster), from its main thread as ``Cluster`` requires.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from dino_ray.config import save_config  # noqa: E402

from .test_ray_trainer import wait_for  # noqa: E402


def test_losing_a_worker_node_mid_run_still_finishes(tiny_cfg, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = tiny_cfg(epochs=12, saveckp_freq=4, batch_size_per_gpu=8, output_dir=str(tmp_path / "nodes"),
                       scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"}, failure={"max_failures": 3})
        save_config(cfg, tmp_path / "nodes.yaml")
        driver = subprocess.Popen([sys.executable, "-m", "dino_ray.cli", "pretrain", "--config",
                                   str(tmp_path / "nodes.yaml")], env={**os.environ, "RAY_ADDRESS": cluster.address},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_dir = tmp_path / "nodes" / "ray_results" / "nodes"
        wait_for(run_dir / "checkpoint_epoch0002", timeout=240)
        assert driver.poll() is None, driver.stdout.read()
        cluster.remove_node(doomed)  # the node and the training worker on it are gone
        cluster.add_node(num_cpus=1)  # a replacement joins, as an autoscaler would provide
        output, _ = driver.communicate(timeout=400)
    finally:
        cluster.shutdown()
    assert driver.returncode == 0, output[-3000:]
    latest = max(run_dir.glob("checkpoint_epoch*"))
    assert latest.name == "checkpoint_epoch0011"
    epochs = [json.loads(line)["epoch"] for line in open(latest / "log.txt")]
    assert epochs == list(range(12)), "no epoch of the checkpoint's lineage trained twice"
    final = torch.load(latest / "checkpoint.pth", weights_only=True)
    assert final["epoch"] == 12 and set(final) >= {"student", "teacher", "optimizer", "dino_loss", "args"}
    assert "restart" in output.lower() or "fail" in output.lower(), "the node loss was seen and survived"
