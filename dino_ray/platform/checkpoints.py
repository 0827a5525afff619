"""Where a checkpoint comes from, for every command that takes one: one resolver.

``resolve_checkpoint`` turns any of these into a local file plus what is known of the pretraining it belongs to:
- a dino-ray or reference checkpoint file (full or backbone-only), or its ``s3://`` / ``gs://`` URI (a Ray-reported
  checkpoint carries its MLflow run id beside it: ``mlflow_run_id.txt``);
- a pretraining's MLflow run: ``<run id>``, ``runs:/<run id>`` (its latest checkpoint, or the kept one named by
  ``checkpoint``) or ``runs:/<run id>/<artifact path>``;
- a registered model: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the run its version came from);
- a hub name (``dino_vits16`` ...: the official file, from the torch hub cache or downloaded).
Resuming (on Ray and with ``--no-ray``), continued pretraining (``init_from``) and every evaluation use it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dino_ray.core.config import build_config
from dino_ray.core.models.hub import OFFICIAL_URL, OFFICIAL_WEIGHTS, download_weights, safe_load
from dino_ray.core.storage import exists as storage_exists
from dino_ray.core.storage import fetch, is_uri, join
from dino_ray.core.train.checkpoint import checkpoint_epoch, recorded_args
from dino_ray.platform.tracking.store import RUN_ID_FILE
from dino_ray.platform.tracking.store import tracking_uri as pretraining_uri

RUN_REFERENCE = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:/(.+))?$")
MODEL_REFERENCE = re.compile(r"^models:/([^/@]+)(?:@([^/]+)|/(\d+))$")
LATEST = "checkpoints/checkpoint.pth"  # what a pretraining logs as its latest checkpoint


@dataclass
class Weights:
    path: Path  # a local file
    run_id: Optional[str] = None  # the pretraining's MLflow run, when known
    epoch: Optional[int] = None  # epochs trained (the checkpoint's ``epoch``), when recorded
    tracking_uri: Optional[str] = None  # the pretraining's MLflow store, when known
    arch: Optional[str] = None  # for hub names: the architecture the file needs
    patch_size: Optional[int] = None
    kind: str = "file"  # file, uri, run, model or hub: what the source named


def resolve_checkpoint(source: str, tracking_uri: Optional[str] = None, checkpoint: Optional[str] = None,
                       cache_dir: str | Path = "outputs/weights") -> Weights:
    """A local file for ``source`` (any form of the module docstring) and what is known of its pretraining run.
    ``tracking_uri``: the store of run ids and registered models; ``checkpoint``: with a run, which kept
    checkpoint (``checkpoint0040.pth``; default the latest)."""
    source = str(source)
    run = RUN_REFERENCE.match(source)
    if run and not Path(source).exists():
        artifact = run.group(2) or f"checkpoints/{checkpoint or 'checkpoint.pth'}"
        return _from_run(source, run.group(1), artifact, tracking_uri, cache_dir, "run")
    model = MODEL_REFERENCE.match(source)
    if model:
        return _from_run(source, _model_run(source, *model.groups(), tracking_uri), LATEST, tracking_uri, cache_dir,
                         "model")
    if source in OFFICIAL_WEIGHTS:
        arch, patch_size, url_path = OFFICIAL_WEIGHTS[source]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url_path).name
        if not cached.exists():
            download_weights(OFFICIAL_URL + url_path)
        return Weights(cached, arch=arch, patch_size=patch_size or None, kind="hub")
    kind = "file"
    if is_uri(source):  # e.g. a checkpoint in a cloud run.storage_path, with its MLflow run id beside it
        kind = "uri"
        folder = Path(cache_dir) / source.split("://", 1)[1].rsplit("/", 1)[0]
        run_file = join(source.rsplit("/", 1)[0], RUN_ID_FILE)
        if storage_exists(run_file):
            fetch(run_file, folder)
        source = str(fetch(source, folder))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{source}' is neither a file, an s3:// or gs:// URI, an MLflow run "
                                f"(<run id>, runs:/<run id>), a registered model (models:/<name>@<alias>), nor one "
                                f"of {', '.join(OFFICIAL_WEIGHTS)}")
    loaded = safe_load(path)
    run_file = path.parent / RUN_ID_FILE
    run_id = run_file.read_text().strip() if run_file.exists() else None
    uri = tracking_uri
    if run_id and not uri and recorded_args(loaded):
        uri = pretraining_uri(build_config(recorded_args(loaded)))
    return Weights(path, run_id, checkpoint_epoch(loaded), uri, kind=kind)


def _from_run(source: str, run_id: str, artifact: str, tracking_uri: Optional[str], cache_dir: str | Path,
              kind: str) -> Weights:
    from dino_ray.platform.tracking.runs import download_checkpoint

    if not tracking_uri:
        raise ValueError(f"checkpoint '{source}' is in an MLflow store: give --tracking_uri (or set "
                         f"MLFLOW_TRACKING_URI) to say which")
    path = Path(download_checkpoint(tracking_uri, run_id, Path(cache_dir) / run_id, artifact))
    return Weights(path, run_id, checkpoint_epoch(safe_load(path)), tracking_uri, kind=kind)


def _model_run(source: str, name: str, alias: Optional[str], version: Optional[str],
               tracking_uri: Optional[str]) -> str:
    """The run a registered model's version (by alias or number) was logged from."""
    from dino_ray.platform.tracking.runs import registered_model_run

    if not tracking_uri:
        raise ValueError(f"'{source}' is a registered model: give --tracking_uri (or set MLFLOW_TRACKING_URI)")
    return registered_model_run(tracking_uri, name, alias, version)
