"""Gaussian rendering: one `render()` with a CUDA backend (gsplat) and a pure-PyTorch reference.

Both backends share gsplat's classic 3DGS semantics (see `kernels/reference.py`), so a model
trained on one renders the same on the other; tests/test_kernels.py checks the parity.

A scene is either shared by all cameras (means (N, 3), ...) or given per camera (means
(B, N, 3), ...: camera b sees scene b). The second renders B different frames of a deforming
head in one call, where one call per frame would cost more in launches than in rasterization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ggtalker_cli.errors import Exit, GGError

from . import gsplat_backend, reference

__all__ = ["Gaussians", "Camera", "RenderOutput", "render"]


@dataclass
class Gaussians:
    """N Gaussians in world space (face space, cm). Activated values: no log/sigmoid here.

    Shared by all cameras, or one scene per camera with a leading (B,) on every field.
    """

    means: Tensor  # (N, 3) or (B, N, 3)
    quats: Tensor  # (N, 4) or (B, N, 4) wxyz, any norm
    scales: Tensor  # (N, 3) or (B, N, 3) linear standard deviations
    opacities: Tensor  # (N,) or (B, N) in [0, 1]
    colors: Tensor  # (N, D) or (B, N, D) per camera, usually D = 3

    def __len__(self) -> int:
        return self.means.shape[-2]


@dataclass
class Camera:
    """Pinhole camera(s), OpenCV convention: viewmat is world -> camera, K in pixels."""

    viewmat: Tensor  # (4, 4) or (B, 4, 4)
    K: Tensor  # (3, 3) or (B, 3, 3)
    width: int
    height: int

    def batched(self) -> tuple[Tensor, Tensor]:
        """-> viewmats (B, 4, 4), Ks (B, 3, 3), a single one broadcast to the other's batch."""
        viewmats, Ks = self.viewmat.reshape(-1, 4, 4), self.K.reshape(-1, 3, 3)
        B = max(len(viewmats), len(Ks))
        if len(viewmats) not in (1, B) or len(Ks) not in (1, B):
            raise ValueError(f"camera batch mismatch: {len(viewmats)} viewmats, {len(Ks)} Ks")
        return viewmats.expand(B, 4, 4), Ks.expand(B, 3, 3)


@dataclass
class RenderOutput:
    rgb: Tensor  # (B, H, W, D), background composited
    alpha: Tensor  # (B, H, W, 1) accumulated opacity
    depth: Tensor  # (B, H, W, 1) expected camera z, Σ w·z / Σ w (0 where nothing is drawn)
    aux: dict = field(default_factory=dict)  # radii (B,N,2) int32, means2d (B,N,2), depths (B,N), conics (B,N,3)


def render(
    gaussians: Gaussians,
    camera: Camera,
    background: Tensor | None = None,
    backend: str = "auto",
    near: float = 0.01,
    far: float = 1e4,
) -> RenderOutput:
    """Render B views. background: None (black), (D,) colour or (B, H, W, D) images.

    Per-camera Gaussians (a leading (B,) on every field) need exactly one camera per scene.

    backend "auto" takes gsplat for CUDA tensors when it loads, else the reference; "torch" and
    "gsplat" force one. `aux["means2d"]` is the tensor the 2D positional gradients land in
    (call `.retain_grad()` on it before backward for densification).
    """
    g = gaussians
    viewmats, Ks = camera.batched()
    B = len(viewmats)
    if g.means.dim() not in (2, 3) or g.means.shape[-1] != 3:
        raise ValueError(f"Gaussians.means has shape {tuple(g.means.shape)}, expected (N, 3) or (B, N, 3)")
    N = len(g)
    scenes = tuple(g.means.shape[:-2])  # () shared, (S,) one scene per camera
    if scenes not in ((), (B,)):
        raise ValueError(f"{scenes[0]} per-camera scenes for {B} cameras: pass one camera per scene")
    shapes = {"means": (N, 3), "quats": (N, 4), "scales": (N, 3), "opacities": (N,)}
    for name, shape in shapes.items():
        if tuple(getattr(g, name).shape) != scenes + shape:
            raise ValueError(f"Gaussians.{name} has shape {tuple(getattr(g, name).shape)}, expected {scenes + shape}")
    colors = g.colors[None].expand(B, -1, -1) if g.colors.dim() == 2 else g.colors
    if colors.dim() != 3 or colors.shape[:2] != (B, N):
        raise ValueError(f"Gaussians.colors has shape {tuple(g.colors.shape)} for {B} cameras and {N} Gaussians")

    if backend == "auto":
        backend = "gsplat" if g.means.is_cuda and gsplat_backend.unavailable() is None else "torch"
    args = (g.means, g.quats, g.scales, g.opacities, colors, viewmats, Ks, camera.width, camera.height, near, far)
    if backend == "torch":
        rgb, alpha, depth, aux = reference.render(*args)
    elif backend == "gsplat":
        if not g.means.is_cuda:
            raise GGError("the gsplat backend needs CUDA tensors: render on a CUDA device, or "
                          "pass backend=\"torch\" on CPU (the verbs choose with --device)", Exit.RESOURCE)
        reason = gsplat_backend.unavailable()
        if reason is not None:
            raise GGError(
                f"gsplat is unavailable ({reason}): pip install 'ggtalker[cuda]' (gsplat==1.5.3) with a CUDA "
                "toolkit (nvcc) for its first-run build, or pass backend=\"torch\" (the default backend=\"auto\" falls back to it)",
                Exit.RESOURCE,
            )
        rgb, alpha, depth, aux = gsplat_backend.render(*args)
    else:
        raise ValueError(f"unknown backend {backend!r}: expected auto, torch or gsplat")
    if background is not None:
        rgb = rgb + (1 - alpha) * background.to(rgb)
    return RenderOutput(rgb, alpha, depth, aux)
