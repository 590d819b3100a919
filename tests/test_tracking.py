"""tracking.py: camera model consistency on real video, exact 3D landmarks, gaps, lag-free smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from ggtalker_cli import media, tracking
from ggtalker_cli.errors import GGError


@pytest.fixture(scope="module")
def macron_track(macron_cut):
    p = media.probe(macron_cut)
    return tracking.track(media.decode(macron_cut, 25, p.width, p.height), p.width, p.height, 25, source=str(macron_cut))


def test_real_clip_is_tracked(macron_track):
    t = macron_track
    n = len(t.pose)
    assert n == pytest.approx(75, abs=1)
    assert t.valid.mean() >= 0.95 and t.info["faces_seen"] == 1
    assert t.landmarks.shape == (n, 478, 2) and t.blendshapes.shape == (n, 52)
    assert "jawOpen" in t.blendshape_names and "eyeBlinkLeft" in t.blendshape_names
    rot = t.pose[:, :3, :3]
    assert np.allclose(rot @ rot.transpose(0, 2, 1), np.eye(3), atol=1e-5)  # rigid (no scale)
    assert np.all(t.pose[:, 2, 3] > 10)  # the face is in front of the camera (OpenCV +z), in cm


def test_posed_canonical_mesh_lands_on_landmarks(macron_track):
    """The 63° camera + GL→CV flip are right: the *canonical* mesh (not this person's shape)
    projects within a few pixels of the detections; a wrong FOV or axis flip gives tens."""
    from ggtalker_cli.face_model import canonical_mesh

    t = macron_track
    uv = tracking.project(canonical_mesh().verts.astype(np.float64), t.pose, t.K)
    err = np.linalg.norm(uv - t.landmarks[:, :468], axis=-1).mean(1)
    assert np.median(err) < 8.0


def test_backprojected_verts_reproject_exactly_and_rigid_shape_within_a_few_px(macron_track):
    t = macron_track
    verts = tracking.backproject(t.landmarks, t.z, t.pose, t.K, 512)
    assert np.abs(tracking.project(verts.astype(np.float64), t.pose, t.K) - t.landmarks).max() < 1e-2
    rigid = tracking.rigid_reprojection(verts, t.pose, t.K, t.landmarks, t.valid)
    assert rigid["rigid_reproj_px_median"] < 3.0  # measured ≈1.7 px at 512² on the full clip
    # face space is centimetres around the head centre: a face ~12-20 cm tall
    neutral = np.median(verts, 0)
    assert 10 < neutral[tracking.FOREHEAD, 1] - neutral[tracking.CHIN, 1] < 22


def test_signals_follow_the_mouth(macron_track):
    t = macron_track
    blink, mouth = tracking.signals(t.landmarks, t.blendshapes, t.blendshape_names)
    assert blink.min() >= 0 and blink.max() <= 1
    jaw = t.blendshapes[:, t.blendshape_names.index("jawOpen")]
    assert np.corrcoef(mouth, jaw)[0, 1] > 0.6


def _fake_track(n: int, missing: set[int]) -> tracking._Track:
    tr = tracking._Track()
    for t in range(n):
        if t in missing:
            continue
        pose = np.eye(4)
        pose[:3, 3] = [t, 0, 50]
        lm = np.zeros((478, 3), np.float32)
        lm[:, 0] = t
        tr.faces[t] = tracking.Face(lm, np.zeros(52, np.float32), pose)
    return tr


def test_short_gaps_interpolated_long_gaps_flagged():
    missing = {5, 6, 7} | set(range(20, 40))
    names = [f"b{i}" for i in range(52)]
    t = tracking._fill_and_smooth(_fake_track(60, missing), 60, 100, 100, 25.0, names, 12, 0.0, {})
    assert t.interpolated[[5, 6, 7]].all() and not t.valid[[5, 6, 7]].any()
    assert not t.interpolated[20:40].any() and not t.valid[20:40].any()
    assert np.allclose(t.landmarks[6, :, 0], 6) and np.allclose(t.pose[6, 0, 3], 6)  # linear fill
    assert t.info["lost_frames"] == 20 and t.info["interpolated_frames"] == 3


def test_pose_smoothing_has_no_lag():
    """Zero-phase filtering: a 1 Hz head sway keeps its timing while jitter is removed."""
    n, fps = 200, 25.0
    rng = np.random.default_rng(0)
    sway = 3 * np.sin(2 * np.pi * np.arange(n) / fps)
    tr = tracking._Track()
    for t in range(n):
        pose = np.eye(4)
        pose[:3, 3] = [sway[t] + rng.normal(0, 0.3), 0, 50]
        tr.faces[t] = tracking.Face(np.zeros((478, 3), np.float32), np.zeros(52, np.float32), pose)
    out = tracking._fill_and_smooth(tr, n, 100, 100, fps, [f"b{i}" for i in range(52)], 12, 6.0, {})
    x = out.pose[:, 0, 3]
    lags = range(-5, 6)
    best = max(lags, key=lambda k: np.dot(np.roll(x, k)[10:-10], sway[10:-10]))
    assert best == 0
    assert np.abs(x - sway)[10:-10].std() < 0.2  # noise (σ 0.3) reduced


def test_no_face_is_refused(tmp_path):
    from conftest import ffmpeg

    path = tmp_path / "noface.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=128x128:rate=25:duration=1", "-pix_fmt", "yuv420p", str(path))
    with pytest.raises(GGError, match="face was found in only 0%"):
        tracking.track(media.decode(path, 25, 128, 128), 128, 128, 25, source=str(path))


def test_small_second_face_is_ignored_with_a_note(tmp_path, cuts):
    """A second, smaller person in a corner: the main face is followed and the run says so."""
    from conftest import ffmpeg

    path = tmp_path / "twofaces_small.mp4"
    ffmpeg("-i", str(cuts / "aoc_8s_512_25fps.mp4"), "-i", str(cuts / "katiehill_8s_512_25fps.mp4"), "-filter_complex",
           "[1:v]scale=220:220[s];[0:v]pad=732:512[b];[b][s]overlay=512:0", "-t", "2", "-an", "-c:v", "libx264",
           "-preset", "ultrafast", str(path))
    t = tracking.track(media.decode(path, 25, 732, 512), 732, 512, 25, source=str(path))
    assert t.info["faces_seen"] == 2 and "following the largest" in t.info["note"]
    assert t.valid.mean() > 0.95 and t.landmarks[:, :, 0].mean() < 512  # the big face on the left
