"""Where an evaluation's weights come from, and which pretraining run its results belong to.

Every eval takes ``--pretrained_weights`` as any of: a dino-ray or reference checkpoint file (full or
backbone-only) or its ``s3://`` / ``gs://`` URI, the id of a pretraining's MLflow run (``<run id>`` or ``runs:/<run id>``, its latest
checkpoint or a chosen kept one), or a hub name (``dino_vits16`` ...: the official file, from the
torch hub cache or downloaded). A dino-ray checkpoint knows its pretraining: Ray-reported ones carry
the MLflow run id beside them and every one records its config (hence its tracking store).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from dino_ray.models.hub import OFFICIAL_URL, OFFICIAL_WEIGHTS, download_weights, safe_load
from dino_ray.storage import exists as storage_exists
from dino_ray.storage import fetch, is_uri, join
from dino_ray.train.checkpoint import RUN_ID_FILE

RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")


@dataclass
class Weights:
    path: Path  # a local file
    run_id: Optional[str] = None  # the pretraining's MLflow run, when known
    epoch: Optional[int] = None  # epochs trained (the checkpoint's ``epoch``), when recorded
    tracking_uri: Optional[str] = None  # the pretraining's MLflow store, when known
    arch: Optional[str] = None  # for hub names: the architecture the file needs
    patch_size: Optional[int] = None


def recorded_args(checkpoint: Any) -> dict[str, Any]:
    """The pretraining config a full checkpoint records (dino-ray: a dict; the reference: a Namespace)."""
    args = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    return dict(args) if isinstance(args, dict) else vars(args)


def resolve_weights(source: str, tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None,
                    cache_dir: str | Path = "outputs/weights") -> Weights:
    """Turn ``source`` into a local file plus what is known of its pretraining run."""
    match = RUN_ID.match(source)
    if match and not Path(source).exists():
        from dino_ray.tracking import download_checkpoint

        run_id = match.group(1)
        if not tracking_uri:
            raise ValueError(f"pretrained_weights '{source}' is an MLflow run id: give --tracking_uri (or set "
                             f"MLFLOW_TRACKING_URI) to say which store it is in")
        artifact = f"checkpoints/{checkpoint or 'checkpoint.pth'}"
        path = Path(download_checkpoint(tracking_uri, run_id, Path(cache_dir) / run_id, artifact))
        return Weights(path, run_id, checkpoint_epoch(safe_load(path)), tracking_uri)
    if source in OFFICIAL_WEIGHTS:
        arch, patch_size, url_path = OFFICIAL_WEIGHTS[source]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url_path).name
        if not cached.exists():
            download_weights(OFFICIAL_URL + url_path)
        return Weights(cached, arch=arch, patch_size=patch_size or None)
    if is_uri(source):  # e.g. a checkpoint in a cloud run.storage_path, with its MLflow run id beside it
        folder = Path(cache_dir) / source.split("://", 1)[1].rsplit("/", 1)[0]
        run_file = join(source.rsplit("/", 1)[0], RUN_ID_FILE)
        if storage_exists(run_file):
            fetch(run_file, folder)
        source = str(fetch(source, folder))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_weights '{source}' is neither a file, an MLflow run id, nor one of "
                                f"{', '.join(OFFICIAL_WEIGHTS)}")
    loaded = safe_load(path)
    run_file = path.parent / RUN_ID_FILE
    run_id = run_file.read_text().strip() if run_file.exists() else None
    uri = tracking_uri
    if run_id and not uri and recorded_args(loaded):
        from dino_ray.config import build_config
        from dino_ray.tracking import tracking_uri as pretraining_uri

        uri = pretraining_uri(build_config(recorded_args(loaded)))
    return Weights(path, run_id, checkpoint_epoch(loaded), uri)


def checkpoint_epoch(checkpoint: Any) -> Optional[int]:
    return int(checkpoint["epoch"]) if isinstance(checkpoint, dict) and "epoch" in checkpoint else None
