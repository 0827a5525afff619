"""MLflow tracking of a pretraining run: the one module that imports mlflow.

Written by rank 0 only. The location is ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
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
import time
from pathlib import Path
from typing import Any, Callable, Optional

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from dino_ray.config import DINOConfig

log = logging.getLogger(__name__)


def tracking_uri(cfg: DINOConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def flat_params(cfg: DINOConfig) -> dict[str, str]:
    """The resolved config as MLflow params, sections dotted (``scaling.num_workers``)."""
    params = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            params.update({f"{key}.{k}": str(v) for k, v in value.items()})
        else:
            params[key] = str(value)
    return params


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """One MLflow run per pretraining; every call is failure-proof."""

    def __init__(self, cfg: DINOConfig, run_id: Optional[str] = None, tags: Optional[dict[str, str]] = None) -> None:
        # Fail fast on a dead server (MLflow's default retries for minutes); the metrics are in log.txt anyway.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(self.uri)
        self.enabled = True
        self.run_id: Optional[str] = run_id
        self._safe(lambda: self._start(cfg, tags or {}))

    def _start(self, cfg: DINOConfig, tags: dict[str, str]) -> None:
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment_name)
        if experiment is None:
            artifacts = None
            if self.uri.startswith("sqlite:///") and not cfg.tracking.tracking_uri:
                artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(cfg.tracking.experiment_name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s (%s)", self.run_id, self.uri)
            return
        all_tags = {"git_commit": git_commit(), "hardware": platform.processor() or platform.machine(), **tags}
        run = self.client.create_run(experiment_id, run_name=cfg.run.name or Path(cfg.output_dir).name, tags=all_tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        log.info("MLflow: run %s in experiment '%s' (%s); UI: mlflow ui --backend-store-uri %s",
                 self.run_id, cfg.tracking.experiment_name, self.uri, self.uri)

    def _safe(self, action: Callable[[], Any]) -> None:
        if not self.enabled:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - any tracking failure must leave training running
            self.enabled = False
            log.warning("MLflow tracking at %s failed (%s: %s): tracking is off for the rest of this run; "
                        "metrics are kept in log.txt", self.uri, type(exc).__name__, exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self._safe(lambda: self.client.log_batch(self.run_id, metrics=batch))

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
