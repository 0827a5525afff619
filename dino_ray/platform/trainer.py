"""Pretraining on Ray Train: the core loop on every ``TorchTrainer`` worker (``dino_ray.platform.ray_train``'s wrapper).

Each worker runs ``train_dino`` unchanged inside the process group Ray sets up (gloo on CPU, NCCL
on GPU). The loop's checkpoint goes through ``ray.train.report`` every epoch, so Ray keeps the
latest one (the reference's ``checkpoint.pth``) plus every ``saveckp_freq``-th, in
``run.storage_path/run.name`` (a local folder or a cloud URI). A worker that fails, or a whole
run started again with the same name and storage, resumes from the latest reported checkpoint.
Rank 0 records the run in MLflow (``dino_ray.platform.tracking``); the MLflow run id travels inside the
checkpoint, so a resumed run continues the same MLflow run; so do the tracking calls an unreachable server
has not taken yet (``mlflow_queue.json``), replayed by the resumed run, or kept under
``output_dir/mlflow_queue`` when the server is still away at the end (``dino-ray sync-tracking``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import Checkpoint, ValidationConfig, ValidationTaskConfig
from ray.train.torch import TorchTrainer

from dino_ray.core.config import DINOConfig, build_config
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.core.storage import is_uri, join
from dino_ray.core.train.checkpoint import kept_epoch
from dino_ray.core.train.loop import train_dino
from dino_ray.platform.checkpoints import resolve_checkpoint
from dino_ray.platform.monitor import knn_monitor
from dino_ray.platform.ray_data import multicrop_dataset, shard_epochs
from dino_ray.platform.ray_session import ray_session
from dino_ray.platform.ray_train import run_in_scratch, torch_trainer, worker_context
from dino_ray.platform.tracking.store import QUEUE_FILE, RUN_ID_FILE, RUN_KEY_TAG, tracking_uri

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("checkpoint.pth", "log.txt", "config.yaml", RUN_ID_FILE, QUEUE_FILE)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    run_in_scratch("dino_ray_rank", lambda local_dir: _train_in(local_dir, loop_config))


def _train_in(local_dir: Path, loop_config: dict[str, Any]) -> None:
    cfg = build_config(loop_config["config"])
    if cfg.scaling.threads_per_worker:
        torch.set_num_threads(cfg.scaling.threads_per_worker)
    layout = {"num_workers": str(ray.train.get_context().get_world_size()),
              "torch_threads": str(torch.get_num_threads())}

    def open_tracker(resumed: Optional[str]) -> Any:
        from dino_ray.platform.tracking.runs import pretraining_tracker  # rank 0 alone imports MLflow

        tracker = pretraining_tracker(cfg, resumed, spool_dir=local_dir, tags={
            "ray_job_id": loop_config.get("job_id") or "none", **layout, RUN_KEY_TAG: loop_config["run_key"]})
        if resumed:  # a run continued on other workers says what it runs on now
            tracker.set_tags(layout)
        return tracker

    worker = worker_context(local_dir, CHECKPOINT_FILES, open_tracker, loop_config.get("resume_from"))
    log.info("rank %d: %s torch threads (scaling.threads_per_worker)", worker.rank, layout["torch_threads"])

    def report(epoch: int, stats: dict[str, Any], checkpoint_path: Path) -> None:
        kept = kept_epoch(epoch, cfg.saveckp_freq)
        monitor = bool(cfg.eval.knn_every) and ((epoch + 1) % cfg.eval.knn_every == 0 or epoch + 1 == cfg.epochs)
        worker.report(stats, epoch, f"checkpoint_epoch{epoch:04d}",
                      {"epoch": epoch, "kept_epoch": epoch if kept else -1},
                      validation=ValidationTaskConfig(fn_kwargs={"epoch": epoch}) if monitor and not cfg.eval.knn_sync
                      else False,  # the asynchronous monitor, in Ray's validation task
                      at_checkpoint=(lambda checkpoint: knn_monitor(checkpoint, cfg.to_dict(), epoch))
                      if monitor and cfg.eval.knn_sync else None)  # in this report: Tune's schedulers see it
        if worker.tracker is not None:
            worker.tracker.log_artifact(local_dir / "log.txt")
            if kept:
                worker.tracker.log_artifact(local_dir / f"checkpoint{epoch:04}.pth", "checkpoints")

    def log_step(iteration: int, metrics: dict[str, float]) -> None:
        """Progress lines for the job's logs (a bar does not survive Ray's log pipe), and iter/* metrics."""
        log.info("epoch %.2f/%d  iteration %d  loss %.4f  lr %.2e  %.0f images/s  peak RSS %.0f MiB",
                 metrics["epoch"], cfg.epochs, iteration, metrics["loss"], metrics["lr"], metrics["images_per_s"],
                 metrics["peak_rss_mb"])
        worker.tracker.log_metrics({f"iter/{k}": v for k, v in metrics.items()}, step=iteration)

    epoch_batches = None
    if cfg.data_loader == "ray_data":
        epoch_batches = shard_epochs(cfg, loop_config["rows"], worker.rank, worker.world_size)
    with worker.finishing(loop_config.get("keep_dir")):
        train_dino(cfg, on_epoch_end=report, show_progress=False,
                   on_step=log_step if worker.tracker is not None else None, work_dir=local_dir,
                   epoch_batches=epoch_batches)
        if worker.tracker is not None:
            log_final_artifacts(worker.tracker, cfg, local_dir)


def log_final_artifacts(tracker: Any, cfg: DINOConfig, folder: Path) -> None:
    """The config, the full checkpoint, the teacher backbone alone (the released files' layout) and, unless
    ``tracking.log_model`` is off, the backbone as an MLflow model."""
    backbone = backbone_from_checkpoint(folder / "checkpoint.pth")[0].eval()
    torch.save(backbone.state_dict(), folder / "teacher_backbone.pth")
    tracker.log_artifact(folder / "config.yaml")
    tracker.log_artifact(folder / "checkpoint.pth", "checkpoints")
    tracker.log_artifact(folder / "teacher_backbone.pth", "checkpoints")
    example = np.zeros((1, 3, cfg.global_crops_size, cfg.global_crops_size), dtype=np.float32)
    if cfg.tracking.log_model:
        tracker.log_model(backbone, example)


def run_storage(cfg: DINOConfig) -> tuple[str, str]:
    """Where Ray Train keeps this run: ``run.storage_path`` (default ``output_dir/ray_results``) and its name."""
    return (cfg.run.storage_path or str(Path(cfg.output_dir).resolve() / "ray_results"),
            cfg.run.name or Path(cfg.output_dir).name)


def staged_resume(cfg: DINOConfig, checkpoint_file: str, mlflow_run_id: Optional[str] = None) -> Checkpoint:
    """The checkpoint to resume from, copied into the run's storage (``<run>/resume_from``) as a Ray
    ``Checkpoint`` that every worker reads wherever it runs: never a path only this process has. (Ray Train V2
    takes it through ``train_loop_config``: ``resume_from_checkpoint`` is gone.)"""
    storage, name = run_storage(cfg)
    location = join(storage, name, "resume_from")
    filesystem, path = (pafs.FileSystem.from_uri(location) if is_uri(location)
                        else (pafs.LocalFileSystem(), str(Path(location).resolve())))
    with tempfile.TemporaryDirectory() as staging:
        shutil.copy(checkpoint_file, Path(staging) / "checkpoint.pth")
        if mlflow_run_id:
            (Path(staging) / RUN_ID_FILE).write_text(mlflow_run_id)
        filesystem.create_dir(path)
        pafs.copy_files(staging, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    log.info("resuming from %s, staged in the run's storage at %s", checkpoint_file, location)
    return Checkpoint(path, filesystem)


def build_trainer(cfg: DINOConfig, resume_from: Optional[Checkpoint] = None, job_id: Optional[str] = None,
                  callbacks: Optional[list] = None) -> TorchTrainer:
    """A TorchTrainer for ``cfg``: scaling, storage, failure and checkpoint-keeping from the config's sections;
    ``resume_from``: a checkpoint in the run's storage (``staged_resume``) for a run that has none of its own."""
    storage_path, run_name = run_storage(cfg)
    validation = None
    if cfg.eval.knn_every and not cfg.eval.knn_sync:  # the k-NN monitor, in Ray's own task per flagged checkpoint
        validation = ValidationConfig(knn_monitor, ValidationTaskConfig(fn_kwargs={"config": cfg.to_dict()}),
                                      ray_remote_kwargs={"num_cpus": cfg.eval.num_cpus})
    datasets, rows = None, None
    if cfg.data_loader == "ray_data":
        views, rows = multicrop_dataset(cfg)
        datasets = {"train": views}
    return torch_trainer(
        train_loop_per_worker,
        {"config": cfg.to_dict(), "resume_from": resume_from, "job_id": job_id, "rows": rows,
         "run_key": uuid.uuid4().hex,  # its MLflow run, even for a restart before any checkpoint
         "keep_dir": str(Path(cfg.output_dir).resolve() / "mlflow_queue")},
        name=run_name, storage_path=storage_path, num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=cfg.scaling.resources_per_worker, placement_strategy=cfg.scaling.placement_strategy,
        max_failures=cfg.failure.max_failures,
        # Ray always keeps the latest checkpoint; the score keeps every saveckp_freq-th as well.
        num_to_keep=math.ceil(cfg.epochs / cfg.saveckp_freq) if cfg.saveckp_freq else 1,
        score_attribute="kept_epoch", validation=validation, datasets=datasets, callbacks=callbacks)


def absolute_data_paths(cfg: DINOConfig) -> DINOConfig:
    """Ray's worker processes do not start in this folder: give them local paths as this process sees them."""
    def resolve(path: Optional[str]) -> Optional[str]:
        return str(Path(path).resolve()) if path and not is_uri(path) and Path(path).exists() else path

    evals = dataclasses.replace(cfg.eval, knn_train_data=resolve(cfg.eval.knn_train_data),
                                knn_val_data=resolve(cfg.eval.knn_val_data))
    audit_dir = cfg.ray_data.audit_dir
    audit_dir = str(Path(audit_dir).resolve()) if audit_dir and not is_uri(audit_dir) else audit_dir
    return dataclasses.replace(cfg, data_path=resolve(cfg.data_path), eval=evals,
                               ray_data=dataclasses.replace(cfg.ray_data, audit_dir=audit_dir))


def pretrain_on_ray(cfg: DINOConfig, resume_from: Optional[str] = None) -> ray.train.Result:
    """Run (or resume) a pretraining on the Ray cluster this process is connected to (a local one if none).

    ``resume_from``: any checkpoint ``resolve_checkpoint`` knows; when it names an MLflow run (a run id,
    ``runs:/``, ``models:/``), that MLflow run continues too. It is staged in the run's storage for the workers.
    """
    cfg = absolute_data_paths(cfg)
    staged = None
    if resume_from:
        weights = resolve_checkpoint(resume_from, tracking_uri(cfg),
                                     cache_dir=Path(cfg.output_dir).resolve() / "resume")
        staged = staged_resume(cfg, str(weights.path), weights.run_id if weights.kind in ("run", "model") else None)
    with ray_session():
        result = build_trainer(cfg, staged, ray.get_runtime_context().get_job_id()).fit()
    if result.checkpoint is not None:
        log.info("pretraining done; latest checkpoint: %s", result.checkpoint.path)
    return result
