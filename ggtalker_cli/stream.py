"""Audio → expressions incrementally: samples in any chunking, frames out as soon as they are final.

`a2e.predict` needs the whole audio. Synthesis of long or live speech needs the same result
from chunks, in bounded memory, so this module replays predict's windowed passes incrementally
and emits a frame once no later audio can change it:

- **whisper** (`audio.encode`'s schedule): 30 s windows every 20 s, the last one end-aligned.
  Window k starts at k·HOP exactly when the audio reaches k·HOP + 30 s, which is known as soon
  as that much has arrived; a frame belongs to the window with the nearest centre, so once
  window k is complete every frame up to its centre is owned by a known window.
- **A2E** (`a2e.Sampler`, the same code a whole-file run uses): `sample_steps` flow steps over
  windows every `window/2`, the last end-aligned, each frame's starting noise drawn from
  (seed, frame index). Frame t is final once features exist up to t + `Sampler.latency`.
- **resampling** to the output rate (`a2e.resample`, linear at frame centres).

Each emitted group is fixed by the audio alone, never by the chunking, so a stream's output does
not depend on how its audio was cut (tests check it, and that it matches `a2e.predict` for the
same seed). Memory: at most 50 s of audio, two whisper windows and a few A2E windows per flow
step. Latency: frames are final up to `latency_s` seconds of audio behind the newest sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import a2e, audio
from .errors import Exit, GGError
from .models.a2e import MOUTH, N_BLENDSHAPES, from_state

WHISPER_LATENCY_S = (audio.WINDOW / 2 + audio.HOP) / audio.SAMPLE_RATE  # 35 s: a frame just past a window centre waits for the next window


@dataclass
class Frames:
    """A run of consecutive output frames starting at `start`."""

    start: int
    blendshapes: np.ndarray  # (T, 52)
    mouth: np.ndarray  # (T, M, 3) face-space mouth points (cm)
    mouth_open: np.ndarray  # (T,) inner-lip gap (cm)

    def __len__(self) -> int:
        return len(self.blendshapes)


class _Whisper:
    """Samples in, feature rows (one per model frame, consecutive) out, as audio.encode makes them."""

    def __init__(self, encoder: audio.Encoder, fps: float):
        self.encoder, self.fps, self.dim = encoder, fps, encoder.dim
        self.samples = 0
        self.buf, self.buf0 = np.zeros(0, np.float32), 0  # audio kept, from sample buf0 on
        self.windows: list[tuple[int, torch.Tensor]] = []  # (start, rows) of the last two windows
        self.k = 0  # windows completed
        self.n = 0  # frames emitted

    def centre(self, start: int) -> float:
        return (start + audio.WINDOW / 2) / audio.SAMPLE_RATE

    def rows(self, start: int) -> torch.Tensor:
        """(1500, D) encoder output of the 30 s window at `start` (zero padded past the audio)."""
        for s, r in self.windows:
            if s == start:
                return r
        return self.encoder.window(self.buf[start - self.buf0 : start - self.buf0 + audio.WINDOW])

    def features(self, end: int, starts: list[int]) -> np.ndarray:
        """Rows of frames [n, end), each from the window of `starts` with the nearest centre."""
        out = audio.frame_features(np.arange(self.n, end), self.fps, starts, self.rows)
        self.n = end
        return out

    def push(self, samples: np.ndarray) -> np.ndarray:
        self.buf = np.concatenate([self.buf, samples.astype(np.float32)])
        self.samples += len(samples)
        out = [np.zeros((0, self.dim), np.float16)]
        while self.k * audio.HOP + audio.WINDOW <= self.samples:
            start = self.k * audio.HOP
            self.windows = (self.windows + [(start, self.rows(start))])[-2:]
            self.k += 1
            end = math.floor(self.centre(start) * self.fps - 0.5 + 1e-9) + 1  # frames centred up to the window's centre
            if end > self.n:
                out.append(self.features(end, [s for s, _ in self.windows]))
            self.buf, self.buf0 = self.buf[start - self.buf0 :], start  # later windows start after this one
        return np.concatenate(out)

    def finish(self, n_frames: int) -> np.ndarray:
        """The remaining frames of audio.encode(audio, n_frames, fps)."""
        n_samples = max(self.samples, math.ceil(n_frames / self.fps * audio.SAMPLE_RATE))
        return self.features(n_frames, audio.window_starts(n_samples)) if n_frames > self.n else np.zeros((0, self.dim), np.float16)


class Expressions:
    """`push(samples)` / `finish()` → `Frames` at `fps`, equal to `a2e.predict` on the whole audio
    with the same `seed`."""

    def __init__(self, state: dict[str, torch.Tensor], fps: float, whisper: str | Path | None = None, device: str = "cpu", seed: int = 0):
        self.model = from_state(state).to(device)
        self.fps, self.mfps = float(fps), float(self.model.meta["fps"])
        encoder = audio.Encoder(whisper or self.model.meta["whisper"]["model"], device, dim=self.model.meta["feature_dim"])
        self.whisper = _Whisper(encoder, self.mfps)
        self.sampler = a2e.Sampler(self.model, seed=seed)
        self.neutral = self.model.neutral.cpu().numpy()
        self.bs, self.mouth, self.m0 = np.zeros((0, N_BLENDSHAPES), np.float32), np.zeros((0, len(MOUTH), 3), np.float32), 0
        self.n_model = 0  # decoded model frames
        self.n_out = 0  # output frames emitted
        self.latency_s = WHISPER_LATENCY_S + self.sampler.latency / self.mfps + 1 / self.fps

    @property
    def seconds(self) -> float:
        return self.whisper.samples / audio.SAMPLE_RATE

    def _decode(self, code: torch.Tensor) -> None:
        bs, mouth = self.model.decode(code)
        self.bs = np.concatenate([self.bs, bs.clamp(0, 1).cpu().numpy()])
        self.mouth = np.concatenate([self.mouth, mouth.cpu().numpy()])
        self.n_model += len(code)

    def _resample(self, end: int, n_model: int | None) -> Frames:
        """Output frames [n_out, end): linear interpolation at frame centres (a2e.resample)."""
        j = np.arange(self.n_out, end)
        last = (n_model or 10**12) - 1
        pos = np.clip((j + 0.5) * self.mfps / self.fps - 0.5, 0, last) if self.fps != self.mfps else j.astype(np.float64)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, last)
        w = (pos - lo)[:, None]
        bs_lo, bs_hi = self.bs[lo - self.m0], self.bs[hi - self.m0]
        mouth = (1 - w[..., None]) * self.mouth[lo - self.m0] + w[..., None] * self.mouth[hi - self.m0] + self.neutral
        frames = Frames(self.n_out, ((1 - w) * bs_lo + w * bs_hi).astype(np.float32), mouth.astype(np.float32), a2e.mouth_gap(mouth).astype(np.float32))
        self.n_out = end
        keep = max(0, int(np.floor(max(0.0, (end + 0.5) * self.mfps / self.fps - 0.5))) - 1) - self.m0  # the next frame's lo and later
        if keep > 0:
            self.bs, self.mouth, self.m0 = self.bs[keep:], self.mouth[keep:], self.m0 + keep
        return frames

    def push(self, samples: np.ndarray) -> Frames:
        code = self.sampler.push(torch.as_tensor(self.whisper.push(samples).astype(np.float32)))
        if len(code):
            self._decode(code)
        # output frame j is final when its upper neighbour (lo + 1) is decoded
        end = self.n_out
        while math.floor((end + 0.5) * self.mfps / self.fps - 0.5) + 1 < self.n_model:
            end += 1
        return self._resample(end, None)

    def finish(self) -> Frames:
        if self.seconds < audio.MIN_SECONDS:
            raise GGError(f"audio is {self.seconds:.2f} s long; at least {audio.MIN_SECONDS} s of speech is needed", Exit.INPUT_INVALID)
        n_model = max(1, math.ceil(self.seconds * self.mfps))
        feats = self.whisper.finish(n_model)
        code = self.sampler.push(torch.as_tensor(feats.astype(np.float32)))
        rest = self.sampler.finish()
        for c in (code, rest):
            if len(c):
                self._decode(c)
        return self._resample(max(1, math.ceil(self.seconds * self.fps)), n_model)
