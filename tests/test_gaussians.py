"""Gaussians bound to triangles through the UV map: binding, rotations, densify/prune, PLY."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ggtalker_cli.face_model import HeadModel
from ggtalker_cli.gaussians import (
    PLY_FIELDS,
    GaussianMap,
    rasterize_uv,
    read_ply,
    rotmat_to_quat,
    write_ply,
)
from kernels.reference import quat_to_rotmat


@pytest.fixture(scope="module")
def head() -> HeadModel:
    return HeadModel.template()


def test_rasterize_uv_barycentrics_reconstruct_texel_centres(head):
    res = 48
    texel, tri, bary = rasterize_uv(head.face_uvs.numpy(), res)
    assert len(texel) == len(np.unique(texel)) > 0.6 * res * res  # the atlas is mostly used
    assert (bary >= -1e-6).all() and np.allclose(bary.sum(1), 1, atol=1e-5)
    centre = np.stack([(texel % res + 0.5) / res, (texel // res + 0.5) / res], -1)
    corners = head.face_uvs.numpy()[tri]  # (N, 3, 2)
    assert np.allclose((bary[:, :, None] * corners).sum(1), centre, atol=1e-5)


def test_rotmat_to_quat_round_trip_including_half_turns():
    q = torch.randn(2000, 4, dtype=torch.float64)
    half_turns = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1e-9, 1, 1, 0]], dtype=torch.float64)
    R = quat_to_rotmat(torch.cat([q, half_turns]))
    assert torch.allclose(quat_to_rotmat(rotmat_to_quat(R)), R, atol=1e-9)


def _random_similarity(seed: int):
    gen = torch.Generator().manual_seed(seed)
    R = quat_to_rotmat(torch.randn(4, generator=gen))
    return R, torch.randn(3, generator=gen) * 5, 1.3


def test_gaussians_follow_a_moved_mesh_exactly(head):
    gmap = GaussianMap(head, 32, seed=1)
    with torch.no_grad():  # non-trivial local values
        for k, p in gmap.groups.items():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(k))))
    verts = head.vertices(head.neutral)
    R, t, s = _random_similarity(3)
    a = gmap.splats(verts)
    b = gmap.splats(s * verts @ R.T + t)
    assert torch.allclose(b["means"], s * a["means"] @ R.T + t, atol=1e-4)
    assert torch.allclose(b["scales"], s * a["scales"], rtol=1e-4)
    assert torch.allclose(quat_to_rotmat(b["quats"]), R @ quat_to_rotmat(a["quats"]), atol=1e-4)
    assert torch.equal(a["opacities"], b["opacities"])


def test_gaussians_sit_on_their_triangles_at_zero_offset(head):
    gmap = GaussianMap(head, 32)
    verts = head.vertices(head.neutral)
    g = gmap.splats(verts)
    _, tri, bary = gmap.bound()
    expected = (bary[:, :, None] * verts[head.faces[tri]]).sum(1)
    assert torch.allclose(g["means"], expected, atol=1e-5)
    # a local offset along z moves a Gaussian along its triangle's normal by offset · s_tri
    with torch.no_grad():
        gmap.groups["offset"][2] = 0.5
    moved = gmap.splats(verts)["means"]
    step = (moved - g["means"]).norm(dim=-1)
    assert torch.allclose(((moved - g["means"]) * g["normals"]).sum(-1), step, atol=1e-5)


def test_batched_splats_equal_frame_by_frame(head):
    """A leading batch of frames poses every frame's Gaussians in one pass, as one by one."""
    gmap = GaussianMap(head, 24, seed=2)
    verts = torch.stack([head.vertices(head.neutral) @ _random_similarity(k)[0].T for k in range(3)])
    batched = gmap.splats(verts)
    for key in ("means", "quats", "scales", "opacities", "normals"):
        assert batched[key].shape[:2] == (3, len(gmap)), key
        assert torch.allclose(batched[key], torch.stack([gmap.splats(v)[key] for v in verts]), atol=1e-6), key
    assert torch.equal(batched["feature"], gmap.splats(verts[0])["feature"])  # raw values stay per Gaussian


def test_prune_and_upsample(head):
    gmap = GaussianMap(head, 32)
    n = len(gmap)
    with torch.no_grad():
        gmap.groups["opacity"][0, :8] = -10.0  # 8 rows of texels nearly transparent
    removed = gmap.prune(0.01)
    assert 0 < removed < n and len(gmap) == n - removed
    pruned = torch.zeros(32 * 32, dtype=torch.bool)
    pruned[gmap.texel] = ~gmap.alive.view(-1)[gmap.texel]
    scale_before = gmap.splats(head.vertices(head.neutral))["scales"].detach().median()
    gmap.upsample()
    assert gmap.res == 64 and gmap.map.shape[-1] == 64
    assert 3.5 * (n - removed) < len(gmap) < 4.5 * n  # 4 children per texel (+ new border texels)
    children = pruned.view(32, 32).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert not gmap.alive[children].any()  # pruned parents stay pruned in their children
    scale_after = gmap.splats(head.vertices(head.neutral))["scales"].detach().median()
    assert math.isclose(float(scale_after / scale_before), 0.5, rel_tol=0.1)


def test_state_round_trip(head):
    gmap = GaussianMap(head, 32, seed=5)
    with torch.no_grad():
        gmap.groups["opacity"][0, 10:12] = -10.0
    gmap.prune(0.01)
    again = GaussianMap.from_state(head, gmap.state())
    assert torch.equal(again.map, gmap.map) and torch.equal(again.alive, gmap.alive)


def test_ply_round_trip(tmp_path, head):
    gmap = GaussianMap(head, 24)
    g = gmap.splats(head.vertices(head.neutral))
    colors = torch.rand(len(g["means"]), 3)
    path = tmp_path / "head.ply"
    write_ply(path, g["means"], g["quats"], g["scales"], g["opacities"], colors)
    header = path.read_bytes().split(b"end_header\n")[0].decode().splitlines()
    assert header[:3] == ["ply", "format binary_little_endian 1.0", f"element vertex {len(colors)}"]
    assert [line.split()[2] for line in header[3:]] == PLY_FIELDS
    data = read_ply(path)
    means = np.stack([data["x"], data["y"], data["z"]], 1)
    assert np.allclose(means, g["means"].detach().numpy(), atol=1e-5)
    rgb = 0.5 + 0.28209479177387814 * np.stack([data[f"f_dc_{i}"] for i in range(3)], 1)
    assert np.allclose(rgb, colors.numpy(), atol=1e-4)
    assert np.allclose(1 / (1 + np.exp(-data["opacity"])), g["opacities"].detach().numpy(), atol=1e-5)
    scales = np.exp(np.stack([data[f"scale_{i}"] for i in range(3)], 1))
    assert np.allclose(scales, g["scales"].detach().numpy(), rtol=1e-4)
    quats = np.stack([data[f"rot_{i}"] for i in range(4)], 1)
    assert np.allclose(np.linalg.norm(quats, axis=1), 1, atol=1e-5)
