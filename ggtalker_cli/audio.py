"""Audio in, whisper encoder features out: one feature row per video frame.

Why whisper: its encoder was trained on 680k hours of many languages and noisy recordings, so
its features carry phonetic content that survives another speaker, language or a phone mic
(the out-of-distribution audio GGTalker is about). Whisper's encoder sees exactly 30 s at a
time; long audio is cut into 30 s windows every 20 s and each output frame is taken from the
window whose centre is nearest, so every feature has at least 5 s of context on both sides
(except at the ends of the audio) and memory stays bounded by one window whatever the length.
The 50 Hz encoder output is averaged over each video frame's time span (overlap-weighted), which
gives exactly `n_frames` rows at any frame rate.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import assets, console, media
from .device import device_of
from .errors import Exit, GGError

SAMPLE_RATE = 16000
FEATURE_HZ = 50  # whisper encoder output rate (two mel frames of 10 ms per row)
WINDOW = 30 * SAMPLE_RATE  # whisper's fixed input length
HOP = 20 * SAMPLE_RATE
MIN_SECONDS = 0.3  # shorter than one syllable: nothing to lip-sync to (a 0.2 s file is refused)
DEFAULT_MODEL = "base"


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any file FFmpeg reads into float32 mono at `sr`.

    FFmpeg's resampler (in process, media.read_audio) resamples and downmixes; a long file costs
    only its decoded size (4 bytes a sample: 77 MB for 20 minutes).
    """
    path = Path(path)
    if not path.is_file():
        raise GGError(f"{path}: no such audio file; check the path", Exit.INPUT_MISSING)
    audio = media.read_audio(path, sr)
    if len(audio) < MIN_SECONDS * sr:
        raise GGError(f"{path}: audio is {len(audio) / sr:.2f} s long; at least {MIN_SECONDS} s of speech is needed")
    return audio


def resolve_model(model: str | Path | None = None) -> tuple[Path, str, str]:
    """(checkpoint path, model name, where it came from) through the asset resolver.

    `model` is a whisper model name (base, tiny.en, small, ...) or a path to an openai-whisper
    checkpoint. Names with an offline package (base, tiny.en) are converted once into the cache;
    other official names are downloaded into it.
    """
    if model is None:
        model = DEFAULT_MODEL
    name = str(model)
    if isinstance(model, Path) or name.endswith(".pt") or "/" in name:
        path, source, _ = assets.locate(f"whisper-{DEFAULT_MODEL}", explicit=model)
        return path, Path(name).stem, source
    asset = f"whisper-{name}"
    if asset not in assets.REGISTRY:
        import whisper

        if name not in whisper._MODELS:
            raise GGError(f"unknown whisper model '{name}'; use one of {', '.join(whisper.available_models())} or a path to a .pt checkpoint", Exit.USAGE)
        assets.register(assets.Asset(name=asset, filename=f"{asset}.pt",
                                     env=f"GGTALKER_WHISPER_{name.upper().replace('.', '_').replace('-', '_')}", url=whisper._MODELS[name],
                                     hint="pass --whisper PATH to an openai-whisper .pt"))
    path, source, tried = assets.locate(asset)
    if path is None:
        raise GGError(f"whisper model '{name}' not found (looked in: {'; '.join(tried)}); {assets.REGISTRY[asset].hint}", Exit.ASSET)
    return path, name, source


@functools.lru_cache(maxsize=2)
def _load(path: str, device: str):
    import whisper  # slow import (numba): only when features are really computed

    try:
        model = whisper.load_model(path, device=device)  # torch.load(weights_only=True) inside
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise GGError(f"{path}: not a loadable openai-whisper checkpoint ({e.__class__.__name__}); delete it or pass another --whisper", Exit.ASSET) from e
    return model.eval()  # fp32 weights: whisper's LayerNorm needs them; its Linear/Conv1d cast to the input's dtype


def default_device() -> str:
    return device_of("auto").type


def frame_weights(frames: np.ndarray, fps: float, t0: float, n_rows: int) -> np.ndarray:
    """(len(frames), n_rows) weights averaging 50 Hz rows over each frame's span.

    Frame j spans [j/fps, (j+1)/fps) in seconds, shifted by the window start `t0`; row i spans
    [i/50, (i+1)/50). Each weight is the overlap length, rows normalised to sum to one, so a
    frame longer than a row averages several rows and a shorter one blends its neighbours.
    """
    j = np.asarray(frames, dtype=np.float64)[:, None]
    a = np.clip(j / fps - t0, 0, n_rows / FEATURE_HZ)
    b = np.clip((j + 1) / fps - t0, 0, n_rows / FEATURE_HZ)
    i = np.arange(n_rows, dtype=np.float64)[None, :]
    w = np.clip(np.minimum(b, (i + 1) / FEATURE_HZ) - np.maximum(a, i / FEATURE_HZ), 0, None)
    return (w / np.maximum(w.sum(1, keepdims=True), 1e-12)).astype(np.float32)


def window_starts(n_samples: int) -> list[int]:
    """Window starts in samples: every HOP while a window ends before the audio does, the last
    one aligned to the end, so no window is mostly padding when the audio is longer than one."""
    starts = [0]
    while starts[-1] + WINDOW < n_samples:
        starts.append(min(starts[-1] + HOP, n_samples - WINDOW))
    return starts


def frame_features(frames: np.ndarray, fps: float, starts: list[int], rows: Callable[[int], torch.Tensor]) -> np.ndarray:
    """(len(frames), D) float16 features of video `frames` (not empty), each averaged from the
    window of `starts` whose centre is nearest (`rows(start)` gives that window's 50 Hz rows).

    The one resampling rule of `encode` and of streaming (stream._Whisper), so both give the same
    bits. Windows that own no frame are never asked for: a stream no longer holds their audio.
    """
    centres = np.array([(s + WINDOW / 2) / SAMPLE_RATE for s in starts])
    owner = np.searchsorted((centres[1:] + centres[:-1]) / 2, (frames + 0.5) / fps)
    out = None
    for k, start in enumerate(starts):
        mine = owner == k
        if not mine.any():
            continue
        r = rows(start)  # (1500, D) on the device
        if out is None:
            out = np.zeros((len(frames), r.shape[1]), np.float16)
        w = torch.from_numpy(frame_weights(frames[mine], fps, start / SAMPLE_RATE, len(r))).to(r.device)
        out[mine] = (w @ r).half().cpu().numpy()
    return out


class Encoder:
    """whisper's encoder over one 30 s window at a time, the one way every path computes features.

    The checkpoint loads on the first window actually computed. With GGTALKER_FEATURE_CACHE set to
    a folder, each window's rows are kept there by content (window samples + model), so synth and
    eval of speech seen before need no whisper at all: the GPU machines have no whisper weights, and
    the features of every bench audio are made once on a machine that has them.
    """

    def __init__(self, model: str | Path | None = None, device: str | None = None, dim: int | None = None):
        self.model, self.device, self.dim = model or DEFAULT_MODEL, device or default_device(), dim
        self.name, self.source, self.path, self._net = str(self.model), "feature cache", None, None
        path_like = isinstance(self.model, Path) or self.name.endswith(".pt") or "/" in self.name
        if path_like:  # a file: resolve (and check) now
            self._resolve()
        cache = os.environ.get("GGTALKER_FEATURE_CACHE")
        self.cache = Path(cache) if cache else None
        self.key = None  # what the cache knows the model by: a name is fixed public weights, a file its content
        if self.cache is not None:
            self.key = hashlib.sha256(Path(self.path).read_bytes()).hexdigest() if path_like else f"whisper-{self.name}"
        self.used: list[Path] = []  # cache files read or written (what another machine needs)

    def _resolve(self) -> None:
        path, self.name, self.source = resolve_model(self.model)
        self.path = str(path)

    def net(self):
        if self._net is None:
            if self.path is None:
                self._resolve()
            self._net = _load(self.path, self.device)
            self._check(self._net.dims.n_audio_state)
        return self._net

    def _check(self, dim: int) -> None:
        if self.dim is not None and dim != self.dim:
            raise GGError(f"whisper '{self.name}' gives {dim}-d features but the A2E was trained on {self.dim}-d; pass that whisper model", Exit.USAGE)
        self.dim = dim

    @torch.no_grad()
    def window(self, piece: np.ndarray) -> torch.Tensor:
        """(1500, D) encoder rows of one window of at most WINDOW samples (zero padded here, as
        whisper pads), float32 holding float16 values: what the GPU computes in half precision,
        and half the cache's size."""
        chunk = np.zeros(WINDOW, np.float32)
        chunk[: len(piece)] = piece
        file = None
        if self.cache is not None:
            digest = hashlib.sha256(chunk.astype(np.float32).tobytes() + self.key.encode()).hexdigest()
            file = self.cache / f"{digest}.npy"
            self.used.append(file)
            if file.is_file():
                rows = np.load(file)
                self._check(rows.shape[1])
                return torch.from_numpy(rows.astype(np.float32)).to(self.device)
        try:
            import whisper  # slow import (numba): only when features are really computed
        except ImportError as e:
            cached = f" and {self.cache} holds no features for this audio" if self.cache else ""
            raise GGError(f"openai-whisper is not installed{cached}; pip install openai-whisper", Exit.ASSET) from e
        net = self.net()
        mel = whisper.log_mel_spectrogram(torch.from_numpy(chunk), net.dims.n_mels, device=self.device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32  # whisper's own fp16 inference
        rows = net.encoder(mel[None].to(dtype))[0].half()
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, rows.cpu().numpy())
            tmp.replace(file)  # atomic: a concurrent reader sees all of it or nothing
        return rows.float()


def encode(audio: np.ndarray, n_frames: int, fps: float, model: str | Path | None = None, device: str | None = None) -> tuple[np.ndarray, dict]:
    """Whisper encoder features of 16 kHz mono `audio`, one float16 row per video frame.

    Frames past the end of the audio see whisper's zero padding (silence).
    """
    if n_frames <= 0 or fps <= 0:
        raise GGError(f"need a positive frame count and frame rate, got {n_frames} frames at {fps} fps", Exit.USAGE)
    encoder = Encoder(model, device)
    n_samples = max(len(audio), math.ceil(n_frames / fps * SAMPLE_RATE))
    starts = window_starts(n_samples)
    begin = time.perf_counter()
    with console.progress() as bar:
        task = bar.add_task("whisper features", total=len(starts))

        def rows(start: int) -> torch.Tensor:
            window = encoder.window(audio[start : start + WINDOW])
            bar.advance(task)
            return window

        out = frame_features(np.arange(n_frames), fps, starts, rows)
    seconds = len(audio) / SAMPLE_RATE
    wall = time.perf_counter() - begin
    info = {
        "model": encoder.name,
        "source": encoder.source,
        "dim": int(out.shape[1]),
        "layer": "encoder output",
        "seconds": round(seconds, 3),
        "windows": len(starts),
        "device": encoder.device,
        "realtime_factor": round(seconds / max(wall, 1e-9), 2),
    }
    return out, info


def features_for_clip(wav: Path, n_frames: int, fps: float, model: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """(n_frames, D) float16 whisper features aligned to a clip's frames, and how they were made."""
    return encode(load_audio(wav), n_frames, fps, model)
