"""The durable MLflow call queue: tracking never stops training and loses nothing.

Every call (a run's creation, params, metrics with their own steps and timestamps, tags, artifacts, the final
status) is a JSON record sent in order; while the server is unreachable the rest wait and are retried with
back-off, and replayed in order when it returns. A queue given a spool file keeps its unsent calls there
(``mlflow_queue.json``, beside the checkpoints), a resumed run replays them, and ``dino-ray sync-tracking``
replays a queue left behind by a run whose server never came back. MLflow's own asynchronous logging queues in
memory only and gives up on a failed batch, hence this queue.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dino_ray.platform.tracking.store import QUEUE_FILE, RUN_KEY_TAG, artifacts_beside, ui_command

log = logging.getLogger(__name__)

# Errors that no retry can mend (a bad value, a run deleted meanwhile): the call is dropped with a warning.
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
        elif op == "terminate_key":  # a training run's MLflow run, found by its run key (the driver's view)
            experiment = client.get_experiment_by_name(call["experiment"])
            runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{call['key']}'") \
                if experiment is not None else []
            for run in runs:
                client.set_terminated(run.info.run_id, call["status"], end_time=call["time"])
        elif op == "register":  # a run's logged model as a new version of a registered model, under an alias
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            version = mlflow.register_model(f"runs:/{self._run(call)}/{call['model']}", call["name"])
            client.set_registered_model_alias(call["name"], call["alias"], version.version)
            log.info("MLflow: run %s's %s registered as %s version %s, alias '%s' (models:/%s@%s)", self._run(call),
                     call["model"], call["name"], version.version, call["alias"], call["name"], call["alias"])
        elif op == "close_children":
            parent = self._run(call)
            experiment = client.get_run(parent).info.experiment_id
            for run in client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, call["status"], end_time=call["time"])
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


