"""Pure-PyTorch differentiable 3D Gaussian rasterizer: the CPU backend and the specification.

It follows gsplat 1.5.3's "classic" 3DGS semantics so the two backends agree (tests/test_kernels.py):
EWA projection (Jacobian clamped a little beyond the field of view), a 0.3 px² low-pass added to
every 2D covariance (no opacity compensation), opacity-aware 3.33σ radii, pixel centres at
(x + 0.5, y + 0.5), front-to-back compositing in camera-z order with
alpha = min(0.999, opacity · exp(-½ dᵀΣ⁻¹d)), contributions with alpha < 1/255 skipped and a
pixel finished (exclusive) as soon as its transmittance would drop to 1e-4 or below.

Instead of gsplat's per-pixel loop over tiles it works on (Gaussian, pixel) pairs: for every
Gaussian and row it lists the pixels inside the ellipse where alpha >= 1/255, sorts the pairs
by pixel (stable, so depth order survives) and composites with a segmented cumulative sum of
log(1 - alpha). Work is proportional to the pairs that matter, not to pixels × Gaussians, and
autograd provides the backward pass (one hand-written piece). Rows are split into bands of at
most `budget` pairs; with several bands each is checkpointed (recomputed in backward), so peak
memory stays bounded at any resolution. Gaussians are shared by the B cameras ((N, ...)) or
given per camera ((B, N, ...)): projection broadcasts either against the cameras, and
rasterization runs camera by camera anyway.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

EPS2D = 0.3  # px², low-pass added to every projected covariance
ALPHA_MIN = 1.0 / 255.0  # contributions below are skipped
ALPHA_MAX = 0.999  # per-Gaussian alpha clamp
T_MIN = 1e-4  # a pixel stops before its transmittance would reach this
EXTEND = 3.33  # footprint radius in σ (capped by the opacity-aware bound)
BUDGET = 1 << 20  # pairs per band, estimated from the boxes (~1M: ~300 MB peak with grads)


class Projection(NamedTuple):
    """Per camera and Gaussian, (B, N, ...); culled Gaussians have radii == 0."""

    means2d: Tensor  # (B, N, 2) pixels
    conics: Tensor  # (B, N, 3) upper triangle of the inverse 2D covariance (a, b, c)
    depths: Tensor  # (B, N) camera z
    radii: Tensor  # (B, N, 2) int32, gsplat's ceil'd box half-sizes
    extent: Tensor  # (B, N, 2) float box half-sizes (not rounded, no grad)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """(..., 4) wxyz, any norm -> (..., 3, 3)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


def project(
    means: Tensor,  # (N, 3) or (B, N, 3) world
    quats: Tensor,  # (N, 4) or (B, N, 4)
    scales: Tensor,  # (N, 3) or (B, N, 3)
    opacities: Tensor,  # (N,) or (B, N)
    viewmats: Tensor,  # (B, 4, 4) world -> camera
    Ks: Tensor,  # (B, 3, 3)
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e4,
) -> Projection:
    """EWA splatting: Σ2d = J W Σ Wᵀ Jᵀ + 0.3·I, with culling exactly as gsplat does it."""
    R, t = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]  # (B, 1, 3, 3), (B, 1, 3)
    means_c = (R @ means[..., None]).squeeze(-1) + t  # (B, N, 3)
    M = R @ (quat_to_rotmat(quats) * scales[..., None, :])  # (B, N, 3, 3): Σ_c = M Mᵀ
    x, y, z = means_c.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # (B, 1)
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # gsplat evaluates the Jacobian with x/z, y/z clamped to 0.3 half-FOV tangents beyond the
    # image edges, which keeps Gaussians far off-axis from exploding into huge footprints.
    lim_x, lim_y = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
    tx = z * torch.minimum(torch.maximum(x / z, -cx / fx - lim_x), (width - cx) / fx + lim_x)
    ty = z * torch.minimum(torch.maximum(y / z, -cy / fy - lim_y), (height - cy) / fy + lim_y)
    zeros = torch.zeros_like(z)
    J = torch.stack([fx / z, zeros, -fx * tx / z**2, zeros, fy / z, -fy * ty / z**2], -1)
    JM = J.reshape(z.shape + (2, 3)) @ M  # (B, N, 2, 3)
    cov = JM @ JM.transpose(-1, -2)
    a, b, c = cov[..., 0, 0] + EPS2D, cov[..., 0, 1], cov[..., 1, 1] + EPS2D
    det = a * c - b * b
    conics = torch.stack([c, -b, a], -1) / det.clamp(min=1e-10)[..., None]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)

    with torch.no_grad():
        # Opacity-aware radius (gsplat, arXiv 2402.00525 B.2): beyond it alpha < 1/255 anyway.
        o = opacities.clamp(min=ALPHA_MIN).expand_as(z)
        extend = torch.sqrt(2 * torch.log(o / ALPHA_MIN)).clamp(max=EXTEND)
        extent = extend[..., None] * torch.stack([a, c], -1).clamp(min=0).sqrt()
        radii = torch.ceil(extent)
        mx, my = means2d.unbind(-1)
        visible = (
            (z >= near) & (z <= far) & (det > 0) & (opacities >= ALPHA_MIN)
            & (mx + radii[..., 0] > 0) & (mx - radii[..., 0] < width)
            & (my + radii[..., 1] > 0) & (my - radii[..., 1] < height)
        )
        radii = (radii * visible[..., None]).int()
        extent = extent * visible[..., None]
    return Projection(means2d, conics, z, radii, extent)


def _bands(rows: Tensor, width_px: Tensor, height: int, budget: int) -> list[tuple[int, int]]:
    """Split [0, height) into consecutive row bands of at most ~budget (box-estimated) pairs."""
    per_row = torch.zeros(height + 1, dtype=width_px.dtype, device=width_px.device)
    per_row.index_add_(0, rows[:, 0], width_px).index_add_(0, rows[:, 1], -width_px)
    bands, start, acc = [], 0, 0
    for row, n in enumerate(per_row.cumsum(0)[:height].tolist()):
        if acc + n > budget and row > start:
            bands.append((start, row))
            start, acc = row, 0
        acc += n
    return bands + [(start, height)]


def _segments(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For counts (S,), -> the segment of every element and its index inside the segment."""
    seg = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = (counts.cumsum(0) - counts).index_select(0, seg)
    return seg, torch.arange(len(seg), device=counts.device) - starts


class Pairs(NamedTuple):
    """(Gaussian, pixel) pairs of one band, sorted by pixel then depth; all (M,) but `lengths`."""

    gid: Tensor  # index into the band's Gaussians (depth order)
    px: Tensor  # pixel centre x
    py: Tensor  # pixel centre y
    first: Tensor  # index of the first pair of the same pixel
    last: Tensor  # index of the last pair of the same pixel
    lengths: Tensor  # (n_pix,) pairs per pixel of the band


def _pairs(ell: Tensor, rows: Tensor, ya: int, yb: int, width: int) -> Pairs:
    """The pairs of rows [ya, yb) where alpha may reach 1/255.

    ell (G, 6): mx, my, conic A, B, C and L = ln(255 · opacity) of Gaussians in depth order;
    rows (G, 2) their row range [y0, y1). On each row, alpha >= 1/255 <=> ½(A dx² + 2B dx dy +
    C dy²) <= L, an interval of dx: only its pixels are listed (plus a 0.01 px margin, the exact
    test is in `_composite`), so no work is spent on the corners of the 3σ boxes.
    """
    y0 = rows[:, 0].clamp(min=ya)
    seg, k = _segments((rows[:, 1].clamp(max=yb) - y0).clamp(min=0))
    # index_select, not x[idx]: advanced indexing is several times slower on CPU
    y = y0.index_select(0, seg) + k
    mx, my, A, B, C, L = ell.index_select(0, seg).unbind(-1)
    dy = y + 0.5 - my
    disc = 2 * A * L - (A * C - B * B) * dy * dy
    half = torch.sqrt(disc.clamp(min=0)) / A + 0.01
    centre = mx - B * dy / A - 0.5  # pixel x whose centre is the interval's midpoint
    x0 = torch.ceil(centre - half).clamp(0, width).long()
    x1 = (torch.floor(centre + half) + 1).clamp(0, width).long()
    pair_seg, k = _segments(torch.where(disc >= 0, x1 - x0, 0).clamp(min=0))
    pix = ((y.index_select(0, pair_seg) - ya) * width + x0.index_select(0, pair_seg) + k).int()
    pix, order = torch.sort(pix, stable=True)  # int32: radix sort, ~3x faster than int64
    lengths = torch.bincount(pix, minlength=(yb - ya) * width)
    ends = lengths.cumsum(0)
    return Pairs(
        gid=seg.index_select(0, pair_seg.index_select(0, order)),
        px=(pix % width).to(ell.dtype) + 0.5,
        py=torch.div(pix, width, rounding_mode="floor").to(ell.dtype) + (ya + 0.5),
        first=(ends - lengths).index_select(0, pix),
        last=ends.index_select(0, pix) - 1,
        lengths=lengths,
    )


class _SegmentCumsum(torch.autograd.Function):
    """Exclusive cumsum inside each pixel's run of pairs: log T in front of every pair.

    Runs a global float64 cumsum (the global sum grows with the pairs) and subtracts the value
    at each run's start. Hand-written backward: the reverse cumsum inside each run, cheaper than
    autograd's way through the gather (a scatter into a zero-filled copy).
    """

    @staticmethod
    def forward(ctx, x: Tensor, first: Tensor, last: Tensor) -> Tensor:
        ctx.save_for_backward(last)
        before = torch.cumsum(x.double(), -1) - x
        return (before - before.index_select(-1, first)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (last,) = ctx.saved_tensors
        after = torch.cumsum(grad.double(), -1)
        return (after.index_select(-1, last) - after).to(grad.dtype), None, None


def _composite(table: Tensor, pairs: Pairs) -> Tensor:
    """Front-to-back compositing -> (n_pix, F): Σ weight · features per pixel.

    table (6 + F, G), one row per quantity so every per-pair vector is contiguous (3x faster
    gathers and gradients than (G, 6 + F)): mx, my, A/2, B, C/2, ln(opacity), features (the
    last one all 1, for alpha).
    """
    g = table.index_select(1, pairs.gid)
    mx, my, a, b, c, log_op, feats = g.split([1, 1, 1, 1, 1, 1, len(table) - 6], 0)
    dx, dy = pairs.px - mx, pairs.py - my
    sigma = (a * dx + b * dy) * dx + c * dy * dy
    alpha = torch.exp(log_op - sigma).clamp(max=ALPHA_MAX)
    alpha = alpha * (alpha >= ALPHA_MIN)  # skipped: no colour, no attenuation
    log_t = torch.log1p(-alpha)
    log_T = _SegmentCumsum.apply(log_t, pairs.first, pairs.last)  # transmittance in front
    alive = (log_T + log_t).detach() > math.log(T_MIN)  # gsplat stops when next T <= 1e-4
    weight = alpha * torch.exp(log_T) * alive
    # pairs are grouped by pixel: a segment sum is several times faster than index_add on CPU
    lengths = pairs.lengths.expand(len(feats), -1)
    return torch.segment_reduce(weight * feats, "sum", lengths=lengths, axis=1).T


def _band(table: Tensor, ell: Tensor, rows: Tensor, ya: int, yb: int, width: int) -> Tensor:
    with torch.no_grad():
        pairs = _pairs(ell, rows, ya, yb, width)
    return _composite(table, pairs)


def rasterize(
    proj: Projection,
    opacities: Tensor,  # (N,) or (B, N)
    features: Tensor,  # (B, N, D)
    width: int,
    height: int,
    budget: int = BUDGET,
) -> tuple[Tensor, Tensor]:
    """-> accumulated features (B, H, W, D) and alpha (B, H, W, 1), no background."""
    images = []
    opacities = opacities.expand_as(proj.depths)
    for b in range(features.shape[0]):
        idx = torch.nonzero(proj.radii[b, :, 0] > 0).squeeze(1)
        idx = idx[torch.argsort(proj.depths[b, idx].detach(), stable=True)]
        means2d, conics, op = proj.means2d[b, idx], proj.conics[b, idx], opacities[b, idx, None]
        half = torch.tensor([0.5, 1.0, 0.5], dtype=conics.dtype, device=conics.device)
        ones = torch.ones_like(op)
        table = torch.cat([means2d, conics * half, torch.log(op), features[b, idx], ones], 1).T
        with torch.no_grad():
            ell = torch.cat([means2d, conics, torch.log(op / ALPHA_MIN)], 1)
            ey = proj.extent[b, idx, 1]
            rows = torch.stack(  # rows whose pixel centre is within the box: |y + 0.5 - my| <= ey
                [torch.ceil(means2d[:, 1] - ey - 0.5), torch.floor(means2d[:, 1] + ey - 0.5) + 1], 1
            ).clamp(0, height).long()
            rows[:, 1] = torch.maximum(rows[:, 1], rows[:, 0])
            bands = _bands(rows, torch.ceil(2 * proj.extent[b, idx, 0]).long(), height, budget)

        # With several bands, recompute each in backward instead of keeping all pairs alive.
        chunked = len(bands) > 1 and table.requires_grad
        parts = [
            checkpoint(_band, table, ell, rows, ya, yb, width, use_reentrant=False)
            if chunked
            else _band(table, ell, rows, ya, yb, width)
            for ya, yb in bands
        ]
        images.append(torch.cat(parts, 0).reshape(height, width, -1))
    out = torch.stack(images)
    return out[..., :-1], out[..., -1:]


def render(
    means: Tensor,  # (N, 3) or (B, N, 3), and so on: shared or per camera
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
    budget: int = BUDGET,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """-> rgb (B,H,W,D), alpha (B,H,W,1), expected depth (B,H,W,1), aux; no background."""
    proj = project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far)
    features = torch.cat([colors, proj.depths[..., None]], -1)
    acc, alpha = rasterize(proj, opacities, features, width, height, budget)
    depth = acc[..., -1:] / alpha.clamp(min=1e-10)  # gsplat's "ED"
    aux = {"radii": proj.radii, "means2d": proj.means2d, "depths": proj.depths, "conics": proj.conics}
    return acc[..., :-1], alpha, depth, aux
