"""The collective operations the math core needs, behind a tiny interface.

The core never imports ``torch.distributed``: a ``Communicator`` is handed in. ``LocalComm`` is the
single-process one; ``lightning_msif.distributed.TorchComm`` wraps a process group.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Communicator(Protocol):
    """What a sharded computation needs from its process group."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all ranks (returned on every rank)."""

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's ``tensor``, in rank order; row counts may differ."""


class LocalComm:
    """The single-process communicator: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous, duplicate-free share of ``range(n)`` for ``rank`` (sizes differ by at most one)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)
