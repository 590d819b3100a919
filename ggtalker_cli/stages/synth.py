"""`ggtalker synth AVATAR_DIR --audio speech.wav -o out.mp4`: speech in, a talking video out.

audio → whisper features → A2E expressions (stream.Expressions, equal to `a2e.predict`) →
head landmarks (`HeadModel.drive`) → Gaussian head render → body inpainter over a replayed
body frame → H.264 with the speech muxed in sync.

- **Expressions** come from the avatar's adapted A2E (`a2e.safetensors`) or `--a2e` (a prior).
  Audio is consumed in chunks and frames are rendered as soon as they are final, in batch and
  `--stream` mode alike (same code, same frames); memory is flat in the audio's length.
- **Eyes**: the A2E predicts a conditional mean, in which blinks average away. The eye and brow
  blendshapes therefore come from the replayed training frame's own tracking: the clip's real
  blinks and gaze, at its real blink rate, in step with the replayed head motion.
- **Body and pose**: the clip's training frames played forward and backward (ping-pong), so any
  audio length works, each with its refined head pose (`synthesis/track.npz`); or a pose file
  (`--pose`); turned by `--yaw/--pitch` and a sinusoidal `--orbit` for novel views.
- **Output**: frames stream into the H.264 encoder (media.VideoWriter, video only) while the
  audio is kept in a temp wav; the speech is muxed in at the end into a hidden temp file renamed
  onto the target, so an interrupted run never leaves a corrupt mp4 there. Nothing but the
  target is ever written: the temps are fresh names made exclusively, and removed. `-o -` writes raw rgb24 frames to stdout;
  `-o x.npz` writes the expressions alone, with a mouth-opening plot beside it.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import a2e, artifacts, audio, console, media
from ..avatar import Avatar
from ..body import Body, load_track
from ..clip import Clip
from ..errors import Exit, GGError
from ..models.a2e import from_state
from ..stream import Expressions, Frames

A2E_FILE = "a2e.safetensors"
EYE_PREFIXES = ("eye", "brow")  # blendshapes taken from the replayed frame, not from the audio
ORBIT_PERIOD_S = 6.0  # one full left-right-left sweep of --orbit
CHUNK_S = 2.0  # audio pushed per step
BATCH = 8  # frames composited per inpainter call
PREFETCH = 4 * BATCH  # body frames decoded ahead
WORKERS = min(8, os.cpu_count() or 1)  # threads decoding body frames (JPEG decode + resize release the GIL)
ENCODE_QUEUE = 4 * BATCH  # frames waiting for the encoder thread


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise GGError(f"--device {name}: expected cpu, cuda or auto", Exit.USAGE)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GGError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu or a GPU machine", Exit.RESOURCE)
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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

            from ..viz import FRONTAL  # (lazy: viz pulls in matplotlib)

            pose = np.tile(np.eye(4, dtype=np.float32), (len(rows), 1, 1))
            pose[:, :3, :3] = Rotation.from_euler("xyz", rows[:, [1, 0, 2]], degrees=True).as_matrix() @ FRONTAL
            pose[:, :3, 3] = rows[:, 3:6]
    except (KeyError, IndexError, *artifacts.NUMPY_ERRORS) as e:
        raise GGError(f"{path}: unreadable pose file ({e.__class__.__name__}); expected an .npz with 'pose' (N,4,4) or a CSV of yaw,pitch,roll,tx,ty,tz", Exit.INPUT_INVALID) from e
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


# ---------------------------------------------------------------------------------------------
# the avatar, ready to render


class Synthesizer:
    """An avatar at one output size: head, body compositor, synthesis track and body frames."""

    def __init__(self, folder: Path, device: torch.device, size: int | None = None, clip: Path | None = None, background: str | None = None):
        self.folder, self.device = Path(folder), device
        self.meta = artifacts.read_meta(self.folder, "avatar")
        self.avatar = Avatar.load(self.folder, device)
        self.track = load_track(self.folder)
        clip_path = Path(clip or self.meta["clip"]["path"])
        if not clip_path.exists():
            raise GGError(f"{clip_path}: the avatar's clip (its body frames) is not there; pass --clip CLIP_DIR", Exit.INPUT_MISSING)
        self.clip = Clip(clip_path)
        if self.clip.n_frames != len(self.track["pose"]):
            raise GGError(f"{clip_path}: {self.clip.n_frames} frames but the avatar was adapted on {len(self.track['pose'])}; pass the avatar's own clip", Exit.INPUT_INVALID)
        self.size = int(size or self.meta["size"])
        if self.size % 8 or self.size < 32:
            raise GGError(f"--size {self.size}: use a multiple of 8, at least 32", Exit.USAGE)
        K = self.clip.K.copy()
        K[:2] *= self.size / self.clip.size
        self.K = torch.tensor(K, dtype=torch.float32, device=device)
        self.background = None if background is None else parse_background(background, self.size)
        plate = self.background if self.background is not None else self._resize(self.clip.background).astype(np.float32) / 255
        self.body = Body.load(self.folder, self.meta, torch.from_numpy(plate).to(device)[None], device)
        lo, hi = self.meta.get("synthesis", {}).get("body_frames", [int(self.clip.train_indices[0]), int(self.clip.train_indices[-1]) + 1])
        self.body_frames = np.arange(int(lo), int(hi))
        names = [str(n) for n in self.clip.tracking["blendshape_names"]]
        self.eye_columns = [k for k, n in enumerate(names) if n.startswith(EYE_PREFIXES)]
        self.centre = self.avatar.head.vertices(self.avatar.head.neutral).mean(0)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """(size, size, C), same dtype; OpenCV's area filter (anti-aliased down, bilinear up)."""
        if image.shape[0] != self.size:
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return image.reshape(self.size, self.size, -1)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip frame i at size² (background replaced if asked) and its 0/1 head mask, both uint8:
        decoding threads move a quarter of float32's bytes; the device converts."""
        labels = self.clip.mask(int(i))
        frame = self._resize(self.clip.frame(int(i)))
        if self.background is not None:
            bg = self._resize((labels == 0).astype(np.float32))
            frame = (frame * (1 - bg) + self.background * 255 * bg + 0.5).astype(np.uint8)
        return frame, (self._resize((labels == 2).astype(np.float32)) > 0.5).astype(np.uint8)

    def bodies(self, frames: np.ndarray, fps: float) -> np.ndarray:
        """Clip frame replayed under output frames `frames` (ping-pong over the body frames, in the clip's time)."""
        t = np.floor(np.asarray(frames) * self.clip.fps / fps + 1e-6).astype(int)
        return self.body_frames[pingpong(t, len(self.body_frames))]

    def poses(self, frames: np.ndarray, bodies: np.ndarray, fps: float, pose_track: np.ndarray | None = None,
              yaw: float = 0.0, pitch: float = 0.0, orbit: float = 0.0) -> torch.Tensor:  # fmt: skip
        """(T, 4, 4) head poses: the body frames' refined poses or the pose file's (ping-pong),
        turned by yaw/pitch offsets and the orbit's sinusoidal yaw sweep."""
        base = self.track["pose"][bodies] if pose_track is None else pose_track[pingpong(np.asarray(frames), len(pose_track))]
        poses = torch.as_tensor(np.asarray(base, np.float32), device=self.device)
        if yaw or pitch or orbit:
            sweep = orbit * np.sin(2 * np.pi * np.asarray(frames) / fps / ORBIT_PERIOD_S)
            poses = torch.stack([p @ turn(self.centre, yaw + float(s), pitch) for p, s in zip(poses, sweep)])
        return poses

    def with_eyes(self, blendshapes: np.ndarray, bodies: np.ndarray) -> np.ndarray:
        """Audio-driven blendshapes with the eye/brow columns of the replayed frames' tracking."""
        out = np.array(blendshapes, np.float32, copy=True)
        out[:, self.eye_columns] = self.track["blendshapes"][bodies][:, self.eye_columns]
        return out

    @torch.no_grad()
    def frames(self, exprs: np.ndarray, poses: torch.Tensor, bodies: np.ndarray, bases: np.ndarray | None = None,
               paste: bool = False, timings: dict[str, float] | None = None) -> Iterator[np.ndarray]:  # fmt: skip
        """Final uint8 frames, in order: head rendered with exprs (T,52) at poses (T,4,4) from
        landmarks `bases` (T,478,3; default the expressions driven through the basis), composited
        onto body frames `bodies` by the inpainter (or, with `paste`, the plate paste)."""
        n = len(bodies)
        pending = {k: self.pool.submit(self.load, bodies[k]) for k in range(min(PREFETCH, n))}
        exprs_t = torch.as_tensor(np.asarray(exprs, np.float32), device=self.device)
        bases_t = None if bases is None else torch.as_tensor(np.asarray(bases, np.float32), device=self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for a in range(0, n, BATCH):
            b = min(a + BATCH, n)
            tic = time.perf_counter()
            # the whole batch in one pass: per-frame calls cost more in launches than in rasterizing
            base = self.avatar.head.drive(exprs_t[a:b]) if bases_t is None else bases_t[a:b]
            out, _ = self.avatar.render(base, poses[a:b], exprs_t[a:b], self.K, self.size)
            sync()
            tac = time.perf_counter()
            loaded = []
            for k in range(a, b):
                loaded.append(pending.pop(k).result())
                if k + PREFETCH < n:
                    pending[k + PREFETCH] = self.pool.submit(self.load, bodies[k + PREFETCH])
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


# ---------------------------------------------------------------------------------------------
# audio in


def read_audio(path: Path) -> np.ndarray:
    """16 kHz mono float32 samples of any file FFmpeg reads (audio.load_audio, in process)."""
    return audio.load_audio(path)


def _file_samples(path: Path, start: float, end: float | None) -> np.ndarray:
    """A whole file decoded (audio.load_audio checks it) and cut to [start, end) seconds."""
    samples = read_audio(path)
    a = round(start * audio.SAMPLE_RATE)
    b = len(samples) if end is None else min(len(samples), round(end * audio.SAMPLE_RATE))
    if b - a < audio.MIN_SECONDS * audio.SAMPLE_RATE:
        raise GGError(f"{path}: {max(b - a, 0) / audio.SAMPLE_RATE:.2f} s of audio in --start/--end; at least {audio.MIN_SECONDS} s is needed", Exit.INPUT_INVALID)
    return samples[a:b]


def _stream_chunks(source: str, start: float, end: float | None) -> Iterator[np.ndarray]:
    """Audio from a file or stdin ('-') decoded as it arrives (media.audio_chunks), cut to [start, end)."""
    if source != "-" and not Path(source).is_file():
        raise GGError(f"{source}: no such audio file; check the path", Exit.INPUT_MISSING)
    skip = round(start * audio.SAMPLE_RATE)
    left = math.inf if end is None else round((end - start) * audio.SAMPLE_RATE)
    blocks = media.audio_chunks(sys.stdin.buffer if source == "-" else Path(source), "stdin" if source == "-" else source)
    try:
        for x in blocks:
            if skip:
                cut = min(skip, len(x))
                x, skip = x[cut:], skip - cut
            x = x[: int(min(left, len(x)))]
            left -= len(x)
            if len(x):
                yield x
            if left <= 0:
                break
    finally:
        blocks.close()


# ---------------------------------------------------------------------------------------------
# output


def _fresh_sibling(path: Path, suffix: str) -> Path:
    """A new hidden file beside `path`, created exclusively (O_EXCL: never a file that was already
    there) with the umask's permissions, so the mp4 renamed from it reads like any other file."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue


class _Output:
    """Where frames go: an mp4 (video temp + wav temp, muxed and renamed at the end), raw rgb24
    on stdout, or nowhere (expressions only). Temps are hidden siblings of the target."""

    def __init__(self, target: str, fps: float, size: int, crf: int):
        self.target, self.fps, self.size, self.crf = target, fps, size, crf
        self.kind = "raw" if target == "-" else "npz" if target.endswith(".npz") else "video"
        self.frames = 0
        self.temps: list[Path] = []
        self.writer = self.wav = self.behind = None
        if self.kind == "video":
            path = Path(target)
            self.temps = [_fresh_sibling(path, suffix) for suffix in (".video.mp4", ".audio.wav", ".tmp.mp4")]
            self.video_tmp, self.wav_tmp, self.final_tmp = self.temps
            try:
                self.writer = media.open_writer(self.video_tmp, fps, size, size, crf=crf)
                self.wav = wave.open(str(self.wav_tmp), "wb")
            except BaseException:
                self.cleanup()
                raise
            self.wav.setnchannels(1)
            self.wav.setsampwidth(2)
            self.wav.setframerate(audio.SAMPLE_RATE)
        self.behind = None if self.kind == "npz" else media.Behind(self._write, ENCODE_QUEUE)

    def audio(self, samples: np.ndarray) -> None:
        if self.wav is not None:
            self.wav.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())

    def write(self, frame: np.ndarray) -> None:
        """Queue one frame for the encoder thread (`_write`)."""
        if self.behind is not None:
            self.behind.put(frame)
        self.frames += 1

    def _write(self, frame: np.ndarray) -> None:
        if self.kind == "video":
            self.writer.write(frame)
            return
        try:
            sys.stdout.buffer.write(frame.tobytes())
        except BrokenPipeError as e:
            raise GGError("stdout closed by the reader; raw frames stopped", Exit.OUTPUT) from e

    def flush(self) -> None:
        """Raw frames so far reach the reader now (streaming): wait for the queue, then flush stdout."""
        if self.kind == "raw":
            self.behind.drain()
            sys.stdout.buffer.flush()

    def close(self) -> None:
        """Finish the mp4: drain the encoder thread, close the encoder, mux the speech, rename onto the target."""
        if self.behind is not None:
            self.behind.close()
            self.behind = None
        if self.kind != "video":
            if self.kind == "raw":
                sys.stdout.buffer.flush()
            return
        self.wav.close()
        self.wav = None
        self.writer.close()
        self.writer = None
        media.mux(self.video_tmp, self.wav_tmp, self.final_tmp)
        os.replace(self.final_tmp, Path(self.target))  # the named output (checked free, or --force)
        self.cleanup()

    def cleanup(self) -> None:
        if self.behind is not None:
            self.behind.abandon()
            self.behind = None
        if self.wav is not None:
            self.wav.close()
        if self.writer is not None:
            self.writer.__exit__(KeyboardInterrupt, None, None)  # kills the encoder, removes its file
        for p in self.temps:
            p.unlink(missing_ok=True)


def _mp4_need(frames: int, size: int, seconds: float) -> int:
    """Bytes an mp4 needs while it is made, generously: H.264 at CRF 18 (counted as 0.1 B/px),
    held twice (the video temp and the muxed copy), plus the 16 kHz 16-bit wav temp."""
    return int(2 * frames * 0.1 * size**2 + seconds * 32_000)


def check_target(target: str, force: bool) -> None:
    """Refuse an unusable -o before any work: existing (without --force), a folder, unwritable."""
    if target == "-":
        if console._state["json"]:
            raise GGError("-o - writes raw frames to stdout, where --json would also go; drop --json", Exit.USAGE)
        return
    path = Path(target)
    if path.suffix.lower() not in (".mp4", ".mov", ".mkv", ".npz"):
        raise GGError(f"{path}: unknown output type; use .mp4 (video), .npz (expressions only) or - (raw rgb24 frames)", Exit.USAGE)
    plot = path.with_suffix(".png")
    if path.suffix.lower() == ".npz" and plot.exists():  # --force names the .npz only, never its side-car
        raise GGError(f"{plot}: already exists, and synth writes the mouth-opening plot of {path.name} there; move it or choose another -o", Exit.OUTPUT)
    if path.is_dir():
        raise GGError(f"{path}: is a folder; pass a file path for -o", Exit.OUTPUT)
    if path.exists() and not force:
        raise GGError(f"{path}: output already exists; pass --force to replace it", Exit.OUTPUT)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise GGError(f"{parent}: output folder does not exist; create it or choose another -o", Exit.OUTPUT)
    try:  # os.access says yes to root everywhere; only a real file says whether it can be written
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise GGError(f"{parent}: cannot write files there ({e.strerror}); choose a writable -o", Exit.OUTPUT) from e


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so temps are removed and the target is never half-written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# the stage


def run(
    avatar_dir: Path,
    audio_source: str,
    out: str,
    *,
    a2e_path: Path | None = None,
    clip: Path | None = None,
    pose: Path | None = None,
    yaw: float = 0.0,
    pitch: float = 0.0,
    orbit: float = 0.0,
    background: str | None = None,
    size: int | None = None,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    crf: int = 18,
    device: str = "auto",
    stream: bool = False,
    whisper: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    out = str(out)
    check_target(out, force)
    if audio_source == "-" and not stream:
        raise GGError("--audio - (stdin) needs --stream", Exit.USAGE)
    if start < 0 or (end is not None and end <= start):
        raise GGError(f"--start {start} / --end {end}: need 0 ≤ start < end (seconds of the audio)", Exit.USAGE)
    if not 0 <= crf <= 51:
        raise GGError(f"--crf {crf}: x264 takes 0 (lossless) to 51", Exit.USAGE)
    if audio_source != "-" and not Path(audio_source).is_file():
        raise GGError(f"{audio_source}: no such audio file; check --audio", Exit.INPUT_MISSING)
    dev = device_of(device)
    artifacts.read_meta(Path(avatar_dir), "avatar")  # format check first: the clearest error for a foreign folder
    state, a2e_source = load_a2e(Path(avatar_dir), a2e_path)
    expr_only = out.endswith(".npz")
    synth = None if expr_only else Synthesizer(Path(avatar_dir), dev, size, clip, background)
    fps = float(fps or (synth.clip.fps if synth else artifacts.read_meta(Path(avatar_dir), "avatar").get("synthesis", {}).get("fps", 25.0)))
    if fps <= 0 or fps > 120:
        raise GGError(f"--fps {fps}: use a rate in (0, 120]", Exit.USAGE)
    pose_track = read_pose_file(pose) if pose is not None else None
    expressions = Expressions(state, fps, whisper, device=dev.type)
    if stream:
        chunks, total = _stream_chunks(audio_source, start, end), None
    else:
        samples = _file_samples(Path(audio_source), start, end)
        step = int(CHUNK_S * audio.SAMPLE_RATE)
        chunks, total = (samples[i : i + step] for i in range(0, len(samples), step)), math.ceil(len(samples) / audio.SAMPLE_RATE * fps)
        if synth is not None and out != "-":  # an mp4 of known length
            artifacts.check_disk_space(Path(out), _mp4_need(total, synth.size, len(samples) / audio.SAMPLE_RATE))
    timings: dict[str, float] = {}
    kept: list[Frames] = []
    output = None
    tic = time.perf_counter()
    try:
        with _sigterm_as_interrupt(), console.progress() as bar:
            output = _Output(out, fps, synth.size if synth else 0, crf)
            task = bar.add_task("synth", total=total)

            def emit(group: Frames) -> None:
                if not len(group):
                    return
                if expr_only:
                    kept.append(group)
                else:
                    idx = np.arange(group.start, group.start + len(group))
                    bodies = synth.bodies(idx, fps)
                    poses = synth.poses(idx, bodies, fps, pose_track, yaw, pitch, orbit)
                    for image in synth.frames(synth.with_eyes(group.blendshapes, bodies), poses, bodies, timings=timings):
                        output.write(image)
                        bar.advance(task)
                    output.flush()
                done = group.start + len(group)
                wall = time.perf_counter() - tic
                bar.update(task, completed=done, status=f"{done / fps / max(wall, 1e-9):.2f}× real time")

            for chunk in chunks:
                output.audio(chunk)
                emit(expressions.push(chunk))
            emit(expressions.finish())
            output.close()
    except BaseException:
        if output is not None:
            output.cleanup()
        raise
    finally:
        if synth is not None:
            synth.close()
    wall = time.perf_counter() - tic
    n = expressions.n_out
    summary: dict[str, Any] = {
        "output": out,
        "frames": n,
        "duration_s": round(expressions.seconds, 3),
        "fps": fps,
        "fps_achieved": round(n / wall, 2),
        "realtime_factor": round(expressions.seconds / wall, 3),
        "device": device_name(dev),
        "a2e": a2e_source,
        "stream": stream,
    }
    if stream:
        summary["latency_s"] = round(expressions.latency_s, 2)
    if expr_only:
        if _write_expressions(Path(out), kept, fps, audio_source, a2e_source, start, end):
            summary["plot"] = str(Path(out).with_suffix(".png"))
    else:
        summary.update(size=synth.size, body=synth.body.kind,
                       ms_per_frame={k: round(1000 * v / max(n, 1), 3) for k, v in timings.items()})  # fmt: skip
    return summary


def _write_expressions(path: Path, groups: list[Frames], fps: float, source: str, a2e_source: str, start: float, end: float | None) -> bool:
    """expressions.npz (blendshapes, mouth, mouth_open, fps) + the mouth-opening plot (a2e.plot_mouth,
    which reads the audio file itself: made for a whole file, not for stdin or a cut); -> plotted."""
    import io

    bs = np.concatenate([g.blendshapes for g in groups])
    mouth = np.concatenate([g.mouth for g in groups])
    opening = np.concatenate([g.mouth_open for g in groups])
    buffer = io.BytesIO()
    np.savez(buffer, blendshapes=bs, mouth=mouth, mouth_open=opening, fps=np.float32(fps), mouth_landmarks=np.asarray(a2e.MOUTH),
             audio=np.str_(source), a2e=np.str_(a2e_source), start_s=np.float32(start))  # fmt: skip
    artifacts.atomic_write_bytes(path, buffer.getvalue())
    if source == "-" or start != 0 or end is not None:
        return False
    a2e.plot_mouth(path.with_suffix(".png"), source, opening, fps)
    return True
