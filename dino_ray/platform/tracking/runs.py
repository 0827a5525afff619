"""The MLflow run API of pretrainings and evaluations, every call through the durable queue (``tracking.queue``).

A pretraining is written by rank 0 only; an evaluation is a run nested under the pretraining it evaluates, with
its headline metrics also logged on that pretraining run at the checkpoint's epoch, so the runs table shows each
pretraining's k-NN and linear accuracy side by side. A resumed run passes its MLflow run id and continues the
same run.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dino_ray.core.config import DINOConfig, flatten
from dino_ray.platform.tracking.queue import CallQueue
from dino_ray.platform.tracking.store import QUEUE_FILE, tracking_uri

log = logging.getLogger(__name__)


def pretraining_tracker(cfg: DINOConfig, run_id: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                        spool_dir: Optional[str | Path] = None) -> "RunTracker":
    """The MLflow run of a pretraining: the resolved config as params (sections dotted, ``scaling.num_workers``);
    unsent calls wait in ``spool_dir`` (the folder whose files go into every checkpoint)."""
    tags = dict(tags or {})
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return RunTracker(tracking_uri(cfg), cfg.tracking.experiment_name, cfg.run.name or Path(cfg.output_dir).name,
                      flatten(cfg.to_dict()), run_id, tags, cfg.tracking.artifact_location,
                      spool_dir, cfg.tracking.retry_timeout_s)


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
    """One MLflow run (a pretraining, or an evaluation nested under one) whose calls never fail the caller and are
    never lost while the process lives (``CallQueue``); with ``spool_dir``, not even when it dies."""

    def __init__(self, uri: str, experiment_name: str, run_name: str, params: Optional[dict[str, Any]] = None,
                 run_id: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                 artifact_location: Optional[str] = None, spool_dir: Optional[str | Path] = None,
                 finish_wait_s: float = 120.0) -> None:
        # One quick try per call (MLflow's default retries for minutes): the queue does the retrying.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri
        self.queue = CallQueue(uri, Path(spool_dir) / QUEUE_FILE if spool_dir else None)
        self.client = self.queue.client
        self.finish_wait_s = finish_wait_s
        self.parent_run_id: Optional[str] = None  # an evaluation's pretraining run, when it is in this store
        self._ref = run_id or f"pending-{uuid.uuid4().hex}"
        waiting = [c["ref"] for c in self.queue.calls if c["op"] == "create"]
        if run_id is None and waiting:  # an earlier process of this run never reached the server: that run it is
            self._ref = waiting[-1]
            self.queue.flush()
        elif run_id is not None:
            self.queue.put({"op": "resume", "run": run_id})
            log.info("MLflow: continuing run %s (%s)", run_id, uri)
        else:
            all_tags = {"git_commit": git_commit(), "hardware": platform.processor() or platform.machine(),
                        **(tags or {})}
            self.queue.put({"op": "create", "ref": self._ref, "experiment": experiment_name, "run_name": run_name,
                            "tags": all_tags, "params": {k: str(v) for k, v in (params or {}).items()},
                            "artifact_location": artifact_location, "time": _now_ms()})

    @property
    def run_id(self) -> Optional[str]:
        """The run's id, None while the server has not created it yet."""
        return self.queue.ids.get(self._ref, None if self._ref.startswith("pending-") else self._ref)

    def log_metrics(self, metrics: dict[str, float], step: int, run_id: Optional[str] = None,
                    send: bool = True, once: bool = False) -> None:
        """Log to this run, or to ``run_id`` (an evaluation's headline numbers on its pretraining run).

        ``send=False`` queues them for the next ``flush`` (an epoch's metrics wait in the spool that goes into
        its checkpoint, so a restart replays what a dead process did not send); ``once``: skipped at sending
        time if the run already has this step of the first metric (an epoch run again after a failure, or
        a replay of what was sent), so every epoch is in MLflow once."""
        now = _now_ms()
        values = [[k, float(v), now, int(step)] for k, v in metrics.items() if isinstance(v, (int, float))]
        self.queue.put({"op": "metrics", "run": run_id or self.run_id or self._ref, "metrics": values,
                        "once": once}, send)

    def flush(self) -> bool:
        """Send what is queued, without waiting for an unreachable server; True when nothing is left."""
        return self.queue.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.queue.put({"op": "tags", "run": self.run_id or self._ref, "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Files inside the spool's folder are recorded relative to it, so a queue moved with them still finds them."""
        path = Path(path).resolve()
        spool = self.queue.spool
        if spool is not None and path.is_relative_to(spool.parent.resolve()):
            path = path.relative_to(spool.parent.resolve())
        self.queue.put({"op": "artifact", "run": self.run_id or self._ref, "path": str(path), "folder": artifact_path})

    def log_model(self, model: Any, input_example: Any, name: str = "teacher_backbone") -> None:
        """The model as an MLflow model (signature from ``input_example``, batch size free), saved by ``torch.export``
        (MLflow's ``pt2`` serialization: a graph and tensors, no pickle), so loading it from a shared store runs no
        code a file could carry; ``mlflow.pytorch.load_model`` gives a module of the same outputs. A Python object
        cannot wait in a queue on disk: tried once the queue is empty, else only warned about (the same weights
        are the ``checkpoints/teacher_backbone.pth`` artifact)."""
        if not self.queue.flush() or self.run_id is None:
            log.warning("MLflow at %s unreachable: the MLflow model is skipped; the backbone is still queued as "
                        "checkpoints/teacher_backbone.pth", self.uri)
            return
        import mlflow
        import mlflow.pytorch
        import torch

        try:
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(model, name=name, input_example=input_example, serialization_format="pt2",
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm",
                                                           "dino-ray"])
        except Exception as exc:  # noqa: BLE001 - tracking must not fail the run
            log.warning("MLflow at %s: the MLflow model was not logged (%s: %s)", self.uri, type(exc).__name__, exc)

    def register(self, run_id: str, name: str, alias: str, model: str = "teacher_backbone") -> None:
        """Register ``run_id``'s logged ``model`` as a new version of ``name`` with ``alias`` (``models:/name@alias``
        then names it in every command that takes weights)."""
        self.queue.put({"op": "register", "run": run_id, "name": name, "alias": alias, "model": model})

    def close_children(self, status: str = "KILLED") -> None:
        """Mark this run's child runs still RUNNING with ``status`` (a sweep's trials its scheduler stopped)."""
        self.queue.put({"op": "close_children", "run": self.run_id or self._ref, "status": status,
                        "time": _now_ms()})

    def finish(self, status: str = "FINISHED") -> bool:
        """The run's final status, after everything queued before it; waits up to ``finish_wait_s`` for an
        unreachable server. False (and the queue left in the spool) when the server did not come back."""
        self.queue.put({"op": "terminate", "run": self.run_id or self._ref, "status": status, "time": _now_ms()})
        if self.queue.flush(self.finish_wait_s):
            return True
        where = (f"kept in {self.queue.spool}: replay with `dino-ray sync-tracking {self.queue.spool.parent}`"
                 if self.queue.spool else "lost with this process (no spool folder)")
        log.warning("MLflow at %s did not come back within %.0f s: %d tracking calls %s", self.uri,
                    self.finish_wait_s, len(self.queue.calls), where)
        return False

    def keep_queue(self, folder: str | Path) -> Optional[Path]:
        """Copy what is still queued, with the artifact files it names, into ``folder`` (a run's durable output
        folder, when the spool lives in a scratch folder about to be removed). Returns the folder, or None."""
        if not self.queue.calls or self.queue.spool is None:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for call in self.queue.calls:
            if call["op"] == "artifact" and not Path(call["path"]).is_absolute():
                source = self.queue.spool.parent / call["path"]
                if source.exists():
                    (folder / call["path"]).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(source, folder / call["path"])
        (folder / QUEUE_FILE).write_text(json.dumps({"uri": self.uri, "calls": self.queue.calls}))
        log.warning("MLflow: %d tracking calls kept in %s; replay with `dino-ray sync-tracking %s`",
                    len(self.queue.calls), folder, folder)
        return folder


def _now_ms() -> int:
    return int(time.time() * 1000)


def end_run_by_key(uri: str, experiment: str, run_key: str, status: str, wait_s: float) -> bool:
    """Set the final status of the MLflow run of a training run (all its restarts share ``run_key``): the driver's
    word when the workers could not say it (killed); waits up to ``wait_s`` for an unreachable server."""
    queue = CallQueue(uri)
    queue.put({"op": "terminate_key", "experiment": experiment, "key": run_key, "status": status, "time": _now_ms()},
              send=False)
    return queue.flush(wait_s)


def registered_model_run(uri: str, name: str, alias: Optional[str] = None, version: Optional[str] = None) -> str:
    """The run a registered model's version (by ``alias``, else by ``version`` number) was logged from."""
    client = MlflowClient(uri)
    which = f"alias '{alias}'" if alias else f"version {version}"
    try:
        model_version = client.get_model_version_by_alias(name, alias) if alias else \
            client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing model or alias
        raise FileNotFoundError(f"the MLflow store at {uri} has no registered model '{name}' with {which}: "
                                f"{exc}") from exc
    if not model_version.run_id:
        raise FileNotFoundError(f"registered model '{name}' ({which}) at {uri} names no run to take weights from")
    return model_version.run_id
