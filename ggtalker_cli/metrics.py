"""Evaluation metrics: image quality, landmark distance, lip-sync and blinks (docs/evaluation.md).

Every number in a report carries a key of `DEFINITIONS`, whose text is the exact definition; a
definition never changes under its key (a changed definition gets a new key), so numbers with
the same key are comparable across runs and versions.

Images are float RGB in [0, 1] (uint8 is scaled), HWC, as numpy arrays or torch tensors; masks
are HW. Image metrics run in float64 torch so the same SSIM serves evaluation and the
inpainter's training loss (`ssim_map`, differentiable). Landmarks are (T, 478, 2) pixel arrays
in mediapipe's face-mesh order, NaN where no face was found.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import butter, sosfiltfilt

DEFINITIONS: dict[str, str] = {
    "psnr": "PSNR in dB, 10*log10(1/MSE) over all pixels and RGB channels of images in [0,1]; "
    "identical images give +inf (JSON \"inf\"); mean over test frames of per-frame PSNR.",
    "psnr_face": "psnr restricted to the face box: bounding box of the ground truth's 478 mediapipe "
    "landmarks, grown by 10% of its width/height on each side, clipped to the frame.",
    "psnr_seam": "psnr over the seam band: pixels within r = round(0.02*S) px (Chebyshev) of the "
    "ground-truth head-mask border, i.e. dilate(mask, r) minus erode(mask, r); S = frame side.",
    "ssim": "SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2, "
    "C2 = 0.03^2, images in [0,1], valid windows only (no padding), mean over windows and RGB "
    "channels; mean over test frames.",
    "ssim_face": "ssim on the face box (see psnr_face).",
    "lmd": "Lip landmark distance: the 40 mediapipe lip landmarks of prediction and ground truth "
    "(same detector, single-image mode), coordinates scaled to a 512x512 frame, each set centred "
    "on its own mean; mean Euclidean distance over the 40 points in px; mean over frames where "
    "both detections succeed. Not comparable to FAN-based LMD in papers.",
    "mouth_open_r": "Pearson correlation over test frames of the predicted and ground-truth "
    "mouth-opening tracks (mouth_open).",
    "mouth_open": "Mouth opening per frame (tracking.signals, as in tracking.npz): distance of the "
    "inner-lip centre landmarks 13-14 divided by the outer eye-corner distance 33-263.",
    "audio_env": "Audio envelope per video frame t: RMS of the mono waveform over the frame's "
    "interval [t/fps, (t+1)/fps).",
    "av_lag": "Retired (reports before av_sync_lag; too noisy on real clips, docs/evaluation.md): audio-mouth lag in "
    "frames: the shift k in [-10, 10] maximising the Pearson correlation of audio_env[t] with mouth_open[t+k] over "
    "overlapping frames; k > 0 means the mouth moves after the sound. Ties go to the smallest |k|.",
    "av_corr": "Retired with av_lag: the peak Pearson correlation found by av_lag.",
    "av_sync_lag": "Audio-mouth lag in frames (k > 0: the mouth moves after the sound), on at least 8 s: the speech "
    "envelope (audio_env of the waveform band-passed to 300-3000 Hz, 4th-order Butterworth, zero-phase) and mouth_open "
    "(missing frames linearly interpolated; not measured if over 10% are missing) are each mean-removed and band-passed to "
    "the syllable rate, 2-7 Hz (2nd-order Butterworth, zero-phase); k in [-8, 8] maximises the Pearson correlation of "
    "envelope[t] with mouth[t+k] over overlapping frames (ties to the smallest |k|), refined by a parabola through the "
    "correlations at k-1, k, k+1. Not measured (null) below 8 s or when the maximum is at +-8 (no peak in range).",
    "av_sync_r": "Speech-lip correlation: the peak Pearson correlation found by av_sync_lag (at its integer k).",
    "av_sync_lag_rel": "av_sync_lag of a video minus av_sync_lag of the avatar's training clip over its whole length "
    "(tracked mouth_open against the clip's audio.wav): 0 = the audio-mouth timing of the real video the avatar learned from.",
    "mouth_lag": "Lip-sync error against the real video in frames: the shift k in [-10, 10] maximising the Pearson "
    "correlation of the ground truth's mouth_open[t] with the prediction's mouth_open[t+k] over overlapping frames; "
    "k > 0 means the predicted mouth moves after the real one. Ties go to the smallest |k|.",
    "blink_rate": "Blinks per minute: rising crossings of the blink signal (tracking.signals: mean "
    "of the eyeBlinkLeft/Right blendshapes, 0..1) above 0.5, re-armed only after it falls below "
    "0.3 (hysteresis), divided by the duration in minutes.",
    "render_ms": "Head render time per frame in ms: the avatar's Gaussians for one frame plus rasterisation, wall-clock with "
    "the device synchronised, mean over the frames of one run.",
    "render_lag": "Pipeline sync in frames: the shift k in [-10, 10] maximising the Pearson correlation of the mouth "
    "opening the A2E model drove (its inner-lip gap, expression level) at frame t with the mouth_open detected in the "
    "written video at t+k; k > 0 means the video shows the mouth later than it was driven (render, body replay, "
    "encode and mux, independent of any model of when lips move). Ties go to the smallest |k|.",
    "render_ms_batch": "Head render time per frame in ms: the avatar's Gaussians plus rasterisation for batches of 8 "
    "frames in one pass (as synth renders), wall-clock with the device synchronised, mean per frame over one run.",
    "composite_ms": "Body composite time per frame in ms: blank mask + inpainter (fp16 on CUDA) or plate paste, and the "
    "conversion to uint8, in batches of 8, mean per frame.",
    "synth_fps": "End-to-end synthesis rate: output frames / wall-clock seconds from the first audio sample to the last "
    "encoded frame (whisper, A2E, render, composite, H.264 encode), one run.",
    "adapt_s": "Adaptation wall-clock seconds as logged in the avatar's meta.yaml: head fit train_seconds + inpainter "
    "train_seconds.",
}

# Mediapipe face-mesh indices (FaceLandmarksConnections.FACE_LANDMARKS_LIPS, as a sorted set).
LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191,
        267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)

LMD_SIZE = 512  # LMD is reported in pixels of a 512x512 frame
SEAM_FRACTION = 0.02  # seam band radius as a fraction of the frame side
FACE_BOX_MARGIN = 0.1
MAX_LAG = 10  # frames: 0.4 s at 25 fps covers lips leading speech and small mux offsets; a peak at ±10 means look wider
SPEECH_BAND = (300.0, 3000.0)  # Hz: formant energy; drops low-frequency hum, breath and room rumble
SYLLABLE_BAND = (2.0, 7.0)  # Hz: the syllable rhythm where lip and envelope movements are coupled
SYNC_MAX_LAG = 8  # frames: 0.32 s at 25 fps, wider than the lip lead and offsets seen on real clips (to 0.22 s)
SYNC_NYQUIST_FPS = 2 * SYLLABLE_BAND[1]  # at or under this frame rate the band does not fit: thinned clips are not measured
SYNC_MIN_SECONDS = 8.0  # below this a real clip's own lag is not reproducible within ±1 frame (bench/av_lag_gt.py)
MOUTH_SYNC_MIN_SECONDS = 4.0  # mouth_sync: two mouth tracks agree on a sharp peak in 4 s (bench/source_lag.py)
MOUTH_SYNC_MIN_R = 0.2  # mouth_sync: below this the band-passed tracks share no rhythm to align
SYNC_MAX_MISSING = 0.1  # fraction of frames without a detected mouth above which no lag is measured
BLINK_HIGH, BLINK_LOW = 0.5, 0.3


def jsonable(value: float) -> float | str | None:
    """A metric value for JSON: +/-inf as the strings "inf"/"-inf", NaN (undefined) as null.

    JSON has no infinities; PSNR of identical images is legitimately +inf and must stay
    distinguishable from "undefined" (null), so the two get different encodings.
    """
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


# ---------------------------------------------------------------------------------------------
# images


def _image(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HWC (or HW) image as a float64 tensor in [0, 1]."""
    t = torch.as_tensor(x)
    t = t.double() / 255.0 if t.dtype == torch.uint8 else t.double()
    return t[..., None] if t.ndim == 2 else t


def _crop(img: torch.Tensor, box: tuple[int, int, int, int] | None) -> torch.Tensor:
    if box is None:
        return img
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]


def psnr(pred, target, mask=None, box: tuple[int, int, int, int] | None = None) -> float:
    """PSNR in dB of HWC images in [0,1]; `mask` (HW, bool or weights) restricts it to a region.

    Identical images (MSE 0) give +inf, explicitly: use `jsonable` to serialise it.
    """
    err = ((_crop(_image(pred), box) - _crop(_image(target), box)) ** 2).mean(-1)
    if mask is None:
        mse = err.mean()
    else:
        w = _crop(torch.as_tensor(mask).double(), box)
        if w.sum() <= 0:
            raise ValueError("psnr: the mask selects no pixels")
        mse = (err * w).sum() / w.sum()
    return math.inf if mse == 0 else float(-10.0 * torch.log10(mse))


@lru_cache(maxsize=8)
def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-window SSIM of (B, C, H, W) images in [0,1] -> (B, C, H-size+1, W-size+1).

    Valid windows only, as in Wang et al.: padding would invent statistics at the border.
    Differentiable; runs in the inputs' dtype and device (the inpainter's loss uses it).
    """
    c = x.shape[1]
    g = _gaussian(size, sigma).to(x)
    gx, gy = g.view(1, 1, 1, size).repeat(c, 1, 1, 1), g.view(1, 1, size, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gx, groups=c), gy, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def ssim(pred, target, box: tuple[int, int, int, int] | None = None) -> float:
    """SSIM of two HWC images in [0,1] (optionally on a box x0, y0, x1, y1); 1 for identical."""
    a = _crop(_image(pred), box).permute(2, 0, 1)[None]
    b = _crop(_image(target), box).permute(2, 0, 1)[None]
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"ssim: image or box {tuple(a.shape[-2:])} is smaller than the 11 px window")
    return float(ssim_map(a, b).mean())


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (..., H, W) masks by a (2r+1)² square, as two separable max-pools.

    A square (Chebyshev distance) rather than a disc: exact with two 1-D passes, so it costs
    O(r) per pixel on any device, which matters when the inpainter dilates every frame.
    """
    if radius <= 0:
        return mask
    shape = mask.shape
    m = mask.reshape(-1, 1, *shape[-2:]).float()
    k = 2 * radius + 1
    m = F.max_pool2d(m, (1, k), stride=1, padding=(0, radius))
    m = F.max_pool2d(m, (k, 1), stride=1, padding=(radius, 0))
    return m.reshape(shape).to(mask.dtype)


def seam_band(head_mask, radius: int | None = None) -> torch.Tensor:
    """Bool HW band of pixels within `radius` px of the head-mask border (where head meets body).

    `radius` defaults to round(SEAM_FRACTION * side) (10 px at 512²), the `psnr_seam` definition.
    """
    m = torch.as_tensor(head_mask).bool()
    r = round(SEAM_FRACTION * max(m.shape[-2:])) if radius is None else radius
    grown = dilate(m.float(), r)
    shrunk = 1 - dilate(1 - m.float(), r)
    return (grown - shrunk) > 0.5


def face_box(landmarks: np.ndarray, size: int, margin: float = FACE_BOX_MARGIN) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) box of one frame's (478, 2) landmarks grown by `margin`, clipped to size²."""
    lo, hi = np.nanmin(landmarks, axis=0), np.nanmax(landmarks, axis=0)
    pad = (hi - lo) * margin
    x0, y0 = np.floor(np.clip(lo - pad, 0, size)).astype(int)
    x1, y1 = np.ceil(np.clip(hi + pad, 0, size)).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


# ---------------------------------------------------------------------------------------------
# landmarks


def _frames(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    return lm[None] if lm.ndim == 2 else lm


def lmd(pred: np.ndarray, target: np.ndarray, size: int) -> float:
    """LMD in px at 512²: (T, 478, 2) landmarks of prediction and ground truth in a size² frame.

    Each lip set is centred on its own mean, so head translation (tracked separately) does not
    count, only mouth shape. Frames where either set is missing (NaN) are skipped; NaN if none.
    """
    p = _frames(pred)[:, LIPS] * (LMD_SIZE / size)
    g = _frames(target)[:, LIPS] * (LMD_SIZE / size)
    p = p - p.mean(axis=1, keepdims=True)
    g = g - g.mean(axis=1, keepdims=True)
    per_frame = np.linalg.norm(p - g, axis=-1).mean(axis=1)
    ok = np.isfinite(per_frame)
    return float(per_frame[ok].mean()) if ok.any() else math.nan


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the entries where both are finite; NaN if either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return math.nan
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# audio-visual sync and blinks


def audio_envelope(samples: np.ndarray, sample_rate: int, fps: float, n_frames: int | None = None) -> np.ndarray:
    """(T,) RMS of a mono waveform over each video frame's interval [t/fps, (t+1)/fps).

    Frame t is shown during that interval once the audio is muxed, so a zero lag means the
    sound and the picture are presented together. Frames past the audio's end get 0.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim > 1:
        x = x.mean(axis=-1)
    if n_frames is None:
        n_frames = int(len(x) * fps / sample_rate)
    edges = np.minimum(np.round(np.arange(n_frames + 1) * sample_rate / fps).astype(np.int64), len(x))
    energy = np.concatenate([[0.0], np.cumsum(x * x)])
    count = np.diff(edges)
    power = np.diff(energy[edges]) / np.maximum(count, 1)
    return np.sqrt(np.maximum(power, 0.0))


def _shift_corr(a: np.ndarray, b: np.ndarray, max_lag: int) -> np.ndarray:
    """(2*max_lag+1,) Pearson(a[t], b[t+k]) for k = -max_lag..max_lag; NaN under 3 overlapping frames."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = min(len(a), len(b))
    out = np.full(2 * max_lag + 1, math.nan)
    for k in range(-max_lag, max_lag + 1):
        if n - abs(k) >= 3:
            out[k + max_lag] = pearson(*((a[: n - k], b[k:n]) if k >= 0 else (a[-k:n], b[: n + k])))
    return out


def _best(corr: np.ndarray) -> int:
    """Index of the largest finite correlation, ties to the centre (smallest |k|); -1 if none."""
    max_lag = len(corr) // 2
    order = sorted(range(len(corr)), key=lambda i: abs(i - max_lag))
    finite = [i for i in order if math.isfinite(corr[i])]
    return max(finite, key=lambda i: corr[i]) if finite else -1


def peak_shift(a: np.ndarray, b: np.ndarray, max_lag: int = MAX_LAG) -> tuple[int, float]:
    """(k, r): the integer shift maximising Pearson(a[t], b[t+k]); k > 0 = b after a.

    Two tracks of the same quantity (mouth opening vs mouth opening: mouth_lag, render_lag)
    correlate strongly, so the raw levels give a sharp peak. Ties go to the smallest |k|;
    (0, -inf) when no shift has a defined correlation.
    """
    corr = _shift_corr(a, b, max_lag)
    i = _best(corr)
    return (i - max_lag, float(corr[i])) if i >= 0 else (0, -math.inf)


def speech_envelope(samples: np.ndarray, sample_rate: int, fps: float, n_frames: int) -> np.ndarray:
    """audio_env of the waveform band-passed to SPEECH_BAND: the energy that articulation shapes."""
    x = np.asarray(samples, dtype=np.float64)
    x = x.mean(axis=-1) if x.ndim > 1 else x
    sos = butter(4, SPEECH_BAND, btype="band", fs=sample_rate, output="sos")
    return audio_envelope(sosfiltfilt(sos, x), sample_rate, fps, n_frames)


def _gaps_filled(x: np.ndarray) -> np.ndarray:
    """x as float64 with NaN frames (mouth not detected) linearly interpolated from their neighbours."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return x if ok.all() else np.interp(np.arange(len(x)), np.flatnonzero(ok), x[ok])


def _syllable_band(x: np.ndarray, fps: float) -> np.ndarray:
    """x mean-removed and band-passed (zero-phase) to SYLLABLE_BAND, NaN gaps interpolated first.

    Removing slow drift (pauses, head distance) and frame jitter leaves the syllable rhythm,
    whose cross-correlation has a narrow peak where the raw levels' is broad and wanders.
    """
    x = _gaps_filled(x)
    sos = butter(2, SYLLABLE_BAND, btype="band", fs=fps, output="sos")
    return sosfiltfilt(sos, x - x.mean())


def av_sync(samples: np.ndarray, sample_rate: int, fps: float, mouth: np.ndarray) -> tuple[float, float]:
    """(lag, r) of av_sync_lag / av_sync_r: audio-mouth lag in frames, k > 0 = mouth after sound.

    (NaN, NaN) when it cannot be trusted: under SYNC_MIN_SECONDS (on real clips the lag of
    shorter windows is not reproducible), at or under SYNC_NYQUIST_FPS, more than
    SYNC_MAX_MISSING of the mouth track undetected, or no interior peak within ±SYNC_MAX_LAG.
    Sub-frame by a parabola through the peak and its neighbours, so a consistent lip lead of a
    fraction of a frame stays visible.
    """
    mouth = np.asarray(mouth, dtype=np.float64)
    n = len(mouth)
    if fps <= SYNC_NYQUIST_FPS or n < SYNC_MIN_SECONDS * fps or np.isfinite(mouth).mean() < 1 - SYNC_MAX_MISSING:
        return math.nan, math.nan
    env = _syllable_band(speech_envelope(samples, sample_rate, fps, n), fps)
    return _subframe_peak(_shift_corr(env, _syllable_band(mouth, fps), SYNC_MAX_LAG))


def mouth_sync(reference: np.ndarray, mouth: np.ndarray, fps: float, min_r: float = MOUTH_SYNC_MIN_R) -> tuple[float, float]:
    """(lag, r): av_sync's measure with a mouth track as the reference instead of the speech
    envelope, e.g. the mouth an in-sync A2E predicts from the same audio; k > 0 = `mouth` after it.

    Two mouth-opening tracks share their syllable rhythm far more closely than sound and mouth
    do, so the peak is sharp on short clips: on 4-s windows of the long real clips the estimate
    stays within 0.7 frame of its median (51 of 53 windows measured), where av_sync needs 8 s
    (bench/source_lag.py).
    (NaN, NaN) under MOUTH_SYNC_MIN_SECONDS, at or under SYNC_NYQUIST_FPS, with
    > SYNC_MAX_MISSING missing, a peak at the search edge, r below `min_r`, or when the raw tracks' peak (peak_shift) is more than a frame
    away: band-passing can make a peak out of two tracks that do not follow each other (a
    reference that does not predict this mouth), and the raw levels then disagree.
    """
    n = min(len(reference), len(mouth))
    reference, mouth = np.asarray(reference[:n], dtype=np.float64), np.asarray(mouth[:n], dtype=np.float64)
    if fps <= SYNC_NYQUIST_FPS or n < MOUTH_SYNC_MIN_SECONDS * fps or min(np.isfinite(x).mean() for x in (reference, mouth)) < 1 - SYNC_MAX_MISSING:
        return math.nan, math.nan
    lag, r = _subframe_peak(_shift_corr(_syllable_band(reference, fps), _syllable_band(mouth, fps), SYNC_MAX_LAG))
    raw = peak_shift(_gaps_filled(reference), _gaps_filled(mouth), SYNC_MAX_LAG)[0]
    return (lag, r) if r >= min_r and abs(raw - lag) <= 1 else (math.nan, math.nan)


def _subframe_peak(corr: np.ndarray) -> tuple[float, float]:
    """(lag, r) at the best interior peak of a shift correlation, refined by a parabola through
    it and its neighbours; (NaN, NaN) when the best shift is at the search edge (look wider)."""
    i = _best(corr)
    if i <= 0 or i >= len(corr) - 1:
        return math.nan, math.nan
    y0, y1, y2 = corr[i - 1 : i + 2]
    curve = y0 - 2 * y1 + y2
    offset = 0.5 * (y0 - y2) / curve if curve < 0 else 0.0
    return i - len(corr) // 2 + offset, float(y1)


def count_blinks(signal: np.ndarray, high: float = BLINK_HIGH, low: float = BLINK_LOW) -> int:
    """Blinks in a [0,1] eye-closure signal: rises above `high`, re-armed below `low`.

    The hysteresis keeps a noisy signal hovering near one threshold from counting as many blinks.
    """
    count, armed = 0, True
    for v in np.nan_to_num(np.asarray(signal, dtype=np.float64), nan=0.0):
        if armed and v > high:
            count, armed = count + 1, False
        elif not armed and v < low:
            armed = True
    return count


def blink_rate(signal: np.ndarray, fps: float, high: float = BLINK_HIGH, low: float = BLINK_LOW) -> float:
    """Blinks per minute of a per-frame eye-closure signal at `fps`."""
    minutes = len(signal) / fps / 60.0
    return count_blinks(signal, high, low) / minutes if minutes > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# landmarks of rendered / ground-truth images (single-image mode)


def detect_landmarks(images: Iterable[np.ndarray], model: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mediapipe landmarks (T, 478, 2) px and blendshapes (T, 52) of independent images.

    Blendshape columns follow mediapipe's category index (the order of tracking.npz's
    `blendshape_names`).

    IMAGE mode on purpose (tracking.Landmarker is VIDEO mode): a prediction and its ground truth
    must be measured by the same detector without tracking state carried between frames. Rows
    are NaN where no face is found. `model` overrides the asset resolver.
    """
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    from . import assets
    from .tracking import _quiet_stderr

    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(assets.resolve("face_landmarker", model))),
        running_mode=vision.RunningMode.IMAGE,
        num_faces=1,
        output_face_blendshapes=True,
    )
    points, shapes = [], []
    with _quiet_stderr():  # start-up logs, emitted on creation and on the first detection
        landmarker = vision.FaceLandmarker.create_from_options(options)
        landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.zeros((32, 32, 3), np.uint8)))
    with landmarker:
        for img in images:
            img = np.asarray(img)
            if img.dtype != np.uint8:
                img = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
            h, w = img.shape[:2]
            result = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img[..., :3])))
            if result.face_landmarks:
                points.append([(p.x * w, p.y * h) for p in result.face_landmarks[0]])
                row = np.full(52, np.nan)
                for c in result.face_blendshapes[0]:
                    row[c.index] = c.score
                shapes.append(row)
            else:
                points.append(np.full((478, 2), np.nan))
                shapes.append(np.full(52, np.nan))
    return np.asarray(points, dtype=np.float64).reshape(-1, 478, 2), np.asarray(shapes, dtype=np.float64).reshape(-1, 52)


def detector_floor(frames: Iterable[np.ndarray], landmarks: np.ndarray, blendshapes: np.ndarray, names: list[str], size: int) -> dict[str, float]:
    """The landmark detector's own noise on real frames: the floor under `lmd` and the ceiling
    over `mouth_open_r` (and blink correlation) that no prediction can meaningfully pass.

    Two comparisons on the same `frames` (size² images), both against single-image detections:
    the clip's tracking (`landmarks`, `blendshapes` from tracking.npz, VIDEO mode) — `lmd`,
    `mouth_open_r`, `blink_r` — and the frames shifted by one pixel (edge-padded), which
    changes the detector's face crop as a near-perfect render would — `lmd_shift`,
    `mouth_open_r_shift`. Mediapipe in VIDEO mode re-runs its face detector on every frame while
    it tracks fewer faces than `num_faces`, and then agrees with IMAGE mode up to decoding noise;
    the shift measures the detector's sensitivity whatever the tracking settings were.
    """
    from .tracking import signals

    frames = [np.asarray(f) for f in frames]
    image_lm, image_bs = detect_landmarks(frames)
    shift_lm, shift_bs = detect_landmarks(np.pad(f, ((1, 0), (1, 0), (0, 0)), mode="edge")[:-1, :-1] for f in frames)
    ok = np.isfinite(image_lm).all(axis=(1, 2)) & np.isfinite(shift_lm).all(axis=(1, 2))
    video_blink, video_mouth = signals(np.asarray(landmarks)[ok], np.asarray(blendshapes)[ok], names)
    image_blink, image_mouth = signals(image_lm[ok], image_bs[ok], names)
    _, shift_mouth = signals(shift_lm[ok], shift_bs[ok], names)
    return {
        "frames": len(frames),
        "detected": int(ok.sum()),
        "lmd": lmd(image_lm[ok], np.asarray(landmarks)[ok], size),
        "mouth_open_r": pearson(video_mouth, image_mouth),
        "blink_r": pearson(video_blink, image_blink),
        "lmd_shift": lmd(shift_lm[ok], image_lm[ok], size),
        "mouth_open_r_shift": pearson(shift_mouth, image_mouth),
    }
