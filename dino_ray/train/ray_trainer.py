"""Pretraining on Ray Train: the core loop on every ``TorchTrainer`` worker (``dino_ray.ray_train``'s wrapper).

Each worker runs ``train_dino`` unchanged inside the process group Ray sets up (gloo on CPU, NCCL
on GPU). The loop's checkpoint goes through ``ray.train.report`` every epoch, so Ray keeps the
latest one (the reference's ``checkpoint.pth``) plus every ``saveckp_freq``-th, in
``run.storage_path/run.name`` (a local folder or a cloud URI). A worker that fails, or a whole
run started again with the same name and storage, resumes from the latest reported checkpoint.
Rank 0 records the run in MLflow (``dino_ray.tracking``); the MLflow run id travels inside the
checkpoint, so a resumed run continues the same MLflow run; so do the tracking calls an unreachable server
has not taken yet (``mlflow_queue.json``), replayed by the resumed run, or kept under
``output_dir/mlflow_queue`` when the server is still away at the end (``dino-ray sync-tracking``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
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

from dino_ray.config import DINOConfig, build_config
from dino_ray.data.ray_data import multicrop_dataset, shard_epochs
from dino_ray.eval.monitor import knn_monitor
from dino_ray.ray_session import ray_session
from dino_ray.ray_train import finishing, reported_files, restore_files, run_in_scratch, torch_trainer
from dino_ray.storage import is_uri, join
from dino_ray.models.hub import load_pretrained_weights
from dino_ray.train.checkpoint import QUEUE_FILE, RUN_ID_FILE, kept_epoch
from dino_ray.train.loop import build_config_backbone, train_dino

log = logging.getLogger(__name__)
MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")

RESTORED_FILES = ("checkpoint.pth", "log.txt", RUN_ID_FILE, QUEUE_FILE)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    run_in_scratch("dino_ray_rank", lambda local_dir: _train_in(local_dir, loop_config))


def _train_in(local_dir: Path, loop_config: dict[str, Any]) -> None:
    cfg = build_config(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if cfg.scaling.threads_per_worker:
        torch.set_num_threads(cfg.scaling.threads_per_worker)
    log.info("rank %d: %d torch threads (scaling.threads_per_worker)", rank, torch.get_num_threads())
    if not restore_files(local_dir, RESTORED_FILES) and loop_config.get("resume_from") is not None:
        with loop_config["resume_from"].as_directory() as folder:  # from the run's storage, on any node
            for name in ("checkpoint.pth", RUN_ID_FILE):
                if (Path(folder) / name).exists():
                    shutil.copy(Path(folder) / name, local_dir / name)
    tracker = None
    if rank == 0:
        from dino_ray.tracking import RUN_KEY_TAG, pretraining_tracker  # rank 0 alone talks to MLflow

        run_id_file = local_dir / RUN_ID_FILE
        resumed = run_id_file.read_text().strip() if run_id_file.exists() else None
        layout = {"num_workers": str(context.get_world_size()), "torch_threads": str(torch.get_num_threads())}
        tracker = pretraining_tracker(cfg, resumed, tags={"ray_job_id": loop_config.get("job_id") or "none", **layout,
                                                          RUN_KEY_TAG: loop_config["run_key"]}, spool_dir=local_dir)
        if resumed:  # a run continued on other workers says what it runs on now
            tracker.set_tags(layout)
        if tracker.run_id:
            run_id_file.write_text(tracker.run_id)

    def report(epoch: int, stats: dict[str, Any], checkpoint_path: Path) -> None:
        kept = kept_epoch(epoch, cfg.saveckp_freq)
        metrics = {**stats, "epoch": epoch, "kept_epoch": epoch if kept else -1}
        if rank != 0:
            ray.train.report(metrics)
            return
        tracker.log_metrics(stats, step=epoch, send=False, once=True)  # in the checkpoint's spool, sent after it
        if tracker.run_id and not run_id_file.exists():  # created late: the server was away at the start
            run_id_file.write_text(tracker.run_id)
        with reported_files(local_dir, (*RESTORED_FILES, "config.yaml")) as checkpoint:
            monitor = bool(cfg.eval.knn_every) and ((epoch + 1) % cfg.eval.knn_every == 0 or epoch + 1 == cfg.epochs)
            if monitor and cfg.eval.knn_sync:  # in this report, so Tune's schedulers see the metric
                metrics.update(knn_monitor(checkpoint, cfg.to_dict(), epoch))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}",
                             validation=ValidationTaskConfig(fn_kwargs={"epoch": epoch})
                             if monitor and not cfg.eval.knn_sync else False)
        tracker.flush()
        tracker.log_artifact(local_dir / "log.txt")
        if kept:
            tracker.log_artifact(local_dir / f"checkpoint{epoch:04}.pth", "checkpoints")

    def log_step(iteration: int, metrics: dict[str, float]) -> None:
        """Progress lines for the job's logs (a bar does not survive Ray's log pipe), and iter/* metrics."""
        log.info("epoch %.2f/%d  iteration %d  loss %.4f  lr %.2e  %.0f images/s  peak RSS %.0f MiB",
                 metrics["epoch"], cfg.epochs, iteration, metrics["loss"], metrics["lr"], metrics["images_per_s"],
                 metrics["peak_rss_mb"])
        tracker.log_metrics({f"iter/{k}": v for k, v in metrics.items()}, step=iteration)

    epoch_batches = None
    if cfg.data_loader == "ray_data":
        epoch_batches = shard_epochs(cfg, loop_config["rows"], rank, context.get_world_size())
    with finishing(tracker, loop_config.get("keep_dir")):
        train_dino(cfg, on_epoch_end=report, show_progress=False, on_step=log_step if tracker is not None else None,
                   work_dir=local_dir, epoch_batches=epoch_batches)
        if tracker is not None:
            log_final_artifacts(tracker, cfg, local_dir)


def log_final_artifacts(tracker: Any, cfg: DINOConfig, folder: Path) -> None:
    """The config, the full checkpoint, the teacher backbone alone (the released files' layout) and, unless
    ``tracking.log_model`` is off, the backbone as an MLflow model."""
    backbone = load_pretrained_weights(build_config_backbone(cfg), folder / "checkpoint.pth", "teacher").eval()
    torch.save(backbone.state_dict(), folder / "teacher_backbone.pth")
    tracker.log_artifact(folder / "config.yaml")
    tracker.log_artifact(folder / "checkpoint.pth", "checkpoints")
    tracker.log_artifact(folder / "teacher_backbone.pth", "checkpoints")
    example = np.zeros((1, 3, cfg.global_crops_size, cfg.global_crops_size), dtype=np.float32)
    if cfg.tracking.log_model:
        tracker.log_model(backbone, example)


def checkpoint_from_mlflow(cfg: DINOConfig, run_id: str) -> str:
    """Download the latest checkpoint a pretraining logged to MLflow run ``run_id``; returns its local path."""
    from dino_ray.tracking import download_checkpoint, tracking_uri

    return download_checkpoint(tracking_uri(cfg), run_id, Path(cfg.output_dir).resolve() / "resume" / run_id)


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

    ``resume_from``: a ``checkpoint.pth`` path, or the id of an MLflow run whose checkpoint to continue
    from (that MLflow run then continues too). Either is staged in the run's storage for the workers.
    """
    cfg = absolute_data_paths(cfg)
    staged = None
    if resume_from:
        mlflow_run_id = None
        if not Path(resume_from).is_file():
            if not MLFLOW_RUN_ID.fullmatch(resume_from):
                raise FileNotFoundError(f"resume_from '{resume_from}' is neither an existing checkpoint file nor an "
                                        f"MLflow run id (32 hexadecimal characters)")
            mlflow_run_id = resume_from
            resume_from = checkpoint_from_mlflow(cfg, resume_from)
        staged = staged_resume(cfg, resume_from, mlflow_run_id)
    with ray_session():
        result = build_trainer(cfg, staged, ray.get_runtime_context().get_job_id()).fit()
    if result.checkpoint is not None:
        log.info("pretraining done; latest checkpoint: %s", result.checkpoint.path)
    return result
