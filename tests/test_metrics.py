"""Each metric against a case whose answer is computed by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ggtalker_cli import assets, metrics


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, (size, size, 3))


def test_identical_images_psnr_inf_ssim_one():
    img = _image()
    assert metrics.psnr(img, img) == math.inf
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert json.loads(json.dumps({"psnr": metrics.jsonable(metrics.psnr(img, img))})) == {"psnr": "inf"}


def test_jsonable_keeps_inf_and_undefined_apart():
    assert metrics.jsonable(math.inf) == "inf"
    assert metrics.jsonable(-math.inf) == "-inf"
    assert metrics.jsonable(math.nan) is None
    assert metrics.jsonable(np.float32(1.5)) == 1.5


def test_known_mse_gives_known_psnr():
    target = _image()
    assert metrics.psnr(target + 0.1, target) == pytest.approx(20.0)  # MSE 0.01
    half = target.copy()
    half[:16] += 0.1  # error on half the pixels: MSE 0.005
    assert metrics.psnr(half, target) == pytest.approx(10 * math.log10(200))
    mask = np.zeros((32, 32), bool)
    mask[:16] = True
    assert metrics.psnr(half, target, mask=mask) == pytest.approx(20.0)
    assert metrics.psnr(half, target, mask=~mask) == math.inf
    assert metrics.psnr(half, target, box=(0, 16, 32, 32)) == math.inf
    # uint8 is scaled to [0,1]: 51/255 = 0.2, MSE 0.04
    zeros = np.zeros((4, 4, 3), np.uint8)
    assert metrics.psnr(zeros + 51, zeros) == pytest.approx(10 * math.log10(25))
    with pytest.raises(ValueError):
        metrics.psnr(half, target, mask=np.zeros((32, 32), bool))


def test_ssim_of_flat_images_is_the_luminance_term():
    # Zero variance leaves (2ab + C1) / (a² + b² + C1).
    a, b = np.full((16, 16, 3), 0.5), np.full((16, 16, 3), 0.25)
    c1 = 0.01**2
    assert metrics.ssim(a, b) == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1))


def test_ssim_on_box_ignores_outside_and_drops_with_noise():
    target = _image(1)
    pred = target.copy()
    pred[:, :12] = 0.0
    assert metrics.ssim(pred, target, box=(12, 0, 32, 32)) == pytest.approx(1.0)
    assert metrics.ssim(pred, target) < 0.9
    noisy = np.clip(target + np.random.default_rng(2).normal(0, 0.1, target.shape), 0, 1)
    assert 0 < metrics.ssim(noisy, target) < 0.9
    with pytest.raises(ValueError):
        metrics.ssim(target, target, box=(0, 0, 10, 10))


def test_ssim_map_is_differentiable():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    metrics.ssim_map(x, torch.rand(1, 3, 16, 16)).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dilate_and_seam_band_sizes():
    dot = torch.zeros(9, 9)
    dot[4, 4] = 1
    assert int(metrics.dilate(dot, 1).sum()) == 9
    mask = np.zeros((50, 50), bool)
    mask[20:30, 20:30] = True
    band = metrics.seam_band(mask, radius=2)
    assert int(band.sum()) == 14 * 14 - 6 * 6  # dilated 14² minus eroded 6²
    assert band[18, 18] and band[21, 21] and band[31, 31] and not band[22, 22] and not band[17, 17] and not band[32, 32]
    assert int(metrics.seam_band(np.zeros((512, 512), bool)).sum()) == 0  # no head, no seam


def test_face_box_grows_and_clips():
    lm = np.array([[100.0, 100.0], [200.0, 300.0], [150.0, 200.0]])
    assert metrics.face_box(lm, 512) == (90, 80, 210, 320)
    assert metrics.face_box(lm, 256) == (90, 80, 210, 256)


def _lips_face(offsets: np.ndarray, centre=(256.0, 300.0)) -> np.ndarray:
    """A (478, 2) landmark set whose lip points sit at centre + offsets (others arbitrary)."""
    lm = np.random.default_rng(0).uniform(0, 512, (478, 2))
    lm[list(metrics.LIPS)] = np.asarray(centre) + offsets
    return lm


def test_lmd_translation_is_zero_and_scaling_is_known():
    # Lip points at (±3, ±4) from their centre: every point 5 px from it.
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]] * 10, float)
    offsets = signs * [3.0, 4.0]
    gt = _lips_face(offsets)
    assert metrics.lmd(_lips_face(offsets, centre=(270.0, 290.0)), gt, 512) == pytest.approx(0.0, abs=1e-9)
    scaled = _lips_face(offsets * 1.2)
    assert metrics.lmd(scaled, gt, 512) == pytest.approx(1.0)  # 0.2 * 5 px
    assert metrics.lmd(scaled, gt, 256) == pytest.approx(2.0)  # reported at 512²
    # a frame with a missed detection is skipped, not averaged as 0 or NaN
    pred = np.stack([scaled, np.full((478, 2), np.nan)])
    assert metrics.lmd(pred, np.stack([gt, gt]), 512) == pytest.approx(1.0)
    assert math.isnan(metrics.lmd(np.full((1, 478, 2), np.nan), gt[None], 512))


def test_pearson():
    x = np.random.default_rng(3).normal(size=200)
    assert metrics.pearson(x, x) == pytest.approx(1.0)
    assert metrics.pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    assert math.isnan(metrics.pearson(x, np.ones_like(x)))
    y = x.copy()
    y[5] = np.nan  # skipped, not propagated
    assert metrics.pearson(x, y) == pytest.approx(1.0)


def test_audio_envelope_rms_per_frame():
    sr, fps = 16000, 25.0  # 640 samples per frame
    t = np.arange(sr * 2) / sr
    wave = 0.5 * np.sin(2 * np.pi * 250 * t)  # 10 whole periods per frame
    wave[sr:] = 0.0
    env = metrics.audio_envelope(wave, sr, fps)
    assert env.shape == (50,)
    assert env[:25] == pytest.approx(np.full(25, 0.5 / math.sqrt(2)), rel=1e-6)
    assert env[25:] == pytest.approx(np.zeros(25))
    assert metrics.audio_envelope(np.stack([wave, wave], 1), sr, fps, n_frames=60)[50:] == pytest.approx(np.zeros(10))


@pytest.mark.parametrize("k", [3, -2, 0, 7])
def test_peak_shift_recovers_a_known_delay(k):
    rng = np.random.default_rng(4)
    raw = np.convolve(rng.normal(size=400), np.ones(4) / 4, mode="same")  # syllable-like smoothness
    a = raw[20:320]
    b = raw[20 - k : 320 - k]  # b[t] = a[t - k]: b moves k frames after a
    lag, r = metrics.peak_shift(a, b)
    assert lag == k
    assert r == pytest.approx(1.0)


def _speech(seconds: float, delay: float, fps: float = 25.0, rate: int = 8000) -> tuple[np.ndarray, np.ndarray]:
    """Noise amplitude-modulated at a syllable-like rate, and a 'mouth' that follows the modulation `delay` frames later."""
    rng = np.random.default_rng(7)
    n = int(seconds * fps)
    knots = np.abs(rng.normal(size=n // 5 + 8))  # one syllable every 5 frames (5 Hz)
    t = np.arange(int(seconds * rate)) / rate
    samples = rng.normal(size=len(t)) * np.interp(t * fps / 5, np.arange(len(knots)), knots)
    frame_t = (np.arange(n) + 0.5 - delay) / fps  # frame t is shown over [t, t+1)/fps: its audio centres at t+0.5
    mouth = np.interp(frame_t * fps / 5, np.arange(len(knots)), knots)
    return samples, mouth


@pytest.mark.parametrize("delay", [0.0, 3.0, -2.0, 1.5])
def test_av_sync_recovers_a_known_delay(delay):
    samples, mouth = _speech(10.0, delay)
    lag, r = metrics.av_sync(samples, 8000, 25.0, mouth)
    assert lag == pytest.approx(delay, abs=0.25)
    assert r > 0.8


def test_av_sync_does_not_measure_what_it_cannot_trust():
    samples, mouth = _speech(7.5, 0.0)  # under SYNC_MIN_SECONDS
    assert all(math.isnan(x) for x in metrics.av_sync(samples, 8000, 25.0, mouth))
    samples, mouth = _speech(10.0, 0.0)
    mouth[::5] = np.nan  # 20% undetected
    assert all(math.isnan(x) for x in metrics.av_sync(samples, 8000, 25.0, mouth))
    mouth = _speech(10.0, 9.0)[1]  # the true lag lies outside ±8: no interior peak
    assert math.isnan(metrics.av_sync(samples, 8000, 25.0, mouth)[0])


def test_sync_is_not_measured_where_the_frame_rate_cannot_carry_the_syllable_band():
    """A clip thinned to 5 fps (Nyquist 2.5 Hz, under the band's 7 Hz edge) used to crash in the
    band-pass design; it is unmeasurable, like a short clip."""
    samples, mouth = _speech(12.0, 0.0)
    thinned = mouth[::5]
    assert all(math.isnan(x) for x in metrics.av_sync(samples, 8000, 5.0, thinned))
    assert all(math.isnan(x) for x in metrics.mouth_sync(thinned, thinned, 5.0))


@pytest.mark.parametrize("delay", [0.0, 3.0, -2.0, 1.5])
def test_mouth_sync_recovers_a_known_delay_on_short_tracks(delay):
    """Two mouth tracks of the same speech: 5 s is enough (av_sync would refuse under 8 s)."""
    reference = _speech(5.0, 0.0)[1]
    mouth = _speech(5.0, delay)[1] + np.random.default_rng(1).normal(scale=0.05, size=len(reference))
    lag, r = metrics.mouth_sync(reference, mouth, 25.0)
    assert lag == pytest.approx(delay, abs=0.25) and r > 0.8
    samples, _ = _speech(5.0, delay)
    assert all(math.isnan(x) for x in metrics.av_sync(samples, 8000, 25.0, mouth))


def test_mouth_sync_does_not_align_unrelated_or_short_tracks():
    reference = _speech(5.0, 0.0)[1]
    assert all(math.isnan(x) for x in metrics.mouth_sync(reference[:75], reference[:75], 25.0))  # 3 s
    other = np.abs(np.random.default_rng(3).normal(size=len(reference)))  # no shared rhythm
    assert all(math.isnan(x) for x in metrics.mouth_sync(reference, other, 25.0))
    gappy = reference.copy()
    gappy[::5] = np.nan  # 20% undetected
    assert all(math.isnan(x) for x in metrics.mouth_sync(reference, gappy, 25.0))


def test_blinks_on_a_square_wave():
    fps = 25.0
    period = np.r_[np.full(5, 0.9), np.full(95, 0.05)]  # eyes closed 5 frames in every 100
    signal = np.tile(period, 10)  # 1000 frames = 40 s, 10 blinks
    assert metrics.count_blinks(signal) == 10
    assert metrics.blink_rate(signal, fps) == pytest.approx(15.0)
    # hovering between the thresholds after a blink does not count again (hysteresis)
    jitter = np.r_[0.1, 0.9, np.tile([0.45, 0.55], 20), 0.1, 0.9]
    assert metrics.count_blinks(jitter) == 2


def test_every_definition_is_in_the_protocol_doc():
    doc = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    for key in ("psnr", "psnr_face", "psnr_seam", "ssim", "ssim_face", "lmd", "mouth_open", "mouth_open_r",
                "audio_env", "av_sync_lag", "av_sync_r", "av_sync_lag_rel", "blink_rate"):
        assert len(metrics.DEFINITIONS[key]) > 20
        assert f"| `{key}` |" in doc
    assert set(metrics.DEFINITIONS) == {line.split("`")[1] for line in doc.splitlines() if line.startswith("| `")}


@pytest.mark.skipif(assets.find("face_landmarker") is None, reason="face_landmarker.task not available")
def test_detect_landmarks_no_face_gives_nan_rows():
    lm, shapes = metrics.detect_landmarks([np.full((64, 64, 3), 0.5)])
    assert lm.shape == (1, 478, 2) and shapes.shape == (1, 52)
    assert np.isnan(lm).all() and np.isnan(shapes).all()
