"""The distributed layer: a ``Communicator`` over a ``torch.distributed`` process group.

The math core shards examples contiguously over ranks (no padded duplicates) and calls only
``all_reduce_sum`` (Hessian-vector products, flags) and ``all_gather_rows`` (score shards, query
gradients). With NCCL the collectives run on the rank's GPU; tensors come back where they were.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .core.comm import Communicator, LocalComm


class TorchComm:
    """Collectives of the default process group, on ``device`` (the rank's GPU for NCCL, else CPU)."""

    def __init__(self, device: Optional[torch.device] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchComm needs an initialised torch.distributed process group.")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self.device = torch.device(device) if device is not None and backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach().to(self.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(tensor.device)

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach().to(self.device).contiguous()
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=self.device))
        rows = [int(s.item()) for s in sizes]
        padded = torch.zeros((max(rows), *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[:r] for o, r in zip(out, rows)]).to(tensor.device)


def current_comm(device: Optional[torch.device] = None) -> Communicator:
    """``TorchComm`` inside an initialised process group of more than one rank, else ``LocalComm``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchComm(device)
    return LocalComm()
