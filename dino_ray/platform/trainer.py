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

from dino_ray.core.args import ConfigError, RunFailed
from dino_ray.core.config import DINOConfig, build_config
from dino_ray.core.data.datasets import build_dataset, require_labels
from dino_ray.core.models.build import backbone_from_checkpoint
from dino_ray.core.storage import is_uri, join
from dino_ray.core.train.checkpoint import kept_epoch
from dino_ray.core.train.loop import train_dino
from dino_ray.platform.checkpoints import resolve_checkpoint
from dino_ray.platform.monitor import knn_monitor, knn_monitor_task, monitor_between_epochs, training_cpus
from dino_ray.platform.ray_data import multicrop_dataset, shard_epochs
from dino_ray.platform.ray_session import missing_on_nodes, ray_session
from dino_ray.platform.ray_train import fit, run_in_scratch, torch_trainer, worker_context
from dino_ray.platform.tracking.store import QUEUE_FILE, RUN_ID_FILE, RUN_KEY_TAG, tracking_uri

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("checkpoint.pth", "log.txt", "config.yaml", RUN_ID_FILE, QUEUE_FILE)
INIT_FILE = "init_from"  # the weights of init_from in a worker's scratch folder (with their file's suffix)


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

    init = None
    if loop_config.get("init_from") is not None and not (local_dir / "checkpoint.pth").exists():
        with loop_config["init_from"].as_directory() as folder:  # only a run with no checkpoint of its own reads it
            staged = next(Path(folder).glob(f"{INIT_FILE}*"))
            init = local_dir / staged.name
            shutil.copy(staged, init)
    epoch_batches = None
    if cfg.data_loader == "ray_data":
        epoch_batches = shard_epochs(cfg, loop_config["rows"], worker.rank, worker.world_size)
    with worker.finishing(loop_config.get("keep_dir")):
        train_dino(cfg, on_epoch_end=report, show_progress=False,
                   on_step=log_step if worker.tracker is not None else None, work_dir=local_dir,
                   epoch_batches=epoch_batches, init_from=init)
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
    # a batch of 2: torch.export takes a dimension of size 1 for a constant, and the batch size must stay free
    example = np.zeros((2, 3, cfg.eval_size(), cfg.eval_size()), dtype=np.float32)  # what a user feeds it
    if cfg.tracking.log_model:
        tracker.log_model(backbone, example)


def run_storage(cfg: DINOConfig) -> tuple[str, str]:
    """Where Ray Train keeps this run: ``run.storage_path`` (default ``output_dir/ray_results``) and its name."""
    return (cfg.run.storage_path or str(Path(cfg.output_dir).resolve() / "ray_results"),
            cfg.run.name or Path(cfg.output_dir).name)


def stage(cfg: DINOConfig, folder: str, files: dict[str, str], texts: Optional[dict[str, str]] = None) -> Checkpoint:
    """Local ``files`` (name: path) and ``texts`` (name: content) copied into the run's storage (``<run>/<folder>``)
    as a Ray ``Checkpoint`` that every worker reads wherever it runs: never a path only this process has. (Ray
    Train V2 takes it through ``train_loop_config``: ``resume_from_checkpoint`` is gone.)"""
    storage, name = run_storage(cfg)
    location = join(storage, name, folder)
    filesystem, path = (pafs.FileSystem.from_uri(location) if is_uri(location)
                        else (pafs.LocalFileSystem(), str(Path(location).resolve())))
    with tempfile.TemporaryDirectory() as staging:
        for target, source in files.items():
            shutil.copy(source, Path(staging) / target)
        for target, text in (texts or {}).items():
            (Path(staging) / target).write_text(text)
        filesystem.create_dir(path)
        pafs.copy_files(staging, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    log.info("%s staged in the run's storage at %s", ", ".join([*files.values(), *(texts or {})]), location)
    return Checkpoint(path, filesystem)


def build_trainer(cfg: DINOConfig, resume_from: Optional[Checkpoint] = None, job_id: Optional[str] = None,
                  callbacks: Optional[list] = None, run_key: Optional[str] = None,
                  init_from: Optional[Checkpoint] = None) -> TorchTrainer:
    """A TorchTrainer for ``cfg``: scaling, storage, failure and checkpoint-keeping from the config's sections;
    ``resume_from``: a checkpoint in the run's storage (``stage``) for a run that has none of its own;
    ``run_key``: what names its MLflow run across restarts (a new one by default); ``init_from``: the staged
    weights of ``cfg.init_from``."""
    storage_path, run_name = run_storage(cfg)
    if cfg.eval.knn_every:
        cpus = ray.cluster_resources().get("CPU", 0)
        sync = monitor_between_epochs(cfg, cpus)
        why = ("eval.knn_sync" if cfg.eval.knn_sync is not None else
               f"the training keeps {training_cpus(cfg):g} of the cluster's {cpus:g} CPUs busy")
        log.info("k-NN monitor every %d epochs: %s (%s)", cfg.eval.knn_every,
                 "on rank 0 between epochs" if sync else "in its own Ray task", why)
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, knn_sync=sync))
    validation = None
    if cfg.eval.knn_every and not cfg.eval.knn_sync:  # the k-NN monitor, in Ray's own task per flagged checkpoint
        validation = ValidationConfig(knn_monitor_task, ValidationTaskConfig(fn_kwargs={"config": cfg.to_dict()}),
                                      ray_remote_kwargs={"num_cpus": cfg.eval.num_cpus})
    datasets, rows = None, None
    if cfg.data_loader == "ray_data":
        views, rows = multicrop_dataset(cfg)
        datasets = {"train": views}
    return torch_trainer(
        train_loop_per_worker,
        {"config": cfg.to_dict(), "resume_from": resume_from, "init_from": init_from, "job_id": job_id,
         "rows": rows,
         "run_key": run_key or uuid.uuid4().hex,  # its MLflow run, even for a restart before any checkpoint
         "keep_dir": str(Path(cfg.output_dir).resolve() / "mlflow_queue")},
        name=run_name, storage_path=storage_path, num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=cfg.scaling.resources_per_worker, placement_strategy=cfg.scaling.placement_strategy,
        max_failures=cfg.failure.max_failures, max_preemption_failures=cfg.failure.max_preemption_failures,
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


def check_cluster_paths(cfg: DINOConfig) -> None:
    """On a cluster of several machines, refuse local paths that not every machine sees, before any worker starts:
    the checkpoint storage (Ray Train needs one storage every worker writes to and a restart reads from) and the
    data. A shared filesystem mounted at the same path everywhere passes; ``s3://`` / ``gs://`` are not checked."""
    storage, _ = run_storage(cfg)
    paths = {name: path for name, path in (("data_path", cfg.data_path), ("eval.knn_train_data",
                                                                         cfg.eval.knn_train_data),
                                           ("eval.knn_val_data", cfg.eval.knn_val_data))
             if path and not is_uri(path)}
    marker = None
    if not is_uri(storage):
        marker = Path(storage) / f".dino_ray_shared_{uuid.uuid4().hex}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        paths["run.storage_path"] = str(marker)
    try:
        missing = missing_on_nodes(list(paths.values()))
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    if missing:
        named = [f"{name} '{storage if name == 'run.storage_path' else path}' is not visible on "
                 f"{', '.join(missing[path])}" for name, path in paths.items() if path in missing]
        raise ConfigError(f"this Ray cluster has several machines and {'; '.join(named)}: use a location every "
                          f"machine reads (s3:// or gs://, or a shared filesystem mounted at the same path "
                          f"everywhere, such as NFS)")


def pretrain_on_ray(cfg: DINOConfig, resume_from: Optional[str] = None) -> ray.train.Result:
    """Run (or resume) a pretraining on the Ray cluster this process is connected to (a local one if none).

    ``resume_from``: any checkpoint ``resolve_checkpoint`` knows; when it names an MLflow run (a run id,
    ``runs:/``, ``models:/``), that MLflow run continues too. It is staged in the run's storage for the workers.
    A run that ends in an error (``RunFailed``) has its MLflow run marked FAILED, whichever worker failed how.
    """
    cfg = absolute_data_paths(cfg)
    staged = None
    if resume_from:
        weights = resolve_checkpoint(resume_from, tracking_uri(cfg),
                                     cache_dir=Path(cfg.output_dir).resolve() / "resume")
        continued = weights.run_id if weights.kind in ("run", "model") else None  # that MLflow run goes on
        staged = stage(cfg, "resume_from", {"checkpoint.pth": str(weights.path)},
                       {RUN_ID_FILE: continued} if continued else None)
    init = None
    if cfg.init_from:
        weights = resolve_checkpoint(cfg.init_from, tracking_uri(cfg),
                                     cache_dir=Path(cfg.output_dir).resolve() / "init")
        init = stage(cfg, "init_from", {INIT_FILE + weights.path.suffix: str(weights.path)})
    if cfg.eval.knn_every:  # the monitor's k-NN needs labels: say so now, not at the first monitored epoch
        for path, count, role in ((cfg.eval.knn_train_data or cfg.data_path, cfg.eval.knn_train_images,
                                   "memory bank (eval.knn_train_data, by default data_path)"),
                                  (cfg.eval.knn_val_data, cfg.eval.knn_val_images, "test set (eval.knn_val_data)")):
            if not is_uri(path):
                require_labels(build_dataset(path, None, count), path,
                               f"the k-NN monitor's {role}, on when eval.knn_every > 0,")
    run_key = uuid.uuid4().hex
    with ray_session():
        check_cluster_paths(cfg)
        try:
            result = fit(build_trainer(cfg, staged, ray.get_runtime_context().get_job_id(), run_key=run_key,
                                       init_from=init))
        except RunFailed:
            from dino_ray.platform.tracking.runs import end_run_by_key

            end_run_by_key(tracking_uri(cfg), cfg.tracking.experiment_name, run_key, "FAILED",
                           cfg.tracking.retry_timeout_s)
            raise
    if result.checkpoint is not None:
        log.info("pretraining done; latest checkpoint: %s", result.checkpoint.path)
    return result
