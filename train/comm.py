"""Every collective of the training code, on the engine's device.

NCCL only takes tensors on the GPU, gloo on the CPU: each helper makes its tensor on the
``device`` it is given (the engine's), so a flag or scalar never crosses backends by
accident. No other module calls ``torch.distributed`` collectives (a test enforces it).
Without an initialized process group every helper is the single-process identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def agree(flag: bool, device: torch.device | str = "cpu", *, everyone: bool = True) -> bool:
    """True when ``flag`` holds on every rank (``everyone``) or on any rank (``everyone=False``)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if everyone else dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank0(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's ``flag`` on every rank (decisions one clock or one filesystem view makes for all)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(obj: object) -> object:
    """Rank 0's picklable ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(values: list[float] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Element-wise mean over ranks (float64, returned on the CPU)."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().to(device).clone().reshape(-1)
    if active():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.cpu()


def gather(values: torch.Tensor, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Every rank's copy of ``values`` (same shape on all ranks), rank order, on the CPU."""
    t = values.detach().to(device)
    if not active():
        return [t.cpu()]
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def barrier() -> None:
    if active():
        dist.barrier()
