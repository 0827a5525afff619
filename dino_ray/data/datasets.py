"""Image datasets for pretraining and evaluation: ImageFolder trees and Parquet files.

Parquet files hold one row per image with an ``image`` column (the encoded file's bytes) and a
``label`` column, optionally ``path`` (see ``../shared/datasets/cifar10/README.md``). A row or file
that does not decode is skipped: ``__getitem__`` returns ``None``, the collate function drops it and
counts it, and the file or row is named in the log.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import ImageFolder

from dino_ray.storage import is_uri

log = logging.getLogger(__name__)


def is_parquet(data_path: str | Path) -> bool:
    """Cloud data must be Parquet (``dino-ray convert-data``); a local path may also be an image folder."""
    path = Path(data_path)
    return is_uri(data_path) or path.suffix == ".parquet" or (path.is_dir() and any(path.glob("**/*.parquet")))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in a folder (no labels, no class subfolders), in name order."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    return files


def decode_rgb(data: bytes, name: str) -> Optional[Image.Image]:
    """An encoded image's bytes as an RGB picture, or None (the image named in the log) when it does not decode."""
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder error means a bad image
        log.warning("skipping undecodable image %s: %s", name, exc)
        return None


class ParquetImageDataset(Dataset):
    """Images stored as encoded bytes in one Parquet file or a folder of ``*.parquet`` shards."""

    def __init__(self, path: str | Path, transform: Optional[Callable] = None, max_images: Optional[int] = None,
                 image_column: str = "image", label_column: str = "label") -> None:
        path = Path(path)
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no .parquet files under '{path}'")
        self.images: list[bytes] = []
        self.targets: list[int] = []
        self.paths: list[str] = []
        for file in files:
            schema = pq.read_schema(file)
            missing = [c for c in (image_column, label_column) if c not in schema.names]
            if missing:
                raise ValueError(f"Parquet file '{file}' lacks column(s) {missing} (has {schema.names})")
            table = pq.read_table(file, columns=[c for c in (image_column, label_column, "path") if c in schema.names])
            self.images += table.column(image_column).to_pylist()
            self.targets += [int(v) for v in table.column(label_column).to_pylist()]
            self.paths += (table.column("path").to_pylist() if "path" in table.column_names
                           else [f"{file}#row{i}" for i in range(table.num_rows)])
            if max_images is not None and len(self.images) >= max_images:
                del self.images[max_images:], self.targets[max_images:], self.paths[max_images:]
                break
        self.files = files
        self.transform = transform
        self.source = str(path)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        image = decode_rgb(self.images[index], f"row {index} ({self.paths[index]}) of {self.source}")
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), self.targets[index]


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder that skips (returns None for) files PIL cannot read."""

    def __init__(self, root: str | Path, transform: Optional[Callable] = None, max_images: Optional[int] = None) -> None:
        super().__init__(str(root), transform=transform, is_valid_file=lambda p: not Path(p).name.startswith("."))
        if max_images is not None:
            self.samples = self.samples[:max_images]
            self.targets = self.targets[:max_images]
            self.imgs = self.samples

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as exc:  # noqa: BLE001 - any decoder error means a bad file
            log.warning("skipping unreadable image file %s: %s", path, exc)
            return None
        return (self.transform(image) if self.transform else image), target


def build_dataset(data_path: str | Path, transform: Optional[Callable] = None,
                  max_images: Optional[int] = None) -> Dataset:
    """A Parquet file/folder of shards, or an ImageFolder tree; a missing path is a clear error."""
    path = Path(data_path)
    if not path.exists():
        raise FileNotFoundError(f"data_path '{data_path}' does not exist")
    if is_parquet(path):
        return ParquetImageDataset(path, transform, max_images)
    if not path.is_dir():
        raise ValueError(f"data_path '{data_path}' is neither a Parquet file nor an ImageFolder directory")
    return SafeImageFolder(path, transform, max_images)


def collate_skipping_bad(batch: list[Optional[tuple[Any, int]]]) -> tuple[Any, torch.Tensor, int]:
    """Default collation of the good samples; returns ``(images, labels, number_skipped)``."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), len(batch)
    images, labels = default_collate(good)
    return images, labels, len(batch) - len(good)
