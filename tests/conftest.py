"""Shared fixtures: tiny configs and small real image sets (CIFAR-10 rows from ../shared, or the shipped sample)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dino_ray.config import build_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "train"
SAMPLE = ROOT / "data" / "cifar10_sample"

torch.set_num_threads(2)

TINY = dict(arch="vit_tiny", patch_size=4, embed_dim=32, depth=1, num_heads=2, out_dim=64, head_hidden_dim=64,
            head_bottleneck_dim=32, global_crops_size=16, local_crops_size=8, local_crops_number=2,
            batch_size_per_gpu=16, epochs=3, warmup_epochs=1, num_workers=0, drop_path_rate=0.0, saveckp_freq=1,
            **{"tracking.log_model": False})  # the MLflow model costs seconds a run: one test checks it


@pytest.fixture(scope="session")
def cifar_rows(tmp_path_factory) -> Path:
    """A Parquet file of 256 real CIFAR-10 rows."""
    out = tmp_path_factory.mktemp("cifar") / "rows.parquet"
    pq.write_table(pq.read_table(SAMPLE / "train.parquet").slice(0, 256), out)
    return out


@pytest.fixture
def tiny_cfg(tmp_path, cifar_rows):
    """A config for a 1-block ViT on 16 px crops: a whole epoch of 128 images takes about a second."""
    def make(**overrides):
        values = dict(TINY, data_path=str(cifar_rows), output_dir=str(tmp_path / "run"), max_images=128)
        values.update(overrides)
        return build_config(values)
    return make
