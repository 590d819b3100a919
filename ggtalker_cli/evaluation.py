"""Evaluation of an avatar (`ggtalker eval`): quality, lip-sync and speed, with baselines.

The protocol is docs/evaluation.md; every number in report.json carries its definition key
(`report.metric`; the schema is `report.SCHEMA`). Self-reenactment on the clip's test split
renders each test frame at its tracked pose onto its own body (head region blanked, inpainter),
with (a) the tracked expression and (b) expressions predicted from the held-out audio, beside
baselines computed in the same run: the mean expression (no audio), the nearest training frame
(by landmarks; by blendshapes + pose) pasted whole, ground truth against itself, and the
detector's own noise.

Two phases, so renders can be made where the GPU is and scored where mediapipe is:
1. **render** (`render_phase`, torch only): pixel metrics (PSNR/SSIM full frame, face box, seam
   band) computed on the frames in memory; every variant written to `videos/*.mp4` (the same
   encoder for all, ground truth included, so codec noise cancels), strips, speed.
2. **score** (`score_phase`, mediapipe): landmarks of every video in single-image mode → LMD,
   mouth-opening correlation, audio–mouth lag (av_sync_lag, also relative to the training clip's
   own), blink rate; OOD audio speech–lip correlation and lag.
Without mediapipe the report is written with those metrics marked pending (`mark_pending`), and
the score phase finishes it later on a machine that has it.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from . import __version__, assets, audio, console, media, metrics, report, synthesis
from .clip import Clip
from .config import Config, EvalConfig
from .device import device_name
from .errors import Exit, GGError
from .media import read_wav, write_wav
from .report import SCHEMA_VERSION, metric
from .stream import Expressions
from .tracking import signals

VARIANTS: dict[str, tuple[str, str]] = {  # name -> (kind, description)
    "tracked": ("avatar", "avatar with the test frame's tracked expression and landmarks (visual quality alone)"),
    "audio": ("avatar", "avatar with expressions predicted from the held-out audio (the full system)"),
    "no_audio": ("baseline", "avatar with the mean training expression (no audio)"),
    "tracked_paste": ("avatar", "as tracked, composited without the inpainter (blanked region filled from the background plate)"),
    "retrieval_landmarks": ("baseline", "nearest training frame by normalised 2-D landmarks, pasted whole"),
    "retrieval_blendshapes_pose": ("baseline", "nearest training frame by standardised blendshapes + head pose, pasted whole"),
    "gt": ("ceiling", "ground truth against itself: the sync ceiling (its own audio-mouth lag and correlation)"),
    "detector_floor": ("floor", "the landmark detector's own noise on the ground-truth frames (metrics.detector_floor)"),
}
VIDEO_VARIANTS = ("gt", "tracked", "audio", "no_audio", "retrieval_landmarks", "retrieval_blendshapes_pose")
PENDING = "pending: mediapipe not available here; run `ggtalker eval --score-only -o REPORT_DIR` where it is"

# ---------------------------------------------------------------------------------------------
# baselines


def _normalised(landmarks: np.ndarray) -> np.ndarray:
    """(N, 478, 2) → (N, 956): centred on the mean, scaled to unit RMS radius (shape, not placement)."""
    x = landmarks - landmarks.mean(1, keepdims=True)
    return (x / np.sqrt((x**2).sum(-1).mean(1))[:, None, None]).reshape(len(x), -1)


def _pose_features(pose: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return np.concatenate([Rotation.from_matrix(pose[:, :3, :3]).as_rotvec(), pose[:, :3, 3]], 1)


def nearest_training(clip: Clip, train: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest valid training frame of each test frame, by landmarks and by blendshapes + pose
    (each dimension standardised over the training frames, so no unit dominates)."""
    trk = clip.tracking
    found = {}
    lm = _normalised(trk["landmarks"].astype(np.float64))
    bp = np.concatenate([trk["blendshapes"], _pose_features(trk["pose"].astype(np.float64))], 1)
    bp = (bp - bp[train].mean(0)) / np.maximum(bp[train].std(0), 1e-6)
    for name, feats in (("retrieval_landmarks", lm), ("retrieval_blendshapes_pose", bp)):
        d = ((feats[test][:, None, :] - feats[train][None, :, :]) ** 2).sum(-1)
        found[name] = train[d.argmin(1)]
    return found


# ---------------------------------------------------------------------------------------------
# phase 1: render


def _error_image(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """|pred − gt| (mean over RGB) ×4, as a colour map: the error map of strips and error videos."""
    err = np.abs(pred.astype(np.int16) - gt.astype(np.int16)).mean(-1) * 4
    return cv2.cvtColor(cv2.applyColorMap(np.clip(err, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def _pixel_metrics(pred: np.ndarray, gt: np.ndarray, fbox: tuple[int, int, int, int], seam: torch.Tensor) -> dict[str, float]:
    return {
        "psnr": metrics.psnr(pred, gt),
        "ssim": metrics.ssim(pred, gt),
        "psnr_face": metrics.psnr(pred, gt, box=fbox),
        "ssim_face": metrics.ssim(pred, gt, box=fbox) if min(fbox[2] - fbox[0], fbox[3] - fbox[1]) >= 11 else math.nan,
        "psnr_seam": metrics.psnr(pred, gt, mask=seam) if seam.any() else math.nan,
    }


class _Videos:
    """One writer per video name under folder/videos, closed (or removed on error) together."""

    def __init__(self, folder: Path, fps: float, size: int, audio_for: dict[str, Path], crf: int = EvalConfig.video_crf):
        (folder / "videos").mkdir(exist_ok=True)
        self.folder, self.fps, self.size, self.audio_for, self.crf = folder, fps, size, audio_for, crf
        self.writers: dict[str, Any] = {}

    def write(self, name: str, frame: np.ndarray) -> None:
        if name not in self.writers:
            path = self.folder / "videos" / f"{name}.mp4"
            self.writers[name] = media.open_writer(path, self.fps, self.size, self.size, self.audio_for.get(name), self.crf).__enter__()
        self.writers[name].write(frame)

    def close(self, failed: bool = False) -> None:
        for writer in self.writers.values():
            writer.__exit__(RuntimeError if failed else None, None, None)
        self.writers = {}


def _speech(synth: synthesis.Synthesizer, expressions: Expressions, samples: np.ndarray, bodies: np.ndarray | None,
            poses: torch.Tensor | None, timings: dict) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Run audio through the synth path; yield (frame index, blendshapes, mouth_open, image).
    `bodies`/`poses` fixed (self-reenactment) or None (synth's own ping-pong replay)."""
    fps = expressions.fps
    step = int(synth.cfg.chunk_s * audio.SAMPLE_RATE)
    pieces = [samples[i : i + step] for i in range(0, len(samples), step)]
    groups = (expressions.push(p) for p in pieces)
    for group in (*groups, expressions.finish()):
        if not len(group):
            continue
        idx = np.arange(group.start, group.start + len(group))
        if bodies is None:
            b = synth.bodies(idx, fps)
            p = synth.poses(idx, b, fps)
        else:
            idx = idx[idx < len(bodies)]
            b, p = bodies[idx], poses[idx]
        bs = synth.with_eyes(group.blendshapes[: len(idx)], b)
        for k, image in enumerate(synth.frames(bs, p, b, timings=timings)):
            yield int(idx[k]), group.blendshapes[k], group.mouth_open[k], image


def render_phase(avatar_dir: Path, clip_dir: Path | None, audios: list[Path], folder: Path, dev: torch.device, size: int | None,
                 a2e_path: Path | None, max_frames: int | None, cfg: Config) -> tuple[dict, dict[str, np.ndarray]]:
    """Everything that needs the avatar and the device; returns (report, arrays for scoring/plots)."""
    synth = synthesis.Synthesizer(avatar_dir, dev, size, clip_dir, cfg=cfg.synth)
    try:
        return _render(synth, avatar_dir, audios, folder, dev, a2e_path, max_frames, cfg.eval)
    finally:
        synth.close()


def _render(synth: synthesis.Synthesizer, avatar_dir: Path, audios: list[Path], folder: Path, dev: torch.device,
            a2e_path: Path | None, max_frames: int | None, ecfg: EvalConfig) -> tuple[dict, dict[str, np.ndarray]]:
    clip, S = synth.clip, synth.size
    trk = clip.tracking
    valid = trk["valid"].astype(bool)
    test = clip.test_indices[: max_frames or None]
    train = np.asarray([i for i in clip.train_indices if valid[i]])
    if len(test) < 2 or len(train) < 1:
        raise GGError(f"{clip.path}: {len(test)} test / {len(train)} tracked training frames; eval needs a longer clip", Exit.INPUT_INVALID)
    scale = S / clip.size
    state, a2e_source = synthesis.load_a2e(avatar_dir, a2e_path)
    (folder / "audio").mkdir(exist_ok=True)
    test_wav = folder / "audio" / "test.wav"
    samples = synthesis.held_out_audio(clip, test, test_wav)
    track_pose = torch.as_tensor(synth.track["pose"][test], dtype=torch.float32, device=dev)
    n = len(test)
    mean_bs = np.repeat(trk["blendshapes"][train].mean(0, keepdims=True), n, 0)
    nearest = nearest_training(clip, train, test)
    timings: dict[str, float] = {}
    videos = _Videos(folder, clip.fps, S, {"gt": test_wav, "audio": test_wav}, ecfg.video_crf)

    # the full system on the held-out audio, timed end to end (its frames are needed anyway)
    tic = time.perf_counter()
    audio_frames, a2e_bs, a2e_mouth = [], np.zeros((n, 52), np.float32), np.zeros(n, np.float32)
    expressions = Expressions(state, clip.fps, device=dev.type)
    try:
        for k, bs, mouth_open, image in _speech(synth, expressions, samples, test, track_pose, timings):
            a2e_bs[k], a2e_mouth[k] = bs, mouth_open
            videos.write("audio", image)
            audio_frames.append(image)
        synth_seconds = time.perf_counter() - tic
        render_ms = {k: 1000 * v / n for k, v in timings.items()}

        streams = {
            "tracked": synth.frames(synth.track["blendshapes"][test], track_pose, test, bases=trk["verts"][test]),
            "tracked_paste": synth.frames(synth.track["blendshapes"][test], track_pose, test, bases=trk["verts"][test], paste=True),
            "no_audio": synth.frames(synth.with_eyes(mean_bs, test), track_pose, test),
            **{name: (synth.load(j)[0] for j in idx) for name, idx in nearest.items()},
        }
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in ("audio", *streams)}
        shown = set(np.linspace(0, n - 1, min(ecfg.strip_frames, n)).astype(int).tolist())
        strips = []
        with console.progress() as bar:
            task = bar.add_task("eval: render + pixel metrics", total=n)
            for k, i in enumerate(test):
                gt, head = synth.load(i)
                fbox = metrics.face_box(trk["landmarks"][i] * scale, S)
                seam = metrics.seam_band(torch.from_numpy(head[..., 0] > 0))
                videos.write("gt", gt)
                preds = {"audio": audio_frames[k], **{name: next(s) for name, s in streams.items()}}
                for name, pred in preds.items():
                    rows[name].append(_pixel_metrics(pred, gt, fbox, seam))
                    if name in VIDEO_VARIANTS and name != "audio":  # audio.mp4 was written while synthesising
                        videos.write(name, pred)
                for name in ("tracked", "audio"):
                    videos.write(f"error_{name}", _error_image(preds[name], gt))
                if k in shown:
                    strips.append(np.concatenate([gt, preds["tracked"], preds["audio"], _error_image(preds["audio"], gt)], 1))
                bar.advance(task)
        videos.close()
    except BaseException:
        videos.close(failed=True)
        raise
    report.save_png(folder / "strips.png", np.concatenate(strips, 0))

    ood, ood_arrays = [], {}
    for k, path in enumerate(audios):
        entry, arrays = _ood(synth, state, path, k, folder, dev, ecfg.video_crf)
        ood.append(entry)
        ood_arrays.update(arrays)

    meta = synth.meta
    adapt_s = float(meta.get("train_seconds") or 0) + float((meta.get("inpainter") or {}).get("train_seconds") or 0)
    variants = {}
    for name, (kind, description) in VARIANTS.items():
        entry_metrics = {}
        if name in rows:
            for key in ("psnr", "ssim", "psnr_face", "ssim_face", "psnr_seam"):
                values = np.array([r[key] for r in rows[name]], np.float64)
                unit = "dB" if key.startswith("psnr") else None
                value = math.inf if np.isinf(values).all() else float(np.nanmean(values[np.isfinite(values)])) if np.isfinite(values).any() else math.nan
                entry_metrics[key] = metric(key, value, unit)
        if name != "tracked_paste":
            for key in ("lmd", "mouth_open_r", "av_sync_lag", "av_sync_lag_rel", "av_sync_r", "blink_rate"):
                if name == "detector_floor" and key in ("av_sync_lag", "av_sync_lag_rel", "av_sync_r", "blink_rate"):
                    continue
                entry_metrics[key] = metric(key, None, _UNITS.get(key), status=PENDING)
        variants[name] = {"kind": kind, "description": description, "video": f"videos/{name}.mp4" if name in VIDEO_VARIANTS else None,
                          "metrics": entry_metrics}
    variants["tracked_paste"]["video"] = None
    speed = {
        "device": device_name(dev),
        "metrics": {
            "render_ms": metric("render_ms_batch", render_ms.get("render", math.nan), "ms", f"{S}² head render, self-reenactment audio run"),
            "composite_ms": metric("composite_ms", render_ms.get("composite", math.nan), "ms", synth.body.kind),
            "synth_fps": metric("synth_fps", n / synth_seconds, "frames/s", f"held-out audio, {n} frames at {S}²"),
            "adapt_s": metric("adapt_s", adapt_s or None, "s", f"adapted on {meta.get('device', '?')}"),
        },
    }
    result = {
        "schema": "ggtalker-eval-report",
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ggtalker": __version__,
        "avatar": {"path": str(Path(avatar_dir).resolve()), "a2e": a2e_source, "body": synth.body.kind, "steps": meta.get("steps"),
                   "size": meta.get("size"), "gaussians": meta.get("gaussians")},
        "clip": {"path": str(clip.path.resolve()), "fps": clip.fps, "size": clip.size, "test_frames": [int(test[0]), int(test[-1]) + 1],
                 "av_sync_lag": clip_sync(clip)},
        "protocol": {
            "doc": "docs/evaluation.md",
            "setting": "self-reenactment on the clip's held-out test frames: each rendered at its tracked head pose and composited "
            "(inpainter) onto the test frame's own body and background with the dilated head region blanked (the peers' and the "
            "paper's protocol; full-frame numbers include the unchanged body, see the face-box and lip measures). Eye/brow "
            "blendshapes of the audio and no-audio variants come from the test frame, as synth takes them from its body frame.",
            "size": S,
            "frames": n,
        },
        "variants": variants,
        "ood": ood,
        "speed": speed,
        "optional": optional_metrics(),
        "pending": [],
        "files": {"strips": "strips.png", "test_audio": "audio/test.wav"},
    }
    names = [str(x) for x in trk["blendshape_names"]]
    arrays = {
        "test": test, "blendshape_names": np.asarray(names), "track_landmarks": trk["landmarks"][test] * scale,
        "track_blendshapes": trk["blendshapes"][test], "a2e_mouth_open": a2e_mouth, "a2e_blendshapes": a2e_bs,
        "train_blink": trk["blink"][train], **{f"psnr_{name}": np.array([r["psnr"] for r in v]) for name, v in rows.items()}, **ood_arrays,
    }
    return result, arrays


_UNITS = {"lmd": "px at 512²", "av_sync_lag": "frames", "av_sync_lag_rel": "frames", "blink_rate": "blinks/min"}


def _ood(synth: synthesis.Synthesizer, state: dict, path: Path, k: int, folder: Path, dev: torch.device, crf: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Out-of-distribution audio through the synth path: video for scoring, A2E-level sync now."""
    samples = synthesis.read_audio(path)
    wav = folder / "audio" / f"ood_{k}.wav"
    write_wav(wav, samples)
    fps = synth.clip.fps
    expressions = Expressions(state, fps, device=dev.type)
    videos = _Videos(folder, fps, synth.size, {f"ood_{k}": wav}, crf)
    mouth = []
    tic = time.perf_counter()
    try:
        with console.progress() as bar:
            task = bar.add_task(f"eval: {Path(path).name}", total=math.ceil(len(samples) / audio.SAMPLE_RATE * fps))
            for _, _, mouth_open, image in _speech(synth, expressions, samples, None, None, {}):
                videos.write(f"ood_{k}", image)
                mouth.append(mouth_open)
                bar.advance(task)
        videos.close()
    except BaseException:
        videos.close(failed=True)
        raise
    wall = time.perf_counter() - tic
    lag, corr = metrics.av_sync(samples, audio.SAMPLE_RATE, fps, np.asarray(mouth))
    entry = {
        "audio": str(path),
        "seconds": round(len(samples) / audio.SAMPLE_RATE, 3),
        "frames": len(mouth),
        "video": f"videos/ood_{k}.mp4",
        "metrics": {
            "av_sync_lag": metric("av_sync_lag", None, "frames", "rendered video, detected mouth opening", PENDING),
            "av_sync_lag_rel": metric("av_sync_lag_rel", None, "frames", "rendered video, detected mouth opening", PENDING),
            "av_sync_r": metric("av_sync_r", None, None, "rendered video, detected mouth opening", PENDING),
            "a2e_av_sync_lag": metric("av_sync_lag", lag, "frames", sync_note(lag, "A2E's predicted inner-lip gap (expression level, no render)")),
            "a2e_av_sync_r": metric("av_sync_r", corr, None, sync_note(lag, "A2E's predicted inner-lip gap (expression level, no render)")),
            "synth_fps": metric("synth_fps", len(mouth) / wall, "frames/s", f"{synth.size}², ping-pong body replay"),
        },
    }
    return entry, {f"ood_{k}_a2e_mouth_open": np.asarray(mouth, np.float32)}


def sync_metrics(samples: np.ndarray, rate: int, fps: float, mouth: np.ndarray, reference: float | None, note: str | None) -> dict:
    """av_sync_lag, its peak r and, given the training clip's own lag, the lag relative to it."""
    lag, corr = metrics.av_sync(samples, rate, fps, mouth)
    out = {"av_sync_lag": metric("av_sync_lag", lag, "frames", sync_note(lag, note)), "av_sync_r": metric("av_sync_r", corr, None, sync_note(lag, note))}
    if reference is None:
        out["av_sync_lag_rel"] = metric("av_sync_lag_rel", math.nan, "frames", "the training clip's own lag is not measured")
    else:
        out["av_sync_lag_rel"] = metric("av_sync_lag_rel", lag - reference, "frames", f"training clip's own av_sync_lag {reference:+.1f}")
    return out


def sync_note(lag: float, note: str | None) -> str | None:
    """The metric note, saying why when av_sync gave no lag."""
    if math.isfinite(lag):
        return note
    return "; ".join(filter(None, [note, "not measured: under 8 s, >10% undetected or no peak in ±8"]))


def clip_sync(clip: Clip) -> dict:
    """The av_sync_lag metric of the training clip over its whole length (tracked mouth against
    its audio.wav): the reference the avatar's own lags are reported relative to."""
    lag = math.nan
    if clip.audio_path is not None:
        samples, rate = read_wav(clip.audio_path)
        lag = metrics.av_sync(samples, rate, clip.fps, clip.tracking["mouth_open"])[0]
    return metric("av_sync_lag", lag, "frames", "whole clip, tracked mouth opening against its audio")


def optional_metrics() -> dict[str, dict[str, str]]:
    """LPIPS / identity / SyncNet: never silently zero; say why each is not computed."""
    arcface = assets.locate("arcface", download=False)[0]
    return {
        "lpips": {"status": "not computed: weights missing (no LPIPS backbone resolves offline)"},
        "identity_similarity": {"status": "not computed: weights missing (insightface ArcFace)" if arcface is None
                                else f"not computed: ArcFace found at {arcface} but identity scoring is not implemented in this version"},
        "lse_c": {"status": "not computed: weights missing (SyncNet)"},
        "lse_d": {"status": "not computed: weights missing (SyncNet)"},
    }


# ---------------------------------------------------------------------------------------------
# phase 2: score


def can_score() -> bool:
    """mediapipe imports and its face landmarker resolves without a download attempt."""
    try:
        import mediapipe  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install is as good as none: score later)
        return False
    return assets.locate("face_landmarker", download=False)[0] is not None


def read_video(path: Path) -> Iterator[np.ndarray]:
    """RGB uint8 frames of a video (OpenCV decodes mp4 everywhere, ffmpeg or not)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise GGError(f"{path}: cannot open the video; re-run eval to re-render it", Exit.ARTIFACT)
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def _detect(folder: Path, video: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    path = folder / video
    if not path.is_file():
        raise GGError(f"{path}: missing; re-run eval (render phase) for this report", Exit.ARTIFACT)
    frames = list(read_video(path))
    lm, bs = metrics.detect_landmarks(frames)
    return lm, bs, frames


def score_phase(folder: Path) -> dict:
    """Fill the landmark-based metrics of a rendered report (reads videos/, data.npz)."""
    rep = json.loads((folder / "report.json").read_text())
    with np.load(folder / "data.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    names = [str(x) for x in arrays["blendshape_names"]]
    size, fps = rep["protocol"]["size"], rep["clip"]["fps"]
    samples, rate = read_wav(folder / "audio" / "test.wav")
    n = rep["protocol"]["frames"]
    envelope = metrics.audio_envelope(samples, rate, fps, n)
    if "av_sync_lag" not in rep["clip"] and Path(rep["clip"]["path"]).is_dir():  # a report from before the metric
        rep["clip"]["av_sync_lag"] = clip_sync(Clip(rep["clip"]["path"]))
    reference = (rep["clip"].get("av_sync_lag") or {}).get("value")  # None: not measured
    tracks: dict[str, np.ndarray] = {}
    detected = {}
    with console.progress() as bar:
        task = bar.add_task("eval: landmarks", total=len(VIDEO_VARIANTS) + len(rep["ood"]))
        gt_lm, gt_bs, gt_frames = _detect(folder, "videos/gt.mp4")
        bar.advance(task)
        _gt_blink, gt_mouth = signals(gt_lm, gt_bs, names)
        for name in VIDEO_VARIANTS[1:]:
            lm, bs, _ = _detect(folder, rep["variants"][name]["video"])
            detected[name] = (lm, bs)
            bar.advance(task)
        floor = metrics.detector_floor(gt_frames, arrays["track_landmarks"], arrays["track_blendshapes"], names, size)
        for name, (lm, bs) in {"gt": (gt_lm, gt_bs), **detected}.items():
            blink, mouth = signals(lm, bs, names)
            tracks[f"mouth_open_{name}"] = mouth
            m = rep["variants"][name]["metrics"]
            m["lmd"] = metric("lmd", metrics.lmd(lm, gt_lm, size) if name != "gt" else 0.0, _UNITS["lmd"],
                              "ground truth against itself" if name == "gt" else None)
            m["mouth_open_r"] = metric("mouth_open_r", metrics.pearson(mouth, gt_mouth))
            m.update(sync_metrics(samples, rate, fps, mouth, reference, None))
            if name != "gt":
                m["mouth_lag"] = metric("mouth_lag", metrics.peak_shift(gt_mouth, mouth)[0], "frames")
            m["blink_rate"] = metric("blink_rate", metrics.blink_rate(blink, fps), "blinks/min", "detected on the frames")
        rep["variants"]["gt"]["metrics"]["blink_rate_train"] = metric(
            "blink_rate", metrics.blink_rate(arrays["train_blink"], fps), "blinks/min", "the training frames' tracked blinks: what synth replays")
        a2e_blink = arrays["a2e_blendshapes"][:, [names.index("eyeBlinkLeft"), names.index("eyeBlinkRight")]].mean(1)
        rep["variants"]["audio"]["metrics"]["blink_rate_a2e"] = metric(
            "blink_rate", metrics.blink_rate(a2e_blink, fps), "blinks/min", "A2E's own eye blendshapes (replaced by the body frame's in synth)")
        fm = rep["variants"]["detector_floor"]["metrics"]
        fm["lmd"] = metric("lmd", floor["lmd"], _UNITS["lmd"], "clip tracking (video mode) vs single-image detection, GT frames")
        fm["mouth_open_r"] = metric("mouth_open_r", floor["mouth_open_r"], None, "clip tracking (video mode) vs single-image detection")
        fm["lmd_shift"] = metric("lmd", floor["lmd_shift"], _UNITS["lmd"], "single-image detection on GT frames vs the frames shifted by 1 px")
        fm["mouth_open_r_shift"] = metric("mouth_open_r", floor["mouth_open_r_shift"], None, "the same 1-px shift")
        for k, entry in enumerate(rep["ood"]):
            lm, bs, _ = _detect(folder, entry["video"])
            _, mouth = signals(lm, bs, names)
            wav, wav_rate = read_wav(folder / "audio" / f"ood_{k}.wav")
            entry["metrics"].update(sync_metrics(wav, wav_rate, fps, mouth, reference, "rendered video, detected mouth opening"))
            driven = arrays.get(f"ood_{k}_a2e_mouth_open")
            if driven is not None:  # reports rendered before the A2E track was kept have none
                shift, peak = metrics.peak_shift(driven, mouth)
                entry["metrics"]["render_lag"] = metric("render_lag", shift, "frames", f"A2E-driven vs detected mouth opening, peak r {peak:.2f}")
            tracks[f"ood_{k}_mouth_open"] = mouth
            bar.advance(task)
    tracks["envelope"] = envelope
    np.savez(folder / "scores.npz", **tracks)
    rep["pending"] = []
    return rep


def mark_pending(rep: dict) -> None:
    """A report rendered where the score phase cannot run: say which metrics wait, and where."""
    rep["pending"] = ["landmark metrics (lmd, mouth_open_r, av_sync_lag, av_sync_r, blink_rate): " + PENDING]
    console.warn(f"landmark metrics pending: {PENDING.removeprefix('pending: ')}")


def summarize(rep: dict, out: Path) -> dict[str, Any]:
    """The CLI summary: headline numbers of the full system and the no-audio baseline."""

    def value(variant: str, key: str) -> Any:
        return rep["variants"][variant]["metrics"].get(key, {}).get("value")

    return {
        "report": str(out),
        **{f"{v}_{k}": value(v, k) for v in ("tracked", "audio", "no_audio") for k in ("psnr", "ssim", "lmd", "mouth_open_r")},
        "audio_av_sync_lag": value("audio", "av_sync_lag"),
        "audio_av_sync_lag_rel": value("audio", "av_sync_lag_rel"),
        "audio_mouth_lag": value("audio", "mouth_lag"),
        "gt_av_sync_lag": value("gt", "av_sync_lag"),
        "clip_av_sync_lag": (rep["clip"].get("av_sync_lag") or {}).get("value"),
        "synth_fps": rep["speed"]["metrics"]["synth_fps"]["value"],
        "device": rep["speed"]["device"],
        "pending": bool(rep["pending"]),
    }
