"""Feature extraction spread over Ray tasks: one contiguous shard of a dataset per task, on a GPU or a CPU.

Each task builds the backbone from the weights file, reads its shard of the images and writes
``<out>/<split>/part-NNNNN.parquet`` (``dino_ray.eval.features`` layout); reading the parts back in
order gives exactly the single-process features. The driver only waits and shows progress.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import torch
from torch.utils.data import Subset

from dino_ray.core.data.augment import eval_transform
from dino_ray.core.data.datasets import build_dataset
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.eval.features import (
    extract_indexed_features,
    load_features,
    part_name,
    save_features,
)
from dino_ray.platform.ray_session import map_tasks
from dino_ray.platform.ray_train import cluster_has_gpus

log = logging.getLogger(__name__)


def extract_shard(weights: dict[str, Any], data_path: str, image_size: int, resize_size: Optional[int],
                  max_images: Optional[int], shard: int, num_shards: int, batch_size: int, out_dir: str,
                  split: str) -> int:
    """Extract shard ``shard`` of ``num_shards`` of ``data_path`` and save it, with each image's name; returns its
    row count (images that decoded)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, _ = backbone_from_checkpoint(**weights)
    dataset = build_dataset(data_path, eval_transform(image_size, resize_size), max_images)
    indices = np.array_split(np.arange(len(dataset)), num_shards)[shard].tolist()
    features, labels, kept = extract_indexed_features(backbone.to(device), Subset(dataset, indices), batch_size,
                                                      device=device, progress=False)
    paths = dataset.paths  # files, or Parquet rows' names
    save_features(out_dir, split, features, labels, part=shard, paths=[paths[indices[i]] for i in kept.tolist()])
    return len(labels)


def extract_features_on_ray(weights: dict[str, Any], data_path: str, split: str, out_dir: str | Path,
                            image_size: int, resize_size: Optional[int] = None, max_images: Optional[int] = None,
                            num_shards: Optional[int] = None, batch_size: int = 128,
                            use_gpu: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the shards as Ray tasks (a GPU each when the cluster has GPUs), then load the saved features.

    ``weights``: keyword arguments of ``backbone_from_checkpoint`` (a local path every node can read).
    """
    save_features_on_ray(weights, data_path, split, out_dir, image_size, resize_size, max_images, num_shards,
                         batch_size, use_gpu)
    return load_features(out_dir, split)


def save_features_on_ray(weights: dict[str, Any], data_path: str, split: str, out_dir: str | Path,
                         image_size: int, resize_size: Optional[int] = None, max_images: Optional[int] = None,
                         num_shards: Optional[int] = None, batch_size: int = 128, use_gpu: Optional[bool] = None,
                         resume: bool = False) -> int:
    """The shards' features saved as ``out_dir/split/part-NNNNN.parquet`` by Ray tasks; with ``resume``, the parts
    already there are kept (an interrupted extraction continues). Returns the number of shards."""
    # Ray's task processes do not start in this folder: local paths go as this process sees them.
    out_dir = Path(out_dir).resolve()
    data_path = str(Path(data_path).resolve()) if Path(data_path).exists() else data_path
    weights = {**weights, "pretrained_weights": str(Path(weights["pretrained_weights"]).resolve())}
    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    slots = ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)
    num_shards = num_shards or max(1, int(slots))
    todo = [shard for shard in range(num_shards) if not (resume and (out_dir / split / part_name(shard)).exists())]
    rows = sum(map_tasks(extract_shard, [(weights, str(data_path), image_size, resize_size, max_images, shard,
                                          num_shards, batch_size, str(out_dir), split) for shard in todo],
                         f"{split} features ({len(todo)} of {num_shards} shards as Ray tasks)", unit="shard",
                         num_gpus=1 if use_gpu else 0))
    log.info("%s features: %d images in %d shards (%d done before), saved under %s", split, rows, num_shards,
             num_shards - len(todo), Path(out_dir) / split)
    return num_shards
