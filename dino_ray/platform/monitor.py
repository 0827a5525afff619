"""The k-NN monitor of a running pretraining: Ray Train's asynchronous validation function, or a step of rank 0's
report between epochs.

Every ``eval.knn_every``-th checkpoint that rank 0 reports is handed to ``knn_monitor``. Where the cluster has
CPUs that the training leaves free, that happens in its own Ray task (``ValidationConfig``), so the training
workers never wait for it. Where the training's threads take every CPU (a laptop), a task would compete with them
for the cores, and start a process, import torch and build the model each time: there the monitor runs on rank 0
inside the epoch's report instead (``monitor_between_epochs``), a pause of a second or two for the CPU recipe
(``benchmarks/ray_tax.py`` measures both). It loads the teacher
backbone from the checkpoint, runs the weighted k-NN on a small labelled subset, draws the
attention maps of a few fixed held-out images, and logs both to the pretraining's MLflow run at
the checkpoint's epoch. Its metrics are also attached to the checkpoint by Ray.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dino_ray.core.config import DINOConfig, build_config
from dino_ray.core.data.augment import eval_transform
from dino_ray.core.data.datasets import build_dataset
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.eval.attention import attention_figures
from dino_ray.eval.knn import evaluate_knn
from dino_ray.platform.logs import log_to_stderr
from dino_ray.platform.tracking.store import RUN_ID_FILE

log = logging.getLogger(__name__)
MONITOR_NICENESS = 19  # the lowest priority: the monitor must not slow the training it watches


def training_cpus(cfg: DINOConfig) -> float:
    """The CPUs a run's training workers keep busy: each worker's CPUs, or its torch threads when it has more (a
    worker of half a CPU still runs one thread)."""
    per_worker = (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
    return cfg.scaling.num_workers * max(per_worker, cfg.scaling.threads_per_worker or 1)


def monitor_between_epochs(cfg: DINOConfig, cluster_cpus: float) -> bool:
    """Whether the monitor runs on rank 0 in the epoch's report: ``eval.knn_sync`` when set, else when the training
    (and Ray Data's tasks) leave fewer CPUs than one monitor task asks for (``eval.num_cpus``). A cluster smaller
    than its training has yet to grow (an autoscaler starting from no workers, a head of 0 CPUs): a task, there."""
    if cfg.eval.knn_sync is not None:
        return cfg.eval.knn_sync
    busy = training_cpus(cfg)
    if cluster_cpus < busy:
        return False
    loading = cfg.ray_data.num_cpus if cfg.data_loader == "ray_data" else 0
    return cluster_cpus - busy - loading < cfg.eval.num_cpus


def knn_monitor(checkpoint: Any, config: dict[str, Any], epoch: int) -> dict[str, float]:
    """k-NN top-1/top-5 (and attention figures) of the teacher in a reported ``ray.train.Checkpoint``."""
    from dino_ray.platform.tracking.runs import log_to_run
    from dino_ray.platform.tracking.store import tracking_uri

    log_to_stderr()
    cfg = build_config(config)
    with checkpoint.as_directory() as folder:
        backbone, _ = backbone_from_checkpoint(Path(folder) / "checkpoint.pth")
        run_file = Path(folder) / RUN_ID_FILE
        run_id = run_file.read_text().strip() if run_file.exists() else None
    backbone.eval()
    transform = eval_transform(cfg.eval_size(), cfg.eval_size())
    train = build_dataset(cfg.eval.knn_train_data or cfg.data_path, transform, cfg.eval.knn_train_images)
    val = build_dataset(cfg.eval.knn_val_data, transform, cfg.eval.knn_val_images)
    k = cfg.eval.knn_k
    top1, top5 = evaluate_knn(backbone, train, val, [k], cfg.eval.knn_temperature, batch_size=256,
                              progress=False)[k]
    metrics = {f"knn_top1_k{k}": top1, f"knn_top5_k{k}": top5}
    log.info("k-NN monitor, epoch %d: top-1 %.2f, top-5 %.2f (k=%d, %d train / %d val images)", epoch, top1, top5,
             k, len(train), len(val))
    if run_id is None:
        return metrics
    with tempfile.TemporaryDirectory() as scratch:
        figures = []
        if cfg.eval.attention_images and cfg.arch.startswith("vit"):  # a convolutional backbone has no attention
            figures = [file.rename(file.with_name(f"{file.parent.name}.png"))  # attention/epochNNNN/imgNN.png
                       for file in attention_figures(backbone, cfg.eval.knn_val_data, scratch,
                                                     cfg.eval.attention_images, cfg.patch_size,
                                                     4 * cfg.global_crops_size)]
        log_to_run(tracking_uri(cfg), run_id, metrics, step=epoch,
                   artifacts=tuple((file, f"attention/epoch{epoch:04d}") for file in figures))
    return metrics


def knn_monitor_task(checkpoint: Any, config: dict[str, Any], epoch: int) -> dict[str, float]:
    """``knn_monitor`` as Ray's asynchronous validation task: at the lowest priority, so that on shared cores it
    takes only the CPU the training leaves idle and the training keeps its pace."""
    os.nice(max(0, MONITOR_NICENESS - os.nice(0)))
    return knn_monitor(checkpoint, config, epoch)
