"""MLflow tracking of pretraining and evaluation runs: the one module that imports mlflow.

A pretraining is written by rank 0 only; an evaluation is a run nested under the pretraining it
evaluates, with its headline metrics also logged on that pretraining run at the checkpoint's epoch,
so the runs table shows each pretraining's k-NN and linear accuracy side by side. The location is
``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded store under the output folder
(``mlflow.db`` SQLite plus ``mlartifacts/``; any SQLite store keeps its artifacts beside it). A resumed run
passes its MLflow run id and continues the same run.

Tracking never stops training and loses nothing: every call (the run's creation, params, metrics with
their own steps and timestamps, tags, artifacts, the final status) goes through a ``CallQueue`` that
retries with back-off while the server is unreachable and replays in order when it returns. A tracker
given a ``spool_dir`` keeps its unsent calls on disk there (``mlflow_queue.json``, beside the
checkpoints), replays them when it is created again (a resumed run), and ``dino-ray sync-tracking``
replays a queue left behind by a run whose server never came back. MLflow's own asynchronous logging
queues in memory only and gives up on a failed batch, hence this queue.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dino_ray.config import DINOConfig, flatten
from dino_ray.train.checkpoint import QUEUE_FILE

log = logging.getLogger(__name__)


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


# Errors that no retry can mend (a bad value, a run deleted meanwhile): the call is dropped with a warning.
RUN_KEY_TAG = "dino_ray.run_key"  # one id per training run (all its restarts): a restart finds its MLflow run by it
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                    "INVALID_STATE"}


class CallQueue:
    """MLflow calls as JSON records, sent in order; on a transient failure the rest wait and are retried with
    exponential back-off (``retry_s`` doubling up to ``max_retry_s``). A run not created yet is referred to
    by a placeholder that is replaced by its id once the server has created it."""

    def __init__(self, uri: str, spool: Optional[Path] = None, retry_s: float = 1.0, max_retry_s: float = 60.0) -> None:
        self.uri = uri
        self.client = MlflowClient(uri)
        self.spool = spool
        self.calls: list[dict[str, Any]] = []
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._delay, self._next_try, self._outage = retry_s, 0.0, False
        self.ids: dict[str, str] = {}  # placeholder -> run id
        self.dropped: list[str] = []  # calls given up on, named
        if spool is not None and spool.exists():
            saved = json.loads(spool.read_text())
            self.calls = saved["calls"]
            log.info("MLflow: %d tracking calls left by an earlier process in %s are replayed first", len(self.calls),
                     spool)

    def put(self, call: dict[str, Any], send: bool = True) -> None:
        """Queue a call and send what can be sent; ``send=False`` only queues it (and writes the spool)."""
        self.calls.append(call)
        if send:
            self.flush()
        else:
            self.save()

    def flush(self, wait_s: float = 0.0) -> bool:
        """Send what can be sent; wait up to ``wait_s`` seconds for an unreachable server. True when empty."""
        deadline = time.monotonic() + wait_s
        while self.calls:
            now = time.monotonic()
            if now < self._next_try:
                if self._next_try > deadline:
                    break
                time.sleep(self._next_try - now)
            try:
                self._send(self.calls[0])
            except Exception as exc:  # noqa: BLE001 - every failure is either retried or named
                if isinstance(exc, FileNotFoundError) or (isinstance(exc, MlflowException) and
                                                          exc.error_code in PERMANENT_ERRORS):
                    self.dropped.append(f"{self.calls.pop(0)['op']}: {exc}")
                    log.warning("MLflow at %s refused a call, dropped: %s", self.uri, self.dropped[-1])
                    continue
                self._failed(exc)
                continue
            self.calls.pop(0)
            if self._outage:
                log.info("MLflow at %s is back: replaying the queued calls", self.uri)
            self._delay, self._outage = self.retry_s, False
        self.save()
        return not self.calls

    def _failed(self, exc: Exception) -> None:
        if not self._outage:
            log.warning("MLflow at %s unreachable (%s: %s): calls are queued%s and retried with back-off", self.uri,
                        type(exc).__name__, str(exc)[:200], f" in {self.spool}" if self.spool else "")
        self._outage = True
        self._next_try = time.monotonic() + self._delay
        self._delay = min(2 * self._delay, self.max_retry_s)

    def _run(self, call: dict[str, Any]) -> str:
        return self.ids.get(call["run"], call["run"])

    def _send(self, call: dict[str, Any]) -> None:
        op, client = call["op"], self.client
        if op == "create":
            experiment = client.get_experiment_by_name(call["experiment"])
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
                call["experiment"], artifact_location=call.get("artifact_location") or artifacts_beside(self.uri))
            key = call["tags"].get(RUN_KEY_TAG)
            found = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'") if key else []
            if found:  # this training run's workers restarted before any checkpoint named its MLflow run
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
                log.info("MLflow: continuing run %s of this training run (%s)", run_id, self.uri)
            else:
                run_id = client.create_run(experiment_id, run_name=call["run_name"], tags=call["tags"],
                                           start_time=call["time"]).info.run_id
                params = [Param(k, v) for k, v in call["params"].items()]
                for i in range(0, len(params), 100):  # MLflow's batch limit
                    client.log_batch(run_id, params=params[i:i + 100])
                log.info("MLflow: run %s in experiment '%s' (%s); see it with: %s", run_id, call["experiment"],
                         self.uri, ui_command(self.uri))
            self.ids[call["ref"]] = run_id
            for later in self.calls[1:]:  # the spool on disk names the real run from now on
                if later.get("run") == call["ref"]:
                    later["run"] = run_id
        elif op == "resume":
            client.update_run(self._run(call), status="RUNNING")
        elif op == "metrics":
            if call.get("once") and call["metrics"]:  # an epoch already in the run (a re-run of it) adds nothing
                key, step = call["metrics"][0][0], call["metrics"][0][3]
                if any(m.step == step for m in client.get_metric_history(self._run(call), key)):
                    return
            client.log_batch(self._run(call), metrics=[Metric(k, v, t, step) for k, v, t, step in call["metrics"]])
        elif op == "tags":
            client.log_batch(self._run(call), tags=[RunTag(k, v) for k, v in call["tags"].items()])
        elif op == "artifact":
            path = Path(call["path"]) if Path(call["path"]).is_absolute() or self.spool is None else \
                self.spool.parent / call["path"]
            if not path.exists():
                raise FileNotFoundError(f"artifact file '{path}' no longer exists")
            client.log_artifact(self._run(call), str(path), call.get("folder"))
        elif op == "terminate":
            client.set_terminated(self._run(call), call["status"], end_time=call["time"])
        else:
            raise ValueError(f"unknown tracking call '{op}' in {self.spool}")

    def save(self) -> None:
        """The unsent calls on disk (atomically), or no file when there are none."""
        if self.spool is None:
            return
        if not self.calls:
            self.spool.unlink(missing_ok=True)
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        partial = self.spool.with_suffix(".tmp")
        partial.write_text(json.dumps({"uri": self.uri, "calls": self.calls}))
        partial.replace(self.spool)


def sync_tracking(folder: str | Path, uri: Optional[str] = None, wait_s: float = 60.0) -> dict[str, Any]:
    """Replay the tracking calls a run left in ``folder/mlflow_queue.json`` (``dino-ray sync-tracking``)."""
    spool = Path(folder) / QUEUE_FILE
    if not spool.exists():
        raise FileNotFoundError(f"no tracking queue '{spool}': nothing to replay")
    saved_uri = json.loads(spool.read_text())["uri"]
    queue = CallQueue(uri or saved_uri, spool)
    total = len(queue.calls)
    done = queue.flush(wait_s)
    summary = {"uri": queue.uri, "calls": total, "sent": total - len(queue.calls) - len(queue.dropped),
               "left": len(queue.calls), "dropped": queue.dropped, "runs": sorted(set(queue.ids.values()))}
    if not done:
        raise ConnectionError(f"MLflow at {queue.uri} is still unreachable: {len(queue.calls)} calls stay in {spool}")
    return summary


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
        """The model as an MLflow model (signature from ``input_example``), loadable with mlflow.pytorch.load_model.
        A Python object cannot wait in a queue on disk: tried once the queue is empty, else only warned about
        (the same weights are the ``checkpoints/teacher_backbone.pth`` artifact)."""
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
                mlflow.pytorch.log_model(model, name=name, input_example=input_example, serialization_format="pickle",
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm",
                                                           "dino-ray"])
        except Exception as exc:  # noqa: BLE001 - tracking must not fail the run
            log.warning("MLflow at %s: the MLflow model was not logged (%s: %s)", self.uri, type(exc).__name__, exc)

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
