"""Expression→visual prior (E2V): a few frames of a person → that person's UV Gaussian map.

The generator works in UV space, where every texel is one Gaussian of `gaussians.GaussianMap`.
Each reference frame is first *unwrapped* (`unwrap`): every texel's surface point on the
tracked head mesh is projected into the frame and the frame's colour and head mask are sampled
there, keeping only texels that face the camera and pass a coarse z-buffer (so the mouth pocket
behind closed lips or the back of the head never take the face's colours). The head shell
(hair, ears) hides behind the face from the front, so every texel also samples the image
radially beyond the face outline at its own angle: that is where its hair is seen, and unseen
texels start with that colour. Frames are merged by visibility weight.

That gives an identity-general estimate for free. A UV network then predicts the whole map
as a residual over a learned mean head (`template`, itself a GaussianMap) plus the unwrapped
colours: offsets, scales and opacities that shape hair and silhouette, colour corrections,
and the per-Gaussian features that condition a colour MLP shared by all identities.
The network is local by default (`e2v.channels`): trained on ~10 identities, a deeper U-Net
learns to recognise the training people and recall their hair and shape, and gets worse on
held-out identities as it trains, while a local one keeps improving (docs/e2v.md).

An untrained generator already returns the mean head textured from the references; the
cross-identity training (`e2v_train.py`) teaches it the rest. `adapt --prior` starts from
`priors.init_from_prior()` instead of the grey scratch map.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kernels import Camera, Gaussians, RenderOutput, render

from ..errors import Exit, GGError
from ..face_model import CHART_IDS, HeadModel
from ..gaussians import GROUPS, GaussianMap
from .color_mlp import ColorMLP

WEIGHTS = "e2v.safetensors"
PROBES_CM = (0.0, 1.0, 2.0, 4.0)  # head-mask samples along each texel's normal (hair volume, silhouette)
RADII = (1.15, 1.4, 1.8)  # colour + head-mask samples at these multiples of the face outline's radius
ANGLE_BINS = 72  # angular resolution of the face outline in the image
FILL_EPS = 0.05  # below this much head in the radial samples, an unseen texel takes the mean seen colour
IN_CHANNELS = 3 + 2 + len(PROBES_CM) + 4 * len(RADII)
FACING_MIN = 0.3  # texels seen more obliquely than this cosine are not sampled (silhouette pixels mix)
ZBUF_CELL = 4  # z-buffer cell side in pixels (texel points are sparse, a coarse grid has no holes)
ZBUF_TOL_CM = 0.5  # a texel this far behind the front-most one in its cell is occluded, plus...
ZBUF_SLOPE = 2.0  # ...this many cell widths (in cm at the texel's depth): a sloped surface spans depths in a cell


def _channels(group: str) -> slice:
    """Channels of a GaussianMap group in the (C, R, R) map."""
    start = sum(c for k, c in GROUPS.items() if list(GROUPS).index(k) < list(GROUPS).index(group))
    return slice(start, start + GROUPS[group])


COLOR, LOG_SCALE = _channels("color"), _channels("log_scale")
TOPOLOGY = ("faces", "face_uvs", "charts")


def with_topology(head: HeadModel, template: HeadModel) -> HeadModel:
    """`head` with the template's triangles and atlas.

    Triangle winding of the eye fans follows each identity's geometry, so two fits can bind the
    same texel to differently oriented frames; a map meant to transfer between identities must
    use one topology.
    """
    return HeadModel(**{**head.state(), **{k: getattr(template, k).to(head.neutral.device) for k in TOPOLOGY}})


def surface(binding: GaussianMap, verts: Tensor) -> tuple[Tensor, Tensor]:
    """Surface point and unit normal of every covered texel: (..., N, 3) each, texel order.

    verts (..., 478 + E, 3) are all head vertices (`head.vertices(landmarks)`).
    """
    corners = verts[..., binding.head.faces[binding.tri], :]  # (..., N, 3, 3)
    a, b, c = corners.unbind(-2)
    normal = F.normalize(torch.cross(b - a, c - a, dim=-1), dim=-1)
    return (binding.bary[:, :, None] * corners).sum(-2), normal


def unwrap(binding: GaussianMap, images: Tensor, masks: Tensor, verts: Tensor, pose: Tensor, K: Tensor, valid: Tensor) -> Tensor:
    """Reference frames → the generator's (B, IN_CHANNELS, R, R) UV input.

    images (B, M, H, W, 3) and head masks (B, M, H, W, 1) in [0, 1]; verts (B, M, V, 3) all head
    vertices; pose (B, M, 4, 4) face → camera; K (B, M, 3, 3) at H×W; valid (B, M) marks real
    frames (a batch pads samples with fewer references). Channels, merged over the frames:

    - colour where the texel is seen on the head (unseen texels take the radial samples' head
      colour, else the mean seen colour), its confidence, the texel's visibility;
    - the head mask at PROBES_CM along the texel's normal (how far the head reaches beyond it);
    - colour + head mask at RADII × the face outline's radius, along the texel's direction from
      the face's centre in the image. The head shell hides behind the face from the front, so
      this is where hair and ears are seen: the shell's texels find them at their own angle.
    """
    B, M, H, W, _ = images.shape
    pts, nrm = surface(binding, verts.flatten(0, 1))  # (BM, N, 3)
    rot, t = pose[..., :3, :3].flatten(0, 1), pose[..., :3, 3].flatten(0, 1)
    Kf = K.flatten(0, 1)
    cam, ncam = pts @ rot.mT + t[:, None], nrm @ rot.mT
    facing = -(ncam * F.normalize(cam, dim=-1)).sum(-1)
    size = torch.tensor([W, H], dtype=cam.dtype, device=cam.device)
    img = images.flatten(0, 1).permute(0, 3, 1, 2)
    msk = masks.flatten(0, 1).permute(0, 3, 1, 2)
    real = valid.flatten().to(cam.dtype)[:, None]

    def project(p: Tensor) -> Tensor:
        q = p @ Kf.mT
        return q[..., :2] / q[..., 2:].clamp(min=1e-3)

    def inside(px: Tensor) -> Tensor:
        return (px >= 0).all(-1) & (px < size).all(-1)

    def sample(x: Tensor, px: Tensor) -> Tensor:  # (BM, C, H, W) at pixels (BM, N, 2) -> (BM, N, C)
        grid = (2 * px / size - 1)[:, :, None]
        return F.grid_sample(x, grid, align_corners=False, padding_mode="border")[..., 0].mT

    def merge(x: Tensor, w: Tensor) -> Tensor:  # (BM, N, C) weighted over the M frames -> (B, N, C)
        w = w.view(B, M, -1, 1)
        return (x.view(B, M, -1, x.shape[-1]) * w).sum(1) / w.sum(1).clamp(min=1e-6)

    def total(w: Tensor) -> Tensor:  # confidence: one frame seen within 60° is full
        return (w.view(B, M, -1).sum(1) / 0.5).clamp(max=1)[..., None]

    # surface: facing the camera and in front in a coarse z-buffer of the texel points
    px = project(cam)
    front = inside(px) & (cam[..., 2] > 0.01) & (facing > FACING_MIN)
    cells = max(min(H, W) // ZBUF_CELL, 1)
    ij = (px / size * cells).long().clamp(0, cells - 1)
    idx = ij[..., 1] * cells + ij[..., 0]
    z = torch.where(front, cam[..., 2], torch.inf)
    zbuf = torch.full((len(z), cells * cells), torch.inf, device=z.device, dtype=z.dtype).scatter_reduce(1, idx, z, "amin")
    cell_cm = (min(H, W) / cells) * cam[..., 2] / Kf[:, None, 0, 0]
    visible = front & (cam[..., 2] <= zbuf.gather(1, idx) + ZBUF_TOL_CM + ZBUF_SLOPE * cell_cm)
    w_geo = facing.clamp(0, 1) * front * real
    w_vis = w_geo * visible
    head_here = sample(msk, px)
    w_col = w_vis * head_here[..., 0]
    conf = total(w_col)
    rgb = merge(sample(img, px), w_col)
    probes = [merge(head_here, w_vis)]
    for d in PROBES_CM[1:]:
        q = project(cam + d * ncam)
        probes.append(merge(sample(msk, q) * inside(q)[..., None], w_geo))

    # radial: along each texel's image direction from the face's centre, beyond the face outline
    face = binding.head.charts[binding.tri] == CHART_IDS["face"]
    centre = px[:, face].mean(1, keepdim=True)
    rel = px - centre
    radius = rel.norm(dim=-1).clamp(min=1e-6)
    bins = ((torch.atan2(rel[..., 1], rel[..., 0]) + math.pi) / (2 * math.pi) * ANGLE_BINS).long().clamp(0, ANGLE_BINS - 1)
    outline = torch.zeros(len(px), ANGLE_BINS, dtype=px.dtype, device=px.device).scatter_reduce(1, bins[:, face], radius[:, face], "amax")
    reach = outline.gather(1, bins) / radius
    radial = []
    for r in RADII:
        q = centre + rel * (r * reach)[..., None]
        w = inside(q).to(q.dtype) * real
        radial.append((merge(sample(img, q), w), merge(sample(msk, q), w)))

    # unseen texels take the head's colour around the face at their angle (hair, ears), else the
    # mean seen colour: the generator's starting colours before it has learned anything
    mean = (rgb * conf).sum(1, keepdim=True) / conf.sum(1, keepdim=True).clamp(min=1e-6)
    on_head = sum(m for _, m in radial)
    fill = (sum(c * m for c, m in radial) + FILL_EPS * mean) / (on_head + FILL_EPS)
    feats = [conf * rgb + (1 - conf) * fill, conf, total(w_vis), *probes, *(x for pair in radial for x in pair)]
    texels = torch.cat(feats, -1).mT  # (B, C, N)
    R = binding.res
    out = torch.zeros(B, texels.shape[1], R * R, dtype=texels.dtype, device=texels.device)
    out[..., binding.texel] = texels
    return out.view(B, -1, R, R)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(math.gcd(8, cout), cout), nn.SiLU())


class UVNet(nn.Module):
    """U-Net over the UV atlas (concatenated skips); the output conv starts at zero."""

    def __init__(self, cin: int, cout: int, channels: list[int] | tuple[int, ...]):
        super().__init__()
        c = list(channels)
        self.down = nn.ModuleList([nn.Sequential(_conv(cin, c[0]), _conv(c[0], c[0]))])
        self.down.extend(nn.Sequential(_conv(c[i - 1], c[i], 2), _conv(c[i], c[i])) for i in range(1, len(c)))
        self.up = nn.ModuleList(_conv(c[i] + c[i - 1], c[i - 1]) for i in range(1, len(c)))
        self.out = nn.Conv2d(c[0], cout, 3, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.up[i](torch.cat([x, skips[i]], 1))
        return self.out(x)


class E2V(nn.Module):
    """Generator: unwrapped reference frames → UV Gaussian map; plus the shared colour MLP."""

    def __init__(self, head: HeadModel, uv_res: int, feature_dim: int, hidden: int, channels, embed_dim: int):
        super().__init__()
        if uv_res % 2 ** (len(channels) - 1):
            raise GGError(f"e2v.uv_res {uv_res} must be a multiple of {2 ** (len(channels) - 1)} for {len(channels)} U-Net levels; fix the preset", Exit.USAGE)
        self.arch = {"uv_res": uv_res, "feature_dim": feature_dim, "hidden": hidden, "channels": list(channels), "embed_dim": embed_dim}
        self.template = GaussianMap(head, uv_res, feature_dim)  # the learned mean head
        self.embed = nn.Parameter(0.1 * torch.randn(embed_dim, uv_res, uv_res, generator=torch.Generator().manual_seed(0)))
        self.net = UVNet(IN_CHANNELS + embed_dim, self.template.map.shape[0], channels)
        self.color = ColorMLP(feature_dim, hidden=hidden)

    @property
    def head(self) -> HeadModel:
        return self.template.head

    def forward(self, unwrapped: Tensor) -> Tensor:
        """(B, IN_CHANNELS, R, R) → (B, C, R, R) maps (GaussianMap channel layout)."""
        B, _, R, _ = unwrapped.shape
        template = self.template.map
        x = torch.cat([unwrapped, self.embed.expand(B, -1, -1, -1)], 1)
        logit = torch.logit(unwrapped[:, :3].clamp(0.02, 0.98))  # the unwrapped colours, as colour logits
        skip = torch.cat([x.new_zeros(B, COLOR.start, R, R), logit, x.new_zeros(B, len(template) - COLOR.stop, R, R)], 1)
        return template[None] + skip + self.net(x)

    def render(self, uv_map: Tensor, verts: Tensor, pose: Tensor, expr: Tensor, K: Tensor, size: int,
               background: Tensor | None = None) -> tuple[RenderOutput, dict[str, Tensor]]:
        """Render one predicted map (C, R, R) on head vertices (V, 3) seen through pose, like `Avatar.render`."""
        s = self.template.splats(verts, uv_map)
        colors = self.color(s["color"], s["feature"], expr[None], pose[None])[0]
        return render(Gaussians(s["means"], s["quats"], s["scales"], s["opacities"], colors), Camera(pose, K, size, size), background), s

    def save(self, path: Path, meta: dict) -> None:
        """Weights + the template head (its topology is the map's layout) + architecture in metadata."""
        state = {f"head.{k}": v for k, v in self.head.state().items()}
        state.update({k: v for k, v in self.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
                  metadata={"arch": json.dumps(self.arch), "meta": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> tuple[E2V, dict]:
        try:
            with safe_open(str(path), "pt") as f:
                info = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            arch, meta = json.loads(info["arch"]), json.loads(info.get("meta", "{}"))
            head = HeadModel(**{k[5:]: v for k, v in state.items() if k.startswith("head.")})
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
            raise GGError(f"{path}: unreadable e2v prior weights ({e.__class__.__name__}: {e}); re-run ggtalker fit-prior --parts e2v", Exit.ARTIFACT) from e
        current = HeadModel.template()
        if not (torch.equal(head.faces, current.faces) and torch.equal(head.charts, current.charts)
                and head.face_uvs.shape == current.face_uvs.shape and torch.allclose(head.face_uvs, current.face_uvs, atol=1e-6)):
            raise GGError(
                f"{path}: made for another head model ({len(head.faces)} triangles; this ggtalker builds {len(current.faces)} "
                "or lays out the UV atlas differently); re-train it with `ggtalker fit-prior --parts e2v`",
                Exit.ARTIFACT,
            )
        model = cls(head.to(device), **arch).to(device)
        try:
            model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
        except RuntimeError as e:
            raise GGError(f"{path}: e2v prior weights do not match their architecture ({e}); re-run ggtalker fit-prior --parts e2v", Exit.ARTIFACT) from e
        return model, meta


