"""kernels/: the reference rasterizer against closed forms, and against gsplat where CUDA exists."""

from __future__ import annotations

import math

import pytest
import torch

from ggtalker_cli.errors import Exit, GGError
from kernels import Camera, Gaussians, reference, render
from kernels.synthetic import front_cameras, head_scene

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
F64 = torch.float64


def pinhole(size: int, f: float, c: float, dtype=F64) -> Camera:
    """Camera at the origin looking down +z (world = camera), principal point (c, c)."""
    K = torch.tensor([[f, 0, c], [0, f, c], [0, 0, 1]], dtype=dtype)
    return Camera(torch.eye(4, dtype=dtype), K, size, size)


def gaussians(means, scales, opacities, colors, quats=None, dtype=F64) -> Gaussians:
    def t(x):
        return torch.as_tensor(x, dtype=dtype)

    means = t(means)
    quats = t(quats) if quats is not None else torch.tensor([[1.0, 0, 0, 0]], dtype=dtype).expand(len(means), 4)
    return Gaussians(means, quats, t(scales), t(opacities), t(colors))


def test_isotropic_footprint_matches_closed_form():
    # σ_px = f·s/z = 100·0.1/10 = 1 px, then the 0.3 px² low-pass: variance 1.3 px².
    f, s, z, o, c = 100.0, 0.1, 10.0, 0.8, 20.5
    g = gaussians([[0.0, 0.0, z]], [[s, s, s]], [o], [[1.0, 1.0, 1.0]])
    out = render(g, pinhole(41, f, c), backend="torch")
    alpha = out.alpha[0, ..., 0]
    var = (f * s / z) ** 2 + reference.EPS2D
    for i, j in [(20, 20), (20, 21), (22, 19), (23, 20), (17, 18)]:
        r2 = (j + 0.5 - c) ** 2 + (i + 0.5 - c) ** 2
        expected = o * math.exp(-0.5 * r2 / var)
        assert alpha[i, j].item() == pytest.approx(expected, rel=1e-9)
    assert divmod(int(alpha.argmax()), 41) == (20, 20)  # the pixel whose centre is the projection
    # below 1/255 nothing is drawn: r² > 2·var·ln(255·o), about 3.3σ
    i, j = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    r2 = (j + 0.5 - c) ** 2 + (i + 0.5 - c) ** 2
    assert alpha[r2 > 2 * var * math.log(255 * o)].abs().max() == 0
    assert out.depth[0, 20, 20, 0].item() == pytest.approx(z)
    assert torch.equal(out.aux["radii"][0, 0], torch.tensor([4, 4], dtype=torch.int32))  # ceil(3.2σ)


def test_peak_follows_projection_off_axis():
    f, z = 100.0, 10.0
    g = gaussians([[1.05, -0.55, z]], [[0.05, 0.05, 0.05]], [0.9], [[1.0, 0.0, 0.0]])
    out = render(g, pinhole(64, f, 32.0), backend="torch")
    u, v = 32 + f * 1.05 / z, 32 + f * -0.55 / z  # 42.5, 26.5: the centre of pixel (row 26, col 42)
    assert divmod(int(out.alpha[0, ..., 0].argmax()), 64) == (26, 42)
    assert out.aux["means2d"][0, 0].tolist() == pytest.approx([u, v])


@pytest.mark.parametrize("front_first", [True, False])
def test_compositing_order_and_formula(front_first):
    # red in front at z=5 (alpha 0.9 at the centre), green behind at z=10 (0.8); same centre.
    front = ([0.0, 0.0, 5.0], [0.05] * 3, 0.9, [1.0, 0.0, 0.0])
    back = ([0.0, 0.0, 10.0], [0.1] * 3, 0.8, [0.0, 1.0, 0.0])
    gs = [front, back] if front_first else [back, front]
    g = gaussians(*[[x[k] for x in gs] for k in range(4)])
    out = render(g, pinhole(9, 100.0, 4.5), backend="torch")
    a1, a2 = 0.9, 0.8
    assert out.rgb[0, 4, 4].tolist() == pytest.approx([a1, (1 - a1) * a2, 0.0])
    assert out.alpha[0, 4, 4, 0].item() == pytest.approx(1 - (1 - a1) * (1 - a2))
    assert out.depth[0, 4, 4, 0].item() == pytest.approx((a1 * 5 + (1 - a1) * a2 * 10) / (1 - (1 - a1) * (1 - a2)))


def test_transmittance_stops_before_1e4_like_gsplat():
    # 0.999 then 0.95: T would fall to 5e-5 <= 1e-4, so the second Gaussian is left out.
    g = gaussians([[0, 0, 5.0], [0, 0, 6.0]], [[0.05] * 3, [0.05] * 3], [0.999, 0.95], [[1.0, 0, 0], [0, 1.0, 0]])
    out = render(g, pinhole(9, 100.0, 4.5), backend="torch")
    assert out.rgb[0, 4, 4].tolist() == pytest.approx([0.999, 0.0, 0.0])
    assert out.alpha[0, 4, 4, 0].item() == pytest.approx(0.999)


@pytest.mark.parametrize("angle_deg", [25.0, 70.0, -40.0])
def test_rotated_anisotropic_footprint_axis(angle_deg):
    # Long axis along camera x, turned by `angle` about the optical axis: image x right, y down.
    th = math.radians(angle_deg)
    quat = [math.cos(th / 2), 0.0, 0.0, math.sin(th / 2)]
    g = gaussians([[0.0, 0.0, 10.0]], [[0.8, 0.2, 0.2]], [0.5], [[1.0, 1.0, 1.0]], quats=[quat])
    alpha = render(g, pinhole(96, 100.0, 48.0), backend="torch").alpha[0, ..., 0]
    i, j = torch.meshgrid(torch.arange(96.0, dtype=F64), torch.arange(96.0, dtype=F64), indexing="ij")
    w = alpha / alpha.sum()
    x, y = j + 0.5 - (w * (j + 0.5)).sum(), i + 0.5 - (w * (i + 0.5)).sum()
    mxx, myy, mxy = (w * x * x).sum(), (w * y * y).sum(), (w * x * y).sum()
    measured = 0.5 * math.degrees(math.atan2(2 * mxy, mxx - myy))
    assert measured == pytest.approx(angle_deg, abs=0.5)
    assert (mxx + myy).item() == pytest.approx(8**2 + 2**2 + 2 * reference.EPS2D, rel=0.05)  # truncation at 3.3σ


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(0)
    n = 4
    params = [
        torch.randn(n, 3, generator=gen, dtype=F64) * 0.3 + torch.tensor([0.0, 0.0, 8.0], dtype=F64),
        torch.randn(n, 4, generator=gen, dtype=F64),
        torch.rand(n, 3, generator=gen, dtype=F64) * 0.15 + 0.1,
        torch.rand(n, generator=gen, dtype=F64) * 0.6 + 0.3,
        torch.rand(n, 3, generator=gen, dtype=F64),
        torch.eye(4, dtype=F64)[None].repeat(2, 1, 1),
    ]
    params[5][1, :3, 3] = torch.tensor([0.3, -0.2, 0.5])  # a second, shifted camera
    K = torch.tensor([[40.0, 0, 8], [0, 40.0, 8], [0, 0, 1]], dtype=F64)
    params = [p.requires_grad_() for p in params]

    def f(means, quats, scales, opacities, colors, viewmats):
        out = render(Gaussians(means, quats, scales, opacities, colors), Camera(viewmats, K, 16, 16), backend="torch")
        return out.rgb, out.alpha, out.depth

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_background_compositing():
    g = head_scene(300, seed=1, dtype=F64)
    cam = front_cameras(32, yaws_deg=(0.0, 20.0), dtype=F64)
    plain = render(g, cam, backend="torch")
    assert 0.05 < plain.alpha.mean() < 0.95
    colour = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    assert torch.allclose(render(g, cam, colour, backend="torch").rgb, plain.rgb + (1 - plain.alpha) * colour)
    image = torch.rand(2, 32, 32, 3, dtype=F64)
    assert torch.allclose(render(g, cam, image, backend="torch").rgb, plain.rgb + (1 - plain.alpha) * image)


def test_bands_and_batches_change_nothing():
    """Splitting rows into checkpointed bands, and batching cameras, give the same values and grads."""
    g = head_scene(500, seed=2)
    cam = front_cameras(48, yaws_deg=(-15.0, 10.0))
    colors = torch.rand(2, 500, 3, generator=torch.Generator().manual_seed(3))
    args = [g.means, g.quats, g.scales, g.opacities, colors]
    for p in args:
        p.requires_grad_()
    viewmats, Ks = cam.batched()

    def run(budget, views):
        c = colors[views]
        rgb, alpha, depth, _ = reference.render(*args[:4], c, viewmats[views], Ks[views], 48, 48, budget=budget)
        loss = (rgb * torch.linspace(0, 1, 3)).sum() + alpha.sum() + 0.01 * depth.sum()
        return torch.cat([rgb, alpha, depth], -1), torch.autograd.grad(loss, args, allow_unused=True)

    whole, grads = run(reference.BUDGET, [0, 1])
    banded, banded_grads = run(2000, [0, 1])  # ~1 row per band
    assert torch.allclose(whole, banded, atol=1e-6)
    for a, b in zip(grads, banded_grads):
        assert torch.allclose(a, b, atol=1e-5)
    single = torch.cat([run(reference.BUDGET, [v])[0] for v in (0, 1)])
    assert torch.allclose(whole, single, atol=1e-6)


def _scenes(n: int, views: int, seed: int) -> Gaussians:
    """`views` different head scenes of n Gaussians stacked per camera ((B, N, ...) fields)."""
    parts = [head_scene(n, seed=seed + v) for v in range(views)]
    return Gaussians(*(torch.stack([getattr(g, k) for g in parts]) for k in ("means", "quats", "scales", "opacities", "colors")))


def _single(g: Gaussians, b: int) -> Gaussians:
    """Scene b of per-camera Gaussians, as an ordinary shared scene."""
    return Gaussians(g.means[b], g.quats[b], g.scales[b], g.opacities[b], g.colors[b])


def test_per_camera_scenes_equal_single_renders():
    """B scenes, one per camera, in one call == B one-camera renders: images, aux and grads."""
    g = _scenes(400, 3, seed=7)
    cam = front_cameras(40, yaws_deg=(-20.0, 0.0, 15.0))
    params = [t.requires_grad_() for t in (g.means, g.quats, g.scales, g.opacities, g.colors)]
    weights = torch.rand(3, 40, 40, 5, generator=torch.Generator().manual_seed(8))

    def grads(out, w: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad((torch.cat([out.rgb, out.alpha, out.depth / 50], -1) * w).sum(), params)

    batched = render(g, cam, backend="torch")
    singles = [render(_single(g, b), Camera(cam.viewmat[b], cam.K, 40, 40), backend="torch") for b in range(3)]
    assert 0.05 < batched.alpha.mean() < 0.95
    for name in ("rgb", "alpha", "depth"):
        assert torch.allclose(getattr(batched, name), torch.cat([getattr(o, name) for o in singles]), atol=1e-6), name
    for key in ("radii", "means2d", "depths", "conics"):
        assert batched.aux[key].shape[:2] == (3, 400)
        assert torch.allclose(batched.aux[key].float(), torch.cat([o.aux[key] for o in singles]).float(), atol=1e-5), key
    # each single render reaches only its own scene's rows of the stacked parameters
    single_grads = [grads(o, weights[b : b + 1]) for b, o in enumerate(singles)]
    for name, a, *parts in zip(["means", "quats", "scales", "opacities", "colors"], grads(batched, weights), *single_grads):
        assert torch.allclose(a, sum(parts), atol=1e-5), name


def _bad_shapes() -> dict[str, tuple[Gaussians, Camera]]:
    g, cam = _scenes(20, 3, seed=0), front_cameras(16, yaws_deg=(0.0, 10.0, 20.0))
    shared = _single(g, 0)
    return {
        "scenes != cameras": (g, front_cameras(16, yaws_deg=(0.0, 10.0))),
        "shared opacities, per-camera means": (Gaussians(g.means, g.quats, g.scales, shared.opacities, g.colors), cam),
        "quats of another N": (Gaussians(g.means, g.quats[:, :5], g.scales, g.opacities, g.colors), cam),
        "colours of 2 views for 3": (Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors[:2]), cam),
        "means without xyz": (Gaussians(g.means[..., :2], g.quats, g.scales, g.opacities, g.colors), cam),
        "means with 2 batch dims": (Gaussians(g.means[None], g.quats, g.scales, g.opacities, g.colors), cam),
        "shared scene, colours of 2 views for 3": (Gaussians(shared.means, shared.quats, shared.scales, shared.opacities, g.colors[:2]), cam),
    }


@pytest.mark.parametrize("case", list(_bad_shapes()))
def test_shape_errors_are_value_errors(case):
    gaussians, camera = _bad_shapes()[case]
    with pytest.raises(ValueError):
        render(gaussians, camera, backend="torch")


def test_culling_near_plane_and_offscreen():
    g = gaussians(
        [[0, 0, -5.0], [0, 0, 0.005], [100.0, 0, 5.0], [0, 0, 5.0]], [[0.1] * 3] * 4, [0.9] * 4, [[1.0, 1, 1]] * 4
    )
    out = render(g, pinhole(16, 50.0, 8.0), backend="torch")
    assert out.aux["radii"][0, :, 0].tolist()[:3] == [0, 0, 0] and out.aux["radii"][0, 3, 0] > 0
    assert torch.isfinite(out.rgb).all() and out.alpha.max() > 0.5


def test_projection_matches_gsplat_torch_reference():
    """gsplat's pure-torch projection runs on CPU: same means2d, conics, depths; radii no larger."""
    torch_impl = pytest.importorskip("gsplat.cuda._torch_impl")
    g = head_scene(2000, seed=6, dtype=F64)
    g.means[0], g.scales[0] = torch.tensor([40.0, -10.0, 30.0], dtype=F64), 10.0  # centre off-image,
    viewmats, Ks = front_cameras(128, yaws_deg=(-30.0, 0.0, 25.0), dtype=F64).batched()
    covars, _ = torch_impl._quat_scale_to_covar_preci(g.quats, g.scales, compute_preci=False)
    radii, means2d, depths, conics, _ = torch_impl._fully_fused_projection(g.means, covars, viewmats, Ks, 128, 128)
    ours = reference.project(g.means, g.quats, g.scales, g.opacities, viewmats, Ks, 128, 128)
    seen = ours.radii[..., 0] > 0
    assert seen.sum() > 5000 and seen[:, 0].all()  # footprint on it: the Jacobian clamp matters
    assert torch.allclose(ours.means2d[seen], means2d[seen], atol=1e-9)
    assert torch.allclose(ours.conics[seen], conics[seen], rtol=1e-9, atol=1e-12)
    assert torch.allclose(ours.depths, depths)
    # gsplat's CUDA kernel shrinks the 3.33σ radius by opacity, as ours does; its torch copy does not
    assert (ours.radii <= radii).all() and (ours.radii[seen] > 0).all()


def test_gsplat_without_cuda_is_a_resource_error():
    g = head_scene(10)
    with pytest.raises(GGError) as e:
        render(g, front_cameras(16), backend="gsplat")
    assert e.value.code == Exit.RESOURCE and 'backend="torch"' in e.value.message
    assert torch.equal(render(g, front_cameras(16)).rgb, render(g, front_cameras(16), backend="torch").rgb)


@pytest.mark.cuda
@cuda
def test_gsplat_parity_images_and_gradients():
    g = head_scene(2000, seed=4)
    cam = front_cameras(128, yaws_deg=(-30.0, -10.0, 5.0, 25.0))
    gen = torch.Generator().manual_seed(5)
    colors = torch.rand(4, 2000, 3, generator=gen)
    weights = torch.rand(4, 128, 128, 5, generator=gen)

    def run(device, backend):
        params = [t.to(device).requires_grad_() for t in (g.means, g.quats, g.scales, g.opacities, colors)]
        viewmats = cam.viewmat.to(device).requires_grad_()
        out = render(Gaussians(*params), Camera(viewmats, cam.K.to(device), 128, 128), backend=backend)
        image = torch.cat([out.rgb, out.alpha, out.depth / 50], -1)
        grads = torch.autograd.grad((image * weights.to(device)).sum(), params + [viewmats])
        return image.detach().cpu(), [x.cpu() for x in grads], out.aux["radii"].cpu()

    ref_image, ref_grads, ref_radii = run("cpu", "torch")
    image, grads, radii = run("cuda", "gsplat")
    assert torch.equal(run("cuda", "auto")[0], image)  # auto picks gsplat for CUDA tensors
    assert torch.allclose(run("cuda", "torch")[0], ref_image, atol=1e-4)  # the reference runs on CUDA too
    # float32 + fast-math exp/log on the GPU: a radius may round the other way now and then
    assert (ref_radii - radii).abs().max() <= 1 and (ref_radii != radii).float().mean() < 1e-3
    err = (image - ref_image).abs()
    assert err.mean() < 1e-4 and err.max() < 2e-2, (err.mean(), err.max())
    for name, a, b in zip(["means", "quats", "scales", "opacities", "colors", "viewmats"], ref_grads, grads):
        rel = (a - b).norm() / a.norm()
        assert rel < 1e-2, (name, rel.item())


@pytest.mark.cuda
@cuda
def test_gsplat_per_camera_scenes_equal_per_frame_calls():
    """gsplat with one scene per camera (its leading batch dims) == one gsplat call per frame."""
    g = _scenes(2000, 4, seed=9)
    cam = front_cameras(128, yaws_deg=(-25.0, -5.0, 10.0, 30.0))
    weights = torch.rand(4, 128, 128, 5, generator=torch.Generator().manual_seed(10)).cuda()

    def run(scene: Gaussians, camera: Camera, w: torch.Tensor):
        params = [t.cuda().requires_grad_() for t in (scene.means, scene.quats, scene.scales, scene.opacities, scene.colors)]
        out = render(Gaussians(*params), Camera(camera.viewmat.cuda(), camera.K.cuda(), 128, 128), backend="gsplat")
        image = torch.cat([out.rgb, out.alpha, out.depth / 50], -1)
        grads = torch.autograd.grad((image * w).sum(), params)
        return image.detach(), out.aux, grads

    image, aux, grads = run(g, cam, weights)
    singles = [run(_single(g, b), Camera(cam.viewmat[b], cam.K, 128, 128), weights[b : b + 1]) for b in range(4)]
    assert 0.05 < image[..., 3].mean() < 0.95
    assert torch.allclose(image, torch.cat([s[0] for s in singles]), atol=1e-5)
    for key in ("radii", "means2d", "depths", "conics"):
        assert aux[key].shape[:2] == (4, 2000), (key, aux[key].shape)
        assert torch.allclose(aux[key].float(), torch.cat([s[1][key] for s in singles]).float(), atol=1e-4), key
    for k, name in enumerate(["means", "quats", "scales", "opacities", "colors"]):  # atomics: summation order varies
        expected = torch.stack([s[2][k] for s in singles])
        assert (grads[k] - expected).norm() <= 1e-4 * expected.norm(), name
