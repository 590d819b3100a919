"""The CUDA backend: gsplat's fused rasterizer, configured to match `kernels/reference.py`.

gsplat JIT-builds its CUDA extension on first use (~40 s on an H100/H200; set
TORCH_CUDA_ARCH_LIST, e.g. "9.0", and MAX_JOBS to speed it up), then caches it under
~/.cache/torch_extensions.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .reference import EPS2D


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """None when gsplat's CUDA extension loads, else why not (one line). Builds it if needed."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from gsplat.cuda._backend import _C
    except ImportError:
        return "gsplat is not installed"
    except Exception as e:  # the JIT build failed: compiler missing, version mismatch...
        last_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        return f"its CUDA extension failed to build: {last_line[:200]}"
    return None if _C is not None else "no CUDA toolkit (nvcc) found to build its extension"


def render(
    means: Tensor,  # (N, 3) shared by the cameras, or (B, N, 3) one scene per camera; quats... alike
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,  # (B, N, D)
    viewmats: Tensor,  # (B, 4, 4)
    Ks: Tensor,  # (B, 3, 3)
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e4,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """-> rgb (B,H,W,D), alpha (B,H,W,1), expected depth (B,H,W,1), aux (B,N,...); no background.

    Per-camera scenes go through gsplat's leading batch dims, B scenes of one camera each (outputs
    (B, 1, ...)), so all B images still take one projection, one tile sort and one raster launch.
    """
    from gsplat import rasterization

    per_camera = means.dim() == 3
    if per_camera:
        viewmats, Ks = viewmats[:, None], Ks[:, None]
    out, alpha, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near, far_plane=far, eps2d=EPS2D, packed=False, render_mode="RGB+ED",
        rasterize_mode="classic", sh_degree=None,
    )
    aux = {k: meta[k] for k in ("radii", "means2d", "depths", "conics")}
    if per_camera:  # (B, 1, ...) -> (B, ...)
        out, alpha = out[:, 0], alpha[:, 0]
        aux = {k: v[:, 0] for k, v in aux.items()}
    return out[..., :-1], alpha, out[..., -1:], aux
