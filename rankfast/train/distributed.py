"""Process-group helpers for training under ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistContext", "distributed_context", "shard"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.world_size

    def from_main(self, obj):
        """Rank 0's ``obj``, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def distributed_context() -> DistContext:
    """The current process group; under ``torchrun`` (``WORLD_SIZE`` > 1) one is
    started if none exists: NCCL when CUDA is available, gloo otherwise."""
    if not dist.is_available():
        return DistContext()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return DistContext()
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def shard(order: np.ndarray, context: DistContext) -> np.ndarray:
    """This rank's share of ``order``: every ``world_size``-th entry, the list
    first padded by wrapping around so every rank gets as many (DDP needs
    the same number of steps on every rank)."""
    if not context.enabled:
        return order
    size = -(-len(order) // context.world_size) * context.world_size
    padded = np.resize(order, size) if len(order) else order
    return padded[context.rank :: context.world_size]
