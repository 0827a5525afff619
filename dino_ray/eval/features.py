"""Extract backbone features (the CLS output) of an image dataset; save and reload them as Parquet.

Saved features are ``<folder>/<split>/part-NNNNN.parquet`` files with ``path`` (the image's name), ``label``
(int64, -1 without labels) and ``feature`` (list of float32) columns, one row per image that decoded, in
dataset order across the parts: the layout the distributed extraction on Ray writes (one part per task),
``--dump_features`` writes and ``dino-ray embed`` concatenates. A part is written under a temporary name and
renamed when complete, so an interrupted extraction keeps its finished parts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dino_ray.core.data.datasets import collate_skipping_bad


class _Indexed(Dataset):
    """A dataset's items with their index, so that the images kept after the bad ones are dropped are known."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Optional[tuple[Any, tuple[int, int]]]:
        item = self.dataset[index]
        return None if item is None else (item[0], (item[1], index))


@torch.no_grad()
def extract_indexed_features(model: nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 0,
                             device: str | torch.device = "cpu", progress: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features [N, D] float32, labels [N] int64, indices [N])`` in dataset order, bad images skipped."""
    model.eval()
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping_bad)
    features, labels, indices = [], [], []
    for images, (targets, kept), _ in tqdm(loader, desc="features", disable=not progress, leave=False):
        if images is None:
            continue
        features.append(model(images.to(device)).float().cpu())
        labels.append(targets)
        indices.append(kept)
    if not features:
        dimension = getattr(model, "embed_dim", 0)
        return torch.zeros(0, dimension), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels), torch.cat(indices)


def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(features [N, D] float32, labels [N] int64)`` in dataset order, bad images skipped."""
    features, labels, _ = extract_indexed_features(model, dataset, batch_size, num_workers, device, progress)
    return features, labels


def feature_table(features: torch.Tensor, labels: torch.Tensor, paths: Optional[list[str]] = None) -> pa.Table:
    """One row per image: ``path`` (when known), ``label`` and ``feature`` (a fixed-size list of float32)."""
    values = features.float().numpy()
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), values.shape[1]) \
        if len(values) else pa.array([], pa.list_(pa.float32()))
    columns = {"path": pa.array(paths, pa.string())} if paths is not None else {}
    return pa.table({**columns, "label": pa.array(labels.numpy().astype(np.int64)), "feature": column})


def save_features(folder: str | Path, split: str, features: torch.Tensor, labels: torch.Tensor, part: int = 0,
                  paths: Optional[list[str]] = None) -> Path:
    """Write one part of a split's features, whole or not at all; returns the file."""
    out = Path(folder) / split
    out.mkdir(parents=True, exist_ok=True)
    path = out / part_name(part)
    partial = path.with_suffix(".partial")
    pq.write_table(feature_table(features, labels, paths), partial)
    partial.rename(path)
    return path


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def feature_parts(folder: str | Path, split: str) -> list[Path]:
    """A split's parts in order."""
    parts = sorted((Path(folder) / split).glob("part-*.parquet"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    if not parts:
        raise FileNotFoundError(f"no saved features in '{Path(folder) / split}' (expected part-NNNNN.parquet files)")
    return parts


def table_features(table: pa.Table) -> torch.Tensor:
    """The ``feature`` column of a features table as a float32 [N, D] tensor."""
    flat = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.float32).reshape(table.num_rows, -1))


def load_features(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split's parts back in order: ``(features [N, D], labels [N])``."""
    tables = [table for table in map(pq.read_table, feature_parts(folder, split)) if table.num_rows]
    return (torch.cat([table_features(table) for table in tables]),
            torch.cat([torch.from_numpy(table.column("label").to_numpy().astype(np.int64)) for table in tables]))
