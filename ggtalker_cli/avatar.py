"""An adapted avatar: head model + UV Gaussian map + colour MLP, and the one way to render it.

`adapt` trains it and saves `weights.safetensors`; `synth` loads it with `Avatar.load(folder)`
and renders frames from landmarks (tracked, or `head.drive(blendshapes)` from audio), a head
pose and the blendshapes that condition the colour.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kernels import Camera, Gaussians, RenderOutput, render

from . import artifacts
from .errors import Exit, GGError
from .face_model import N_BASE, N_BLENDSHAPES, HeadModel
from .gaussians import GaussianMap
from .models.color_mlp import ColorMLP

WEIGHTS = "weights.safetensors"


class Avatar(nn.Module):
    def __init__(self, head: HeadModel, gmap: GaussianMap, color: ColorMLP):
        super().__init__()
        self.head, self.gmap, self.color = head, gmap, color

    @classmethod
    def create(cls, head: HeadModel, uv_res: int, feature_dim: int, hidden: int, seed: int) -> Avatar:
        return cls(head, GaussianMap(head, uv_res, feature_dim, seed), ColorMLP(feature_dim, hidden=hidden))

    def gaussians(self, base: Tensor, pose: Tensor, expr: Tensor) -> tuple[Gaussians, dict[str, Tensor]]:
        """Landmarks (478, 3), pose (4, 4), blendshapes (52,) -> one frame's Gaussians + raw splats;
        with a leading (B,) on all three, B frames' (Gaussians per camera, for `render`)."""
        frames = base.shape[:-2]
        if base.shape[-2:] != (N_BASE, 3) or pose.shape != frames + (4, 4) or expr.shape != frames + (N_BLENDSHAPES,):
            raise ValueError(f"landmarks {tuple(base.shape)}, poses {tuple(pose.shape)}, blendshapes {tuple(expr.shape)}: "
                             "expected (478, 3), (4, 4), (52,), each with the same leading batch dims")
        s = self.gmap.splats(self.head.vertices(base))
        colors = self.color(s["color"], s["feature"], expr, pose)
        return Gaussians(s["means"], s["quats"], s["scales"], s["opacities"], colors), s

    def render(
        self, base: Tensor, pose: Tensor, expr: Tensor, K: Tensor, size: int, background: Tensor | None = None, backend: str = "auto"
    ) -> tuple[RenderOutput, dict[str, Tensor]]:
        """Render frames seen through `pose` (face → camera) with intrinsics K at size²: one
        frame -> (1, H, W, ·) images, B frames (base (B, 478, 3), pose (B, 4, 4), expr (B, 52))
        -> (B, H, W, ·) in one vectorised pass and one rasterizer call."""
        g, s = self.gaussians(base, pose, expr)
        return render(g, Camera(pose, K, size, size), background, backend), s

    def state(self) -> dict[str, Tensor]:
        out = {f"head.{k}": v for k, v in self.head.state().items()}
        out.update(self.gmap.state())
        out.update({f"color_mlp.{k}": v for k, v in self.color.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device | str = "cpu") -> Avatar:
        head = HeadModel(**{k[5:]: v for k, v in state.items() if k.startswith("head.")}).to(device)
        gmap = GaussianMap.from_state(head, state).to(device)
        mlp = {k[10:]: v for k, v in state.items() if k.startswith("color_mlp.")}
        hidden, feature_dim = mlp["feature.weight"].shape
        color = ColorMLP(feature_dim, hidden=hidden)
        color.load_state_dict(mlp)
        return cls(head, gmap, color.to(device))

    def save(self, path: Path) -> None:
        save_file(self.state(), str(path))

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> Avatar:
        """Load an avatar folder written by `ggtalker adapt` (format-checked)."""
        artifacts.read_meta(folder, "avatar")
        path = artifacts.inside(folder, WEIGHTS)
        try:
            state = load_file(str(path))
            return cls.from_state(state, device)
        except (OSError, SafetensorError, KeyError, RuntimeError) as e:
            raise GGError(f"{path}: unreadable avatar weights ({e.__class__.__name__}); re-run ggtalker adapt", Exit.ARTIFACT) from e
