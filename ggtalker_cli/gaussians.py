"""Gaussians bound to head triangles, stored as a UV Gaussian map; and the 3DGS PLY export.

The head's parameters live in one (C, R, R) tensor laid over the head's UV atlas
(`face_model.CHARTS`): every texel whose centre falls inside a triangle's UV footprint is one
Gaussian, bound to that triangle at the texel's barycentric coordinates. A network can then
predict a whole head as an image (the expression→visual prior), and adaptation optimises the
same map. Channels (`GROUPS`, then per-Gaussian features), all in the triangle's local frame
(GaussianAvatars):

    position = Σ bary·v_tri + s_tri · R_tri · offset      rotation = R_tri · quat
    scale    = s_tri · exp(log_scale)                     opacity  = sigmoid(opacity_logit)
    colour   = sigmoid(color_logit + color MLP(feature, expression, pose))

Densification and pruning are deliberately simple: `prune()` drops texels whose opacity fell
below a threshold (they stay in the map, masked out), and `upsample()` doubles the map's
resolution (4 children per texel, copies of the parent at half the scale) when the fit needs
more Gaussians, the UV-map analogue of 3DGS's clone step.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .face_model import HeadModel, triangle_frames

FEATURE_DIM = 16
# Channel groups of the map, in order; each is its own parameter so it gets its own learning rate.
GROUPS = {"offset": 3, "quat": 4, "log_scale": 3, "opacity": 1, "color": 3}  # then "feature"
INIT_SIZE = 0.5  # initial in-plane σ over the texel spacing: smooth coverage, little overdraw
NORMAL_SQUASH = 0.5  # initial thickness along the normal relative to the in-plane size
INIT_OPACITY = 0.7
SH_C0 = 0.28209479177387814  # 3DGS stores colour as a degree-0 SH coefficient


def rasterize_uv(face_uvs: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a res² atlas.

    face_uvs (F, 3, 2) triangle corners in [0, 1]² (u right, v down). Returns, for the covered
    texels in row-major order: flat texel index (N,), triangle id (N,), barycentrics (N, 3).
    A texel on a shared edge goes to the first triangle that claims it.
    """
    owner = np.full(res * res, -1, np.int64)
    bary = np.zeros((res * res, 3), np.float32)
    corners = face_uvs.astype(np.float64) * res - 0.5  # texel-centre coordinates
    for f, (a, b, c) in enumerate(corners):
        lo = np.maximum(np.floor(np.minimum(np.minimum(a, b), c)).astype(int), 0)
        hi = np.minimum(np.ceil(np.maximum(np.maximum(a, b), c)).astype(int), res - 1)
        if (hi < lo).any():
            continue
        xs, ys = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
        p = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
        det = (b[1] - c[1]) * (a[0] - c[0]) + (c[0] - b[0]) * (a[1] - c[1])
        if abs(det) < 1e-12:
            continue
        l0 = ((b[1] - c[1]) * (p[:, 0] - c[0]) + (c[0] - b[0]) * (p[:, 1] - c[1])) / det
        l1 = ((c[1] - a[1]) * (p[:, 0] - c[0]) + (a[0] - c[0]) * (p[:, 1] - c[1])) / det
        l2 = 1 - l0 - l1
        inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        flat = (p[inside, 1] * res + p[inside, 0]).astype(np.int64)
        free = owner[flat] < 0
        owner[flat[free]] = f
        bary[flat[free]] = np.stack([l0, l1, l2], -1)[inside][free]
    texel = np.nonzero(owner >= 0)[0]
    return texel, owner[texel], bary[texel]


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of (..., 4) wxyz quaternions: rotation a after rotation b."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )


def rotmat_to_quat(R: Tensor) -> Tensor:
    """(..., 3, 3) rotations -> (..., 4) unit wxyz quaternions.

    Each of the four textbook formulas divides by one of |w|, |x|, |y|, |z|; taking, per matrix,
    the one with the largest denominator keeps it accurate and its gradient finite everywhere.
    """
    m = R.reshape(-1, 3, 3)
    m00, m01, m02 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    m10, m11, m12 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    m20, m21, m22 = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    four_sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    root = four_sq.clamp(min=1e-8).sqrt()  # 2|w|, 2|x|, 2|y|, 2|z|
    candidates = torch.stack(
        [
            torch.stack([root[:, 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1) / (2 * root[:, 0:1]),
            torch.stack([m21 - m12, root[:, 1] ** 2, m10 + m01, m02 + m20], -1) / (2 * root[:, 1:2]),
            torch.stack([m02 - m20, m10 + m01, root[:, 2] ** 2, m12 + m21], -1) / (2 * root[:, 2:3]),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, root[:, 3] ** 2], -1) / (2 * root[:, 3:4]),
        ],
        1,
    )  # (M, 4 candidates, 4)
    best = four_sq.argmax(-1)
    q = candidates[torch.arange(len(m)), best]
    return F.normalize(q, dim=-1).reshape(R.shape[:-2] + (4,))


class GaussianMap(nn.Module):
    """A UV Gaussian map bound to a HeadModel; one Gaussian per covered, alive texel.

    The map is held as one parameter per channel group (`GROUPS` + "feature") so each gets its
    own learning rate; `map` concatenates them into the (C, R, R) tensor that is saved and that
    a network predicts.
    """

    def __init__(self, head: HeadModel, res: int, feature_dim: int = FEATURE_DIM, seed: int = 0):
        super().__init__()
        self.head = head
        self.sizes = {**GROUPS, "feature": feature_dim}
        self.groups = nn.ParameterDict([(k, nn.Parameter(torch.zeros(c, res, res))) for k, c in self.sizes.items()])
        self.register_buffer("alive", torch.zeros(res, res, dtype=torch.bool))
        self._bind()
        self._set_map(self._initial(torch.Generator().manual_seed(seed)))
        self.alive.view(-1)[self.texel] = True

    @property
    def res(self) -> int:
        return self.groups["offset"].shape[-1]

    @property
    def map(self) -> Tensor:
        return torch.cat([self.groups[k] for k in self.sizes], 0)

    @torch.no_grad()
    def _set_map(self, full: Tensor) -> None:
        """Replace every group's parameter (new tensors: the optimiser must be rebuilt)."""
        for key, part in zip(self.sizes, full.split(list(self.sizes.values()), 0)):
            self.groups[key] = nn.Parameter(part.contiguous().to(self.alive.device))

    def _bind(self) -> None:
        texel, tri, bary = rasterize_uv(self.head.face_uvs.cpu().numpy(), self.res)
        device = self.alive.device
        # derived from the atlas at this resolution: buffers (they follow .to()), never saved
        for name, value in (("texel", texel), ("tri", tri), ("bary", bary)):
            self.register_buffer(name, torch.as_tensor(value, device=device), persistent=False)

    def _initial(self, gen: torch.Generator) -> Tensor:
        """Initial map: Gaussians on the surface, sized to tile their triangle, grey, opaque-ish.

        Texel spacing on the surface = sqrt(triangle area / texels in it); a σ of half of it
        covers the surface evenly (ripple < 1%) whatever a chart's texel density, while each
        pixel is touched by few Gaussians (the cost of rasterising).
        """
        head = self.head
        _, s = triangle_frames(head.vertices(head.neutral), head.faces)
        s, tri, texel = s.cpu().double(), self.tri.cpu(), self.texel.cpu()
        count = torch.bincount(tri, minlength=len(head.faces)).clamp(min=1)
        spacing = (0.5 * s**2 / count).sqrt()[tri]
        rel = torch.log(INIT_SIZE * spacing / s[tri]).float()
        C = sum(self.sizes.values())
        init = torch.zeros(C, self.res * self.res)
        init[3] = 1.0  # identity quaternion
        init[7:9, texel] = rel
        init[9, texel] = rel + math.log(NORMAL_SQUASH)
        init[10] = math.log(INIT_OPACITY / (1 - INIT_OPACITY))
        init[sum(GROUPS.values()) :] = 0.1 * torch.randn(C - sum(GROUPS.values()), self.res * self.res, generator=gen)
        return init.view(C, self.res, self.res)

    def bound(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flat texel index, triangle id and barycentrics (N, 3) of the alive Gaussians."""
        keep = self.alive.view(-1)[self.texel]
        return self.texel[keep], self.tri[keep], self.bary[keep]

    def __len__(self) -> int:
        return int(self.alive.sum())

    def values(self, full: Tensor | None = None) -> dict[str, Tensor]:
        """{group: (N, channels)} of the alive Gaussians, in texel order; read from `full`
        (a (C, R, R) map, e.g. one the expression→visual prior predicted) instead of the
        parameters when given."""
        texel, _, _ = self.bound()
        groups = self.groups if full is None else dict(zip(self.sizes, full.split(list(self.sizes.values()), 0)))
        return {k: groups[k].reshape(c, -1)[:, texel].T for k, c in self.sizes.items()}

    def splats(self, verts: Tensor, full: Tensor | None = None) -> dict[str, Tensor]:
        """Posed Gaussians for head vertices (..., 478 + E, 3): means, quats, scales, opacities,
        normals (..., N, ·), plus the raw local values (N, ·) the regularisers and the colour MLP
        read (`full`: see values). A leading batch of B frames poses all of them in one pass."""
        _, tri, bary = self.bound()
        v = self.values(full)
        R_tri, s_tri = triangle_frames(verts, self.head.faces)
        corners = verts[..., self.head.faces[tri], :]  # (..., N, 3, 3)
        R, s = R_tri[..., tri, :, :], s_tri[..., tri, None]
        means = (bary[:, :, None] * corners).sum(-2) + s * (R @ v["offset"][:, :, None]).squeeze(-1)
        quats = quat_multiply(rotmat_to_quat(R_tri)[..., tri, :], F.normalize(v["quat"], dim=-1))
        return {
            "means": means,
            "quats": quats,
            "scales": s * torch.exp(v["log_scale"]),
            "opacities": torch.sigmoid(v["opacity"][:, 0]).expand(means.shape[:-1]),
            "normals": R[..., 2],
            **v,
        }

    @torch.no_grad()
    def prune(self, min_opacity: float) -> int:
        """Mask out Gaussians whose opacity fell below `min_opacity`; returns how many."""
        before = len(self)
        self.alive &= torch.sigmoid(self.groups["opacity"][0]) >= min_opacity
        return before - len(self)

    @torch.no_grad()
    def upsample(self) -> None:
        """Double the resolution: each texel's 4 children copy it at half the in-plane scale.

        Texels that only become covered at the new resolution (chart borders) get fresh initial
        values. The parameters are replaced, so the optimiser must be rebuilt.
        """
        old = self.res
        was_covered = torch.zeros(old * old, dtype=torch.bool, device=self.alive.device)
        was_covered[self.texel] = True

        def up(x: Tensor) -> Tensor:
            return x.repeat_interleave(2, -2).repeat_interleave(2, -1)

        child = up(self.map)
        child[7:10] -= math.log(2.0)
        inherited, alive = up(was_covered.view(old, old)), up(self.alive)
        self.alive = torch.zeros_like(alive)
        self._set_map(child)
        self._bind()
        covered = torch.zeros(self.res * self.res, dtype=torch.bool, device=self.alive.device)
        covered[self.texel] = True
        covered = covered.view(self.res, self.res)
        new = covered & ~inherited
        full = self.map.clone()
        full[:, new] = self._initial(torch.Generator().manual_seed(self.res)).to(full)[:, new]
        self._set_map(full)
        self.alive = (alive & covered) | new

    def state(self) -> dict[str, Tensor]:
        return {"uv_map": self.map.detach().contiguous(), "uv_alive": self.alive.to(torch.uint8).contiguous()}

    @classmethod
    def from_state(cls, head: HeadModel, state: dict[str, Tensor]) -> GaussianMap:
        full = state["uv_map"]
        g = cls(head, full.shape[-1], full.shape[0] - sum(GROUPS.values()))
        g._set_map(full)
        g.alive = state["uv_alive"].bool().to(g.alive.device)
        return g


PLY_FIELDS = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    + [f"scale_{i}" for i in range(3)]
    + [f"rot_{i}" for i in range(4)]
)


def write_ply(path: Path, means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor) -> None:
    """Standard 3DGS binary PLY (degree-0 SH): what common splat viewers load.

    Stored as 3DGS keeps them: colour as (rgb − 0.5) / SH_C0, opacity as a logit, scale as a
    log, rotation as a unit wxyz quaternion; normals are zero (unused by viewers).
    """
    rgb = colors.detach().double().clamp(1e-4, 1 - 1e-4)
    op = opacities.detach().double().clamp(1e-6, 1 - 1e-6)
    data = torch.cat(
        [
            means.detach().double(),
            torch.zeros_like(means, dtype=torch.float64),
            (rgb - 0.5) / SH_C0,
            torch.log(op / (1 - op))[:, None],
            torch.log(scales.detach().double().clamp(min=1e-12)),
            F.normalize(quats.detach().double(), dim=-1),
        ],
        1,
    ).cpu().numpy().astype("<f4")
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {len(data)}\n"
    header += "".join(f"property float {name}\n" for name in PLY_FIELDS) + "end_header\n"
    Path(path).write_bytes(header.encode() + data.tobytes())


def read_ply(path: Path) -> dict[str, np.ndarray]:
    """Read a binary little-endian float PLY's vertex element into {property: (N,) array}."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode().splitlines()
    if lines[0] != "ply" or "format binary_little_endian 1.0" not in lines:
        raise ValueError(f"{path}: not a binary little-endian PLY")
    count = next(int(line.split()[2]) for line in lines if line.startswith("element vertex"))
    names = [line.split()[2] for line in lines if line.startswith("property float")]
    data = np.frombuffer(raw[end : end + 4 * count * len(names)], "<f4").reshape(count, len(names))
    return {name: data[:, i] for i, name in enumerate(names)}
