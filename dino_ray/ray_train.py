"""The one Ray Train wrapper, for every trainer job (pretraining, the linear probe): the ``TorchTrainer``
with its scaling, storage, failure and checkpoint-keeping settings, and what a worker does around its loop.

Platform layer. A worker runs its job's loop in a scratch folder (``worker_scratch``), first copying back
what the run's latest reported checkpoint holds (``restore_files``: a restarted or resumed run), and
reports a snapshot of its files each epoch (``reported_files``); rank 0 closes its MLflow run as the
loop ends (``finishing``). Ray keeps the reported checkpoints in ``storage_path/name``.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, ValidationConfig
from ray.train.torch import TorchTrainer

from dino_ray.logs import log_to_stderr


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


@contextlib.contextmanager
def finishing(tracker: Optional[Any], keep_dir: Optional[str] = None) -> Iterator[None]:
    """Close the rank-0 MLflow run: FINISHED after the body, FAILED if it raises (and re-raise). Calls a
    server that never came back did not take are copied to ``keep_dir`` before the scratch folder goes."""
    try:
        yield
    except BaseException:
        if tracker is not None and not tracker.finish("FAILED") and keep_dir:
            tracker.keep_queue(keep_dir)
        raise
    if tracker is not None and not tracker.finish() and keep_dir:
        tracker.keep_queue(keep_dir)


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster has GPUs: the jobs' default for ``use_gpu``."""
    return ray.cluster_resources().get("GPU", 0) > 0


def torch_trainer(train_fn: Callable[[dict], None], loop_config: dict[str, Any], *, name: str, storage_path: str,
                  num_workers: int = 1, use_gpu: Optional[bool] = None,
                  resources_per_worker: Optional[dict] = None, placement_strategy: str = "PACK",
                  max_failures: int = 0, num_to_keep: int = 1, score_attribute: Optional[str] = None,
                  validation: Optional[ValidationConfig] = None, datasets: Optional[dict] = None,
                  callbacks: Optional[list] = None) -> TorchTrainer:
    """A ``TorchTrainer`` running ``train_fn(loop_config)`` on ``num_workers`` workers (GPUs when ``use_gpu``, or
    when it is None and the cluster has them), checkpoints in ``storage_path/name``: the latest, plus the
    ``num_to_keep`` best by ``score_attribute`` (max) when given. The same ``name`` and storage resume."""
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
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute=score_attribute,
                                               checkpoint_score_order="max"),
            callbacks=callbacks,
        ),
    )
