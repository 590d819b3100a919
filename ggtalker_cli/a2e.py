"""Audio→expression, the library around the network (`models.a2e.A2E`): clip data at the model
rate, the few-step sampler, whole-file prediction, source lags and the mouth plot.

Sampling (`Sampler`): the flow is integrated from noise (t = 0) to the code (t = 1) in
`sample_steps` Euler steps, over windows of the training length every half window (the last one
end-aligned), like MultiDiffusion: at each step every window predicts the clean code from the
current noisy sequence, the predictions are cross-faded with a triangular weight, and the whole
sequence takes the step. So overlapping windows agree on one sample instead of averaging two
independent ones (which would shrink the motion again). The starting noise of frame t is a pure
function of (seed, t) (`frame_noise`, scaled by `sample_temperature`), never of a window or a
chunk, and each window's prediction depends only on its own inputs, so the result is fixed by
(audio, seed): a stream fed in any chunking (stream.py) emits exactly the frames of a whole-file
run.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import metrics
from .clip import Clip
from .errors import Exit, GGError
from .media import read_wav
from .models.a2e import (  # noqa: F401 (re-exported for callers)
    A2E,
    LOWER_LIP,
    MOUTH,
    N_BLENDSHAPES,
    N_LIPS,
    UPPER_LIP,
    from_state,
)

NOISE_BLOCK = 64  # frames of noise drawn per (seed, block) generator


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class ClipData:
    """One clip resampled to the model frame rate: inputs, targets, masks and its split."""

    name: str
    person: str  # the identity (clip.person): clips of one person share a style row
    features: np.ndarray  # (T, D) float32 whisper features
    blendshapes: np.ndarray  # (T, 52) deviations from `bs_neutral`
    mouth: np.ndarray  # (T, M, 3) face-space offsets from `neutral` (cm)
    bs_neutral: np.ndarray  # (52,) mean blendshapes over the valid training frames
    neutral: np.ndarray  # (M, 3) mean mouth shape over the valid training frames
    valid: np.ndarray  # (T,) bool: tracked (not interpolated) at both neighbouring clip frames
    n_train: int  # frames [0, n_train) are training frames, the rest test frames
    whisper: dict  # features' model info from the clip's meta (model, dim)


def resample(x: np.ndarray, src_fps: float, dst_fps: float, n_dst: int) -> np.ndarray:
    """Linear interpolation in time of (N, ...) frames at src_fps to n_dst frames at dst_fps,
    sampling at frame centres (identity when the rates match)."""
    if src_fps == dst_fps and len(x) == n_dst:
        return x
    pos = np.clip((np.arange(n_dst) + 0.5) * src_fps / dst_fps - 0.5, 0, len(x) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(x) - 1)
    w = (pos - lo).reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - w) * x[lo] + w * x[hi]


def load_clip(path: str | Path, fps: float) -> ClipData:
    """A clip's whisper features and tracked expressions at the model frame rate `fps`."""
    clip = Clip(path)
    features = clip.audio_features()
    if features is None:
        raise GGError(f"{clip.path}: no audio_features.npy; re-run `ggtalker preprocess` with whisper weights available", Exit.INPUT_INVALID)
    tr = clip.tracking
    if len(features) != clip.n_frames:
        raise GGError(f"{clip.features_path}: {len(features)} rows for {clip.n_frames} frames; re-create the clip", Exit.ARTIFACT)
    n = round(clip.n_frames * fps / clip.fps)
    valid = tr["valid"].astype(bool) & ~tr["interpolated"].astype(bool)
    n_clip_train = len(clip.train_indices)
    verts = tr["verts"][:, list(MOUTH)].astype(np.float64)
    ok = valid[:n_clip_train]
    if ok.sum() < 2:
        raise GGError(f"{clip.tracking_path}: fewer than 2 tracked training frames; this clip cannot train lip motion", Exit.INPUT_INVALID)
    neutral = verts[:n_clip_train][ok].mean(0)
    blend = tr["blendshapes"].astype(np.float64)
    bs_neutral = blend[:n_clip_train][ok].mean(0)
    meta_audio = clip.meta.get("audio") or {}
    return ClipData(
        name=clip.path.resolve().name,
        person=clip.person,
        features=resample(features.astype(np.float32), clip.fps, fps, n).astype(np.float32),
        blendshapes=resample(blend - bs_neutral, clip.fps, fps, n).astype(np.float32),
        mouth=resample(verts - neutral, clip.fps, fps, n).astype(np.float32),
        bs_neutral=bs_neutral.astype(np.float32),
        neutral=neutral.astype(np.float32),
        valid=resample(valid.astype(np.float32), clip.fps, fps, n) > 0.999,
        n_train=min(round(n_clip_train * fps / clip.fps), n),
        whisper=dict(meta_audio.get("features") or {}),
    )


def realign(data: ClipData, shift: int) -> ClipData:
    """`data` with features[t] taken from features[t - shift]: a source whose mouth moves `shift`
    frames after the sound (shift < 0: before it) is trained as if in sync. The rows that would
    come from outside the clip are marked invalid."""
    if shift == 0:
        return data
    n = len(data.features)
    src = np.arange(n) - shift
    inside = (src >= 0) & (src < n)
    return replace(data, features=data.features[np.clip(src, 0, n - 1)], valid=data.valid & inside)


def mouth_gap(mouth: np.ndarray) -> np.ndarray:
    """(T,) mouth opening in face space (cm): distance of the inner-lip centres 13-14, the 3-D
    counterpart of metrics' 2-D `mouth_open` (no eye-span division: face space is already metric)."""
    return np.linalg.norm(mouth[:, UPPER_LIP] - mouth[:, LOWER_LIP], axis=-1)


def training_rows(clips: list[ClipData], field: str, weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`field` of every clip's valid training frames, one float64 row a frame, and each row's
    weight: its clip's entry of `weights` (default 1), scaled to a mean of 1."""
    rows = [getattr(c, field)[: c.n_train][c.valid[: c.n_train]].reshape(-1, *getattr(c, field).shape[1:]).astype(np.float64) for c in clips]
    w = np.concatenate([np.full(len(r), 1.0 if weights is None else weights[i]) for i, r in enumerate(rows)])
    return np.concatenate(rows), w * len(w) / w.sum()


def fit_lip_basis(clips: list[ClipData], k: int, weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Universal PCA of mouth offsets over the valid training frames of all clips:
    (k, M*3) orthonormal basis and (k,) per-component standard deviations. `weights` (one per
    clip, for each of its frames) keep one speaker's many clips from setting the basis alone."""
    rows, w = training_rows(clips, "mouth", weights)
    rows = rows.reshape(len(rows), len(MOUTH) * 3)
    rows = (rows - (w[:, None] * rows).sum(0) / w.sum()) * np.sqrt(w)[:, None]
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    k = min(k, len(s))
    return vt[:k].astype(np.float32), (s[:k] / math.sqrt(max(len(rows) - 1, 1))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# sampling


def frame_noise(seed: int, start: int, end: int, channels: int) -> np.ndarray:
    """(end - start, channels) standard normal float32: row t depends on (seed, t) alone (blocks
    of NOISE_BLOCK frames share one generator), so any window or chunk of frames draws the same."""
    out = np.zeros((max(end - start, 0), channels), np.float32)
    for block in range(start // NOISE_BLOCK, (end - 1) // NOISE_BLOCK + 1 if end > start else 0):
        rows = np.random.default_rng([seed, block]).standard_normal((NOISE_BLOCK, channels), dtype=np.float32)
        a, b = max(start, block * NOISE_BLOCK), min(end, (block + 1) * NOISE_BLOCK)
        out[a - start : b - start] = rows[a - block * NOISE_BLOCK : b - block * NOISE_BLOCK]
    return out


class _Rows:
    """Rows [base, end) of a per-frame tensor: grown at the end, trimmed at the front."""

    def __init__(self, width: int, device: torch.device | str):
        self.data, self.base = torch.zeros(0, width, device=device), 0

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def append(self, rows: Tensor) -> None:
        self.data = torch.cat([self.data, rows])

    def add(self, start: int, rows: Tensor) -> None:
        """Add `rows` onto rows [start, start + len(rows)), zero rows grown where there were none."""
        end = start + len(rows)
        if end > self.end:
            self.append(torch.zeros(end - self.end, self.data.shape[1], device=self.data.device))
        self.data[start - self.base : end - self.base] += rows

    def __getitem__(self, span: slice) -> Tensor:
        return self.data[span.start - self.base : span.stop - self.base]

    def trim(self, start: int) -> None:
        """Forget the rows before `start`."""
        if start > self.base:
            self.data, self.base = self.data[start - self.base :], start


def _crossfade(length: int, device: torch.device | str) -> Tensor:
    """Triangular window weight (never 0): the centre of a window, where it has context on
    both sides, counts most."""
    return 1.0 - (torch.arange(length, device=device) + 0.5 - length / 2).abs() / (length / 2) * 0.98


class Sampler:
    """Feature rows in (`push`, in any chunking), final standardised codes out, in order.

    Level l holds the noisy sequence at flow time l / steps: level 0 is the frame noise, the last
    is the sample. A window at level l runs once the level's sequence is final over it; a frame
    of level l + 1 is final once no later window covers it (the end-aligned window, placed only by
    `finish`, starts at or after the current length minus a window). Each level trails the one
    before by at most a half window, the first by a window: `latency` frames in all. `start`: the absolute frame index of the
    first row, for a caller that samples pieces of a longer sequence (the noise follows it).
    `temperature` scales the starting noise (the state's `sample_temperature` when None): below 1
    the sample keeps less of the motion the audio does not determine.
    """

    def __init__(self, model: A2E, style: Tensor | None = None, seed: int = 0, steps: int | None = None, guidance: float | None = None, start: int = 0,
                 temperature: float | None = None):  # fmt: skip
        self.model = model
        self.device = model.bs_std.device
        self.w = int(model.meta["window"])
        self.hop = self.w // 2
        self.steps = int(steps or model.meta["sample_steps"])
        self.guidance = float(model.meta["guidance"] if guidance is None else guidance)
        self.temperature = float(model.meta["sample_temperature"] if temperature is None else temperature)
        self.style = model.style_vector() if style is None else style
        self.seed, self.dim, self.n, self.start = seed, model.code_dim, 0, start
        self.feats = _Rows(model.meta["feature_dim"], self.device)
        self.x = [_Rows(self.dim, self.device) for _ in range(self.steps + 1)]
        self.acc = [_Rows(self.dim + 1, self.device) for _ in range(self.steps)]  # Σ weight·x̂ | Σ weight
        self.next = [0] * self.steps  # next regular window start per level
        self.emitted = 0
        self.latency = self.w + self.steps * self.hop - 1  # most feature rows pushed beyond the last code emitted

    @torch.no_grad()
    def _window(self, level: int, s: int, length: int) -> None:
        t = torch.full((1,), level / self.steps, device=self.device)
        pred = self.model.guided(self.x[level][s : s + length][None], t, self.feats[s : s + length][None], self.style, self.guidance)[0]
        weight = _crossfade(length, self.device)[:, None]
        self.acc[level].add(s, torch.cat([pred * weight, weight], 1))

    def _advance(self, level: int, end: int) -> None:
        """Make level + 1 final up to frame `end` (every window covering those frames has run)."""
        start = self.x[level + 1].end
        if end <= start:
            return
        acc, x = self.acc[level][start:end], self.x[level][start:end]
        fused = acc[:, : self.dim] / acc[:, self.dim :]
        t0, t1 = level / self.steps, (level + 1) / self.steps
        step = fused if level == self.steps - 1 else x + (t1 - t0) / (1 - t0) * (fused - x)  # Euler on v = (x̂ - x) / (1 - t)
        self.x[level + 1].append(step)

    def _emit(self) -> Tensor:
        out = self.x[-1][self.emitted : self.x[-1].end]
        self.emitted = self.x[-1].end
        keep = min([*self.next, self.n - self.w]) if self.steps else self.n
        self.feats.trim(keep)
        for level in range(self.steps):
            self.x[level].trim(min(keep, self.x[level + 1].end))
            self.acc[level].trim(self.x[level + 1].end)
        self.x[-1].trim(self.emitted)
        return out

    def push(self, features: Tensor) -> Tensor:
        """Take more feature rows (T, D); return the codes (T', C) that became final."""
        self.feats.append(features.to(self.device, torch.float32))
        self.n += len(features)
        noise = frame_noise(self.seed, self.start + self.x[0].end, self.start + self.n, self.dim)
        self.x[0].append(torch.as_tensor(noise, device=self.device) * (self.temperature * self.model.audio_driven))
        for level in range(self.steps):
            while self.next[level] + self.w <= self.x[level].end:
                self._window(level, self.next[level], self.w)
                self.next[level] += self.hop
            self._advance(level, max(0, min(self.next[level], self.n - self.w)))
        return self._emit()

    def finish(self) -> Tensor:
        """The remaining codes, once the last feature row has been pushed."""
        n, w = self.n, self.w
        regular = list(range(0, max(n - w, 0) + 1, self.hop))
        for level in range(self.steps):
            for s in regular:
                if s >= self.next[level]:
                    self._window(level, s, min(w, n - s))
            if regular[-1] + w < n:
                self._window(level, n - w, w)
            self.next[level] = n + self.hop
            self._advance(level, n)
        return self._emit()


@torch.no_grad()
def codes(model: A2E, features: Tensor, style: Tensor | None = None, seed: int = 0, steps: int | None = None, guidance: float | None = None,
          start: int = 0, temperature: float | None = None) -> Tensor:  # fmt: skip
    """(T, D) features → (T, C) sampled standardised codes, the whole sequence at once (rows from
    absolute frame `start` on, for the noise)."""
    sampler = Sampler(model, style, seed, steps, guidance, start, temperature)
    return torch.cat([sampler.push(features), sampler.finish()])


@torch.no_grad()
def run(model: A2E, features: np.ndarray, style: Tensor | None = None, seed: int = 0, steps: int | None = None, guidance: float | None = None,
        temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Whole-sequence sample at the model rate: (T, 52) blendshapes in [0, 1] and (T, M, 3) mouth
    offsets (cm) from the model's `neutral`. `steps=1` is the conditional mean (the flow's first
    prediction from pure noise), what lag measurements use."""
    model.eval()
    x = torch.as_tensor(np.asarray(features, np.float32), device=model.bs_std.device)
    bs, mouth = model.decode(codes(model, x, style, seed, steps, guidance, temperature=temperature))
    return bs.clamp(0, 1).cpu().numpy(), mouth.cpu().numpy()


def predict(a2e_state: dict[str, Tensor], audio_path: str | Path, fps: float, whisper: str | Path | None = None, device: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Audio file → per-frame expressions at `fps`: blendshapes (T, 52), mouth (T, M, 3) face-space
    points (around the adapted identity's neutral, or the training identities' mean in a prior)
    and mouth_open (T,) inner-lip gap in cm; the same for the same seed.

    Features come from the whisper model the state was trained with (its name is in the state)
    unless `whisper` names a checkpoint; a mismatched feature size is refused.
    """
    from . import audio

    model = from_state(a2e_state)
    device = device or audio.default_device()
    model.to(device)
    samples = audio.load_audio(audio_path)
    seconds = len(samples) / audio.SAMPLE_RATE
    n_model = max(1, math.ceil(seconds * model.meta["fps"]))
    feats, info = audio.encode(samples, n_model, model.meta["fps"], whisper or model.meta["whisper"]["model"], device=device)
    if info["dim"] != model.meta["feature_dim"]:
        raise GGError(f"whisper '{info['model']}' gives {info['dim']}-d features but this A2E was trained on {model.meta['feature_dim']}-d ({model.meta['whisper']['model']}); pass that whisper model", Exit.USAGE)
    bs, mouth = run(model, feats.astype(np.float32), seed=seed)
    n_out = max(1, math.ceil(seconds * fps))
    bs = resample(bs, model.meta["fps"], fps, n_out).astype(np.float32)
    mouth = resample(mouth, model.meta["fps"], fps, n_out) + model.neutral.cpu().numpy()
    return {"blendshapes": bs, "mouth": mouth.astype(np.float32), "mouth_open": mouth_gap(mouth).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# source timing


def source_lag(path: str | Path, fps: float) -> float:
    """The clip's own audio–mouth lag over its training frames (metrics.av_sync_lag) in frames at
    `fps`; NaN when under 8 s or not measurable. Real sources are off by up to 5.6 frames (Obama;
    bench/av_lag_gt.py): an offset file or a speaker's lip lead, either way not the timing an
    avatar should say new speech with."""
    clip = Clip(path)
    if clip.audio_path is None:
        return math.nan
    samples, rate = read_wav(clip.audio_path)
    n = len(clip.train_indices)
    return float(metrics.av_sync(samples[: round(n / clip.fps * rate)], rate, clip.fps, clip.tracking["mouth_open"][:n])[0] * fps / clip.fps)


def prior_lag(model: A2E, data: ClipData) -> float:
    """The clip's tracked mouth against the mouth an in-sync A2E (the prior) predicts from the
    clip's own audio, over the training frames (metrics.mouth_sync), in frames at the model rate;
    NaN under 4 s or when the two share no rhythm. The prediction is the conditional mean (one
    flow step): a sample's audio-independent motion would only blur the peak.

    source_lag's stand-in for clips under 8 s. Agreed with it where both measure (Obama, held
    out of the deterministic prior: -5.4 vs -5.6; bench/source_lag.py).
    """
    n = data.n_train
    _, mouth = run(model, data.features[:n], steps=1, guidance=1.0, temperature=1.0)  # as validated (bench/source_lag.py)
    predicted = mouth_gap(mouth + model.neutral.cpu().numpy())
    tracked = np.where(data.valid[:n], mouth_gap(data.mouth[:n] + data.neutral), np.nan)
    return float(metrics.mouth_sync(predicted, tracked, model.meta["fps"])[0])


# ---------------------------------------------------------------------------------------------
# plot


def plot_mouth(path: str | Path, audio_path: str | Path, mouth_open: np.ndarray, fps: float) -> None:
    """PNG: the waveform on top, the predicted mouth opening over time below, same time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import audio
    from .artifacts import atomic_write_bytes

    samples = audio.load_audio(audio_path)
    t_audio = np.arange(len(samples)) / audio.SAMPLE_RATE
    step = max(1, len(samples) // 20000)  # plotting every sample of minutes of audio is pointless
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4), sharex=True, height_ratios=(1, 1.4))
    top.plot(t_audio[::step], samples[::step], lw=0.4, color="0.3")
    top.set_ylabel("waveform")
    bottom.plot((np.arange(len(mouth_open)) + 0.5) / fps, mouth_open, color="tab:red", lw=1.2)
    bottom.set_ylabel("mouth opening (cm)")
    bottom.set_xlabel("time (s)")
    top.set_title(Path(audio_path).name)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
