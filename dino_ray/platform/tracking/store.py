"""Where MLflow records live: one order for every command, the embedded SQLite store, the file names beside checkpoints.

The location is ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded store under the output
folder (``mlflow.db`` SQLite plus ``mlartifacts/``; any SQLite store keeps its artifacts beside it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from dino_ray.core.config import DINOConfig

RUN_ID_FILE = "mlflow_run_id.txt"  # beside checkpoint.pth in a Ray-reported checkpoint: the MLflow run it belongs to
QUEUE_FILE = "mlflow_queue.json"  # tracking calls an unreachable MLflow server has not taken yet (tracking.queue)
RUN_KEY_TAG = "dino_ray.run_key"  # one id per training run (all its restarts): a restart finds its MLflow run by it


def resolve_tracking_uri(explicit: Optional[str], fallback: Optional[str]) -> Optional[str]:
    """Every command's MLflow store, in one order: the one given, else ``$MLFLOW_TRACKING_URI``, else ``fallback``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or fallback


def embedded_store(output_dir: str | Path) -> str:
    """The embedded store of a run's output folder: SQLite beside its artifacts."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: DINOConfig) -> str:
    return resolve_tracking_uri(cfg.tracking.tracking_uri, embedded_store(cfg.output_dir))


def artifacts_beside(uri: str) -> Optional[str]:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlartifacts/`` beside the database, not
    MLflow's ``./mlruns`` under whatever folder the process started in (a sweep, an evaluation, a test).
    None for a server, which has its own setting."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def ui_command(uri: str) -> str:
    """How to look at the runs: the UI command for a local store, the server's address otherwise."""
    if uri.startswith("http"):
        return f"open {uri}"
    mlflow = Path(sys.executable).parent / "mlflow"  # the one installed beside this Python (.venv/bin/mlflow)
    return f"{mlflow if mlflow.exists() else 'mlflow'} ui --backend-store-uri {uri}  (then http://127.0.0.1:5000, " \
           f"experiment -> Runs)"


