"""Minutes, not epochs: ``budget_minutes`` sizes a run from a measured step time so that its whole schedule (warmup,
cosine, teacher momentum and temperature) completes within the budget.

The plan keeps ``epochs`` (so checkpoints, monitors and an ASHA sweep's rungs stay where the config puts them)
and chooses the iterations per epoch (``epoch_length``) of the DataLoader input (a Ray Data epoch is a whole pass
over the data: no budget there). The step time is measured on this machine, on the run's own model and input, by
a few throw-away steps before the run starts (the run itself starts from its initial weights), the slowest rank's
time on several. After each epoch, and when resumed, the run re-plans its remaining epochs from what its epochs
cost into what is left of the budget: the schedules are functions of the run's progress, so they continue where
they were.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from dino_ray.core.config import DINOConfig

log = logging.getLogger(__name__)
MARGIN = 0.97  # of the budget planned for steps: checkpoints, logging and the last partial step take the rest


@dataclass(frozen=True)
class Plan:
    """What a budget buys: iterations per epoch and epochs, from the measured seconds a step."""
    budget_minutes: float
    step_seconds: float
    epochs: int
    epoch_length: int
    spent_minutes: float = 0.0  # training minutes already behind the plan (a resumed run, a re-plan)
    epochs_done: int = 0

    @property
    def steps(self) -> int:
        """The steps still to run."""
        return (self.epochs - self.epochs_done) * self.epoch_length

    def metrics(self) -> dict[str, float]:
        """The plan beside an epoch's statistics (MLflow shows what the budget bought)."""
        return {"budget_minutes": self.budget_minutes, "plan_step_seconds": self.step_seconds,
                "plan_epoch_length": self.epoch_length, "plan_epochs": self.epochs}

    def line(self) -> str:
        left = f", {self.spent_minutes:.1f} spent on {self.epochs_done} epochs" if self.epochs_done else ""
        return (f"budget {self.budget_minutes:g} min{left}: {self.step_seconds:.3f} s a step measured -> "
                f"{self.epochs - self.epochs_done} epochs x {self.epoch_length} iterations = {self.steps} steps, about "
                f"{self.steps * self.step_seconds / 60:.1f} min of training")


def plan_budget(cfg: DINOConfig, step_seconds: float, spent_minutes: float = 0.0, epochs_done: int = 0) -> Plan:
    """The plan for ``cfg.budget_minutes`` at ``step_seconds`` a step: epochs kept and their length chosen (the
    remaining epochs, for a run that spent ``spent_minutes`` on ``epochs_done``)."""
    left = max(cfg.budget_minutes - spent_minutes, 0.0) * 60 * MARGIN
    epochs_left = max(cfg.epochs - epochs_done, 1)  # ``epochs`` stays: checkpoints, monitors, rungs keep theirs
    epoch_length = max(1, math.floor(left / step_seconds / epochs_left))
    return Plan(cfg.budget_minutes, step_seconds, cfg.epochs, epoch_length, spent_minutes, epochs_done)


def planned(cfg: DINOConfig, plan: Plan) -> DINOConfig:
    """``cfg`` with the plan's iterations per epoch."""
    return dataclasses.replace(cfg, epoch_length=plan.epoch_length)


def measure_step_seconds(run_steps: Callable[[int], None], device: torch.device, steps: int = 8, warmup: int = 2
                         ) -> float:
    """Seconds a step: ``run_steps(n)`` runs n steps; the first ``warmup`` (allocator, caches, compilation) are not
    counted. On several ranks every one measures and all take the slowest's time (the plan must be the same)."""
    run_steps(warmup)
    start = time.perf_counter()
    run_steps(steps)
    return slowest((time.perf_counter() - start) / steps, device)


def slowest(seconds: float, device: torch.device) -> float:
    """The largest ``seconds`` over the ranks of a distributed run (on ``device``: NCCL reduces CUDA tensors)."""
    value = torch.tensor([seconds], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def replanned(cfg: DINOConfig, step_seconds: float, spent_minutes: float = 0.0, epochs_done: int = 0
              ) -> tuple[DINOConfig, Plan]:
    """``plan_budget``, and the config it sizes."""
    plan = plan_budget(cfg, step_seconds, spent_minutes, epochs_done)
    return planned(cfg, plan), plan


def cycled(batches: Iterable[Any]) -> Callable[[int], Iterable[Any]]:
    """``n -> the next n batches``, starting over when the input runs out (a short epoch)."""
    source = iter(batches)

    def take(n: int) -> list[Any]:
        nonlocal source
        taken = []
        while len(taken) < n:
            try:
                taken.append(next(source))
            except StopIteration:
                source = iter(batches)
        return taken
    return take
