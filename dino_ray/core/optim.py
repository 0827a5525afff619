"""Schedules, parameter groups, per-parameter clipping, last-layer freezing and LARS.

The reference's ``utils.py`` helpers with the same names and semantics: the warmup ``linspace`` with its endpoint,
the unscaled ``min_lr``, clipping per parameter, weight decay on every tensor of 2+ dimensions, and the frozen last
layer skipped by the optimizer (see the documentation's "Differences from the reference").
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: float = 0, start_warmup_value: float = 0) -> np.ndarray:
    """One value per iteration: linear warmup (endpoint included) then a half cosine to ``final_value``.

    As the reference: the warmup is ``np.linspace`` with its endpoint, so ``base_value`` appears at the
    last warmup iteration and again at the first cosine one; the cosine never quite reaches the end.
    A fractional ``warmup_epochs`` (dino-ray) warms up for that share of an epoch's iterations.
    """
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two groups: weight-decayed (every tensor of 2+ dims) and not (biases, norms, other 1-D tensors)."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient to norm <= ``clip`` on its own; returns the pre-clip norms.

    Same math as the reference's loop, without one host sync per parameter.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    for grad, coef in zip(grads, coefs):
        grad.mul_(coef)
    return norms


def cancel_gradients_last_layer(epoch: float, model: nn.Module, freeze_last_layer: float) -> None:
    """During the first ``freeze_last_layer`` epochs drop the prototypes' gradients (no step, no decay).

    ``epoch`` may be fractional (iteration / iterations per epoch): with integer epochs and an integer
    ``freeze_last_layer`` this freezes exactly the reference's iterations; a fraction freezes part of one."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


def cancel_gradients_backbone(epoch: float, model: nn.Module, freeze_backbone_epochs: float) -> None:
    """During the first ``freeze_backbone_epochs`` epochs drop the backbone's gradients: a fresh head learns on
    pretrained features before its first, large gradients can reach them (continued pretraining)."""
    if epoch >= freeze_backbone_epochs:
        return
    for param in model.backbone.parameters():
        param.grad = None


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA of the student's parameters into the teacher's (buffers are not averaged, as the reference)."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as the reference uses it: no decay or adaptation for 1-D parameters."""

    def __init__(self, params: Iterable, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0.0,
                                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                                        one)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
