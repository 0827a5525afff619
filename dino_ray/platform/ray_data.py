"""``data_loader: ray_data``: Ray Data reads the images, shuffles them, decodes and multi-crops them in CPU tasks
(on any node of the cluster, CPU-only ones included), and streams the views to the training workers through
their dataset shards.

The driver builds the dataset (``multicrop_dataset``); Ray Train splits it into one shard per worker with
equal row counts, so that every rank takes the same number of steps (DDP needs it) and every image is seen
once per epoch (up to ``world_size - 1`` images, and the last partial batch of each rank, dropped; as the
reference's ``DistributedSampler`` + ``drop_last``). Each epoch re-executes the dataset: a new shuffle, seeded
from ``seed`` and the epoch's execution (Ray's ``RandomSeedConfig``), and new random crops. Which rank gets
which image is Ray's dynamic choice, so the order is not reproducible the way the DataLoader's is.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.data
import torch

from dino_ray.core.config import ConfigError, DINOConfig, build_config
from dino_ray.core.data.datasets import decode_rgb, is_parquet, list_images
from dino_ray.core.data.views import Augmentation, batch_views, build_augmentation
from dino_ray.core.storage import is_uri

log = logging.getLogger(__name__)

VIEW = "view{}"


def _unlabelled(batch: Any) -> np.ndarray:
    return np.full(len(batch), -1, dtype=np.int64)


def image_dataset(data_path: str, max_images: Optional[int] = None, num_cpus: float = 1.0) -> ray.data.Dataset:
    """Rows of ``image`` (the encoded file's bytes), ``label`` and ``path``: from Parquet (a file, a folder of
    shards, an ``s3://`` / ``gs://`` URI; ``path`` is the file's when the rows have none, ``label`` -1 when they
    have none) or the images of a folder or path list (``list_images``, listed once here; ``label`` -1:
    pretraining needs none). Each of its tasks asks for ``num_cpus``."""
    if not is_uri(data_path) and not Path(data_path).exists():
        raise FileNotFoundError(f"data_path '{data_path}' does not exist")
    if is_parquet(data_path):
        ds = ray.data.read_parquet(data_path, file_extensions=["parquet"], num_cpus=num_cpus)
        names = ds.schema().names
        if "image" not in names:
            raise ValueError(f"Parquet data '{data_path}' lacks the 'image' column (has {names})")
        if "path" not in names:
            ds = ray.data.read_parquet(data_path, file_extensions=["parquet"], include_paths=True, num_cpus=num_cpus)
        if "label" not in names:
            ds = ds.add_column("label", _unlabelled, batch_format="pandas", num_cpus=num_cpus)
        ds = ds.select_columns(["image", "label", "path"], num_cpus=num_cpus)
    else:
        files = list_images(data_path).files[:max_images]
        ds = ray.data.read_binary_files(files, include_paths=True, num_cpus=num_cpus)
        ds = ds.rename_columns({"bytes": "image"}, num_cpus=num_cpus).add_column(
            "label", _unlabelled, batch_format="pandas", num_cpus=num_cpus)
    return ds.limit(max_images) if max_images else ds


def count_images(data_path: str, max_images: Optional[int] = None) -> int:
    """The number of images ``image_dataset`` reads, from Parquet metadata or the listing (no image read)."""
    if is_parquet(data_path):
        filesystem, root = pafs.FileSystem.from_uri(data_path if is_uri(data_path) else str(Path(data_path).resolve()))
        count = pads.dataset(root, format="parquet", filesystem=filesystem,
                             exclude_invalid_files=False).count_rows()
    else:
        count = len(list_images(data_path).files)
    return min(count, max_images) if max_images else count


@functools.lru_cache(maxsize=4)
def _task_setup(config_json: str) -> tuple[DINOConfig, Augmentation]:
    """The config and augmentation of a pipeline, built once per Ray worker process rather than per batch."""
    cfg = build_config(json.loads(config_json))
    return cfg, build_augmentation(cfg)


def multicrop_batch(batch: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """One Ray Data task's work: decode ``batch["image"]`` and make the views (``augmentation`` of the config);
    images that do not decode are dropped and named in the task's log. The random crops are seeded
    from the config's seed and the batch's paths: Ray's worker processes all start with torch's same default seed."""
    cfg, augmentation = _task_setup(json.dumps(config, sort_keys=True))
    seed = zlib.crc32("\n".join(map(str, batch["path"])).encode(), cfg.seed)
    torch.manual_seed(seed)
    random.seed(seed)  # the reference augmentation's blur
    decoded = [decode_rgb(data, str(path)) for data, path in zip(batch["image"], batch["path"])]
    kept = [k for k, image in enumerate(decoded) if image is not None]
    images = [decoded[k] for k in kept]
    out = {"label": batch["label"][kept], "path": batch["path"][kept]}
    sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
    views = batch_views(augmentation, images) if images else [torch.empty(0, 3, size, size) for size in sizes]
    out.update({VIEW.format(i): view.numpy() for i, view in enumerate(views)})
    return out


def check_cpus_for_data(cfg: DINOConfig) -> None:
    """Fail fast where the training workers would leave the data tasks waiting forever: 2 workers of 1 CPU on a
    2-core machine deadlock, and so does less than 1 free CPU (Ray Data's file-listing task asks for 1 CPU
    whatever ``ray_data.num_cpus`` says; measured). A cluster too small for the workers yet is left to its
    autoscaler."""
    total = ray.cluster_resources().get("CPU", 0)
    per_worker = (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
    left = total - cfg.scaling.num_workers * per_worker
    needed = max(1.0, cfg.ray_data.num_cpus)
    if 0 <= left < needed:
        raise ConfigError(
            f"data_loader: ray_data needs {needed:g} CPU beside the training workers (ray_data.num_cpus="
            f"{cfg.ray_data.num_cpus:g}, and at least 1 for Ray Data's file listing), but the cluster has {total:g} "
            f"CPUs and scaling.num_workers={cfg.scaling.num_workers} x {per_worker:g} (scaling.resources_per_worker) "
            f"leave {left:g}: give the workers fewer CPUs (e.g. resources_per_worker: "
            f"{{CPU: {max(total - needed, 0) / cfg.scaling.num_workers:g}}}) or add CPUs")


def multicrop_dataset(cfg: DINOConfig) -> tuple[ray.data.Dataset, int]:
    """The pretraining input as a Ray dataset of views, and its number of images (before any fails to decode).
    Every task of it (read, shuffle, multi-crop) asks for ``ray_data.num_cpus``: what ``check_cpus_for_data`` saw."""
    check_cpus_for_data(cfg)
    rows = count_images(cfg.data_path, cfg.max_images)
    views = image_dataset(cfg.data_path, cfg.max_images, cfg.ray_data.num_cpus).random_shuffle(
        seed=cfg.seed, num_cpus=cfg.ray_data.num_cpus).map_batches(
        multicrop_batch, fn_kwargs={"config": cfg.to_dict()}, batch_size=cfg.ray_data.batch_size,
        batch_format="numpy", num_cpus=cfg.ray_data.num_cpus)
    return views, rows


class ShardBatches:
    """One epoch of a training worker's dataset shard as the loop's ``(views, labels, skipped)`` batches; with an
    ``audit`` file, the paths of the images it trained on are written there when the epoch ends."""

    def __init__(self, shard: Any, cfg: DINOConfig, steps: int, audit: Optional[Path] = None) -> None:
        self.shard, self.cfg, self.steps, self.audit = shard, cfg, steps, audit

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, int]]:
        seen: list[str] = []
        for batch in self.shard.iter_batches(batch_size=self.cfg.batch_size_per_gpu, drop_last=True,
                                             batch_format="numpy", prefetch_batches=2):
            if self.audit is not None:
                seen.extend(str(path) for path in batch["path"])
            views = [torch.from_numpy(batch[VIEW.format(i)]) for i in range(2 + self.cfg.local_crops_number)]
            yield views, torch.from_numpy(batch["label"]), 0
        if self.audit is not None:
            self.audit.parent.mkdir(parents=True, exist_ok=True)
            self.audit.write_text("".join(f"{path}\n" for path in seen))


def shard_epochs(cfg: DINOConfig, rows: int, rank: int, world_size: int) -> Any:
    """``epoch -> ShardBatches`` for this training worker (``train_dino``'s ``epoch_batches``)."""
    shard = ray.train.get_dataset_shard("train")
    steps = rows // world_size // cfg.batch_size_per_gpu
    if steps == 0:
        raise ValueError(f"data_path '{cfg.data_path}' has {rows} images: fewer than one batch "
                         f"({cfg.batch_size_per_gpu} x {world_size} ranks)")
    audit_dir = Path(cfg.ray_data.audit_dir) if cfg.ray_data.audit_dir else None

    def epoch_batches(epoch: int) -> ShardBatches:
        audit = audit_dir / f"epoch{epoch:04d}_rank{rank}.txt" if audit_dir else None
        return ShardBatches(shard, cfg, steps, audit)
    return epoch_batches
