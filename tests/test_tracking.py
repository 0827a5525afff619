"""MLflow tracking that loses nothing: calls queue while the store is unreachable and replay in order, with
their own steps and timestamps; a queue left on disk is replayed by ``dino-ray sync-tracking``."""
import json
import socket

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dino_ray.cli import main
from dino_ray.core.config import build_config
from dino_ray.platform.tracking.queue import sync_tracking
from dino_ray.platform.tracking.runs import RunTracker
from dino_ray.platform.tracking.store import (
    QUEUE_FILE,
    RUN_KEY_TAG,
    artifacts_beside,
    embedded_store,
    resolve_tracking_uri,
    tracking_uri,
)


@pytest.fixture(autouse=True)
def one_try_per_call(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the queue retries; MLflow's own retries would wait


def closed_port_uri() -> str:
    """An address where no server listens: connections are refused, as while a server restarts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def the_run(uri):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dino-ray").experiment_id])
    return client, run


def test_an_outage_delays_the_calls_and_loses_none(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = RunTracker(uri, "dino-ray", "pretraining", {"lr": 0.1})
    tracker.queue.retry_s = tracker.queue._delay = 0.01
    real_log_batch = tracker.client.log_batch
    down = {"on": True}

    def flaky(*args, **kwargs):
        if down["on"]:
            raise MlflowException("API request failed with exception ConnectionError")  # what a dead server gives
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", flaky)
    for step in range(5):
        tracker.log_metrics({"loss": 10.0 - step}, step=step)
    assert len(tracker.queue.calls) == 5  # waiting, not dropped
    stamps = [call["metrics"][0][2] for call in tracker.queue.calls]
    down["on"] = False
    assert tracker.finish()
    client, run = the_run(uri)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(s, 10.0 - s, t) for s, t in zip(range(5), stamps)]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}


def test_a_server_that_never_returns_leaves_the_queue_on_disk_for_sync_tracking(tmp_path):
    down = closed_port_uri()
    spool = tmp_path / "scratch"
    spool.mkdir()
    (spool / "log.txt").write_text('{"epoch": 0}\n')
    tracker = RunTracker(down, "dino-ray", "pretraining", {"epochs": 2}, spool_dir=spool, finish_wait_s=0)
    assert tracker.run_id is None  # not created yet: later calls name it by a placeholder
    tracker.log_metrics({"loss": 7.5}, step=0)
    tracker.log_artifact(spool / "log.txt")
    tracker.set_tags({"best": "yes"})
    assert not tracker.finish()
    saved = json.loads((spool / QUEUE_FILE).read_text())
    assert saved["uri"] == down
    assert [c["op"] for c in saved["calls"]] == ["create", "metrics", "artifact", "tags", "terminate"]
    kept = tracker.keep_queue(tmp_path / "kept")  # the scratch folder is about to go: calls and files move
    (spool / "log.txt").unlink()

    with pytest.raises(ConnectionError, match="still unreachable"):
        sync_tracking(kept, wait_s=0)
    assert main(["sync-tracking", str(kept), "--wait_s", "0"]) == 2  # the CLI names the problem, exit 2
    store = f"sqlite:///{tmp_path}/mlflow.db"  # the server came back (here: at another address)
    summary = sync_tracking(kept, uri=store)
    assert (summary["calls"], summary["sent"], summary["left"], summary["dropped"]) == (5, 5, 0, [])
    client, run = the_run(store)
    assert summary["runs"] == [run.info.run_id]
    assert run.info.status == "FINISHED" and run.data.tags["best"] == "yes" and run.data.metrics == {"loss": 7.5}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["log.txt"]
    assert not (kept / QUEUE_FILE).exists()  # replayed: nothing left to send


def test_a_resumed_tracker_replays_what_the_last_process_left(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    first = RunTracker(store, "dino-ray", "pretraining", spool_dir=tmp_path)
    run_id = first.run_id
    first.queue.calls.append({"op": "metrics", "run": run_id, "metrics": [["loss", 3.0, 1000, 4]]})
    first.queue.save()  # a process killed with one call unsent
    second = RunTracker(store, "dino-ray", "pretraining", run_id=run_id, spool_dir=tmp_path)
    assert not second.queue.calls and not (tmp_path / QUEUE_FILE).exists()
    client, run = the_run(store)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(4, 3.0)]


def test_calls_no_retry_can_mend_are_dropped_and_named(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = RunTracker(store, "dino-ray", "evaluation")
    tracker.log_metrics({"top1": 50.0}, step=0, run_id="0" * 32)  # a pretraining run this store does not have
    tracker.log_artifact(tmp_path / "missing.png")
    assert tracker.finish()
    assert len(tracker.queue.dropped) == 2
    assert "missing.png" in tracker.queue.dropped[1]
    assert the_run(store)[1].info.status == "FINISHED"


def test_sync_tracking_names_a_folder_without_a_queue(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / QUEUE_FILE)):
        sync_tracking(tmp_path)


def test_a_run_never_created_is_created_once_by_the_process_that_resumes_it(tmp_path):
    down = closed_port_uri()
    first = RunTracker(down, "dino-ray", "pretraining", spool_dir=tmp_path, finish_wait_s=0)
    first.log_metrics({"loss": 2.0}, step=0)  # the server was away for the whole first process
    store = f"sqlite:///{tmp_path}/mlflow.db"
    saved = json.loads((tmp_path / QUEUE_FILE).read_text())
    (tmp_path / QUEUE_FILE).write_text(json.dumps({**saved, "uri": store}))  # it is back (here: elsewhere)
    second = RunTracker(store, "dino-ray", "pretraining", spool_dir=tmp_path)
    second.log_metrics({"loss": 1.0}, step=1)
    assert second.finish()
    client, run = the_run(store)  # exactly one run
    assert second.run_id == run.info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 2.0), (1, 1.0)]


def test_an_epoch_replayed_or_run_again_is_kept_once(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = RunTracker(store, "dino-ray", "pretraining", spool_dir=tmp_path)
    tracker.log_metrics({"loss": 1.5, "lr": 0.1}, step=3, send=False, once=True)
    snapshot = (tmp_path / QUEUE_FILE).read_text()  # what the checkpoint of epoch 3 holds
    assert tracker.flush() and not (tmp_path / QUEUE_FILE).exists()
    (tmp_path / QUEUE_FILE).write_text(snapshot)  # a restart restores the checkpoint: the call is replayed
    again = RunTracker(store, "dino-ray", "pretraining", run_id=tracker.run_id, spool_dir=tmp_path)
    again.log_metrics({"loss": 1.4, "lr": 0.1}, step=3, once=True)  # epoch 3 trained again (its report was lost)
    again.log_metrics({"loss": 1.2, "lr": 0.1}, step=4, once=True)
    again.finish()
    client, run = the_run(store)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 1.5), (4, 1.2)]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 2


def test_a_restart_before_any_checkpoint_finds_its_run_by_the_training_runs_key(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    first = RunTracker(store, "dino-ray", "pretraining", tags={RUN_KEY_TAG: "abc"})
    first.log_metrics({"loss": 2.0}, step=0, once=True)  # then the workers die before a checkpoint holds its id
    restarted = RunTracker(store, "dino-ray", "pretraining", tags={RUN_KEY_TAG: "abc"})
    restarted.log_metrics({"loss": 2.0}, step=0, once=True)
    restarted.log_metrics({"loss": 1.0}, step=1, once=True)
    assert restarted.finish() and restarted.run_id == first.run_id
    client, run = the_run(store)  # one run, each epoch once
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]


def test_every_command_finds_its_store_in_one_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config({"output_dir": str(tmp_path / "run")})
    assert tracking_uri(cfg) == embedded_store(tmp_path / "run") == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    assert resolve_tracking_uri(None, None) is None  # an evaluation's weights lookup: no store is no store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(cfg) == resolve_tracking_uri(None, "sqlite:///x.db") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///given.db", "sqlite:///x.db") == "sqlite:///given.db"
    assert tracking_uri(build_config({"tracking": {"tracking_uri": "sqlite:///given.db"}})) == "sqlite:///given.db"


def test_a_sqlite_stores_artifacts_live_beside_it_not_where_the_process_started(tmp_path, monkeypatch):
    (tmp_path / "store").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a sweep or an evaluation started from another folder
    tracker = RunTracker(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "dino-ray", "knn")
    (tmp_path / "table.md").write_text("| a |")
    tracker.log_artifact(tmp_path / "table.md")
    assert tracker.finish()
    assert [p.name for p in (tmp_path / "store" / "mlartifacts").rglob("*.md")] == ["table.md"]
    assert list((tmp_path / "elsewhere").iterdir()) == []  # no ./mlruns
    assert artifacts_beside("sqlite:///mlflow.db") == (tmp_path / "elsewhere" / "mlartifacts").as_uri()
    assert artifacts_beside("http://127.0.0.1:5000") is None  # a server has its own setting
