"""Motion-aligned colour: per-Gaussian colour as a function of expression and head pose.

A static colour cannot show what changes with the face: wrinkles, shading that moves with the
head, the mouth interior that only exists when the lips part. The MLP adds a residual to each
Gaussian's base colour from its feature vector, the 52 blendshapes and the head rotation.

The condition (expression, pose) is shared by all Gaussians of a frame, so the first layer is
split: the condition's share is computed once per frame and broadcast, the feature's share once
per Gaussian. The output layer starts at zero, so a fresh MLP leaves the base colours untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POSE_DIM = 6  # first two columns of the head rotation (continuous, unlike Euler angles)


def pose_6d(pose: Tensor) -> Tensor:
    """(..., 4, 4) face→camera poses -> (..., 6) rotation features."""
    return pose[..., :3, :2].transpose(-1, -2).reshape(pose.shape[:-2] + (6,))


class ColorMLP(nn.Module):
    def __init__(self, feature_dim: int, expr_dim: int = 52, hidden: int = 64):
        super().__init__()
        self.feature = nn.Linear(feature_dim, hidden)
        self.condition = nn.Linear(expr_dim + POSE_DIM, hidden, bias=False)
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, base: Tensor, features: Tensor, expr: Tensor, pose: Tensor) -> Tensor:
        """base (N, 3) colour logits, features (N, F), expr (..., 52), pose (..., 4, 4) -> (..., N, 3)
        RGB: one frame, or a batch of frames sharing the per-Gaussian half of the first layer."""
        cond = self.condition(torch.cat([expr, pose_6d(pose)], -1))  # (..., H)
        # in-place ReLUs: a batch of frames makes (B, N, H) activations, and on CPU every fresh
        # buffer that large costs more in page faults than the arithmetic filling it
        h = (self.feature(features) + cond[..., None, :]).relu_()  # (..., N, H)
        h = self.hidden(h).relu_()
        return torch.sigmoid(base + self.out(h))
