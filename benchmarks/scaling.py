"""Scaling out, measured: 1 to 16 Ray Train workers on a fake multi-node cluster (CPU, one thread each), fed by
Ray Data, each step's time split into compute, the gradient all-reduce and the wait for input (medians over the steps of
an epoch: each epoch of Ray Data starts with its shuffle, shown apart as the mean wait).

The cluster is Ray's ``cluster_utils.Cluster`` on this machine: a head (the driver, Ray Data's decode and
multi-crop tasks) and ``--nodes`` worker nodes of ``--cpus_per_node`` CPUs, the training workers spread over them
(``placement_strategy: SPREAD``). Every run is ``dino-ray pretrain``'s own path (``build_trainer`` + fit) on the
same small ViT and per-worker batch, with ``profile_allreduce`` on (the gradient all-reduce done synchronously
and timed) and every worker's epoch statistics collected by a Ray Train callback. The second epoch is reported
(the first carries start-up). On 2 cores the workers share the cores: compute per step grows with N because the
cores are shared, not because of DINO; the all-reduce's bytes are exact, its seconds are gloo over loopback.

Usage: ``python benchmarks/scaling.py [--workers 1,2,4,8,16] [--nodes 4] [--cpus_per_node 4] [--steps 8]``;
writes ``benchmarks/results/scaling.json`` (``render_docs.py`` draws its plot on the benchmarks page).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster
from ray.train import UserCallback

from dino_ray.core.config import build_config
from dino_ray.core.data.cifar10 import quickstart_data
from dino_ray.core.models.build import build_student_teacher
from dino_ray.platform.ray_train import fit
from dino_ray.platform.trainer import absolute_data_paths, build_trainer

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(arch="vit_tiny", patch_size=4, embed_dim=64, depth=2, num_heads=2, out_dim=1024, head_hidden_dim=256,
             head_bottleneck_dim=64, global_crops_size=32, local_crops_size=16, local_crops_number=2)


class EveryWorker(UserCallback):
    """Each worker's epoch statistics, as Ray Train's controller receives them, appended to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(metrics) + "\n")


def trainable_bytes(cfg: Any) -> int:
    """The student's trainable parameters in fp32: what DDP all-reduces each step."""
    student, _ = build_student_teacher(cfg)
    return sum(p.numel() * 4 for p in student.parameters() if p.requires_grad)


def run(workers: int, batch: int, steps: int, data: str, work: Path) -> dict[str, Any]:
    cfg = absolute_data_paths(build_config({
        **MODEL, "data_path": data, "max_images": workers * batch * steps, "batch_size_per_gpu": batch, "epochs": 2,
        "warmup_epochs": 0.5, "freeze_last_layer": 0, "saveckp_freq": 0, "num_workers": 0, "drop_path_rate": 0.0,
        "data_loader": "ray_data", "augmentation": "batched", "profile_allreduce": True,
        "output_dir": str(work / f"w{workers}"), "ray_data": {"num_cpus": 0.5, "batch_size": 64},
        "scaling": {"num_workers": workers, "threads_per_worker": 1, "resources_per_worker": {"CPU": 1},
                    "placement_strategy": "SPREAD"},
        "tracking": {"log_model": False}}))
    stats_file = work / f"w{workers}.jsonl"
    start = time.time()
    fit(build_trainer(cfg, callbacks=[EveryWorker(str(stats_file))]))
    wall = time.time() - start
    last = json.loads(stats_file.read_text().splitlines()[-1])  # every worker's second epoch
    per_worker = [{"compute_s": m["step_time_median"] - m.get("allreduce_time", 0.0),
                   "allreduce_s": m.get("allreduce_time", 0.0), "input_wait_s": m["data_time_median"],
                   "input_wait_mean_s": m["data_time"], "peak_rss_mb": m["peak_rss_mb"]} for m in last]
    step = {key: statistics.median(w[key] for w in per_worker) for key in ("compute_s", "allreduce_s",
                                                                          "input_wait_s", "input_wait_mean_s")}
    step_s = step["compute_s"] + step["allreduce_s"] + step["input_wait_s"]
    return {"workers": workers, "batch_per_worker": batch, "steps_per_epoch": steps,
            "images_per_s": round(workers * batch / step_s, 1), "step_s": round(step_s, 4),
            "median_step": {k: round(v, 4) for k, v in step.items()},
            "allreduce_mb_per_step": round(last[0].get("allreduce_mb", 0.0), 3),
            "peak_rss_mb_per_worker": round(max(w["peak_rss_mb"] for w in per_worker)),
            "per_worker": [{k: round(v, 4) for k, v in w.items()} for w in per_worker], "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--cpus_per_node", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = parser.parse_args()
    data, _, source = quickstart_data()
    work = Path(tempfile.mkdtemp(prefix="dino_ray_scaling_"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 400 * 2**20})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    rows = []
    try:
        for workers in map(int, args.workers.split(",")):
            rows.append(run(workers, args.batch, args.steps, data, work))
            r = rows[-1]
            print(f"{workers:3d} workers: {r['images_per_s']:7.1f} images/s; step {r['step_s']:.3f} s = compute "
                  f"{r['median_step']['compute_s']:.3f} + all-reduce {r['median_step']['allreduce_s']:.3f} "
                  f"({r['allreduce_mb_per_step']} MiB) + input {r['median_step']['input_wait_s']:.3f}; peak RSS "
                  f"{r['peak_rss_mb_per_worker']} MiB/worker", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    parameters_mb = trainable_bytes(build_config(MODEL)) / 2**20
    record = {"machine": {"cpu_threads": torch.get_num_threads(), "cluster": f"head (2 CPUs) + {args.nodes} nodes x "
                                                                             f"{args.cpus_per_node} CPUs, one machine"},
              "model": MODEL, "data": source, "trainable_parameters_mb": round(parameters_mb, 3), "runs": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"gradient all-reduce per step: {rows[-1]['allreduce_mb_per_step']} MiB measured, "
          f"{parameters_mb:.3f} MiB of trainable fp32 parameters; saved {args.out}")


if __name__ == "__main__":
    main()
