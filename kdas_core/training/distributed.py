"""torchrun (DDP) support: one process per GPU, rank 0 writes files and validates."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kdas_core.cli.conventions import require_device


def setup(device_choice: str | None) -> tuple[torch.device, int, int]:
    """(device, rank, world_size). Initialises the process group when launched by torchrun
    (one GPU per process: LOCAL_RANK picks it; a single process takes cuda:N as asked)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = require_device(device_choice)
    want_cuda = device.startswith("cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", device.split(":")[1] if ":" in device else "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def any_across(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks must agree on when to stop."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
