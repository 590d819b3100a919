"""Synthetic head-like scenes and cameras for tests and benchmarks (face space, centimetres)."""

from __future__ import annotations

import math

import torch

from . import Camera, Gaussians


def head_scene(n: int, seed: int = 0, radius: float = 10.0, dtype=torch.float32, device="cpu") -> Gaussians:
    """n random Gaussians in a ball of `radius` cm at the origin, scales 0.05-0.5 cm (log-uniform)."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen, dtype=dtype), dim=-1)
    tensors = (
        direction * radius * torch.rand(n, 1, generator=gen, dtype=dtype) ** (1 / 3),  # means
        torch.randn(n, 4, generator=gen, dtype=dtype),  # quats
        torch.exp(torch.empty(n, 3, dtype=dtype).uniform_(math.log(0.05), math.log(0.5), generator=gen)),
        torch.empty(n, dtype=dtype).uniform_(0.05, 0.95, generator=gen),  # opacities
        torch.rand(n, 3, generator=gen, dtype=dtype),  # colors
    )
    return Gaussians(*(t.to(device) for t in tensors))


def front_cameras(size: int, yaws_deg=(0.0,), distance: float = 50.0, dtype=torch.float32, device="cpu") -> Camera:
    """Cameras `distance` cm in front of the face (+z), turned by each yaw about the face's y axis.

    Face space is +y up, +z out of the face; OpenCV cameras look down +z with y down, so the
    frontal view flips y and z. Focal length 1.2 · size, principal point at the centre.
    """
    views = []
    for yaw in yaws_deg:
        c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
        turn = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)
        view = torch.eye(4, dtype=torch.float64)
        view[:3, :3] = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)) @ turn
        view[2, 3] = distance
        views.append(view)
    f = 1.2 * size
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]], dtype=dtype, device=device)
    return Camera(torch.stack(views).to(dtype=dtype, device=device), K, size, size)
