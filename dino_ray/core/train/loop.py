"""The DINO training loop, readable top to bottom beside ``main_dino.py`` of the reference.

``train_dino(cfg)`` runs in one process, or unchanged on every rank of a ``torch.distributed``
group (gloo on CPU, NCCL on GPU) that a launcher (Ray Train, torchrun) has set up. It builds the
multi-crop data, the step (``DINOStep``: networks, loss, optimizer) and the schedules, resumes from
``output_dir/checkpoint.pth`` when present, and then per epoch trains, writes the checkpoints and
appends one JSON line to ``log.txt``. The model math of an iteration lives in ``dino_ray.core.train.step``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dino_ray.core.config import ConfigError, DINOConfig, save_config
from dino_ray.core.data.datasets import ImageListing, build_dataset, is_parquet, list_images
from dino_ray.core.data.loader import build_loader
from dino_ray.core.data.views import build_augmentation, collate_views
from dino_ray.core.models.hub import safe_load
from dino_ray.core.optim import cosine_scheduler
from dino_ray.core.ranks import rank_and_world, seed_everything
from dino_ray.core.train.budget import Plan, cycled, measure_step_seconds, replanned, slowest
from dino_ray.core.train.checkpoint import (
    initialize_from,
    kept_epoch,
    load_checkpoint,
    recorded_args,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from dino_ray.core.train.step import DINOStep, build_step

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any], Path], None]
StepCallback = Callable[[int, dict[str, float]], None]


class EpochBatches(Protocol):
    """One epoch of ``(views, labels, number_skipped)`` batches and its length: a DataLoader or a Ray Data shard."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterable[tuple[Optional[list[torch.Tensor]], torch.Tensor, int]]: ...


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak host memory of this process (and peak CUDA memory on GPU), in MiB."""
    stats = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        stats["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return stats


@dataclass
class Schedules:
    """One value per iteration of the whole run: the reference's cosine schedules."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray

    def at(self, iteration: int) -> dict[str, float]:
        # python floats: numpy scalars in the optimizer state would need an unpickling allow-list
        return {"lr": float(self.lr[iteration]), "wd": float(self.wd[iteration]),
                "momentum_teacher": float(self.momentum[iteration])}


def build_schedules(cfg: DINOConfig, niter_per_ep: int, world_size: int) -> Schedules:
    """The reference's linear scaling rule: lr * total batch / 256 (min_lr is not scaled)."""
    base_lr = cfg.lr * cfg.batch_size_per_gpu * world_size / 256.0
    return Schedules(
        lr=cosine_scheduler(base_lr, cfg.min_lr, cfg.epochs, niter_per_ep, warmup_epochs=cfg.warmup_epochs),
        wd=cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter_per_ep),
        momentum=cosine_scheduler(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, niter_per_ep),
    )


def set_schedules(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """This iteration's lr on every group, its weight decay on the decayed group (the first) only."""
    for j, group in enumerate(optimizer.param_groups):
        group["lr"] = values["lr"]
        if j == 0:
            group["weight_decay"] = values["wd"]


def train_one_epoch(step: DINOStep, loader: EpochBatches, schedules: Schedules, epoch: int,
                    show_progress: bool = False, on_step: Optional[StepCallback] = None,
                    steps_before: int = 0) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean loss, monitors, last schedule values, timings and memory.

    ``on_step(global_iteration, metrics)`` is called every ``log_freq`` iterations (the reference's
    MetricLogger cadence) with that iteration's loss, schedules, timings and memory. The global iteration counts
    from ``steps_before``, the iterations the run went through before this epoch (a time budget changes the epochs'
    lengths, so this count and the schedules' position part).
    """
    cfg, device = step.cfg, next(step.student.parameters()).device
    loss_sum = images_seen = skipped = steps = allreduce_bytes = 0
    allreduce_seconds = 0.0
    data_times: list[float] = []  # per step: the median tells the input's pace apart from an epoch's start-up
    step_times: list[float] = []
    monitors = torch.zeros(2, device=device)  # summed on the device, read at log steps only
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show_progress, leave=False)
    epoch_start = tick = time.perf_counter()
    for i, (images, _, bad) in enumerate(bar):
        data_time = time.perf_counter() - tick
        skipped += bad
        if images is None:  # every image of this batch failed to decode
            continue
        it = len(loader) * epoch + i  # the schedules' position: the same fraction of the run whatever the length
        values = schedules.at(it)
        set_schedules(step.optimizer, values)
        out = step.forward_backward([im.to(device, non_blocking=True) for im in images], epoch, i)
        step.update_teacher(values["momentum_teacher"])
        step_time = time.perf_counter() - tick - data_time
        steps, loss_sum, images_seen = steps + 1, loss_sum + out.loss, images_seen + len(images[0])
        data_times.append(data_time)
        step_times.append(step_time)
        allreduce_seconds += out.allreduce_seconds
        allreduce_bytes += out.allreduce_bytes
        monitors += out.monitors
        if i % cfg.log_freq == 0 or i == len(loader) - 1:
            bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{values['lr']:.2e}")
            if on_step is not None:
                entropy, kl = out.monitors.tolist()
                on_step(steps_before + i,
                        {"epoch": epoch + (i + 1) / len(loader), "loss": out.loss, "teacher_entropy": entropy,
                         "backbone_frozen": float(step.backbone_frozen(epoch, i)),
                         "kl_teacher_student": kl, **values,
                         "teacher_temp": float(step.dino_loss.teacher_temp_schedule[epoch]),
                         "images_per_s": len(images[0]) / (step_time + data_time), "step_time": step_time,
                         "data_time": data_time, **memory_stats(device),
                         **({"allreduce_time": out.allreduce_seconds, "allreduce_mb": out.allreduce_bytes / 2**20}
                            if step.allreduce else {})})
        tick = time.perf_counter()
    if steps == 0:
        raise ValueError(f"epoch {epoch}: no image of '{cfg.data_path}' could be decoded")
    seconds = time.perf_counter() - epoch_start
    entropy, kl = (value / steps for value in monitors.tolist())
    return {"loss": loss_sum / steps, "teacher_entropy": entropy, "kl_teacher_student": kl,  # collapse monitors
            **schedules.at(len(loader) * (epoch + 1) - 1),
            "teacher_temp": float(step.dino_loss.teacher_temp_schedule[epoch]),
            "backbone_frozen": float(step.backbone_frozen(epoch, 0)),  # at the epoch's start
            "steps": steps, "images_per_s": images_seen / seconds, "epoch_seconds": seconds,
            "data_time": sum(data_times) / steps,
            "step_time": sum(step_times) / steps, "data_time_median": statistics.median(data_times),
            "step_time_median": statistics.median(step_times), "skipped_images": skipped, **memory_stats(device),
            **({"allreduce_time": allreduce_seconds / steps, "allreduce_mb": allreduce_bytes / steps / 2**20}
               if step.allreduce else {})}


def continue_from(cfg: DINOConfig, step: DINOStep, weights: str | Path, rank: int) -> DINOConfig:
    """A new run from existing weights (``init_from``); returns the config with ``freeze_backbone_epochs`` decided:
    as given, else 1 epoch when only a backbone came (its head starts fresh), else 0."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"init_from '{weights}' is not a local file: `dino-ray pretrain` resolves run ids, "
                                f"runs:/ and models:/ URIs, cloud URIs and hub names into one")
    kind = initialize_from(safe_load(weights), step.student, step.teacher, step.dino_loss, str(cfg.init_from))
    freeze = cfg.freeze_backbone_epochs if cfg.freeze_backbone_epochs is not None else float(kind == "backbone")
    if rank == 0:
        log.info("initialised from %s (%s): %s", cfg.init_from, "student, teacher and centre" if kind == "full"
                 else "the backbone; the heads start fresh", f"backbone frozen for {freeze:g} epochs" if freeze
                 else "everything trains from the first step")
    return dataclasses.replace(cfg, freeze_backbone_epochs=freeze)


def shared_listing(data_path: str, world_size: int) -> Optional[ImageListing]:
    """An image folder or path list listed once, by rank 0, and sent to the other ranks: N ranks walking a
    million files on a network filesystem each would cost minutes at every start. None: nothing to list."""
    if world_size == 1 or is_parquet(data_path):
        return None
    box = [list_images(data_path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_dino(cfg: DINOConfig, resume_from: Optional[str | Path] = None,
               on_epoch_end: Optional[EpochCallback] = None, show_progress: bool = True,
               on_step: Optional[StepCallback] = None, work_dir: Optional[str | Path] = None,
               epoch_batches: Optional[Callable[[int], EpochBatches]] = None,
               init_from: Optional[str | Path] = None) -> dict[str, Any]:
    """Pretrain with DINO; returns the last epoch's stats. ``on_epoch_end(epoch, stats, checkpoint_path)``
    runs on every rank after the checkpoint is written (a hook for launchers and trackers); ``on_step``
    on rank 0 every ``log_freq`` iterations (see ``train_one_epoch``). Files go to ``work_dir`` when
    given (a launcher's scratch folder), else ``cfg.output_dir``; the checkpoint's ``args`` stay ``cfg``.
    ``epoch_batches(epoch)``: another input than the DataLoader over ``cfg.data_path`` (Ray Data's shards).
    ``init_from``: the local file of ``cfg.init_from`` (which may name an MLflow run: the platform resolves it),
    read when the run has no checkpoint of its own yet."""
    rank, world_size = rank_and_world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    output_dir = Path(work_dir or cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu" and (cfg.use_fp16 or cfg.use_bf16) and rank == 0:
        log.info("mixed precision is for CUDA only: training in fp32 on CPU")
    checkpoint_path = Path(resume_from) if resume_from else output_dir / "checkpoint.pth"
    if resume_from and not checkpoint_path.exists():
        raise FileNotFoundError(f"resume_from '{resume_from}' does not exist")
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    if checkpoint is not None:  # decided when the run started
        cfg = dataclasses.replace(cfg, freeze_backbone_epochs=recorded_args(checkpoint).get(
            "freeze_backbone_epochs", cfg.freeze_backbone_epochs))
    plan = None
    if epoch_batches is None:
        batches_at = dataloader_epochs(lambda: cfg, rank, world_size)  # follows cfg: a budget sizes the epochs
        if cfg.budget_minutes:
            cfg, plan = budgeted(cfg, batches_at(0, 0), device, world_size, checkpoint)
            if rank == 0:
                log.info("%s", plan.line())
    elif cfg.budget_minutes:
        raise ConfigError("budget_minutes sizes the DataLoader's epochs: batches handed in keep their own length")
    else:
        def batches_at(epoch: int, steps_before: int) -> EpochBatches:  # an input that knows its own position
            return epoch_batches(epoch)

    niter_per_ep = len(batches_at(0, 0))
    step = build_step(cfg, device, world_size, niter_per_ep)
    schedules = build_schedules(cfg, niter_per_ep, world_size)
    start_epoch, train_seconds = 0, 0.0
    if checkpoint is not None:
        start_epoch = restore_training_state(checkpoint, step.student, step.teacher, step.optimizer, step.dino_loss,
                                             step.scaler)
        train_seconds = float(checkpoint.get("train_seconds", 0.0))
        if rank == 0:
            log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)
    elif cfg.init_from:
        cfg = continue_from(cfg, step, init_from or cfg.init_from, rank)
    step.freeze_backbone_epochs = cfg.freeze_backbone_epochs or 0.0
    if rank == 0:
        save_config(cfg, output_dir / "config.yaml")

    stats: dict[str, Any] = {}
    spent_before, loop_start, steps_run = train_seconds, time.perf_counter(), 0
    steps_before = int(checkpoint.get("steps", start_epoch * niter_per_ep)) if checkpoint is not None else 0
    for epoch in range(start_epoch, cfg.epochs):
        if plan is not None and steps_run:
            cfg, plan, schedules = replan_epochs(cfg, spent_before, loop_start, steps_run, epoch, device, world_size)
            step.iterations_per_epoch = cfg.epoch_length  # the freezes' progress counts this epoch's iterations
            if rank == 0:
                log.info("re-planned from the epochs so far: %s", plan.line())
        seed_everything(cfg.seed, rank, epoch)  # whatever the input: drop-path masks and augmentations per rank
        batches = batches_at(epoch, steps_before + steps_run)
        stats = train_one_epoch(step, batches, schedules, epoch, show_progress and rank == 0,
                                on_step if rank == 0 else None, steps_before + steps_run)
        steps_run += len(batches)
        train_seconds = spent_before + time.perf_counter() - loop_start  # earlier epochs' checkpoints and hooks too
        stats.update(minutes=train_seconds / 60, **(plan.metrics() if plan else {}))
        latest = output_dir / "checkpoint.pth"
        if rank == 0:
            state = {**training_state(step.student, step.teacher, step.optimizer, step.dino_loss, step.scaler,
                                      epoch + 1, cfg.to_dict()), "train_seconds": train_seconds,
                     "steps": steps_before + steps_run}
            save_checkpoint(state, latest)
            if kept_epoch(epoch, cfg.saveckp_freq):
                save_checkpoint(state, output_dir / f"checkpoint{epoch:04}.pth")
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps({**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}) + "\n")
            log.info("epoch %d/%d: loss %.4f, %.1f images/s; checkpoint %s", epoch, cfg.epochs, stats["loss"],
                     stats["images_per_s"], latest)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats, latest)
    return stats


def dataloader_epochs(config: Callable[[], DINOConfig], rank: int, world_size: int
                      ) -> Callable[[int, int], EpochBatches]:
    """``(epoch, iterations before it) -> DataLoader`` over ``data_path`` (the dataset listed once), for the config
    ``config()`` gives when the epoch starts (a budget may size the epochs after the dataset is made). With
    ``epoch_length`` the epoch's slice of the stream starts after the images those iterations took on all ranks:
    one count, the run's, whatever the earlier epochs' lengths and across a resume."""
    cfg = config()
    if cfg.data_loader != "torch":
        raise ConfigError(f"data_loader: {cfg.data_loader} streams from a Ray cluster: run `dino-ray pretrain` "
                          f"without --no-ray, or set data_loader: torch")
    dataset = build_dataset(cfg.data_path, None, cfg.max_images, listing=shared_listing(cfg.data_path, world_size))
    collate = partial(collate_views, augmentation=build_augmentation(cfg))

    def epoch_loader(epoch: int, steps_before: int) -> EpochBatches:
        cfg = config()
        return build_loader(cfg, rank, world_size, epoch, dataset, collate,
                            start=steps_before * cfg.batch_size_per_gpu * world_size)
    return epoch_loader


def replan_epochs(cfg: DINOConfig, spent_before: float, loop_start: float, steps_run: int, epoch: int,
                  device: torch.device, world_size: int) -> tuple[DINOConfig, Plan, Schedules]:
    """The epochs left re-sized from what the steps so far cost in wall time (checkpoints, hooks, a monitor or a
    loader sharing the machine included: the first plan's few steps ran alone); the schedules follow, continuing
    where they were (they are functions of the run's progress). Epoch lengths change, not epochs."""
    elapsed = slowest(time.perf_counter() - loop_start, device)
    cfg, plan = replanned(cfg, elapsed / steps_run, (spent_before + elapsed) / 60, epoch)
    return cfg, plan, build_schedules(cfg, cfg.epoch_length, world_size)


def budgeted(cfg: DINOConfig, loader: EpochBatches, device: torch.device, world_size: int,
             checkpoint: Optional[dict[str, Any]]) -> tuple[DINOConfig, Plan]:
    """The config sized to ``budget_minutes``: a few throw-away steps of the run's own model on its own loader give
    the step time; a resumed run re-plans its remaining epochs into the minutes left."""
    trial = build_step(cfg, device, world_size, len(loader))  # the run builds its own afterwards, from its seed
    set_schedules(trial.optimizer, build_schedules(cfg, len(loader), world_size).at(0))
    batches = cycled(loader)

    def run_steps(count: int) -> None:
        for images, _, _ in batches(count):
            trial.forward_backward([im.to(device, non_blocking=True) for im in images], 0, 0)
            trial.update_teacher(cfg.momentum_teacher)
    seconds = measure_step_seconds(run_steps, device)
    done = int(checkpoint["epoch"]) if checkpoint is not None else 0
    spent = float(checkpoint.get("train_seconds", 0.0)) / 60 if checkpoint is not None else 0.0
    return replanned(cfg, seconds, spent, done)
