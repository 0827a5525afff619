"""Image datasets for pretraining and evaluation: ImageFolder trees and Parquet files.

Parquet files hold one row per image with an ``image`` column (the encoded file's bytes) and a
``label`` column, optionally ``path`` (see ``../shared/datasets/cifar10/README.md``). A row or file
that does not decode is skipped: ``__getitem__`` returns ``None``, the collate function drops it and
counts it, and the file or row is named in the log.
"""
from __future__ import annotations

import io
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import ImageFolder

from dino_ray.core.storage import is_uri

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


def decode_rgb(data: bytes, name: str | Callable[[], str]) -> Optional[Image.Image]:
    """An encoded image's bytes as an RGB picture, or None (the image named in the log) when it does not decode;
    ``name`` may be a function, called only then."""
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder error means a bad image
        log.warning("skipping undecodable image %s: %s", name() if callable(name) else name, exc)
        return None


OPEN_FILES = 16  # Parquet files a process keeps open (with their parsed footers)


class ParquetImageDataset(Dataset):
    """Images stored as encoded bytes in one Parquet file or a folder of ``*.parquet`` shards, read lazily.

    Only the labels and the row-group layout are read at start; an image's bytes come with its row group,
    read on first use and kept in a per-process cache of at most ``cache_mb`` (least recently used out), so
    a process's memory does not grow with the dataset (ImageNet's 140 GB as well as CIFAR-10). A file whose
    footer or columns are unreadable is named before any training; a row group that fails to read later
    has its rows skipped, counted and named, like an undecodable image.
    """

    def __init__(self, path: str | Path, transform: Optional[Callable] = None, max_images: Optional[int] = None,
                 image_column: str = "image", label_column: str = "label", cache_mb: float = 128) -> None:
        path = Path(path)
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no .parquet files under '{path}'")
        self.groups: list[tuple[Path, int]] = []  # (file, row group) in index order
        starts, labels = [0], []
        for file in files:
            try:
                parquet = pq.ParquetFile(file)
                names = parquet.schema_arrow.names
                missing = [c for c in (image_column, label_column) if c not in names]
                if missing:
                    raise ValueError(f"Parquet file '{file}' lacks column(s) {missing} (has {names})")
                labels.append(parquet.read(columns=[label_column]).column(0).to_numpy().astype(np.int64))
            except (OSError, pa.ArrowException) as exc:
                raise ValueError(f"Parquet file '{file}' is unreadable ({type(exc).__name__}: {exc}): truncated or "
                                 f"not Parquet; convert it again or move it out of '{path}'") from exc
            for group in range(parquet.metadata.num_row_groups):
                self.groups.append((file, group))
                starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
            if max_images is not None and starts[-1] >= max_images:
                break
        self.length = starts[-1] if max_images is None else min(max_images, starts[-1])
        self.starts = np.array(starts)
        self.targets = np.concatenate(labels)[:self.length]
        self.files = files
        self.columns = (image_column, label_column)
        self.transform = transform
        self.source = str(path)
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[int, Optional[pa.Table]] = OrderedDict()
        self._cached_bytes = 0
        self._open: OrderedDict[Path, pq.ParquetFile] = OrderedDict()  # footers parsed once (large for big files)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict(), "_cached_bytes": 0,
                "_open": OrderedDict()}  # each DataLoader worker its own

    def _parquet(self, file: Path) -> pq.ParquetFile:
        if file not in self._open:
            self._open[file] = pq.ParquetFile(file)
            if len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)
        self._open.move_to_end(file)
        return self._open[file]

    def __len__(self) -> int:
        return self.length

    @property
    def paths(self) -> list[str]:
        """Every image's name (its ``path`` column, else ``file#row``); read on demand, not kept."""
        names: list[str] = []
        for file in self.files:
            parquet = pq.ParquetFile(file)
            names += (parquet.read(columns=["path"]).column(0).to_pylist() if "path" in parquet.schema_arrow.names
                      else [f"{file}#row{i}" for i in range(parquet.metadata.num_rows)])
        return names[:self.length]

    def _row_group(self, group: int) -> Optional[pa.Table]:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        file, index = self.groups[group]
        try:
            parquet = self._parquet(file)
            wanted = [c for c in (self.columns[0], "path") if c in parquet.schema_arrow.names]
            table: Optional[pa.Table] = parquet.read_row_group(index, columns=wanted)
        except (OSError, pa.ArrowException) as exc:
            log.warning("skipping row group %d of %s (rows %d-%d): %s", index, file, self.starts[group],
                        self.starts[group + 1] - 1, exc)
            table = None
        self._cache[group] = table
        self._cached_bytes += table.nbytes if table is not None else 0
        while len(self._cache) > 1 and self._cached_bytes > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes if dropped is not None else 0
        return table

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images of {self.source}")
        group = int(np.searchsorted(self.starts, index, side="right")) - 1
        table = self._row_group(group)
        if table is None:  # already named in the log when the row group failed
            return None
        row = index - int(self.starts[group])

        def name() -> str:  # only for an image that does not decode
            file, in_file = self.groups[group]
            cell = table.column("path")[row].as_py() if "path" in table.column_names else \
                f"{file} row group {in_file} row {row}"
            return f"row {index} ({cell}) of {self.source}"

        image = decode_rgb(table.column(self.columns[0])[row].as_py(), name)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), int(self.targets[index])


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
