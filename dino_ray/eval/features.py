"""Extract backbone features (the CLS output) for a labelled image dataset; save and reload them as Parquet.

Saved features are ``<folder>/<split>/part-NNNNN.parquet`` files with a ``label`` (int64) and a
``feature`` (list of float32) column, one row per image in dataset order across the parts: the layout
the distributed extraction on Ray writes (one part per task) and ``--dump_features`` writes.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dino_ray.core.data.datasets import collate_skipping_bad


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(features [N, D] float32, labels [N] int64)`` in dataset order, bad images skipped."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping_bad)
    features, labels = [], []
    for images, targets, _ in tqdm(loader, desc="features", disable=not progress, leave=False):
        if images is None:
            continue
        features.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def save_features(folder: str | Path, split: str, features: torch.Tensor, labels: torch.Tensor, part: int = 0) -> Path:
    """Write one part of a split's features; returns the file."""
    out = Path(folder) / split
    out.mkdir(parents=True, exist_ok=True)
    values = features.float().numpy()
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]) if len(values) else \
        pa.array([], pa.list_(pa.float32()))
    path = out / f"part-{part:05d}.parquet"
    pq.write_table(pa.table({"label": pa.array(labels.numpy().astype(np.int64)), "feature": column}), path)
    return path


def load_features(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split's parts back in order: ``(features [N, D], labels [N])``."""
    parts = sorted((Path(folder) / split).glob("part-*.parquet"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    if not parts:
        raise FileNotFoundError(f"no saved features in '{Path(folder) / split}' (expected part-NNNNN.parquet files)")
    features, labels = [], []
    for part in parts:
        table = pq.read_table(part)
        if table.num_rows == 0:
            continue
        labels.append(torch.from_numpy(table.column("label").to_numpy().astype(np.int64)))
        flat = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        features.append(torch.from_numpy(flat.astype(np.float32).reshape(table.num_rows, -1)))
    return torch.cat(features), torch.cat(labels)
