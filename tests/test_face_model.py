"""The head geometry: mediapipe's canonical mesh, the added mouth/eyes/shell, triangle frames,
and the per-identity expression basis."""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
import pytest
import torch

from ggtalker_cli import face_model
from ggtalker_cli.face_model import CHARTS, HeadModel, canonical_mesh, triangle_frames


def test_canonical_mesh_counts_and_uvs():
    mesh = canonical_mesh()
    assert mesh.verts.shape == (468, 3) and mesh.uvs.shape == (468, 2) and mesh.faces.shape == (898, 3)
    assert mesh.faces.min() == 0 and mesh.faces.max() == 467
    assert (mesh.uvs >= 0).all() and (mesh.uvs <= 1).all()
    # face space: +y up (forehead 10 above chin 152), +z out of the face (nose tip 1 in front)
    assert mesh.verts[10, 1] > mesh.verts[152, 1] and mesh.verts[1, 2] > mesh.verts[234, 2]


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def test_protobuf_packed_and_unpacked_agree():
    floats = [0.5, -1.25, 3.0, 0.1, 0.9]
    indices = [0, 300, 7]
    unpacked = b"".join(_varint(3 << 3 | 5) + struct.pack("<f", x) for x in floats)
    unpacked += b"".join(_varint(4 << 3 | 0) + _varint(i) for i in indices)
    blob_f, blob_i = struct.pack("<5f", *floats), b"".join(_varint(i) for i in indices)
    packed = _varint(3 << 3 | 2) + _varint(len(blob_f)) + blob_f + _varint(4 << 3 | 2) + _varint(len(blob_i)) + blob_i
    for mesh in (unpacked, packed):
        outer = _varint(1 << 3 | 2) + _varint(len(mesh)) + mesh
        vb, ib = face_model._parse_mesh(outer)
        np.testing.assert_allclose(vb.ravel(), floats, rtol=1e-7)
        assert ib.ravel().tolist() == indices


def test_head_is_closed_and_charted():
    head = HeadModel.template()
    faces = head.faces.numpy()
    assert faces.min() >= 0 and faces.max() < head.n_verts
    # the face, mouth pocket, eye fills and shell join into one watertight surface
    edges = Counter(tuple(sorted(e)) for f in faces for e in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])))
    assert set(edges.values()) == {2}
    uv = head.face_uvs.numpy()
    assert (uv >= 0).all() and (uv <= 1).all()
    counts = np.bincount(head.charts.numpy(), minlength=len(CHARTS))
    assert (counts > 0).all()
    for cid, (u0, v0, u1, v1) in enumerate(CHARTS.values()):  # every triangle stays in its chart
        corners = uv[head.charts.numpy() == cid]
        assert (corners[..., 0] >= u0 - 1e-6).all() and (corners[..., 0] <= u1 + 1e-6).all()
        assert (corners[..., 1] >= v0 - 1e-6).all() and (corners[..., 1] <= v1 + 1e-6).all()
    verts = head.vertices(head.neutral)
    assert torch.isfinite(verts).all()
    # the shell reaches well behind the face (a whole head, not a mask)
    assert verts[:, 2].min() < head.neutral[:, 2].min() - 5


def test_added_geometry_follows_the_landmarks():
    head = HeadModel.template()
    base = head.neutral.clone()
    moved = base.clone()
    moved[list(face_model.INNER_LIPS)] += torch.tensor([0.0, -1.0, 0.0])  # lips drop by 1 cm
    delta = head.vertices(moved) - head.vertices(base)
    mouth = head.faces[head.charts == face_model.CHART_IDS["mouth"]].unique()
    shell_only = torch.tensor(sorted(set(head.faces[head.charts == face_model.CHART_IDS["shell"]].unique().tolist()) - set(range(468))))
    assert torch.allclose(delta[mouth, 1], torch.full((len(mouth),), -1.0), atol=1e-5)  # the pocket moves with the lips
    assert delta[shell_only].abs().max() == 0  # the shell beyond the border is head-rigid


def test_triangle_frames_orthonormal_and_aligned():
    head = HeadModel.template()
    verts = head.vertices(head.neutral)
    R, s = triangle_frames(verts, head.faces)
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(len(R)), atol=1e-5)
    v = verts[head.faces]
    e1, e2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
    assert torch.allclose(torch.nn.functional.normalize(e1, dim=-1), R[..., 0], atol=1e-5)  # x = first edge
    assert (R[..., 2] * e2).sum(-1).abs().max() < 1e-4  # z = normal
    assert torch.allclose(s**2, torch.cross(e1, e2, dim=-1).norm(dim=-1), rtol=1e-4)  # s² = 2·area


def test_triangle_frames_differentiable_and_finite_when_degenerate():
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]], requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [0, 1, 3]])  # the second one is collapsed
    R, s = triangle_frames(verts, faces)
    (R.sum() + s.sum()).backward()
    assert torch.isfinite(R).all() and torch.isfinite(verts.grad).all() and s[1] > 0


def test_fit_recovers_a_linear_expression_basis():
    rng = np.random.default_rng(0)
    neutral = face_model.template_landmarks()
    basis = rng.normal(0, 0.3, (52, 478, 3)).astype(np.float32)
    bs = rng.uniform(0, 1, (400, 52)).astype(np.float32)
    verts = neutral + np.einsum("nk,kvc->nvc", bs, basis) + rng.normal(0, 0.01, (400, 478, 3))
    head = HeadModel.fit(verts, bs, ridge=1e-3)
    assert np.abs(head.neutral.numpy() - neutral).max() < 0.05
    assert np.abs(head.basis.numpy() - basis).max() < 0.05
    driven = head.drive(torch.as_tensor(bs[:3]))
    assert torch.allclose(driven, torch.as_tensor(verts[:3], dtype=torch.float32), atol=0.06)


def test_fit_rejects_bad_shapes():
    with pytest.raises(ValueError):
        HeadModel.fit(np.zeros((1, 478, 3)), np.zeros((1, 52)))


def test_topology_is_shared_by_every_identity():
    rng = np.random.default_rng(1)
    a = HeadModel.template()
    other = face_model.template_landmarks() * 1.1 + rng.normal(0, 0.2, (478, 3)).astype(np.float32)
    b = HeadModel.from_neutral(other, shell=face_model.Shell(width=1.4, top=0.6, depth=1.0))
    for key in ("faces", "face_uvs", "charts", "extra_w"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert not torch.equal(a.extra_c, b.extra_c)  # the rigid shell is placed per identity


def test_fit_shell_grows_the_head_to_its_masks():
    """Masks drawn from a larger head: the fitted shell must cover them better than the default."""
    head = HeadModel.template()
    K = np.array([[120.0, 0, 64], [0, 120.0, 64], [0, 0, 1]])
    pose = np.diag([1.0, -1.0, -1.0, 1.0])
    pose[2, 3] = 45.0
    big = HeadModel.from_neutral(head.neutral.numpy(), shell=face_model.Shell(width=1.45, top=0.55))
    base = head.neutral.numpy()
    mask = face_model.silhouette(big, base, pose, K, 128)
    default_iou = (face_model.silhouette(head, base, pose, K, 128) & mask).sum() / mask.sum()
    _, shell, iou = face_model.fit_shell(head.neutral.numpy(), head.basis.numpy(), [(base, pose, mask)], K, 128)
    assert iou > 0.97 > default_iou + 0.05 and shell.width > 1.3 and shell.top > 0.4
