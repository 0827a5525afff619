"""Which rank this process is, and the randomness each (seed, rank, epoch) draws."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


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
