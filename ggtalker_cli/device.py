"""The one place a `--device` name becomes a torch device (every verb and bench script uses it)."""

from __future__ import annotations

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


