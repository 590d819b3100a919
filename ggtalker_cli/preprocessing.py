"""Preprocessing (`ggtalker preprocess`): a talking-head video → the files of a clip/ folder (format 1).

`build` runs the steps into the partial folder, each once (`Steps` keeps a step's summary in
`.steps/`, so a resumed run skips what is done): track (decode at constant fps +
FaceLandmarker) → audio (16 kHz mono wav, exactly N / fps long) → crop (one fixed square for
the whole clip, intrinsics and 3D landmarks in it) → frames (JPEG) → masks (PNG labels) →
background plate → audio features → identity → contact sheet → meta.yaml. `check_input` refuses
an unusable video before anything is written; `disk_need` is what the clip will take.

The video is decoded twice (tracking needs the whole clip before the crop is known); frames
stream through both passes, so memory does not grow with the clip length.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import assets, console, media, segmentation, tracking, viz
from .artifacts import write_meta
from .config import PreprocessConfig
from .errors import Exit, GGError

STEPS_DIR = ".steps"  # inside the partial folder; removed before the final rename


class Steps:
    """Run-once steps: a step's summary is saved as `.steps/NAME.json` once its files are written."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.dir = folder / STEPS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        marker = self.dir / f"{name}.json"
        if marker.is_file():
            self.skipped.append(name)
            saved = json.loads(marker.read_text())
            self.timings[name] = saved.pop("_seconds", 0.0)
            return saved
        start = time.perf_counter()
        summary = fn()
        self.timings[name] = round(time.perf_counter() - start, 3)
        marker.write_text(json.dumps({**summary, "_seconds": self.timings[name]}, default=_scalar))
        return summary


def _scalar(value: Any) -> Any:
    """numpy scalars → Python numbers, for JSON and YAML."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not serialisable: {type(value).__name__}")


def _plain(data: Any) -> Any:
    """A nested structure with only Python builtins (yaml.safe_dump refuses numpy scalars)."""
    return json.loads(json.dumps(data, default=_scalar))


def check_input(video: Path, cfg: PreprocessConfig, allow_no_audio: bool) -> media.Probe:
    """Everything that can refuse the input cheaply, before any output is touched."""
    probe = media.probe(video, cfg.vfr_tolerance)
    if probe.width < 64 or probe.height < 64:
        raise GGError(f"{video}: video is {probe.width}×{probe.height}; need at least 64×64 pixels", Exit.INPUT_INVALID)
    if probe.duration < cfg.min_duration_s:
        raise GGError(f"{video}: video is {probe.duration:.2f} s long; need at least {cfg.min_duration_s:g} s", Exit.INPUT_INVALID)
    if probe.audio_codec is None and not allow_no_audio:
        raise GGError(f"{video}: no audio stream; pass --allow-no-audio to preprocess it anyway (then no audio features)", Exit.INPUT_INVALID)
    if probe.vfr:
        console.warn(
            f"{video.name}: variable frame rate (average {probe.fps_average:.2f} vs nominal {probe.fps_nominal:.2f} fps); "
            f"resampled by timestamps to a constant {cfg.fps:g} fps"
        )
    return probe


def disk_need(probe: media.Probe, pc: PreprocessConfig) -> int:
    """Bytes the clip will take, generously: JPEG frames and PNG masks (0.14 and ~0.02 B/px
    measured at 512², counted as 0.25), ~10 kB of tracking per frame, 16 kHz 16-bit audio."""
    return int(probe.duration * (pc.fps * (0.25 * pc.size**2 + 10_000) + 32_000))


def build(video: Path, tmp: Path, probe: media.Probe, pc: PreprocessConfig, steps: Steps, sha: str, person: str | None = None) -> dict:
    state = tmp / STEPS_DIR
    scale = min(1.0, pc.track_max_side / max(probe.width, probe.height))
    track_w, track_h = 2 * round(probe.width * scale / 2), 2 * round(probe.height * scale / 2)
    expected = max(1, int(round(probe.duration * pc.fps)))

    def do_track() -> dict:
        with console.progress() as bar:
            task = bar.add_task("track faces", total=expected)
            result = tracking.track(
                media.decode(video, pc.fps, track_w, track_h), track_w, track_h, pc.fps,
                max_faces=pc.max_faces, max_gap_frames=pc.max_gap_frames, min_tracked_fraction=pc.min_tracked_fraction,
                ambiguous_ratio=pc.ambiguous_face_ratio, cutoff_hz=pc.pose_cutoff_hz, source=str(video),
                on_frame=lambda n: bar.update(task, completed=n, total=max(n, expected)),
            )
        decoded = len(result.pose)
        if decoded < 0.9 * expected and expected - decoded > pc.fps:
            raise GGError(
                f"{video}: decoding stopped after {decoded / pc.fps:.1f} s of {probe.duration:.1f} s; the file is truncated or damaged, re-export it",
                Exit.INPUT_INVALID,
            )
        result.save(state / "track.npz")
        return result.info

    track_info = steps.run("track", do_track)
    if track_info.get("note"):
        console.warn(f"{video.name}: {track_info['note']}")
    if track_info.get("lost_frames"):
        lost = track_info["lost_frames"]
        console.warn(f"{video.name}: the face was lost for {lost} frames ({lost / pc.fps:.1f} s, gaps over {pc.max_gap_frames} frames); "
                     "they are kept but never trained on")
    trk = tracking.Tracking.load(state / "track.npz", track_info)
    n = len(trk.pose)

    def do_audio() -> dict:
        if probe.audio_codec is None:
            return {"present": False}
        info = media.extract_audio(video, tmp / "audio.wav", int(round(n / pc.fps * media.AUDIO_RATE)), probe.audio_start)
        return {"present": True, "sample_rate": media.AUDIO_RATE, **info}

    audio = steps.run("audio", do_audio)
    crop = steps.run("crop", lambda: _crop(trk, probe, track_w, pc, tmp))
    frames = steps.run("frames", lambda: _frames(video, probe, crop, pc, tmp, n))
    masks = steps.run("masks", lambda: _masks(tmp, pc, n))
    background = steps.run("background", lambda: _background(tmp, pc, n))
    features = steps.run("features", lambda: _features(tmp, n, pc.fps) if audio["present"] else {"file": None, "reason": "no audio"})
    identity = steps.run("identity", lambda: _identity(tmp, n))
    n_test = max(1, int(round(n * pc.test_fraction)))
    split = {"train": [0, n - n_test], "test": [n - n_test, n]}
    steps.run("sheet", lambda: _sheet(tmp, n, pc.fps, split["test"][0], video.name))

    with np.load(tmp / "tracking.npz", allow_pickle=False) as d:
        valid, interp = d["valid"], d["interpolated"]
        reproj = tracking.rigid_reprojection(d["verts"], d["pose"], np.asarray(crop["K"]), d["landmarks"], valid)
    stats = {**track_info, **reproj, "reproj_px_at_size": pc.size}
    meta = {
        "source": {"path": str(video.resolve()), "sha256": sha, **{k: v for k, v in probe.to_dict().items() if k != "path"}},
        "person": person,  # the identity priors group clips by (clip.person); None: the folder's name
        "fps": pc.fps,
        "size": pc.size,
        "n_frames": n,
        "K": crop["K"],
        "crop": {k: crop[k] for k in ("x0", "y0", "side", "pad", "track_scale")},
        "split": split,
        "files": {
            "frames": "frames",
            "masks": "masks",
            "tracking": "tracking.npz",
            "background": "background.png",
            "contact_sheet": "contact_sheet.png",
            "audio": "audio.wav" if audio["present"] else None,
            "audio_features": features["file"],
            "identity": identity["file"],
        },
        "audio": {**audio, "features": features if features["file"] else None, "features_reason": features.get("reason")},
        "identity": identity,
        "tracking": stats,
        "masks": masks,
        "background": background,
        "frames": frames,
        "config": dataclasses.asdict(pc),
        "timings_s": steps.timings,
    }
    write_meta(tmp, "clip", _plain(meta))
    tracked = float((valid | interp).mean())
    return {
        "n_frames": n,
        "size": pc.size,
        "fps": pc.fps,
        "tracked_fraction": round(tracked, 4),
        "detected_fraction": track_info["detected_fraction"],
        **reproj,
        "audio": audio["present"],
        "audio_features": features["file"] is not None,
        "identity_embedding": identity["file"] is not None,
        "timings_s": steps.timings,
    }


# ---------------------------------------------------------------- steps


def _crop(trk: tracking.Tracking, probe: media.Probe, track_w: int, pc: PreprocessConfig, tmp: Path) -> dict:
    """One square for the whole clip, in source pixels: head and shoulders with margin.

    Side = crop_scale × the median face height, grown to hold every tracked face box with a
    margin, and shrunk to the frame when the frame is smaller but still holds the faces (so
    already-cropped 512² videos keep all their pixels). Whatever still falls outside the frame
    is padded by repeating the edge (recorded in `pad`).
    """
    a = probe.width / track_w  # tracked image → source pixels
    use = trk.valid | trk.interpolated
    lm = trk.landmarks[use] * a
    lo, hi = lm.min(1), lm.max(1)  # (V, 2) per-frame face boxes
    face_h = float(np.median(hi[:, 1] - lo[:, 1]))
    center = np.median((lo + hi) / 2, axis=0) + [0.0, pc.crop_shift_y * face_h]
    union = np.concatenate([lo.min(0), hi.max(0)])
    need = 2 * float(max(np.abs(union[[0, 2]] - center[0]).max(), np.abs(union[[1, 3]] - center[1]).max())) * 1.1
    side = max(pc.crop_scale * face_h, need)
    frame_side = min(probe.width, probe.height)
    if side > frame_side >= need:
        side = frame_side
    side = int(round(side))
    x0 = int(round(center[0] - side / 2))
    y0 = int(round(center[1] - side / 2))
    if side <= probe.width:
        x0 = min(max(x0, 0), probe.width - side)
    if side <= probe.height:
        y0 = min(max(y0, 0), probe.height - side)
    pad = {"left": max(0, -x0), "top": max(0, -y0), "right": max(0, x0 + side - probe.width), "bottom": max(0, y0 + side - probe.height)}
    if any(pad.values()):
        console.warn(f"crop reaches {max(pad.values())} px outside the frame; padded by repeating the edge")

    s = pc.size / side  # source → crop pixels
    K = trk.K.copy()
    K[:2] *= a * s
    K[0, 2] -= x0 * s
    K[1, 2] -= y0 * s
    landmarks = (trk.landmarks * a - [x0, y0]) * s
    verts = tracking.backproject(trk.landmarks, trk.z, trk.pose, trk.K, track_w)
    blink, mouth = tracking.signals(landmarks, trk.blendshapes, trk.blendshape_names)
    np.savez(tmp / "tracking.npz", landmarks=landmarks.astype(np.float32), verts=verts, blendshapes=trk.blendshapes,
             blendshape_names=np.array(trk.blendshape_names), pose=trk.pose.astype(np.float32), valid=trk.valid,
             interpolated=trk.interpolated, blink=blink, mouth_open=mouth)
    return {"x0": x0, "y0": y0, "side": side, "pad": pad, "track_scale": round(1 / a, 6), "K": K.round(6).tolist(), "face_height_px": round(face_h, 1)}


def _cropper(probe: media.Probe, crop: dict, size: int) -> Callable[[np.ndarray], np.ndarray]:
    x0, y0, side, pad = crop["x0"], crop["y0"], crop["side"], crop["pad"]
    sx, sy = max(x0, 0), max(y0, 0)
    ex, ey = min(x0 + side, probe.width), min(y0 + side, probe.height)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC

    def cut(frame: np.ndarray) -> np.ndarray:
        img = frame[sy:ey, sx:ex]
        if any(pad.values()):
            img = cv2.copyMakeBorder(img, pad["top"], pad["bottom"], pad["left"], pad["right"], cv2.BORDER_REPLICATE)
        return img if side == size else cv2.resize(img, (size, size), interpolation=interp)

    return cut


def _frames(video: Path, probe: media.Probe, crop: dict, pc: PreprocessConfig, tmp: Path, n: int) -> dict:
    folder = tmp / "frames"
    folder.mkdir(exist_ok=True)
    cut = _cropper(probe, crop, pc.size)
    params = [cv2.IMWRITE_JPEG_QUALITY, pc.jpeg_quality]
    count = 0
    with console.progress() as bar:
        task = bar.add_task("crop frames", total=n)
        for count, frame in enumerate(media.decode(video, pc.fps, probe.width, probe.height), start=1):
            if count > n:
                break
            _, buf = cv2.imencode(".jpg", cv2.cvtColor(cut(frame), cv2.COLOR_RGB2BGR), params)
            (folder / f"{count - 1:06d}.jpg").write_bytes(buf.tobytes())
            bar.update(task, completed=count)
    if count < n:
        raise GGError(f"{video}: second decoding pass gave {count} frames, the first {n}; the file may be damaged, re-export it", Exit.INPUT_INVALID)
    return {"format": "jpg", "quality": pc.jpeg_quality}


def _read_reduced(path: Path, reduce: int) -> np.ndarray:
    """A JPEG decoded at 1/reduce resolution (libjpeg scales in the DCT: nearly free)."""
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    return cv2.cvtColor(cv2.imread(str(path), flag), cv2.COLOR_BGR2RGB)


def _masks(tmp: Path, pc: PreprocessConfig, n: int) -> dict:
    folder = tmp / "masks"
    folder.mkdir(exist_ok=True)
    with np.load(tmp / "tracking.npz", allow_pickle=False) as d:
        landmarks, use = d["landmarks"], d["valid"] | d["interpolated"]
    work = min(pc.seg_size, pc.size)
    reduce = max(r for r in (1, 2, 4, 8) if pc.size // r >= work)
    frames = tmp / "frames"

    def item(i: int) -> tuple[np.ndarray, np.ndarray]:
        return _read_reduced(frames / f"{i:06d}.jpg", reduce), landmarks[i] / reduce

    keys = np.unique(np.linspace(0, n - 1, 16).round().astype(int))
    keys = [k for k in keys if use[k]] or list(keys)
    segmenter = segmentation.Segmenter([item(k) for k in keys], work=work)
    counts = np.zeros(3)
    with console.progress() as bar:
        task = bar.add_task("segment", total=n)
        for i, labels in enumerate(segmentation.segment(segmenter, (item(i) for i in range(n)), pc.size)):
            cv2.imwrite(str(folder / f"{i:06d}.png"), labels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            counts += np.bincount(labels.ravel(), minlength=3)
            bar.update(task, completed=i + 1)
    share = counts / counts.sum()
    return {"labels": {"background": 0, "torso": 1, "head": 2}, "method": "landmark-seeded GrabCut colour model",
            "mean_share": {"background": round(share[0], 4), "torso": round(share[1], 4), "head": round(share[2], 4)}}


def _background(tmp: Path, pc: PreprocessConfig, n: int) -> dict:
    picks = np.unique(np.linspace(0, n - 1, min(n, pc.background_samples)).round().astype(int))

    def samples():
        for i in picks:
            image = cv2.cvtColor(cv2.imread(str(tmp / "frames" / f"{i:06d}.jpg")), cv2.COLOR_BGR2RGB)
            yield image, cv2.imread(str(tmp / "masks" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)

    plate, filled = segmentation.background_plate(samples())
    cv2.imwrite(str(tmp / "background.png"), cv2.cvtColor(plate, cv2.COLOR_RGB2BGR))
    return {"samples": len(picks), "inpainted_fraction": round(filled, 4)}


def _features(tmp: Path, n: int, fps: float) -> dict:
    """Whisper features when the audio module and its weights are there; a reason when not."""
    try:
        from . import audio
    except ImportError as e:
        reason = f"audio features unavailable ({e})"
    else:
        try:
            feats, info = audio.features_for_clip(tmp / "audio.wav", n, fps)
        except GGError as e:
            if e.code != Exit.ASSET:
                raise
            reason = e.message
        else:
            np.save(tmp / "audio_features.npy", feats.astype(np.float16))
            return {"file": "audio_features.npy", "dim": int(feats.shape[1]), **{k: v for k, v in info.items() if _jsonable(v)}}
    console.warn(f"no audio features: {reason}")
    return {"file": None, "reason": reason}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


# insightface's 5 alignment points (image-left eye, image-right eye, nose tip, mouth corners)
# from mediapipe landmarks: iris centres, nose tip, lip corners.
_ARCFACE_POINTS = [468, 473, 1, 61, 291]


def _identity(tmp: Path, n: int, samples: int = 12) -> dict:
    """ArcFace embedding of the tracked face (insightface's recogniser) where its model resolves.

    Faces are aligned from mediapipe's landmarks (no second detector needed). The embedding is
    the normalised mean over frames spread across the clip; their agreement with it (cosine)
    verifies that the track followed one person.
    """
    model = assets.find("arcface")
    if model is None:
        return {"file": None, "reason": "no embedding: insightface models not found (set GGTALKER_ARCFACE)"}
    from insightface.model_zoo import get_model
    from insightface.utils.face_align import norm_crop

    recogniser = get_model(str(model), providers=["CPUExecutionProvider"])
    recogniser.prepare(ctx_id=-1)
    with np.load(tmp / "tracking.npz", allow_pickle=False) as d:
        landmarks, valid = d["landmarks"], d["valid"]
    picks = np.flatnonzero(valid)[np.linspace(0, valid.sum() - 1, min(samples, int(valid.sum()))).round().astype(int)]
    feats = []
    for i in picks:
        bgr = cv2.imread(str(tmp / "frames" / f"{i:06d}.jpg"))
        feats.append(recogniser.get_feat(norm_crop(bgr, landmarks[i][_ARCFACE_POINTS].astype(np.float32))).ravel())
    feats = np.stack(feats)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    mean = feats.mean(0)
    mean /= np.linalg.norm(mean)
    agreement = feats @ mean
    if agreement.min() < 0.5:
        console.warn(f"identity check: some sampled frames look like another person (cosine {agreement.min():.2f} to the clip mean)")
    np.save(tmp / "identity.npy", mean.astype(np.float32))
    return {"file": "identity.npy", "model": str(model), "frames": len(picks), "min_cosine": round(float(agreement.min()), 3)}


def _sheet(tmp: Path, n: int, fps: float, test_start: int, title: str) -> dict:
    with np.load(tmp / "tracking.npz", allow_pickle=False) as d:
        arrays = {k: d[k] for k in ("landmarks", "pose", "valid", "interpolated", "blink", "mouth_open")}
    meta_k = json.loads((tmp / STEPS_DIR / "crop.json").read_text())["K"]
    K = np.asarray(meta_k)
    picks = np.unique(np.linspace(0, n - 1, 8).round().astype(int))
    thumbs = []
    for i in picks:
        image = cv2.cvtColor(cv2.imread(str(tmp / "frames" / f"{i:06d}.jpg")), cv2.COLOR_BGR2RGB)
        labels = cv2.imread(str(tmp / "masks" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        thumbs.append((int(i), viz.overlay(image, labels, arrays["landmarks"][i], arrays["pose"][i].astype(np.float64), K)))
    series = {"blink": arrays["blink"], "mouth open": arrays["mouth_open"], "head (deg)": viz.head_angles(arrays["pose"].astype(np.float64))}
    viz.contact_sheet(tmp / "contact_sheet.png", thumbs, fps, series, arrays["valid"], arrays["interpolated"], test_start, title)
    return {"file": "contact_sheet.png"}
