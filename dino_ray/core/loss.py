"""DINOLoss: cross-entropy between the centred, sharpened teacher and the student, over view pairs.

Caron et al. 2021, Eq. (1)-(2) and Sec. 3.1 (centring); the reference's ``main_dino.DINOLoss``.
Every (teacher global view, student view) pair is used except a view against itself; the centre
used is the one from before the call, then updated by EMA from the raw teacher outputs, averaged
over all ranks when a ``torch.distributed`` group is up (one process works without one).

Collapse monitors (the paper's Sec. 5.3 / Fig. 7), returned with ``return_monitors=True``: the mean
entropy h(P_t) of the teacher's output and the mean KL(P_t || P_s) over the same view pairs as the loss
(cross-entropy minus entropy). Collapse to one dimension drives both
to 0; collapse to uniform drives the entropy to log(out_dim) and the KL to 0.

DINOv2's two training improvements (Oquab et al. 2023, Sec. 4), as options on DINO v1's loss:
``centering="sinkhorn_knopp"`` replaces the centre by three Sinkhorn-Knopp normalisations of the
teacher's batch (SwAV's equipartition; the running centre is then left alone), and ``koleo_loss``
is the Kozachenko-Leonenko entropy estimator that spreads a batch's features over the sphere.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CENTERINGS = ("centering", "sinkhorn_knopp")


def _all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or ``op``) over the ranks in place when a process group is up; a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def _logsumexp(x: torch.Tensor, dim: int, across_ranks: bool) -> torch.Tensor:
    """log(sum(exp(x))) along ``dim``, summed over every rank's rows too when ``across_ranks``."""
    peak = x.amax(dim=dim, keepdim=True)
    if across_ranks:
        _all_reduce(peak, dist.ReduceOp.MAX)
    total = torch.exp(x - peak).sum(dim=dim, keepdim=True)
    if across_ranks:
        _all_reduce(total)
    return peak + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets [B, K] whose K prototypes share the (global) batch equally, each row summing to 1.

    DINOv2's ``sinkhorn_knopp_teacher``: Q = exp(t / temp) as a K x B matrix, then ``n_iterations`` times
    its rows normalised to sum 1/K (B counted over all ranks) and its columns to 1/B; the result times B.
    Computed on log Q, so that sharp teachers neither overflow nor underflow (DINOv2's exp overflows past
    logits of ~88 x temp); its first division by the total is a constant the row step absorbs.
    """
    log_q = (teacher_output.float() / teacher_temp).t()
    prototypes, batch = log_q.shape[0], log_q.shape[1] * (
        dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp(log_q, 1, across_ranks=True) - math.log(prototypes)
        log_q = log_q - _logsumexp(log_q, 0, across_ranks=False) - math.log(batch)
    return torch.exp(log_q + math.log(batch)).t()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019; DINOv2's ``KoLeoLoss``): -mean log of each l2-normalised
    feature's distance to its nearest neighbour in the batch. Minimal when the batch is spread evenly."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.t()
        similarity.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = similarity.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: a linspace warmup (endpoint included, as the reference), then flat."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "centering") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering '{centering}' is unknown (choose from {', '.join(CENTERINGS)})")
        self.centering = centering
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                return_monitors: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``student_output``: all crops stacked (ncrops x B rows); ``teacher_output``: the 2 global crops. With
        ``return_monitors``, also ``[teacher entropy, KL(teacher || student)]`` (detached, on the device)."""
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = float(self.teacher_temp_schedule[epoch])
        if self.centering == "sinkhorn_knopp":
            teacher_out = sinkhorn_knopp(teacher_output, temp).chunk(2)
        else:
            teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)

        total_loss = student_output.new_zeros(())
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue
                total_loss = total_loss + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n_loss_terms += 1
        if self.centering == "centering":
            self.update_center(teacher_output)
        loss = total_loss / n_loss_terms
        if not return_monitors:
            return loss
        with torch.no_grad():  # every teacher view is paired with ncrops - 1 student views: a plain mean matches
            q_all = torch.cat(teacher_out)
            entropy = -torch.special.xlogy(q_all, q_all).sum(dim=-1).mean()
        return loss, torch.stack([entropy, loss.detach() - entropy])

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        # Sum and row count in one all-reduce: the mean stays exact when ranks hold unequal batches.
        stats = torch.cat([teacher_output.detach().float().sum(dim=0), teacher_output.new_tensor([len(teacher_output)],
                                                                                              dtype=torch.float32)])
        _all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
