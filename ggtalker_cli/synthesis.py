"""The synthesis runtime: an avatar ready to render talking frames (`synth`, `eval` and bench use it).

`Synthesizer` holds one avatar at one output size: the head, the body compositor (`body.Body`),
the synthesis track and the clip's body frames, decoded ahead on threads. Given expressions and
poses it yields final frames in order. Around it: the A2E state that drives an avatar
(`load_a2e`), the pose sources (replayed frames in ping-pong, a pose file, `turn` for novel
views), the `--background` replacement and the speech reader (`read_audio`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import artifacts, audio, media
from .avatar import Avatar
from .body import Body, load_track
from .clip import Clip
from .clip_view import Prefetch, intrinsics, resize
from .config import SynthConfig
from .errors import Exit, GGError
from .models.a2e import from_state

A2E_FILE = "a2e.safetensors"
EYE_PREFIXES = ("eye", "brow")  # blendshapes taken from the replayed frame, not from the audio
WORKERS = min(8, os.cpu_count() or 1)  # threads decoding body frames (JPEG decode + resize release the GIL)


def load_a2e(folder: Path, explicit: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The A2E state driving the avatar: `explicit` (a prior folder or a .safetensors file)
    first, else the avatar's own adapted one. -> (state, its path)."""
    if explicit is not None and Path(explicit).is_dir():
        meta = artifacts.read_meta(Path(explicit), "prior")
        if "a2e" not in (meta.get("parts") or []):
            raise GGError(f"{explicit}: this prior has no a2e part; train one with `ggtalker fit-prior --parts a2e`", Exit.ARTIFACT)
        path = artifacts.inside(Path(explicit), A2E_FILE)
    elif explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise GGError(f"{path}: no such A2E weights file; check --a2e", Exit.INPUT_MISSING)
    else:
        path = Path(folder) / A2E_FILE
        if not path.is_file():
            raise GGError(
                f"{folder}: this avatar has no audio→expression model ({A2E_FILE}); pass --a2e PRIOR_DIR (a fit-prior output "
                "with an a2e part), or re-run adapt with such a prior",
                Exit.ARTIFACT,
            )
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise GGError(f"{path}: unreadable A2E weights ({e.__class__.__name__}); re-run fit-prior or adapt", Exit.ARTIFACT) from e
    from_state(state, str(path))  # another A2E version or a foreign file: refused naming it, before any work
    return state, str(path)


def turn(centre: torch.Tensor, yaw: float, pitch: float) -> torch.Tensor:
    """4×4 face-space rotation of the head about `centre`: yaw about its vertical axis, then
    pitch about its left-right axis (degrees; positive yaw turns the face to its left)."""
    y, p = math.radians(yaw), math.radians(pitch)
    Ry = torch.tensor([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    Rx = torch.tensor([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    M = torch.eye(4, dtype=centre.dtype, device=centre.device)
    M[:3, :3] = (Ry @ Rx).to(centre)
    M[:3, 3] = centre - M[:3, :3] @ centre
    return M


def pingpong(t: np.ndarray, n: int) -> np.ndarray:
    """Indices 0, 1, …, n−1, n−2, …, 1, 0, 1, … for positions t (any length from n frames)."""
    if n == 1:
        return np.zeros_like(t)
    k = np.mod(t, 2 * (n - 1))
    return np.where(k < n, k, 2 * (n - 1) - k)


def read_pose_file(path: Path) -> np.ndarray:
    """(N, 4, 4) face→camera poses from an npz with `pose`, or a CSV of yaw,pitch,roll (degrees,
    viz.head_angles' convention) and tx,ty,tz (cm, camera space), one row per output frame."""
    path = Path(path)
    if not path.is_file():
        raise GGError(f"{path}: no such pose file; pass an .npz with 'pose' or a yaw,pitch,roll,tx,ty,tz CSV", Exit.INPUT_MISSING)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                pose = np.asarray(data["pose"], np.float32)
        else:
            rows = np.loadtxt(path, delimiter=",", ndmin=2, comments="#", skiprows=_header_rows(path))
            from scipy.spatial.transform import Rotation

            from .viz import FRONTAL  # (lazy: viz pulls in matplotlib)

            pose = np.tile(np.eye(4, dtype=np.float32), (len(rows), 1, 1))
            pose[:, :3, :3] = Rotation.from_euler("xyz", rows[:, [1, 0, 2]], degrees=True).as_matrix() @ FRONTAL
            pose[:, :3, 3] = rows[:, 3:6]
    except (KeyError, IndexError, *artifacts.NUMPY_ERRORS) as e:
        raise GGError(f"{path}: unreadable pose file ({e.__class__.__name__}); "
                      "expected an .npz with 'pose' (N,4,4) or a CSV of yaw,pitch,roll,tx,ty,tz", Exit.INPUT_INVALID) from e
    if pose.ndim != 3 or pose.shape[1:] != (4, 4) or len(pose) == 0 or not np.isfinite(pose).all():
        raise GGError(f"{path}: poses must be a finite (N, 4, 4) array with N ≥ 1, got {pose.shape}", Exit.INPUT_INVALID)
    return pose


def _header_rows(path: Path) -> int:
    with open(path) as f:
        first = f.readline()
    return int(any(c.isalpha() for c in first))


def parse_background(spec: str, size: int) -> np.ndarray:
    """--background: an image file (resized to size²) or a colour ('white', '#00ff00', '0,255,0')."""
    if Path(spec).is_file():
        image = cv2.imread(spec, cv2.IMREAD_COLOR)
        if image is None:
            raise GGError(f"{spec}: not a readable image; pass a PNG/JPEG or a colour", Exit.INPUT_INVALID)
        image = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)
        return image.astype(np.float32) / 255
    from matplotlib.colors import to_rgb

    try:
        rgb = [int(v) / 255 for v in spec.split(",")] if "," in spec else to_rgb(spec)
    except ValueError as e:
        raise GGError(f"--background {spec!r}: neither an image file nor a colour (white, #00ff00, 0,255,0)", Exit.USAGE) from e
    if len(rgb) != 3:
        raise GGError(f"--background {spec!r}: a colour needs three components", Exit.USAGE)
    return np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3)).copy()


class Synthesizer:
    """An avatar at one output size: head, body compositor, synthesis track and body frames."""

    def __init__(self, folder: Path, device: torch.device, size: int | None = None, clip: Path | None = None, background: str | None = None,
                 cfg: SynthConfig | None = None):
        self.folder, self.device, self.cfg = Path(folder), device, cfg or SynthConfig()
        self.meta = artifacts.read_meta(self.folder, "avatar")
        self.avatar = Avatar.load(self.folder, device)
        self.track = load_track(self.folder)
        clip_path = Path(clip or self.meta["clip"]["path"])
        if not clip_path.exists():
            raise GGError(f"{clip_path}: the avatar's clip (its body frames) is not there; pass --clip CLIP_DIR", Exit.INPUT_MISSING)
        self.clip = Clip(clip_path)
        if self.clip.n_frames != len(self.track["pose"]):
            raise GGError(f"{clip_path}: {self.clip.n_frames} frames but the avatar was adapted on {len(self.track['pose'])}; "
                          "pass the avatar's own clip", Exit.INPUT_INVALID)
        self.size = int(size or self.meta["size"])
        if self.size % 8 or self.size < 32:
            raise GGError(f"--size {self.size}: use a multiple of 8, at least 32", Exit.USAGE)
        self.K = torch.tensor(intrinsics(self.clip, self.size), dtype=torch.float32, device=device)
        self.background = None if background is None else parse_background(background, self.size)
        plate = self.background if self.background is not None else resize(self.clip.background, self.size).astype(np.float32) / 255
        self.body = Body.load(self.folder, self.meta, torch.from_numpy(plate).to(device)[None], device)
        lo, hi = self.meta.get("synthesis", {}).get("body_frames", [int(self.clip.train_indices[0]), int(self.clip.train_indices[-1]) + 1])
        self.body_frames = np.arange(int(lo), int(hi))
        names = [str(n) for n in self.clip.tracking["blendshape_names"]]
        self.eye_columns = [k for k, n in enumerate(names) if n.startswith(EYE_PREFIXES)]
        self.centre = self.avatar.head.vertices(self.avatar.head.neutral).mean(0)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip frame i at size² (background replaced if asked) and its 0/1 head mask, both uint8:
        decoding threads move a quarter of float32's bytes; the device converts."""
        labels = self.clip.mask(int(i))
        frame = resize(self.clip.frame(int(i)), self.size)
        if self.background is not None:
            bg = resize((labels == 0).astype(np.float32), self.size)
            frame = (frame * (1 - bg) + self.background * 255 * bg + 0.5).astype(np.uint8)
        return frame, (resize((labels == 2).astype(np.float32), self.size) > 0.5).astype(np.uint8)

    def bodies(self, frames: np.ndarray, fps: float) -> np.ndarray:
        """Clip frame replayed under output frames `frames` (ping-pong over the body frames, in the clip's time)."""
        t = np.floor(np.asarray(frames) * self.clip.fps / fps + 1e-6).astype(int)
        return self.body_frames[pingpong(t, len(self.body_frames))]

    def poses(self, frames: np.ndarray, bodies: np.ndarray, fps: float, pose_track: np.ndarray | None = None,
              yaw: float = 0.0, pitch: float = 0.0, orbit: float = 0.0) -> torch.Tensor:
        """(T, 4, 4) head poses: the body frames' refined poses or the pose file's (ping-pong),
        turned by yaw/pitch offsets and the orbit's sinusoidal yaw sweep."""
        base = self.track["pose"][bodies] if pose_track is None else pose_track[pingpong(np.asarray(frames), len(pose_track))]
        poses = torch.as_tensor(np.asarray(base, np.float32), device=self.device)
        if yaw or pitch or orbit:
            sweep = orbit * np.sin(2 * np.pi * np.asarray(frames) / fps / self.cfg.orbit_period_s)
            poses = torch.stack([p @ turn(self.centre, yaw + float(s), pitch) for p, s in zip(poses, sweep)])
        return poses

    def with_eyes(self, blendshapes: np.ndarray, bodies: np.ndarray) -> np.ndarray:
        """Audio-driven blendshapes with the eye/brow columns of the replayed frames' tracking."""
        out = np.array(blendshapes, np.float32, copy=True)
        out[:, self.eye_columns] = self.track["blendshapes"][bodies][:, self.eye_columns]
        return out

    @torch.no_grad()
    def frames(self, exprs: np.ndarray, poses: torch.Tensor, bodies: np.ndarray, bases: np.ndarray | None = None,
               paste: bool = False, timings: dict[str, float] | None = None) -> Iterator[np.ndarray]:
        """Final uint8 frames, in order: head rendered with exprs (T,52) at poses (T,4,4) from
        landmarks `bases` (T,478,3; default the expressions driven through the basis), composited
        onto body frames `bodies` by the inpainter (or, with `paste`, the plate paste)."""
        n = len(bodies)
        batch = self.cfg.batch
        stream = Prefetch(self.load, lambda k: [bodies[k]], n, ahead=4 * batch, pool=self.pool)
        stream.queue(0)  # body frames decode while the first batch renders
        exprs_t = torch.as_tensor(np.asarray(exprs, np.float32), device=self.device)
        bases_t = None if bases is None else torch.as_tensor(np.asarray(bases, np.float32), device=self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for a in range(0, n, batch):
            b = min(a + batch, n)
            tic = time.perf_counter()
            # the whole batch in one pass: per-frame calls cost more in launches than in rasterizing
            base = self.avatar.head.drive(exprs_t[a:b]) if bases_t is None else bases_t[a:b]
            out, _ = self.avatar.render(base, poses[a:b], exprs_t[a:b], self.K, self.size)
            sync()
            tac = time.perf_counter()
            loaded = [stream.get(k)[0] for k in range(a, b)]
            frame = torch.from_numpy(np.stack([f for f, _ in loaded])).to(self.device).float() / 255
            mask = torch.from_numpy(np.stack([m for _, m in loaded])).to(self.device).float()
            toc = time.perf_counter()
            head, alpha = out.rgb, out.alpha
            if paste:
                final = self.body.paste(head, alpha, frame, self.body.blank(mask, alpha))
            else:
                final = self.body(head, alpha, frame, mask)
            images = (final.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
            if timings is not None:
                timings["render"] = timings.get("render", 0.0) + tac - tic
                timings["load"] = timings.get("load", 0.0) + toc - tac
                timings["composite"] = timings.get("composite", 0.0) + time.perf_counter() - toc
            yield from images


def read_audio(path: Path) -> np.ndarray:
    """16 kHz mono float32 samples of any file FFmpeg reads (audio.load_audio, in process)."""
    return audio.load_audio(path)


def held_out_audio(clip: Clip, frames: np.ndarray, path: Path) -> np.ndarray:
    """The clip's audio under `frames` (consecutive) → written to `path`; returns the samples.

    eval drives the avatar with it; bench/run_all.py fills the feature cache from exactly that audio."""
    if clip.audio_path is None:
        raise GGError(f"{clip.path}: the clip has no audio.wav; eval needs the clip's speech (re-run preprocess on a video with sound)", Exit.INPUT_INVALID)
    samples, rate = media.read_wav(clip.audio_path)
    a, b = (round(f / clip.fps * rate) for f in (frames[0], frames[-1] + 1))
    cut = samples[a:b]
    media.write_wav(path, cut, rate)
    return cut
