"""The one Ray Train wrapper, for every trainer job (pretraining, the linear probe): the ``TorchTrainer``
with its scaling, storage, failure and checkpoint-keeping settings, and what a worker does around its loop.

A worker runs its job's loop in a scratch folder (``run_in_scratch``) through one ``WorkerContext``: it copies
back what the run's latest reported checkpoint holds (a restarted or resumed run), opens rank 0's MLflow run
(the one the restored files name, else a new one), reports a snapshot of its files each epoch, and closes the
MLflow run as the loop ends. Ray keeps the reported checkpoints in ``storage_path/name``.

Failures: a run restarts from its latest checkpoint after a worker fails (``max_failures`` times, 3 by default;
a preempted node does not count: ``max_preemption_failures``, unlimited by default), but the same error raised
again from the same checkpoint stops it at once (``StopRepeatedErrors``): a deterministic error, bad data or a
non-finite loss, would fail the same way every time. ``fit`` turns the end of a failed run into ``RunFailed``.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ray
import ray.train
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    ControllerError,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    UserCallback,
    ValidationConfig,
    WorkerGroupError,
)
from ray.train.torch import TorchTrainer

from dino_ray.core.args import RunFailed
from dino_ray.platform.logs import log_to_stderr
from dino_ray.platform.tracking.store import RUN_ID_FILE


def restore_files(local_dir: Path, names: tuple[str, ...]) -> bool:
    """Copy ``names`` from the run's latest reported checkpoint (a restart or resume) into ``local_dir``."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as folder:
        for name in names:
            if (Path(folder) / name).exists():
                shutil.copy(Path(folder) / name, local_dir / name)
    return True


@contextlib.contextmanager
def reported_files(local_dir: Path, names: tuple[str, ...]) -> Iterator[Checkpoint]:
    """A Ray checkpoint of a snapshot of ``names`` from ``local_dir``, for one ``ray.train.report``."""
    with tempfile.TemporaryDirectory(dir=local_dir) as folder:
        for name in names:
            if (local_dir / name).exists():
                shutil.copy(local_dir / name, Path(folder) / name)
        yield Checkpoint.from_directory(folder)


@contextlib.contextmanager
def worker_scratch(prefix: str) -> Iterator[Path]:
    """A worker's scratch folder, removed at the end: everything worth keeping was reported to the storage."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_in_scratch(prefix: str, body: Callable[[Path], None]) -> None:
    """A worker's whole life: log lines to the job's stderr, ``body(scratch folder)``, the folder removed."""
    log_to_stderr()
    with worker_scratch(f"{prefix}{ray.train.get_context().get_world_rank()}_") as local_dir:
        body(local_dir)


@dataclass
class WorkerContext:
    """One Ray Train worker of a job: its scratch folder, rank and world size, the files every checkpoint holds,
    and on rank 0 the job's MLflow run (``tracker``)."""
    local_dir: Path
    rank: int
    world_size: int
    files: tuple[str, ...]
    tracker: Optional[Any] = None

    def report(self, metrics: dict[str, Any], step: int, checkpoint_dir_name: str,
               extra: Optional[dict[str, Any]] = None, validation: Any = False,
               at_checkpoint: Optional[Callable[[Checkpoint], dict[str, Any]]] = None) -> None:
        """Every rank reports ``metrics`` (plus ``extra``, for Ray only); rank 0 with a snapshot of the files as
        the checkpoint, its MLflow metrics queued into that snapshot first and sent after it (a restart replays
        what a dead process did not send; each step reaches MLflow once). ``at_checkpoint(checkpoint)`` adds
        metrics computed from the snapshot (a synchronous k-NN monitor)."""
        reported = {**metrics, **(extra or {})}
        if self.rank != 0:
            ray.train.report(reported)
            return
        self.tracker.log_metrics(metrics, step=step, send=False, once=True)
        self._write_run_id()
        with reported_files(self.local_dir, self.files) as checkpoint:
            if at_checkpoint is not None:
                reported.update(at_checkpoint(checkpoint))
            ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name,
                             validation=validation)
        self.tracker.flush()

    def _write_run_id(self) -> None:
        """The MLflow run's id into the files every checkpoint holds (late when the server was away at the start)."""
        run_file = self.local_dir / RUN_ID_FILE
        if self.tracker.run_id and not run_file.exists():
            run_file.write_text(self.tracker.run_id)

    @contextlib.contextmanager
    def finishing(self, keep_dir: Optional[str] = None) -> Iterator[None]:
        """Close rank 0's MLflow run: FINISHED after the body, FAILED if it raises (and re-raise). Calls a server
        that never came back did not take are copied to ``keep_dir`` before the scratch folder goes."""
        try:
            yield
        except BaseException:
            if self.tracker is not None and not self.tracker.finish("FAILED") and keep_dir:
                self.tracker.keep_queue(keep_dir)
            raise
        if self.tracker is not None and not self.tracker.finish() and keep_dir:
            self.tracker.keep_queue(keep_dir)


def worker_context(local_dir: Path, files: tuple[str, ...], open_tracker: Callable[[Optional[str]], Any],
                   resume_from: Optional[Checkpoint] = None) -> WorkerContext:
    """A worker's start: the files of the run's latest checkpoint copied back (else those of ``resume_from``, a
    checkpoint staged in the run's storage), and on rank 0 ``open_tracker(run id or None)``: the MLflow run the
    restored files name, continued, else a new one."""
    context = ray.train.get_context()
    if not restore_files(local_dir, files) and resume_from is not None:
        with resume_from.as_directory() as folder:  # from the run's storage, on any node
            for name in files:
                if (Path(folder) / name).exists():
                    shutil.copy(Path(folder) / name, local_dir / name)
    worker = WorkerContext(local_dir, context.get_world_rank(), context.get_world_size(), files)
    if worker.rank == 0:
        run_file = local_dir / RUN_ID_FILE
        worker.tracker = open_tracker(run_file.read_text().strip() if run_file.exists() else None)
        worker._write_run_id()
    return worker


class RepeatedError(RuntimeError):
    """The same worker error twice from the same checkpoint: not worth another restart."""


class StopRepeatedErrors(UserCallback):
    """On Ray Train's controller: stop the run when its workers fail with the same errors as on the previous
    attempt, without a checkpoint in between (raising here ends the run: Ray does not retry controller errors).
    A killed worker or a lost node fails with a new actor's id each time, so it is always retried."""

    def __init__(self) -> None:
        self.checkpoint: Optional[str] = None  # the latest reported checkpoint: where a restart starts from
        self.previous: Optional[tuple] = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Checkpoint]) -> None:
        if checkpoint is not None:
            self.checkpoint = checkpoint.path

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        errors = tuple(sorted(f"{type(exc).__name__}: {exc}" for exc in worker_exceptions.values()))
        if self.previous == (self.checkpoint, errors):
            raise RepeatedError(f"the same error twice from {self.checkpoint or 'the start'}, not retried again: "
                                f"{errors[0][:2000]}")
        self.previous = (self.checkpoint, errors)


def describe_failure(error: TrainingFailedError) -> str:
    """What ended a run: the controller's reason, or each failed worker's error (their first lines)."""
    if isinstance(error, ControllerError):
        return str(error.controller_failure)
    if isinstance(error, WorkerGroupError):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}"
                         for rank, exc in sorted(error.worker_failures.items()))
    return str(error)


def fit(trainer: TorchTrainer) -> Result:
    """``trainer.fit()``; a run that ends in an error raises ``RunFailed`` with what ended it."""
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        raise RunFailed(describe_failure(exc)) from exc


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster has GPUs: the jobs' default for ``use_gpu``."""
    return ray.cluster_resources().get("GPU", 0) > 0


def torch_trainer(train_fn: Callable[[dict], None], loop_config: dict[str, Any], *, name: str, storage_path: str,
                  num_workers: int = 1, use_gpu: Optional[bool] = None,
                  resources_per_worker: Optional[dict] = None, placement_strategy: str = "PACK",
                  max_failures: int = 3, max_preemption_failures: int = -1, num_to_keep: int = 1,
                  score_attribute: Optional[str] = None,
                  validation: Optional[ValidationConfig] = None, datasets: Optional[dict] = None,
                  callbacks: Optional[list] = None) -> TorchTrainer:
    """A ``TorchTrainer`` running ``train_fn(loop_config)`` on ``num_workers`` workers (GPUs when ``use_gpu``, or
    when it is None and the cluster has them), checkpoints in ``storage_path/name``: the latest, plus the
    ``num_to_keep`` best by ``score_attribute`` (max) when given. The same ``name`` and storage resume. Worker
    failures restart the run from its latest checkpoint (``max_failures``, -1: always; preemptions counted apart),
    a repeated error stops it (``StopRepeatedErrors``)."""
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=num_workers,
                                     use_gpu=cluster_has_gpus() if use_gpu is None else use_gpu,
                                     resources_per_worker=resources_per_worker,
                                     placement_strategy=placement_strategy),
        validation_config=validation,
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures, max_preemption_failures=max_preemption_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute=score_attribute,
                                               checkpoint_score_order="max"),
            callbacks=[StopRepeatedErrors(), *(callbacks or [])],
        ),
    )
