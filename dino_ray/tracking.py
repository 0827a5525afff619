"""MLflow tracking of pretraining and evaluation runs: the one module that imports mlflow.

A pretraining is written by rank 0 only; an evaluation is a run nested under the pretraining it
evaluates, with its headline metrics also logged on that pretraining run at the checkpoint's epoch,
so the runs table shows each pretraining's k-NN and linear accuracy side by side. The location is ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
else an embedded store under the output folder (``mlflow.db`` SQLite plus ``mlartifacts/``). A
resumed run passes its MLflow run id and continues the same run. Tracking never stops training:
if the server cannot be reached, the first failure is warned about once, tracking switches off,
and the metrics stay in ``log.txt``.
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from dino_ray.config import DINOConfig, flatten

log = logging.getLogger(__name__)


def tracking_uri(cfg: DINOConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def embedded_artifacts(cfg: DINOConfig) -> Optional[str]:
    """Artifacts of the embedded store live beside it under the output folder (not in ./mlruns)."""
    if tracking_uri(cfg).startswith("sqlite:///") and not cfg.tracking.tracking_uri:
        return (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
    return None


def ui_command(uri: str) -> str:
    """How to look at the runs: the UI command for a local store, the server's address otherwise."""
    if uri.startswith("http"):
        return f"open {uri}"
    mlflow = Path(sys.executable).parent / "mlflow"  # the one installed beside this Python (.venv/bin/mlflow)
    return f"{mlflow if mlflow.exists() else 'mlflow'} ui --backend-store-uri {uri}  (then http://127.0.0.1:5000, " \
           f"experiment -> Runs)"


def pretraining_tracker(cfg: DINOConfig, run_id: Optional[str] = None,
                        tags: Optional[dict[str, str]] = None) -> "RunTracker":
    """The MLflow run of a pretraining: the resolved config as params (sections dotted, ``scaling.num_workers``)."""
    tags = dict(tags or {})
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return RunTracker(tracking_uri(cfg), cfg.tracking.experiment_name, cfg.run.name or Path(cfg.output_dir).name,
                      flatten(cfg.to_dict()), run_id, tags, cfg.tracking.artifact_location or embedded_artifacts(cfg))


def eval_tracker(uri: str, parent_run_id: Optional[str], name: str, params: dict[str, Any],
                 experiment_name: str = "dino-ray", epoch: Optional[int] = None) -> "RunTracker":
    """An evaluation's run, nested under the pretraining run it evaluates (``mlflow.parentRunId``) when known."""
    tags = {"dino_ray.eval": name}
    parent = None
    if parent_run_id:
        tags["dino_ray.pretraining_run"] = parent_run_id
        client = MlflowClient(uri)
        try:
            experiment_name = client.get_experiment(client.get_run(parent_run_id).info.experiment_id).name
            tags["mlflow.parentRunId"] = parent = parent_run_id
        except Exception as exc:  # noqa: BLE001 - a store without that run: the evaluation is still recorded
            log.warning("MLflow at %s has no pretraining run %s (%s): the '%s' run is not nested under it", uri,
                        parent_run_id, type(exc).__name__, name)
    if epoch is not None:
        tags["dino_ray.checkpoint_epoch"] = str(epoch)
    tracker = RunTracker(uri, experiment_name, name, params, tags=tags)
    tracker.parent_run_id = parent
    return tracker


def log_to_run(uri: str, run_id: str, metrics: dict[str, float], step: int,
               artifacts: tuple[tuple[Path, str], ...] = ()) -> None:
    """Add metrics and ``(file, artifact folder)`` pairs to an existing run without touching its status
    (the k-NN monitor writing into a pretraining that may have finished meanwhile). Failures only warn."""
    client = MlflowClient(uri)
    try:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        for path, folder in artifacts:
            client.log_artifact(run_id, str(path), folder)
    except Exception as exc:  # noqa: BLE001 - tracking must not fail the evaluation
        log.warning("MLflow at %s: could not log to run %s (%s: %s)", uri, run_id, type(exc).__name__, exc)


def download_checkpoint(uri: str, run_id: str, target: str | Path,
                        artifact: str = "checkpoints/checkpoint.pth") -> str:
    """Fetch a checkpoint a pretraining logged to MLflow run ``run_id``; returns its local path."""
    Path(target).mkdir(parents=True, exist_ok=True)
    try:
        return MlflowClient(uri).download_artifacts(run_id, artifact, str(target))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing run or artifact
        raise FileNotFoundError(f"'{run_id}' is neither a checkpoint file nor an MLflow run with a '{artifact}' "
                                f"artifact at {uri}: {exc}") from exc


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """One MLflow run (a pretraining, or an evaluation nested under one); every call is failure-proof."""

    def __init__(self, uri: str, experiment_name: str, run_name: str, params: Optional[dict[str, Any]] = None,
                 run_id: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                 artifact_location: Optional[str] = None) -> None:
        # Fail fast on a dead server (MLflow's default retries for minutes); the metrics are in log.txt anyway.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri
        self.client = MlflowClient(uri)
        self.enabled = True
        self.run_id: Optional[str] = run_id
        self.parent_run_id: Optional[str] = None  # an evaluation's pretraining run, when it is in this store
        self.experiment_id: Optional[str] = None
        self._safe(lambda: self._start(experiment_name, run_name, params or {}, tags or {}, artifact_location))

    def _start(self, experiment_name: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
               artifact_location: Optional[str]) -> None:
        if self.run_id is not None:  # a resumed run: its experiment is the one it was created in
            self.client.update_run(self.run_id, status="RUNNING")
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            log.info("MLflow: continuing run %s (%s)", self.run_id, self.uri)
            return
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            self.experiment_id = experiment.experiment_id
        all_tags = {"git_commit": git_commit(), "hardware": platform.processor() or platform.machine(), **tags}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        batch = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=batch[i:i + 100])
        log.info("MLflow: run %s in experiment '%s' (%s); see it with: %s", self.run_id, experiment_name, self.uri,
                 ui_command(self.uri))

    def _safe(self, action: Callable[[], Any]) -> None:
        if not self.enabled:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - any tracking failure must leave training running
            self.enabled = False
            log.warning("MLflow tracking at %s failed (%s: %s): tracking is off for the rest of this run; "
                        "metrics are kept in log.txt", self.uri, type(exc).__name__, exc)

    def log_metrics(self, metrics: dict[str, float], step: int, run_id: Optional[str] = None) -> None:
        """Log to this run, or to ``run_id`` (an evaluation's headline numbers on its pretraining run)."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self._safe(lambda: self.client.log_batch(run_id or self.run_id, metrics=batch))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._safe(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_model(self, model: Any, input_example: Any, name: str = "teacher_backbone") -> None:
        """The model as an MLflow model (signature from ``input_example``), loadable with mlflow.pytorch.load_model."""
        def action() -> None:
            import mlflow
            import mlflow.pytorch
            import torch

            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(model, name=name, input_example=input_example, serialization_format="pickle",
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm",
                                                           "dino-ray"])
        self._safe(action)

    def finish(self, status: str = "FINISHED") -> None:
        self._safe(lambda: self.client.set_terminated(self.run_id, status))
