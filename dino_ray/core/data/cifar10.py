"""CIFAR-10 for the quickstart, the tests and the benchmarks, from wherever it can be had, in this order:

1. the paths given (``--train_data`` / ``--val_data``);
2. Parquet shards in the data root (``$DINO_RAY_DATA/cifar10/train/part-0000N.parquet``: shard 0 to pretrain
   on, shard 4 held out; the data root is ``DINO_RAY_DATA``, by default ``~/.cache/dino-ray``);
3. torchvision's CIFAR-10 download into the data root (``cifar10/torchvision``), written out as an image folder
   and converted to Parquet with ``dino-ray convert-data``'s converter: the training split to pretrain on,
   the test split held out;
4. the sample the package carries (``cifar10_sample``: 4,000 training and 1,000 held-out images).
``DINO_RAY_OFFLINE=1`` skips step 3.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Optional

from dino_ray.core.config import data_root

log = logging.getLogger(__name__)

SAMPLE = Path(__file__).resolve().parent / "cifar10_sample"  # package data: offline, on a fresh install
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)  # where torchvision's CIFAR-10 archive lives


def shards() -> Path:
    """The CIFAR-10 Parquet shards' folder in the data root (``part-00000.parquet`` ... ``part-00004.parquet``)."""
    return data_root() / "cifar10" / "train"


def online(address: tuple[str, int] = DOWNLOAD_HOST, timeout: float = 3.0) -> bool:
    """Whether the download host answers: an offline machine says no at once, not after a long hang."""
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def cifar10_parquet(cache: Optional[Path] = None, download: bool = True) -> tuple[Path, Path]:
    """torchvision's CIFAR-10 (downloaded into ``cache``, by default the data root's, unless there) as
    ``(train, test)`` Parquet folders."""
    cache = cache or data_root() / "cifar10"
    from torchvision.datasets import CIFAR10

    from dino_ray.core.data.convert import convert_images

    parquet = {}
    for split in ("train", "test"):
        target = cache / "parquet" / split
        if not (target / "_skipped.csv").exists():  # written last by a finished conversion
            images = CIFAR10(str(cache / "torchvision"), train=split == "train", download=download)
            folder = cache / "images" / split
            for index in range(len(images)):
                image, label = images[index]
                path = folder / images.classes[label] / f"{index:05d}.png"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
            convert_images(folder, target, rows_per_shard=10000)
        parquet[split] = target
    return parquet["train"], parquet["test"]


def quickstart_data(train: Optional[str] = None, val: Optional[str] = None) -> tuple[str, str, str]:
    """``(train data, held-out data, where they came from)`` in the module docstring's order."""
    if train or val:
        if not (train and val):
            raise ValueError("give both --train_data and --val_data, or neither")
        return train, val, "given"
    if (shards() / "part-00004.parquet").exists():
        return str(shards() / "part-00000.parquet"), str(shards() / "part-00004.parquet"), \
            f"CIFAR-10 shards in the data root ({shards()})"
    if os.environ.get("DINO_RAY_OFFLINE") != "1" and online():
        try:
            train_path, test_path = cifar10_parquet()
            return str(train_path), str(test_path), f"CIFAR-10 downloaded by torchvision ({data_root()})"
        except Exception as exc:  # noqa: BLE001 - any failure of the download falls back to the sample
            log.warning("CIFAR-10 download into %s failed (%s): using the package's sample", data_root(), exc)
    return str(SAMPLE / "train.parquet"), str(SAMPLE / "val.parquet"), f"the package's sample ({SAMPLE})"
