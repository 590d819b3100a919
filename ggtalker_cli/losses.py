"""Training losses shared by the stages that fit images (adapt, the E2V prior, the inpainter).

The SSIM itself is `metrics.ssim_map` (differentiable, valid windows only), so a loss and the
reported metric can never disagree about what SSIM means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .metrics import ssim_map


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM of (B, H, W, C) images in [0, 1], differentiable."""
    return ssim_map(pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)).mean()


def photometric(pred: Tensor, target: Tensor, ssim_weight: float) -> Tensor:
    """(1 − w)·L1 + w·(1 − SSIM), the 3DGS image loss, on (B, H, W, C) images in [0, 1]."""
    l1 = (pred - target).abs().mean()
    return (1 - ssim_weight) * l1 + ssim_weight * (1 - ssim(pred, target))


def hinge_sq(x: Tensor, limit: float) -> Tensor:
    """Mean of relu(x − limit)²: free below the limit, a quadratic wall above it."""
    return torch.relu(x - limit).square().mean()
