"""The per-worker context every Ray Train job shares, with Ray Train's worker API replaced by fakes: what a worker
restores, which MLflow run it opens, what it reports, and how it closes the run."""
from pathlib import Path

import pytest
import ray.train
from ray.train import Checkpoint

from dino_ray.platform.ray_train import worker_context
from dino_ray.platform.tracking.store import RUN_ID_FILE

FILES = ("checkpoint.pth", "log.txt", RUN_ID_FILE)


class FakeTracker:
    def __init__(self, run_id, finished=True):
        self.run_id, self.calls, self.finished = run_id, [], finished

    def log_metrics(self, metrics, step, **options):
        self.calls.append(("metrics", dict(metrics), step, options))

    def flush(self):
        self.calls.append(("flush",))

    def finish(self, status="FINISHED"):
        self.calls.append(("finish", status))
        return self.finished

    def keep_queue(self, folder):
        self.calls.append(("keep", folder))


class FakeContext:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def get_world_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world


@pytest.fixture
def fake_train(monkeypatch):
    """Ray Train's worker API as plain Python: the context, the run's latest checkpoint, and the reports."""
    state = {"context": FakeContext(0, 2), "latest": None, "reports": []}

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, validation=False):
        files = None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                files = {p.name: p.read_text() for p in Path(folder).iterdir()}
        state["reports"].append({"metrics": metrics, "files": files, "name": checkpoint_dir_name})

    monkeypatch.setattr(ray.train, "get_context", lambda: state["context"])
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: state["latest"])
    monkeypatch.setattr(ray.train, "report", report)
    return state


def test_a_fresh_rank_0_opens_a_new_run_and_reports_its_files_with_the_checkpoint(fake_train, tmp_path):
    opened = []
    worker = worker_context(tmp_path, FILES, lambda run_id: opened.append(run_id) or FakeTracker("a" * 32))
    assert opened == [None] and (tmp_path / RUN_ID_FILE).read_text() == "a" * 32
    (tmp_path / "log.txt").write_text("epoch 0\n")
    worker.report({"loss": 7.0}, 0, "checkpoint_epoch0000", extra={"epoch": 0},
                  at_checkpoint=lambda checkpoint: {"knn": 30.0})
    (report,) = fake_train["reports"]
    assert report["metrics"] == {"loss": 7.0, "epoch": 0, "knn": 30.0} and report["name"] == "checkpoint_epoch0000"
    assert report["files"] == {"log.txt": "epoch 0\n", RUN_ID_FILE: "a" * 32}  # the snapshot, run id included
    # MLflow gets the metrics (not Ray's extras) queued with the snapshot, each step once, sent after it
    assert worker.tracker.calls == [("metrics", {"loss": 7.0}, 0, {"send": False, "once": True}), ("flush",)]


def test_a_restarted_worker_restores_the_files_and_continues_the_run_they_name(fake_train, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "checkpoint.pth").write_text("weights")
    (saved / RUN_ID_FILE).write_text("b" * 32)
    fake_train["latest"] = Checkpoint.from_directory(saved)
    opened = []
    local = tmp_path / "local"
    local.mkdir()
    worker = worker_context(local, FILES, lambda run_id: opened.append(run_id) or FakeTracker(run_id))
    assert opened == ["b" * 32] and (local / "checkpoint.pth").read_text() == "weights"
    assert worker.rank == 0 and worker.world_size == 2


def test_a_resumed_run_without_its_own_checkpoint_restores_the_staged_one(fake_train, tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "checkpoint.pth").write_text("from elsewhere")
    local = tmp_path / "local"
    local.mkdir()
    worker_context(local, FILES, lambda run_id: FakeTracker("c" * 32), resume_from=Checkpoint.from_directory(staged))
    assert (local / "checkpoint.pth").read_text() == "from elsewhere"


def test_other_ranks_report_metrics_only_and_open_no_run(fake_train, tmp_path):
    fake_train["context"] = FakeContext(1, 2)
    worker = worker_context(tmp_path, FILES, lambda run_id: pytest.fail("only rank 0 talks to MLflow"))
    worker.report({"loss": 7.0}, 0, "checkpoint_epoch0000", extra={"epoch": 0})
    assert worker.tracker is None and fake_train["reports"] == [{"metrics": {"loss": 7.0, "epoch": 0}, "files": None,
                                                                 "name": None}]
    with worker.finishing():
        pass  # nothing to close on rank 1


def test_the_run_closes_finished_or_failed_and_keeps_what_an_absent_server_did_not_take(fake_train, tmp_path):
    worker = worker_context(tmp_path, FILES, lambda run_id: FakeTracker("d" * 32))
    with worker.finishing():
        pass
    assert worker.tracker.calls[-1] == ("finish", "FINISHED")
    worker = worker_context(tmp_path, FILES, lambda run_id: FakeTracker("d" * 32, finished=False))
    with pytest.raises(KeyError):
        with worker.finishing(keep_dir=str(tmp_path / "kept")):
            raise KeyError("the loop failed")
    assert worker.tracker.calls[-2:] == [("finish", "FAILED"), ("keep", str(tmp_path / "kept"))]
