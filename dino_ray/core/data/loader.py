"""The pretraining DataLoader: each image once per epoch across ranks, or fixed-length epochs of a shuffled stream.

Its sampler and its workers are seeded from (seed, rank, epoch), so a resumed epoch sees the same order and crops.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from dino_ray.core.config import DINOConfig
from dino_ray.core.ranks import derived_seed


class EpochSliceSampler(Sampler[int]):
    """Fixed-length epochs (dinov2's ``OFFICIAL_EPOCH_LENGTH``): epoch ``e`` takes the ``e``-th run of
    ``per_rank x world_size`` indices from a stream of seeded permutations of the dataset, split over ranks.
    Every image is seen once per pass whatever the epoch length; short epochs give frequent checkpoints."""

    def __init__(self, size: int, per_rank: int, world_size: int, rank: int, seed: int, epoch: int,
                 start: Optional[int] = None) -> None:
        self.size, self.per_rank, self.world_size, self.rank = size, per_rank, world_size, rank
        self.seed = seed
        self.start = epoch * per_rank * world_size if start is None else start  # where in the stream it begins

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        total = self.per_rank * self.world_size
        data_pass, offset = divmod(self.start, self.size)
        stream: list[int] = []
        while len(stream) < offset + total:
            generator = torch.Generator().manual_seed(self.seed + data_pass)
            stream += torch.randperm(self.size, generator=generator).tolist()
            data_pass += 1
        return iter(stream[offset:offset + total][self.rank::self.world_size])


def build_loader(cfg: DINOConfig, rank: int, world_size: int, epoch: int, dataset: Any,
                 collate_fn: Callable[[list], Any], start: int) -> DataLoader:
    """Each image once per epoch across ranks (DistributedSampler with a shared seed), or with ``epoch_length``
    the epoch's slice of an endless shuffled stream (from ``start``, the images the run's earlier iterations took on
    all ranks, whatever the epochs' lengths); the loader's workers are seeded from (seed, rank, epoch), so a
    resumed epoch sees the same order and crops."""
    if cfg.epoch_length is not None:
        sampler: Sampler[int] = EpochSliceSampler(len(dataset), cfg.epoch_length * cfg.batch_size_per_gpu,
                                                  world_size, rank, cfg.seed, epoch, start)
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
