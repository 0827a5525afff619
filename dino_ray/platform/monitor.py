"""The k-NN monitor of a running pretraining: Ray Train's asynchronous validation function.

Every ``eval.knn_every``-th checkpoint that rank 0 reports is handed to ``knn_monitor`` in its own
Ray task (``ValidationConfig``), so the training workers never wait for it. It loads the teacher
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

from dino_ray.core.config import build_config
from dino_ray.core.data.augment import eval_transform
from dino_ray.core.data.datasets import build_dataset
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.eval.attention import attention_figures
from dino_ray.eval.knn import evaluate_knn
from dino_ray.platform.logs import log_to_stderr
from dino_ray.platform.tracking.store import RUN_ID_FILE

log = logging.getLogger(__name__)
MONITOR_NICENESS = 19  # the lowest priority: the monitor must not slow the training it watches


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
    transform = eval_transform(cfg.global_crops_size, cfg.global_crops_size)
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
