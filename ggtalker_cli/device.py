"""The one place a `--device` name becomes a torch device (every verb and bench script uses it),
and where a torchrun launch becomes a (rank, world size, device)."""

from __future__ import annotations

import os

import torch

from .errors import Exit, GGError


def device_of(name: str) -> torch.device:
    """`auto` (CUDA when PyTorch sees it, else the CPU), `cpu`, `cuda` or `cuda:N`; a CUDA name
    without CUDA is a RESOURCE error, anything else a USAGE error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise GGError(f"--device {name}: expected cpu, cuda or auto", Exit.USAGE)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GGError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu or a GPU machine", Exit.RESOURCE)
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What meta.yaml and reports record as the device: the GPU's name, or cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def distributed(device: str | None) -> tuple[int, int, str]:
    """(rank, world size, device): torch.distributed is initialised when torchrun launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, str(device_of(device or "auto"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, device or "cpu"
