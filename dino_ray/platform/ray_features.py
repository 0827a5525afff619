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
from dino_ray.eval.features import extract_features, load_features, save_features
from dino_ray.platform.ray_session import map_tasks
from dino_ray.platform.ray_train import cluster_has_gpus

log = logging.getLogger(__name__)


def extract_shard(weights: dict[str, Any], data_path: str, image_size: int, resize_size: Optional[int],
                  max_images: Optional[int], shard: int, num_shards: int, batch_size: int, out_dir: str,
                  split: str) -> int:
    """Extract shard ``shard`` of ``num_shards`` of ``data_path`` and save it; returns its row count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, _ = backbone_from_checkpoint(**weights)
    dataset = build_dataset(data_path, eval_transform(image_size, resize_size), max_images)
    indices = np.array_split(np.arange(len(dataset)), num_shards)[shard]
    features, labels = extract_features(backbone.to(device), Subset(dataset, indices.tolist()), batch_size,
                                        device=device, progress=False)
    save_features(out_dir, split, features, labels, part=shard)
    return len(labels)


def extract_features_on_ray(weights: dict[str, Any], data_path: str, split: str, out_dir: str | Path,
                            image_size: int, resize_size: Optional[int] = None, max_images: Optional[int] = None,
                            num_shards: Optional[int] = None, batch_size: int = 128,
                            use_gpu: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the shards as Ray tasks (a GPU each when the cluster has GPUs), then load the saved features.

    ``weights``: keyword arguments of ``backbone_from_checkpoint`` (a local path every node can read).
    """
    # Ray's task processes do not start in this folder: local paths go as this process sees them.
    out_dir = Path(out_dir).resolve()
    data_path = str(Path(data_path).resolve()) if Path(data_path).exists() else data_path
    weights = {**weights, "pretrained_weights": str(Path(weights["pretrained_weights"]).resolve())}
    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    slots = ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)
    num_shards = num_shards or max(1, int(slots))
    rows = sum(map_tasks(extract_shard, [(weights, str(data_path), image_size, resize_size, max_images, shard,
                                          num_shards, batch_size, str(out_dir), split) for shard in range(num_shards)],
                         f"{split} features ({num_shards} Ray tasks)", unit="shard", num_gpus=1 if use_gpu else 0))
    log.info("%s features: %d images in %d shards, saved under %s", split, rows, num_shards, Path(out_dir) / split)
    return load_features(out_dir, split)
