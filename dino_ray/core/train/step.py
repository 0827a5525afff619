"""One DINO iteration's model math, apart from the loop that schedules, logs and checkpoints around it.

``DINOStep`` holds the student and the teacher, the loss, the optimizer and the precision settings, as dinov2's
``SSLMetaArch`` holds its networks: ``forward_backward`` runs the student on every crop and the teacher on the two
global ones, computes the loss (the reference's ``main_dino.train_one_epoch``: clipping per parameter, the last
layer frozen early on) and steps the optimizer; ``update_teacher`` moves the teacher towards the student. The
collapse monitors come back as return values. ``build_step`` makes it from a config, on every rank the same way:
BatchNorm synchronised across ranks as the reference does, the student wrapped in DDP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from dino_ray.core.config import DINOConfig
from dino_ray.core.loss import DINOLoss, koleo_loss
from dino_ray.core.models.build import build_student_teacher
from dino_ray.core.models.sync_batchnorm import convert_sync_batchnorm, has_batchnorm
from dino_ray.core.optim import (
    LARS,
    cancel_gradients_backbone,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
    update_teacher,
)
from dino_ray.core.train.comm import AllReduceTimer, time_allreduce


@dataclass
class StepOutput:
    loss: float
    monitors: torch.Tensor  # [teacher entropy, KL(teacher || student)], on the device: read at log steps only
    allreduce_seconds: float = 0.0  # the gradient all-reduce, when profiled (``profile_allreduce``)
    allreduce_bytes: int = 0


@dataclass
class DINOStep:
    cfg: DINOConfig
    student: nn.Module  # the bare student (EMA, clipping, checkpoints)
    teacher: nn.Module
    student_fwd: nn.Module  # what runs forward: DDP-wrapped and / or compiled
    teacher_fwd: nn.Module
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], Any]
    scaler: torch.amp.GradScaler
    iterations_per_epoch: int
    allreduce: Optional[AllReduceTimer] = None  # with ``profile_allreduce`` on several ranks
    freeze_backbone_epochs: float = 0.0  # continued pretraining: the head learns alone first

    def backbone_frozen(self, epoch: int, iteration: int) -> bool:
        return epoch + iteration / self.iterations_per_epoch < self.freeze_backbone_epochs

    def forward_backward(self, images: list[torch.Tensor], epoch: int, iteration: int) -> StepOutput:
        """Loss, backward and optimizer step on one batch of crops (the 2 global crops first) at ``iteration`` of
        ``epoch``. A non-finite loss stops here, before any update."""
        with self.autocast():
            teacher_output = self.teacher_fwd(images[:2])  # only the 2 global views pass through the teacher
            student_output, student_features = self.student_fwd(images, return_features=True)
            loss, monitors = self.dino_loss(student_output, teacher_output, epoch, return_monitors=True)
            if self.cfg.koleo_loss_weight:  # DINOv2: summed over the global views, each a batch of its own
                n_global = 2 * len(images[0])
                loss = loss + self.cfg.koleo_loss_weight * sum(koleo_loss(f) for f in
                                                               student_features[:n_global].chunk(2))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, iteration {iteration}: stopping; the "
                                     f"last checkpoint is left intact")
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
            clip_gradients(self.student, self.cfg.clip_grad)
        progress = epoch + iteration / self.iterations_per_epoch
        cancel_gradients_last_layer(progress, self.student, self.cfg.freeze_last_layer)
        cancel_gradients_backbone(progress, self.student, self.freeze_backbone_epochs)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepOutput(loss_value, monitors, *(self.allreduce.take() if self.allreduce else ()))

    def update_teacher(self, momentum: float) -> None:
        update_teacher(self.student, self.teacher, momentum)


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


def precision(cfg: DINOConfig, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
    """The autocast context and the gradient scaler of every step, enabled or not: fp16 with loss scaling on CUDA
    (as the reference), bf16 as an option, fp32 on CPU (a disabled scaler passes the loss and the step through)."""
    half = device.type == "cuda" and (cfg.use_bf16 or cfg.use_fp16)
    dtype = torch.bfloat16 if cfg.use_bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=half and not cfg.use_bf16)
    return partial(torch.autocast, device.type, dtype=dtype, enabled=half), scaler


def build_step(cfg: DINOConfig, device: torch.device, world_size: int, iterations_per_epoch: int) -> DINOStep:
    """The networks (the same initial weights on every rank: seeded with ``cfg.seed``), BatchNorm synchronised
    when ``world_size > 1`` and ``cfg.sync_bn`` (as ``main_dino.py``: statistics over the global batch, so N ranks
    x B images train as 1 x N*B), the student in DDP, the loss, the optimizer and the precision settings."""
    torch.manual_seed(cfg.seed)
    student, teacher = build_student_teacher(cfg)
    if world_size > 1 and cfg.sync_bn and has_batchnorm(student):
        student, teacher = convert_sync_batchnorm(student, device.type), convert_sync_batchnorm(teacher, device.type)
    place(cfg, student, device)
    place(cfg, teacher, device)
    student_fwd: nn.Module = student
    allreduce = None
    if world_size > 1:
        student_fwd = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.index is not None
                                                          else None)
        allreduce = time_allreduce(student_fwd) if cfg.profile_allreduce else None
    teacher_fwd = teacher
    if cfg.torch_compile:
        teacher_fwd, student_fwd = torch.compile(teacher), torch.compile(student_fwd)
    dino_loss = DINOLoss(cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                         cfg.warmup_teacher_temp_epochs, cfg.epochs, centering=cfg.centering).to(device)
    autocast, scaler = precision(cfg, device)
    return DINOStep(cfg, student, teacher, student_fwd, teacher_fwd, dino_loss, build_optimizer(cfg, student),
                    autocast, scaler, iterations_per_epoch, allreduce)
