"""The DINO training loop, readable top to bottom beside ``main_dino.py`` of the reference.

``train_dino(cfg)`` runs in one process, or unchanged on every rank of a ``torch.distributed``
group (gloo on CPU, NCCL on GPU) that a launcher (Ray Train, torchrun) has set up. It builds the
student and the teacher, the multi-crop data, the loss and the schedules, resumes from
``output_dir/checkpoint.pth`` when present, and then per epoch trains, writes the checkpoints and
appends one JSON line to ``log.txt``.
"""
from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from dino_ray.config import ConfigError, DINOConfig, save_config
from dino_ray.data.datasets import build_dataset
from dino_ray.data.views import build_augmentation, collate_views
from dino_ray.loss import DINOLoss, koleo_loss
from dino_ray.models.backbones import build_backbone
from dino_ray.models.head import DINOHead
from dino_ray.models.multicrop import MultiCropWrapper
from dino_ray.optim import (LARS, cancel_gradients_last_layer, clip_gradients, cosine_scheduler, get_params_groups,
                            update_teacher)
from dino_ray.train.checkpoint import (kept_epoch, load_checkpoint, restore_training_state, save_checkpoint,
                                      training_state)

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


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def derived_seed(seed: int, rank: int, epoch: int) -> int:
    """One seed per (seed, rank, epoch): ranks differ, and an epoch's draws do not depend on the ones before."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def seed_everything(seed: int, rank: int, epoch: int) -> None:
    """Seed torch, numpy and Python from (seed, rank, epoch).

    Re-seeding at every epoch start makes the RNG state a function of the epoch, so a run resumed
    from a checkpoint draws the same crops and drop-path masks on every rank as one never stopped;
    and ranks differ (the reference gives every rank the same seed, hence the same augmentations).
    """
    derived = derived_seed(seed, rank, epoch)
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)


def build_config_backbone(cfg: DINOConfig, drop_path_rate: float = 0.0) -> nn.Module:
    """The backbone ``cfg`` describes. Right after ``torch.manual_seed(cfg.seed)`` it holds the run's initial
    weights (the student's backbone is the first thing a run draws): the random-init baseline of evaluations."""
    if cfg.arch.startswith("vit"):
        return build_backbone(cfg.arch, cfg.patch_size, drop_path_rate, cfg.fused_attn, stem=cfg.stem,
                              img_size=cfg.global_crops_size, **cfg.vit_kwargs())
    return build_backbone(cfg.arch, stem=cfg.stem, width=cfg.width)


def build_student_teacher(cfg: DINOConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path, configurable last layer) and teacher (no drop path, normed last layer), equal weights."""
    def make(drop_path_rate: float, norm_last_layer: bool) -> MultiCropWrapper:
        backbone = build_config_backbone(cfg, drop_path_rate)
        head = DINOHead(backbone.embed_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head, norm_last_layer=norm_last_layer,
                        nlayers=cfg.head_nlayers, hidden_dim=cfg.head_hidden_dim,
                        bottleneck_dim=cfg.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head)

    student = make(cfg.drop_path_rate, cfg.norm_last_layer)
    teacher = make(0.0, True)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def place(cfg: DINOConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to ``device``; a convolutional one channels-last when ``cfg.channels_last`` (oneDNN on CPU and
    cuDNN run convolutions about 1.3x faster so; same math, same state dict keys)."""
    convolutional = not cfg.arch.startswith("vit")
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last and convolutional
                    else torch.preserve_format)


def build_optimizer(cfg: DINOConfig, student: nn.Module) -> torch.optim.Optimizer:
    """lr and weight decay are set every iteration from the schedules; these are placeholders."""
    groups = get_params_groups(student)
    fused = True if cfg.fused_optimizer else None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9, fused=fused)
    return LARS(groups)


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray


def build_schedules(cfg: DINOConfig, niter_per_ep: int, world_size: int) -> Schedules:
    """The reference's linear scaling rule: lr * total batch / 256 (min_lr is not scaled)."""
    base_lr = cfg.lr * cfg.batch_size_per_gpu * world_size / 256.0
    return Schedules(
        lr=cosine_scheduler(base_lr, cfg.min_lr, cfg.epochs, niter_per_ep, warmup_epochs=cfg.warmup_epochs),
        wd=cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter_per_ep),
        momentum=cosine_scheduler(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, niter_per_ep),
    )


class EpochSliceSampler(Sampler[int]):
    """Fixed-length epochs (dinov2's ``OFFICIAL_EPOCH_LENGTH``): epoch ``e`` takes the ``e``-th run of
    ``per_rank x world_size`` indices from a stream of seeded permutations of the dataset, split over ranks.
    Every image is seen once per pass whatever the epoch length; short epochs give frequent checkpoints."""

    def __init__(self, size: int, per_rank: int, world_size: int, rank: int, seed: int, epoch: int) -> None:
        self.size, self.per_rank, self.world_size, self.rank = size, per_rank, world_size, rank
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        total = self.per_rank * self.world_size
        data_pass, offset = divmod(self.epoch * total, self.size)
        stream: list[int] = []
        while len(stream) < offset + total:
            generator = torch.Generator().manual_seed(self.seed + data_pass)
            stream += torch.randperm(self.size, generator=generator).tolist()
            data_pass += 1
        return iter(stream[offset:offset + total][self.rank::self.world_size])


def build_loader(cfg: DINOConfig, rank: int, world_size: int, epoch: int, dataset: Any,
                 collate_fn: Callable[[list], Any]) -> DataLoader:
    """Each image once per epoch across ranks (DistributedSampler with a shared seed), or with ``epoch_length``
    the epoch's slice of an endless shuffled stream; the loader's workers are seeded from (seed, rank, epoch),
    so a resumed epoch sees the same order and crops."""
    if cfg.epoch_length is not None:
        sampler: Sampler[int] = EpochSliceSampler(len(dataset), cfg.epoch_length * cfg.batch_size_per_gpu,
                                                  world_size, rank, cfg.seed, epoch)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch))
    loader = DataLoader(dataset, sampler=sampler, batch_size=cfg.batch_size_per_gpu, num_workers=cfg.num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True, collate_fn=collate_fn,
                        generator=generator)
    if len(loader) == 0:
        raise ValueError(f"data_path '{cfg.data_path}' has {len(dataset)} images: fewer than one batch "
                         f"({cfg.batch_size_per_gpu} x {world_size} ranks)")
    return loader


def precision(cfg: DINOConfig, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
    """The autocast context and the gradient scaler of every step, enabled or not: fp16 with loss scaling on CUDA
    (as the reference), bf16 as an option, fp32 on CPU (a disabled scaler passes the loss and the step through)."""
    half = device.type == "cuda" and (cfg.use_bf16 or cfg.use_fp16)
    dtype = torch.bfloat16 if cfg.use_bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=half and not cfg.use_bf16)
    return partial(torch.autocast, device.type, dtype=dtype, enabled=half), scaler


def train_one_epoch(student: nn.Module, teacher: nn.Module, student_ddp: nn.Module, dino_loss: DINOLoss,
                    loader: EpochBatches, optimizer: torch.optim.Optimizer, schedules: Schedules, epoch: int,
                    cfg: DINOConfig, device: torch.device, autocast: Callable[[], Any],
                    scaler: torch.amp.GradScaler, show_progress: bool,
                    on_step: Optional[StepCallback] = None) -> dict[str, float]:
    """One pass over the data; ``student`` is the bare model (for EMA and clipping), ``student_ddp`` the wrapped one.

    ``on_step(global_iteration, metrics)`` is called every ``log_freq`` iterations (the reference's
    MetricLogger cadence) with that iteration's loss, schedules, timings and memory.
    """
    totals = {"loss": 0.0, "images": 0, "skipped_images": 0, "data_time": 0.0, "step_time": 0.0}
    monitors = torch.zeros(2, device=device)  # teacher entropy, KL: summed on the device, read at log steps only
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show_progress, leave=False)
    epoch_start = tick = time.perf_counter()
    for i, (images, _, skipped) in enumerate(bar):
        data_time = time.perf_counter() - tick
        totals["skipped_images"] += skipped
        if images is None:  # every image of this batch failed to decode
            continue
        it = len(loader) * epoch + i  # global iteration
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(schedules.lr[it])  # python floats: numpy scalars would need an unpickling allow-list
            if j == 0:  # only the decayed group
                group["weight_decay"] = float(schedules.wd[it])
        images = [im.to(device, non_blocking=True) for im in images]

        with autocast():
            teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
            student_output, student_features = student_ddp(images, return_features=True)
            loss = dino_loss(student_output, teacher_output, epoch)
            if cfg.koleo_loss_weight:  # DINOv2: summed over the global views, each a batch of its own
                n_global = 2 * len(images[0])
                loss = loss + cfg.koleo_loss_weight * sum(koleo_loss(f) for f in student_features[:n_global].chunk(2))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, iteration {i}: stopping; the last "
                                     f"checkpoint is left intact")

        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients
            clip_gradients(student, cfg.clip_grad)
        cancel_gradients_last_layer(it / len(loader), student, cfg.freeze_last_layer)
        scaler.step(optimizer)
        scaler.update()

        update_teacher(student, teacher, float(schedules.momentum[it]))

        step_time = time.perf_counter() - tick - data_time
        steps += 1
        step_monitors = torch.stack([dino_loss.last_teacher_entropy, dino_loss.last_kl])
        monitors += step_monitors
        totals["loss"] += loss_value
        totals["images"] += len(images[0])
        totals["data_time"] += data_time
        totals["step_time"] += step_time
        if i % cfg.log_freq == 0 or i == len(loader) - 1:
            if show_progress:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{schedules.lr[it]:.2e}")
            if on_step is not None:
                entropy, kl = step_monitors.tolist()
                on_step(it, {"epoch": epoch + (i + 1) / len(loader), "loss": loss_value,
                             "teacher_entropy": entropy, "kl_teacher_student": kl, "lr": float(schedules.lr[it]), "wd": float(schedules.wd[it]),
                             "momentum_teacher": float(schedules.momentum[it]),
                             "teacher_temp": float(dino_loss.teacher_temp_schedule[epoch]),
                             "images_per_s": len(images[0]) / (step_time + data_time), "step_time": step_time,
                             "data_time": data_time, **memory_stats(device)})
        tick = time.perf_counter()
    if steps == 0:
        raise ValueError(f"epoch {epoch}: no image of '{cfg.data_path}' could be decoded")
    last = len(loader) * (epoch + 1) - 1
    return {
        "loss": totals["loss"] / steps,
        "teacher_entropy": monitors[0].item() / steps,  # collapse monitors (DINOLoss)
        "kl_teacher_student": monitors[1].item() / steps,
        "lr": float(schedules.lr[last]),
        "wd": float(schedules.wd[last]),
        "momentum_teacher": float(schedules.momentum[last]),
        "teacher_temp": float(dino_loss.teacher_temp_schedule[epoch]),
        "images_per_s": totals["images"] / (time.perf_counter() - epoch_start),
        "epoch_seconds": time.perf_counter() - epoch_start,
        "data_time": totals["data_time"] / steps,
        "step_time": totals["step_time"] / steps,
        "skipped_images": totals["skipped_images"],
        **memory_stats(device),
    }


def train_dino(cfg: DINOConfig, resume_from: Optional[str | Path] = None,
               on_epoch_end: Optional[EpochCallback] = None, show_progress: bool = True,
               on_step: Optional[StepCallback] = None, work_dir: Optional[str | Path] = None,
               epoch_batches: Optional[Callable[[int], EpochBatches]] = None) -> dict[str, Any]:
    """Pretrain with DINO; returns the last epoch's stats. ``on_epoch_end(epoch, stats, checkpoint_path)``
    runs on every rank after the checkpoint is written (a hook for launchers and trackers); ``on_step``
    on rank 0 every ``log_freq`` iterations (see ``train_one_epoch``). Files go to ``work_dir`` when
    given (a launcher's scratch folder), else ``cfg.output_dir``; the checkpoint's ``args`` stay ``cfg``.
    ``epoch_batches(epoch)``: another input than the DataLoader over ``cfg.data_path`` (Ray Data's shards)."""
    rank, world_size = rank_and_world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    output_dir = Path(work_dir or cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    if device.type == "cpu" and (cfg.use_fp16 or cfg.use_bf16) and rank == 0:
        log.info("mixed precision is for CUDA only: training in fp32 on CPU")

    if epoch_batches is None:
        if cfg.data_loader != "torch":
            raise ConfigError(f"data_loader: {cfg.data_loader} streams from a Ray cluster: run `dino-ray pretrain` "
                              f"without --no-ray, or set data_loader: torch")
        dataset = build_dataset(cfg.data_path, None, cfg.max_images)
        collate = partial(collate_views, augmentation=build_augmentation(cfg))

        def epoch_batches(epoch: int) -> EpochBatches:
            return build_loader(cfg, rank, world_size, epoch, dataset, collate)
    niter_per_ep = len(epoch_batches(0))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank; each epoch re-seeds per rank below
    student, teacher = build_student_teacher(cfg)
    place(cfg, student, device)
    place(cfg, teacher, device)
    student_ddp: nn.Module = student
    if world_size > 1:
        student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.index is not None
                                                          else None)
    teacher_fwd, student_fwd = teacher, student_ddp
    if cfg.torch_compile:
        teacher_fwd, student_fwd = torch.compile(teacher), torch.compile(student_ddp)

    dino_loss = DINOLoss(cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                         cfg.warmup_teacher_temp_epochs, cfg.epochs, centering=cfg.centering).to(device)
    optimizer = build_optimizer(cfg, student)
    autocast, scaler = precision(cfg, device)
    schedules = build_schedules(cfg, niter_per_ep, world_size)

    start_epoch = 0
    checkpoint_path = Path(resume_from) if resume_from else output_dir / "checkpoint.pth"
    if checkpoint_path.exists():
        start_epoch = restore_training_state(load_checkpoint(checkpoint_path), student, teacher, optimizer,
                                             dino_loss, scaler)
        if rank == 0:
            log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)
    elif resume_from:
        raise FileNotFoundError(f"resume_from '{resume_from}' does not exist")

    stats: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed, rank, epoch)  # whatever the input: drop-path masks and augmentations per rank
        loader = epoch_batches(epoch)
        stats = train_one_epoch(student, teacher_fwd, student_fwd, dino_loss, loader, optimizer, schedules, epoch, cfg,
                                device, autocast, scaler, show_progress and rank == 0,
                                on_step if rank == 0 else None)
        latest = output_dir / "checkpoint.pth"
        if rank == 0:
            state = training_state(student, teacher, optimizer, dino_loss, scaler, epoch + 1, cfg.to_dict())
            save_checkpoint(state, latest)
            if kept_epoch(epoch, cfg.saveckp_freq):
                save_checkpoint(state, output_dir / f"checkpoint{epoch:04}.pth")
            line = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps(line) + "\n")
            log.info("epoch %d/%d: loss %.4f, %.1f images/s; checkpoint %s", epoch, cfg.epochs, stats["loss"],
                     stats["images_per_s"], latest)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats, latest)
    return stats
