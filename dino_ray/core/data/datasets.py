"""Image datasets for pretraining and evaluation: whatever images a user has.

``data_path`` is any of:
- a folder of images at any depth. With class subfolders and no image directly in it (``<root>/<class>/...``,
  torchvision's ImageFolder layout) each image is labelled by its first-level folder; otherwise (a flat folder,
  photos by date...) the images are unlabelled (label -1). Hidden files and folders are left out; files that are
  not images by their name are left out, counted and named in the log;
- a text file listing image paths (relative to the list's folder) or ``s3://`` / ``gs://`` URIs, one a line
  (``#`` comments and blank lines ignored): unlabelled;
- Parquet: a file, a folder of shards or a cloud URI, one row per image with an ``image`` column (the encoded
  file's bytes) and optionally ``label`` (else -1) and ``path`` (``dino-ray convert-data`` writes these).
An image or row that does not decode is skipped: ``__getitem__`` returns ``None``, the collate function drops
it and counts it, and the file or row is named in the log; nothing is fatal after the first batch. Evaluations
that need labels call ``require_labels``, which says what to give them instead.
"""
from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from dino_ray.core.storage import is_uri, read_bytes

log = logging.getLogger(__name__)


def is_parquet(data_path: str | Path) -> bool:
    """Parquet data: a ``.parquet`` file or URI, or a folder of them (a cloud folder must be Parquet shards)."""
    path = Path(data_path)
    if is_uri(data_path):
        return not str(data_path).endswith(LIST_SUFFIXES)
    return path.suffix == ".parquet" or (path.is_dir() and any(path.glob("**/*.parquet")))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
LIST_SUFFIXES = (".txt", ".lst", ".csv")  # a list of image paths, when on cloud storage (a local one: any file)


@dataclass
class ImageListing:
    """The images of a folder or path list: paths (local, absolute, or URIs), labels (-1: none), class names, and
    the files left out because their names are not images'."""
    files: list[str]
    labels: list[int]
    classes: list[str]
    left_out: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _walk(folder: str) -> Iterator[str]:
    """Every file under ``folder``, hidden ones and hidden folders left out, in name order, by ``os.scandir``
    (no stat call per file on most filesystems: a million files list in seconds, not minutes)."""
    entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _walk(entry.path)
        else:
            yield entry.path


def list_images(data_path: str | Path) -> ImageListing:
    """The images of a folder (labelled by class subfolders when that is its layout) or of a path list."""
    source = str(data_path)
    if is_uri(source) or Path(source).is_file():
        text = read_bytes(source).decode() if is_uri(source) else Path(source).read_text()
        base = source.rsplit("/", 1)[0] if is_uri(source) else str(Path(source).resolve().parent)
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        files = [line if is_uri(line) or os.path.isabs(line) else f"{base}/{line}" for line in lines]
        if not files:
            raise ValueError(f"path list '{source}' names no image")
        return ImageListing(files, [-1] * len(files), [], [])
    if not Path(source).is_dir():
        raise FileNotFoundError(f"data_path '{source}' does not exist")
    top = [e for e in os.scandir(source) if not e.name.startswith(".")]
    has_top_images = any(e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES) for e in top)
    classes = [] if has_top_images else sorted(e.name for e in top if e.is_dir(follow_symlinks=True))
    files, labels, left_out = [], [], []
    for label, folder in enumerate(classes) if classes else [(-1, source)]:
        for path in _walk(os.path.join(source, folder) if classes else folder):
            if path.lower().endswith(IMAGE_SUFFIXES):
                files.append(path)
                labels.append(label)
            else:
                left_out.append(path)
    if left_out:
        log.warning("%s: %d files left out, not images by their names: %s%s", source, len(left_out),
                    ", ".join(left_out[:5]), " ..." if len(left_out) > 5 else "")
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under '{source}'")
    used = sorted(set(labels))  # class folders without any image are not classes
    if classes and len(used) < len(classes):
        classes = [classes[i] for i in used]
        relabel = {old: new for new, old in enumerate(used)}
        labels = [relabel[label] for label in labels]
    return ImageListing(files, labels, classes, left_out)


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
                if image_column not in names:
                    raise ValueError(f"Parquet file '{file}' lacks the '{image_column}' column (has {names})")
                labels.append(parquet.read(columns=[label_column]).column(0).to_numpy().astype(np.int64)
                              if label_column in names else np.full(parquet.metadata.num_rows, -1, np.int64))
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


class ImageFiles(Dataset):
    """Images from files (local paths or URIs) of an ``ImageListing``; a file that does not decode gives None."""

    def __init__(self, listing: ImageListing, transform: Optional[Callable] = None,
                 max_images: Optional[int] = None) -> None:
        self.paths = listing.files[:max_images]
        self.targets = listing.labels[:max_images]
        self.classes = listing.classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        path = self.paths[index]
        try:
            data = read_bytes(path) if is_uri(path) else Path(path).read_bytes()
        except OSError as exc:
            log.warning("skipping unreadable image file %s: %s", path, exc)
            return None
        image = decode_rgb(data, path)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), self.targets[index]


def build_dataset(data_path: str | Path, transform: Optional[Callable] = None, max_images: Optional[int] = None,
                  listing: Optional[ImageListing] = None) -> Dataset:
    """The dataset of any ``data_path`` of the module docstring; ``listing``: its images, listed already (by rank 0
    of a distributed run, so that the other ranks do not walk the folder again)."""
    if not is_uri(data_path) and not Path(data_path).exists():
        raise FileNotFoundError(f"data_path '{data_path}' does not exist")
    if is_parquet(data_path):
        return ParquetImageDataset(data_path, transform, max_images)
    return ImageFiles(listing or list_images(data_path), transform, max_images)


def require_labels(dataset: Dataset, data_path: str | Path, purpose: str) -> None:
    """Refuse unlabelled images where ``purpose`` (an evaluation) needs labels, saying how to give them."""
    targets = dataset.targets
    if len(targets) and max(targets) < 0:
        raise ValueError(f"{purpose} needs labelled images, and '{data_path}' has none (a flat folder, a path list, "
                         f"or Parquet without a 'label' column): give class subfolders (<root>/<class>/<images>) or "
                         f"Parquet with a 'label' column")


def collate_skipping_bad(batch: list[Optional[tuple[Any, int]]]) -> tuple[Any, torch.Tensor, int]:
    """Default collation of the good samples; returns ``(images, labels, number_skipped)``."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), len(batch)
    images, labels = default_collate(good)
    return images, labels, len(batch) - len(good)
