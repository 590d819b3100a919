"""Face tracking with mediapipe's FaceLandmarker: landmarks, blendshapes and head pose per frame.

mediapipe's pose is a 4×4 transform from its canonical face (centimetres, +y up, +z out of the
face) into an OpenGL camera whose perspective has a 63° vertical field of view on the *input*
image. Flipping y and z gives our OpenCV-convention `pose` (face → camera), and the same field
of view gives the intrinsics `K`, so the posed canonical mesh lands on the detected landmarks
(≈5 px at 512², the rest is the person's shape).

Per-frame face-space landmarks (`verts`) are the detected 2D landmarks lifted to 3D: each one is
back-projected at its depth (the posed canonical mesh's mean depth plus mediapipe's relative z,
which is in image-width units) and mapped into face space by the inverse pose. They reproject
exactly; the honest check of pose + K is how well one *rigid* shape per person (the median of
`verts`) reprojects, reported by `rigid_reprojection`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.signal import butter, filtfilt
from scipy.spatial.transform import Rotation

from . import assets
from .errors import Exit, GGError

N_LANDMARKS = 478  # 468 mesh vertices + 10 iris points
VERTICAL_FOV_DEG = 63.0  # mediapipe's face-geometry perspective camera
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL camera (y up, looking down -z) → OpenCV

# Landmark indices used for signals and boxes (mediapipe face mesh topology).
UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14
EYE_OUTER_R, EYE_OUTER_L = 33, 263
FOREHEAD, CHIN = 10, 152
# The face oval, clockwise from the forehead (mediapipe's FACEMESH_FACE_OVAL order).
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]


# ---------------------------------------------------------------- camera


def camera_K(width: float, height: float) -> np.ndarray:
    """Intrinsics of the landmarker's perspective camera for an input image of this size."""
    f = 0.5 * height / np.tan(np.radians(VERTICAL_FOV_DEG / 2))
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def project(points: np.ndarray, pose: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Face-space points (..., P, 3) through pose (..., 4, 4) and K (3, 3) → pixels (..., P, 2)."""
    cam = points @ np.swapaxes(pose[..., :3, :3], -1, -2) + pose[..., None, :3, 3]
    uv = cam @ K.T
    return uv[..., :2] / uv[..., 2:3]


# ---------------------------------------------------------------- detection


@dataclass
class Face:
    landmarks: np.ndarray  # (478, 3): x, y in pixels of the tracked image, z in image-width units
    blendshapes: np.ndarray  # (52,)
    pose: np.ndarray  # (4, 4) face → OpenCV camera

    @property
    def box(self) -> tuple[float, float, float, float]:
        lo, hi = self.landmarks[:, :2].min(0), self.landmarks[:, :2].max(0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """mediapipe's C++ logs a dozen INFO/WARNING lines on start-up straight to fd 2; hide them."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class Landmarker:
    """FaceLandmarker in VIDEO mode (it tracks between frames); use as a context manager."""

    def __init__(self, width: int, height: int, fps: float, max_faces: int = 2, model: Path | None = None):
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        self.width, self.height, self.fps = width, height, fps
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(model or assets.resolve("face_landmarker"))),
            running_mode=vision.RunningMode.VIDEO,
            num_faces=max_faces,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        with _quiet_stderr():
            self._landmarker = vision.FaceLandmarker.create_from_options(options)
            self._landmarker.detect_for_video(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.zeros((32, 32, 3), np.uint8)), 0)
        self.blendshape_names: list[str] = []

    def detect(self, frame: np.ndarray, index: int) -> list[Face]:
        """Faces in one RGB frame; `index` is the frame number (timestamps must increase)."""
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
        result = self._landmarker.detect_for_video(image, 1 + int(round(index * 1000.0 / self.fps)))
        scale = np.array([self.width, self.height, self.width], np.float32)
        faces = []
        for points, shapes, matrix in zip(result.face_landmarks, result.face_blendshapes, result.facial_transformation_matrixes):
            if not self.blendshape_names:
                self.blendshape_names = [c.category_name for c in shapes]
            landmarks = np.array([(p.x, p.y, p.z) for p in points], np.float32) * scale
            landmarks[:, 2] /= self.width  # keep z in image-width units (mediapipe's own)
            faces.append(Face(landmarks, np.array([c.score for c in shapes], np.float32), GL_TO_CV @ np.asarray(matrix, np.float64)))
        return faces

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> Landmarker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- tracks over a video


@dataclass
class _Track:
    faces: dict[int, Face] = field(default_factory=dict)
    last: int = -1
    center: np.ndarray = field(default_factory=lambda: np.zeros(2))
    size: float = 0.0
    area_sum: float = 0.0


def _centre_size(face: Face) -> tuple[np.ndarray, float]:
    """A detection's box centre (2,) and its larger side: where a track is and how far it may move."""
    x0, y0, x1, y1 = face.box
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), max(x1 - x0, y1 - y0)


def _area(face: Face) -> float:
    x0, y0, x1, y1 = face.box
    return (x1 - x0) * (y1 - y0)


def _associate(tracks: list[_Track], faces: list[Face], t: int, max_gap: int) -> None:
    """Greedy nearest-centre matching of this frame's faces to the tracks seen recently."""
    used: set[int] = set()
    for face in sorted(faces, key=lambda f: -_area(f)):
        center, size = _centre_size(face)
        best, best_d = None, np.inf
        for k, track in enumerate(tracks):
            d = float(np.linalg.norm(track.center - center))
            if k not in used and t - track.last <= max_gap + 1 and d < 0.5 * max(size, track.size) and d < best_d:
                best, best_d = k, d
        if best is None:
            if any(np.linalg.norm(tracks[k].center - center) < 0.3 * size for k in used):
                continue  # a duplicate detection of a face already matched this frame
            tracks.append(_Track())
            best = len(tracks) - 1
        track = tracks[best]
        track.faces[t] = face
        track.last, track.center, track.size = t, center, size
        track.area_sum += _area(face)
        used.add(best)


def _rejoin(tracks: list[_Track]) -> list[_Track]:
    """Join tracks broken by a gap longer than `_associate`'s max_gap: a track that starts after
    another ended, within half a face of where it ended, is that face back (the person turned
    away or was occluded), not a second person. Without this a long mid-clip loss split the one
    face into two tracks, and the clip was refused as too sparsely tracked or as two people."""
    joined: list[_Track] = []
    for track in sorted(tracks, key=lambda tr: min(tr.faces)):
        first = min(track.faces)
        centre, size = _centre_size(track.faces[first])
        ended = [(float(np.linalg.norm(o.center - centre)), k) for k, o in enumerate(joined) if o.last < first]
        near = [(d, k) for d, k in ended if d < 0.5 * max(size, joined[k].size)]
        if not near:
            joined.append(track)
            continue
        host = joined[min(near)[1]]
        host.faces.update(track.faces)
        host.last, host.center, host.size = track.last, track.center, track.size
        host.area_sum += track.area_sum
    return joined


@dataclass
class Tracking:
    """The target face over all frames, in the coordinates of the tracked image."""

    landmarks: np.ndarray  # (N, 478, 2) px
    z: np.ndarray  # (N, 478) mediapipe relative depth, image-width units
    blendshapes: np.ndarray  # (N, 52)
    pose: np.ndarray  # (N, 4, 4) face → camera (OpenCV), smoothed
    valid: np.ndarray  # (N,) bool: detected in this frame
    interpolated: np.ndarray  # (N,) bool: filled from neighbours (gap ≤ max_gap_frames)
    K: np.ndarray  # (3, 3) for the tracked image
    blendshape_names: list[str]
    info: dict

    def save(self, path: Path) -> None:
        np.savez(path, landmarks=self.landmarks, z=self.z, blendshapes=self.blendshapes, pose=self.pose, valid=self.valid,
                 interpolated=self.interpolated, K=self.K, blendshape_names=np.array(self.blendshape_names))

    @classmethod
    def load(cls, path: Path, info: dict) -> Tracking:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
        names = [str(n) for n in arrays.pop("blendshape_names")]
        return cls(**arrays, blendshape_names=names, info=info)


def track(
    frames: Iterable[np.ndarray],
    width: int,
    height: int,
    fps: float,
    *,
    max_faces: int = 2,
    max_gap_frames: int = 12,
    min_tracked_fraction: float = 0.5,
    ambiguous_ratio: float = 0.5,
    cutoff_hz: float = 5.0,
    source: str = "video",
    on_frame: Callable[[int], None] | None = None,
) -> Tracking:
    """Detect faces in every frame, follow the main person, fill short gaps, smooth the pose.

    The target is the track with the largest area summed over frames (largest and most
    persistent). A second track scoring at least `ambiguous_ratio` of it makes the video
    ambiguous (two people on screen most of the time): refused, since modelling the wrong
    person silently is worse than asking for a crop. Lesser tracks are ignored with a warning.
    """
    tracks: list[_Track] = []
    n = 0
    with Landmarker(width, height, fps, max_faces) as landmarker:
        for n, frame in enumerate(frames, start=1):
            _associate(tracks, landmarker.detect(frame, n - 1), n - 1, max_gap_frames)
            if on_frame:
                on_frame(n)
        names = landmarker.blendshape_names
    if n == 0:
        raise GGError(f"{source}: no frames could be decoded; the file may be corrupt, re-export it", Exit.INPUT_INVALID)
    ranked = sorted(_rejoin(tracks), key=lambda tr: -tr.area_sum)
    detected = len(ranked[0].faces) / n if ranked else 0.0
    if detected < min_tracked_fraction:
        raise GGError(
            f"{source}: a face was found in only {detected:.0%} of {n} frames (need {min_tracked_fraction:.0%}); pass a video where one face is visible",
            Exit.INPUT_INVALID,
        )
    target = ranked[0]
    others = [tr for tr in ranked[1:] if len(tr.faces) >= max(2, 0.02 * n)]
    if others and others[0].area_sum >= ambiguous_ratio * target.area_sum:
        raise GGError(
            f"{source}: {1 + len(others)} faces of similar size (in {len(target.faces) / n:.0%} and {len(others[0].faces) / n:.0%} of frames); "
            "crop the video to the one person to model (e.g. ffmpeg -vf crop=w:h:x:y)",
            Exit.INPUT_INVALID,
        )
    info = {
        "frames": n,
        "faces_seen": 1 + len(others),
        "detected_fraction": round(detected, 4),
        "note": (
            f"{1 + len(others)} faces seen; following the largest and most persistent one (in {len(target.faces) / n:.0%} of frames)"
            if others
            else None
        ),
    }
    return _fill_and_smooth(target, n, width, height, fps, names, max_gap_frames, cutoff_hz, info)


def _fill_and_smooth(target: _Track, n: int, width: int, height: int, fps: float, names: list[str], max_gap: int,
                     cutoff_hz: float, info: dict) -> Tracking:
    """Dense arrays from the target's detections, gaps filled by interpolation (held at the ends).

    Gaps up to `max_gap` frames count as `interpolated`; longer ones are filled the same way so
    the arrays stay usable, but stay flagged as lost (neither valid nor interpolated).
    """
    valid = np.zeros(n, bool)
    landmarks = np.zeros((n, N_LANDMARKS, 3), np.float32)
    blend = np.zeros((n, len(names)), np.float32)
    rotvec_q = np.zeros((n, 4))
    trans = np.zeros((n, 3))
    for t, face in target.faces.items():
        valid[t] = True
        landmarks[t], blend[t] = face.landmarks, face.blendshapes
        rotvec_q[t] = Rotation.from_matrix(face.pose[:3, :3]).as_quat()
        trans[t] = face.pose[:3, 3]
    idx = np.flatnonzero(valid)
    for a, b in zip(idx[:-1], idx[1:]):  # quaternion hemisphere continuity, so averages make sense
        if np.dot(rotvec_q[a], rotvec_q[b]) < 0:
            rotvec_q[b] = -rotvec_q[b]
    gap = _gap_lengths(valid)
    interpolated = ~valid & (gap <= max_gap)
    t_all = np.arange(n)

    def fill(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(n, -1)
        out = np.stack([np.interp(t_all, idx, col[idx]) for col in flat.T], axis=1)
        return out.reshape(x.shape).astype(x.dtype)

    landmarks, blend, rotvec_q, trans = fill(landmarks), fill(blend), fill(rotvec_q), fill(trans)
    if n > 12 and cutoff_hz > 0 and cutoff_hz < fps / 2:
        b, a = butter(2, cutoff_hz / (fps / 2))
        rotvec_q, trans = filtfilt(b, a, rotvec_q, axis=0), filtfilt(b, a, trans, axis=0)
    pose = np.tile(np.eye(4), (n, 1, 1))
    pose[:, :3, :3] = Rotation.from_quat(rotvec_q / np.linalg.norm(rotvec_q, axis=1, keepdims=True)).as_matrix()
    pose[:, :3, 3] = trans
    info.update(tracked_fraction=round(float((valid | interpolated).mean()), 4), interpolated_frames=int(interpolated.sum()),
                lost_frames=int((~valid & ~interpolated).sum()), pose_cutoff_hz=cutoff_hz)
    return Tracking(landmarks[..., :2], landmarks[..., 2], blend, pose, valid, interpolated, camera_K(width, height), names, info)


def _gap_lengths(valid: np.ndarray) -> np.ndarray:
    """For each frame, the length of the run of missing frames it belongs to (0 where valid)."""
    out = np.zeros(len(valid), int)
    t = 0
    while t < len(valid):
        if valid[t]:
            t += 1
            continue
        end = t
        while end < len(valid) and not valid[end]:
            end += 1
        # a gap touching either end of the clip has no second anchor: count it as twice as long
        length = (end - t) * (2 if t == 0 or end == len(valid) else 1)
        out[t:end] = length
        t = end
    return out


# ---------------------------------------------------------------- 3D landmarks and checks


def backproject(landmarks: np.ndarray, z: np.ndarray, pose: np.ndarray, K: np.ndarray, image_width: float) -> np.ndarray:
    """Face-space 3D landmarks (N, 478, 3) that project exactly onto `landmarks` through K @ pose.

    Depth of landmark i: the posed canonical mesh's mean depth Z plus mediapipe's relative z
    converted to centimetres at that depth (z · image_width · Z / f), centred on the mesh's mean.
    """
    from .face_model import (
        canonical_mesh,  # imports torch: only needed here, keep `tracking` light
    )

    canon = canonical_mesh().verts.astype(np.float64)
    cam_canon = canon @ np.swapaxes(pose[:, :3, :3], 1, 2) + pose[:, None, :3, 3]
    depth_mean = cam_canon[..., 2].mean(1, keepdims=True)  # (N, 1)
    z_rel = z - z[:, : len(canon)].mean(1, keepdims=True)
    depth = depth_mean + z_rel * image_width * depth_mean / K[0, 0]
    rays = np.concatenate([landmarks, np.ones(landmarks.shape[:-1] + (1,))], -1) @ np.linalg.inv(K).T
    cam = rays * depth[..., None]
    face = (cam - pose[:, None, :3, 3]) @ pose[:, :3, :3]  # R^T (x - t), row-vector form
    return face.astype(np.float32)


def rigid_reprojection(verts: np.ndarray, pose: np.ndarray, K: np.ndarray, landmarks: np.ndarray, valid: np.ndarray) -> dict:
    """Pixel error of one rigid shape per person (median of `verts`) projected through pose + K.

    This is the consistency check of the pose and intrinsics: expressions (mouth, eyes) are
    part of the residual, so a few pixels is expected; a wrong K or a jittery pose gives more.
    """
    neutral = np.median(verts[valid], axis=0)
    err = np.linalg.norm(project(neutral, pose[valid], K) - landmarks[valid], axis=-1)  # (V, 478)
    per_frame = err.mean(1)
    return {
        "rigid_reproj_px_median": round(float(np.median(per_frame)), 3),
        "rigid_reproj_px_mean": round(float(per_frame.mean()), 3),
        "rigid_reproj_px_p95": round(float(np.percentile(per_frame, 95)), 3),
    }


def signals(landmarks: np.ndarray, blendshapes: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Blink (mean of eyeBlinkLeft/Right, 0..1) and mouth opening (inner-lip gap / eye span)."""
    blink = blendshapes[:, [names.index("eyeBlinkLeft"), names.index("eyeBlinkRight")]].mean(1)
    gap = np.linalg.norm(landmarks[:, UPPER_INNER_LIP] - landmarks[:, LOWER_INNER_LIP], axis=-1)
    span = np.linalg.norm(landmarks[:, EYE_OUTER_R] - landmarks[:, EYE_OUTER_L], axis=-1)
    return blink.astype(np.float32), (gap / np.maximum(span, 1e-6)).astype(np.float32)
