"""The gradient all-reduce of a step, timed: what scaling out costs in communication.

DistributedDataParallel all-reduces the gradients bucket by bucket while the backward pass runs, so its cost
hides inside the step's time. ``AllReduceTimer`` replaces DDP's default hook by one that does the same
all-reduce and average, but synchronously, and counts its seconds and bytes: the step then shows compute and
communication apart (``profile_allreduce: true``). Synchronous means no overlap with the backward pass, so a
profiled step is a little slower than a normal one: for measuring, not for training speed. (No postponed
annotations here: DDP checks the hook's annotations as objects.)
"""

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class AllReduceTimer:
    seconds: float = 0.0
    bytes: int = 0

    def take(self) -> tuple[float, int]:
        """The seconds and bytes since the last ``take``."""
        taken = self.seconds, self.bytes
        self.seconds, self.bytes = 0.0, 0
        return taken


def timed_allreduce(timer: AllReduceTimer, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce and average of one gradient bucket, done at once and timed."""
    tensor = bucket.buffer()
    start = time.perf_counter()
    dist.all_reduce(tensor)
    tensor.div_(dist.get_world_size())
    timer.seconds += time.perf_counter() - start
    timer.bytes += tensor.numel() * tensor.element_size()
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(tensor)
    return done


def time_allreduce(ddp: nn.parallel.DistributedDataParallel) -> AllReduceTimer:
    """Register the timed hook on ``ddp``; returns the timer it adds to."""
    timer = AllReduceTimer()
    ddp.register_comm_hook(timer, timed_allreduce)
    return timer
