"""Audio→expression (A2E): whisper features → blendshapes + mouth geometry, in a speaker's style.

Targets, per frame, both as deviations from the identity's mean over its clip's training frames
(a person's resting face is not predictable from audio, their motion is): the 52 mediapipe
blendshapes (what the avatar's head model and colour MLP consume, identity-independent like
FLAME's expression code) and the mouth geometry, face-space offsets of 47 mouth-region landmarks
(the 40 lip points of `metrics.LIPS` plus 7 on the chin and jaw line). The offsets are coded by
a universal PCA basis fitted across the prior's training identities (`lip_components`
coefficients), so the lip geometry is compact and comparable across people. The identity means
(`bs_neutral`, `neutral`) are buffers: the training identities' average in a prior, the
person's own once adapted.

Model: whisper features → LayerNorm → two 1-D convolutions (±2 frames of local context) →
sinusoidal positions + a projected 64-d style embedding → a pre-norm transformer encoder over a
window of frames → one linear head to standardised blendshapes and whitened lip coefficients.
The head starts at zero, so an untrained model is the no-audio baseline (the identity mean), and
training and adaptation (`a2e_train`) finish by shrinking its output toward that mean by the
factor their validation prefers. Eye and brow blendshapes (`UPPER_FACE`) are not predicted.
The style table has one learned row per training identity and a last "null" row trained on a
share of windows in place of the speaker's row (like the unconditional branch of classifier-free
guidance): the prior uses it for a voice it never saw, adaptation starts a new row from it.

Where it falls short of the paper: GGTalker's A2E is a conditional *diffusion* transformer
sampled with classifier-free guidance. This model is deterministic, so it predicts the
conditional mean: motion of ambiguous sounds is averaged (under-articulated, damped lips,
especially on out-of-distribution audio), it cannot sample varied takes of the same audio, and
there is no guidance scale to trade diversity for sync. Temporal smoothness comes only from the
Huber loss on frame differences, not from a learned distribution of motion. And the paper's
prior sees thousands of speakers; ours a dozen, so on a new voice the prior alone tracks mouth
opening only loosely (r ≈ 0.5) and adaptation does the rest (docs/a2e.md, a2e_results.md).

Loss = expression L2 (standardised, audio-driven blendshapes) + lip-vertex L2 (mm², reconstructed
through the PCA basis against the tracked offsets) + mouth-opening L2 (mm², the inner-lip
13→14 vector, weighted above the other lip points: it is what lip-sync is judged by) + Huber on
frame-to-frame differences of blendshapes and lips.

The whole model travels as one tensor dict (`state`): weights, buffers and a `meta.json` uint8
tensor with its hyper-parameters, the whisper model its features come from, the model frame
rate and the style rows' identity names, so an avatar's weights.safetensors can embed it.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from ..clip import Clip
from ..errors import Exit, GGError
from ..media import read_wav

N_BLENDSHAPES = 52
JAW = (152, 148, 176, 149, 377, 400, 378)  # chin and lower jaw line: the jaw drops with the mouth
MOUTH = tuple(metrics.LIPS) + JAW
N_LIPS = len(metrics.LIPS)  # the first N_LIPS rows of MOUTH are the lip points (lip-vertex error)
_UPPER, _LOWER = MOUTH.index(13), MOUTH.index(14)  # inner-lip centres, as in metrics' mouth_open
# mediapipe order: _neutral, 5 brow, then 14 eye blendshapes (9-22). Audio does not determine
# them (blinks, gaze), and synth takes them from the replayed frame, so the model keeps them at
# the identity mean instead of spending capacity on, and overfitting to, their noise.
UPPER_FACE = (0, 1, 2, 3, 4, 5, *range(9, 23))
STATE_VERSION = 2  # 2: targets are deviations from identity means (bs_neutral)


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class ClipData:
    """One clip resampled to the model frame rate: inputs, targets, masks and its split."""

    name: str
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
    n_train = round(len(clip.train_indices) * fps / clip.fps)
    verts = tr["verts"][:, list(MOUTH)].astype(np.float64)
    ok = valid[: len(clip.train_indices)]
    if ok.sum() < 2:
        raise GGError(f"{clip.tracking_path}: fewer than 2 tracked training frames; this clip cannot train lip motion", Exit.INPUT_INVALID)
    neutral = verts[: len(clip.train_indices)][ok].mean(0)
    blend = tr["blendshapes"].astype(np.float64)
    bs_neutral = blend[: len(clip.train_indices)][ok].mean(0)
    meta_audio = clip.meta.get("audio") or {}
    return ClipData(
        name=clip.path.resolve().name,
        features=resample(features.astype(np.float32), clip.fps, fps, n).astype(np.float32),
        blendshapes=resample(blend - bs_neutral, clip.fps, fps, n).astype(np.float32),
        mouth=resample(verts - neutral, clip.fps, fps, n).astype(np.float32),
        bs_neutral=bs_neutral.astype(np.float32),
        neutral=neutral.astype(np.float32),
        valid=resample(valid.astype(np.float32), clip.fps, fps, n) > 0.999,
        n_train=min(n_train, n),
        whisper=dict(meta_audio.get("features") or {}),
    )


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


def _training_gaps(model: A2E, data: ClipData, neutral: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, tracked) inner-lip gaps over the training frames: `model`'s mouth from the
    clip's audio around `neutral`, and the tracked one (NaN where not tracked)."""
    n = data.n_train
    _, mouth = run(model, data.features[:n])
    return mouth_gap(mouth + neutral), np.where(data.valid[:n], mouth_gap(data.mouth[:n] + data.neutral), np.nan)


def prior_lag(model: A2E, data: ClipData) -> float:
    """The clip's tracked mouth against the mouth an in-sync A2E (the prior) predicts from the
    clip's own audio, over the training frames (metrics.mouth_sync), in frames at the model rate;
    NaN under 4 s or when the two share no rhythm.

    source_lag's stand-in for clips under 8 s. Agrees with it where both measure (Obama, held
    out of the prior: -5.4 vs -5.6) but is pulled towards 0 for a clip the prior was trained on,
    whose offset it partly learned (Ted Lieu -1.4 vs -2.3; bench/source_lag.py). A user's own
    clip is never in the prior.
    """
    predicted, tracked = _training_gaps(model, data, model.neutral.cpu().numpy())
    return float(metrics.mouth_sync(predicted, tracked, model.meta["fps"])[0])


def articulation_gain(model: A2E, data: ClipData, exponent: float, max_gain: float) -> tuple[float, float]:
    """(spread ratio, gain): the clip's tracked mouth-opening std over its training frames against
    the std of the mouth `model` predicts there (at gain 1), and that ratio ** exponent clamped to
    [1, max_gain], the `articulation` adaptation sets.

    Why: a model trained for least squares predicts the expected mouth given the sound, and what
    the sound does not determine averages out; the prior's mouth opening spreads 2.4-4.9x less
    than the tracked one on every real clip (docs/a2e.md), a mumbling avatar whose rendered lips
    barely move. Matching the spread fully (exponent 1) costs held-out lip-vertex error (+6.5%);
    the square root doubles the motion for +0.9%.
    """
    gain = model.articulation.clone()
    model.articulation.fill_(1.0)
    predicted, tracked = _training_gaps(model, data, data.neutral)
    model.articulation.copy_(gain)
    ratio = float(np.nanstd(tracked) / max(float(predicted.std()), 1e-6))
    return ratio, float(np.clip(ratio**exponent, 1.0, max_gain))


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
    return np.linalg.norm(mouth[:, _UPPER] - mouth[:, _LOWER], axis=-1)


def fit_lip_basis(clips: list[ClipData], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Universal PCA of mouth offsets over the valid training frames of all clips:
    (k, M*3) orthonormal basis and (k,) per-component standard deviations."""
    rows = np.concatenate([c.mouth[: c.n_train][c.valid[: c.n_train]].reshape(-1, len(MOUTH) * 3) for c in clips])
    rows = rows - rows.mean(0)
    _, s, vt = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
    k = min(k, len(s))
    return vt[:k].astype(np.float32), (s[:k] / math.sqrt(max(len(rows) - 1, 1))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# model


def _sinusoids(length: int, channels: int) -> Tensor:
    scales = torch.exp(-math.log(10000) * torch.arange(channels // 2) / (channels // 2 - 1))
    t = torch.arange(length)[:, None] * scales[None]
    return torch.cat([t.sin(), t.cos()], 1)


class A2E(nn.Module):
    def __init__(self, meta: dict):
        super().__init__()
        self.meta = meta
        d, k, m = meta["d_model"], meta["lip_components"], len(MOUTH)
        self.feature_norm = nn.LayerNorm(meta["feature_dim"])
        self.front = nn.Sequential(
            nn.Conv1d(meta["feature_dim"], d, 3, padding=1), nn.GELU(), nn.Conv1d(d, d, 3, padding=1), nn.GELU()
        )
        self.style = nn.Embedding(len(meta["identities"]) + 1, meta["style_dim"])  # last row: null style
        nn.init.normal_(self.style.weight, std=0.1)
        self.style_proj = nn.Linear(meta["style_dim"], d)
        layer = nn.TransformerEncoderLayer(d, meta["heads"], 2 * d, meta["dropout"], activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, meta["layers"], enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, N_BLENDSHAPES + k))
        nn.init.zeros_(self.head[1].weight)  # starts at the identity mean: the no-audio baseline
        nn.init.zeros_(self.head[1].bias)
        audio_driven = torch.ones(N_BLENDSHAPES + k)
        audio_driven[list(UPPER_FACE)] = 0
        self.register_buffer("audio_driven", audio_driven, persistent=False)
        self.register_buffer("bs_std", torch.ones(N_BLENDSHAPES))  # of deviations, across identities
        self.register_buffer("lip_basis", torch.zeros(k, m * 3))
        self.register_buffer("lip_std", torch.ones(k))
        self.register_buffer("bs_neutral", torch.zeros(N_BLENDSHAPES))  # identity means (see top)
        self.register_buffer("neutral", torch.zeros(m, 3))
        self.register_buffer("adapted_style", torch.zeros(meta["style_dim"]))
        self.register_buffer("articulation", torch.ones(1))  # gain on the audio-driven code (articulation_gain)

    @property
    def null_style(self) -> int:
        return self.style.num_embeddings - 1

    def style_vector(self, index: Tensor | None = None) -> Tensor:
        """(B, style_dim) rows of the style table; with no index the adapted (or null) style."""
        if index is not None:
            return self.style(index)
        if self.meta.get("adapted"):
            return self.adapted_style[None]
        return self.style.weight[-1:]

    def forward(self, features: Tensor, style: Tensor, noise: float = 0.0, drop: float = 0.0) -> Tensor:
        """features (B, T, D), style (B, style_dim) → (B, T, 52 + K) standardised expression code.

        `noise` (Gaussian, on the normalised features) and `drop` (dropout of feature channels)
        are training-time regularisers: with a dozen identities the model otherwise learns
        which speaker and which moment a feature vector belongs to instead of how it sounds.
        """
        x = self.feature_norm(features)
        if noise > 0:
            x = x + noise * torch.randn_like(x)
        if drop > 0:
            x = F.dropout(x, drop, training=True)
        x = self.front(x.transpose(1, 2)).transpose(1, 2)
        x = x + _sinusoids(x.shape[1], x.shape[2]).to(x) + self.style_proj(style)[:, None]
        return self.head(self.encoder(x)) * self.audio_driven

    def decode(self, code: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised code → blendshapes (..., 52) around `bs_neutral` (unclamped) and mouth
        offsets (..., M, 3) in cm from `neutral`, the deviations scaled by `articulation`."""
        code = code * self.articulation
        bs = code[..., :N_BLENDSHAPES] * self.bs_std + self.bs_neutral
        lips = (code[..., N_BLENDSHAPES:] * self.lip_std) @ self.lip_basis
        return bs, lips.reshape(*lips.shape[:-1], len(MOUTH), 3)

    def loss(self, code: Tensor, blendshapes: Tensor, mouth: Tensor, valid: Tensor, lip_weight: float, temporal_weight: float, gap_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
        """Expression L2 + lip-vertex L2 + mouth-opening L2 + temporal-difference Huber over valid frames.

        code (B, T, 52+K); targets (deviations) blendshapes (B, T, 52), mouth (B, T, M, 3) cm;
        valid (B, T).
        """
        mask = self.audio_driven[:N_BLENDSHAPES]
        target_bs = blendshapes / self.bs_std * mask
        pred_bs = code[..., :N_BLENDSHAPES]
        _, pred_mouth = self.decode(code)
        v = valid.float()
        n = v.sum().clamp(min=1)
        expr = (((pred_bs - target_bs) ** 2).sum(-1) / mask.sum() * v).sum() / n
        lip_mm = ((pred_mouth - mouth) * 10).pow(2).sum(-1).mean(-1)  # squared mm per vertex
        lip = (lip_mm * v).sum() / n
        gap_err = ((pred_mouth[..., _UPPER, :] - pred_mouth[..., _LOWER, :]) - (mouth[..., _UPPER, :] - mouth[..., _LOWER, :])) * 10
        gap = (gap_err.pow(2).sum(-1) * v).sum() / n
        pair = v[:, 1:] * v[:, :-1]
        np_ = pair.sum().clamp(min=1)
        d_bs = F.huber_loss(pred_bs.diff(dim=1), target_bs.diff(dim=1), reduction="none", delta=0.5).sum(-1) / mask.sum()
        d_lip = F.huber_loss((pred_mouth.diff(dim=1) * 10), (mouth.diff(dim=1) * 10), reduction="none", delta=0.5).mean((-1, -2))
        temporal = ((d_bs + d_lip) * pair).sum() / np_
        total = expr + lip_weight * lip + gap_weight * gap + temporal_weight * temporal
        return total, {"expr": expr.item(), "lip_mm2": lip.item(), "gap_mm2": gap.item(), "temporal": temporal.item()}


def make_meta(cfg, feature_dim: int, whisper: dict, identities: list[str]) -> dict:
    """The hyper-parameters and provenance a state carries (`cfg` is config.A2EConfig)."""
    if cfg.d_model % cfg.heads:
        raise GGError(f"a2e.d_model ({cfg.d_model}) must be a multiple of a2e.heads ({cfg.heads})", Exit.USAGE)
    return {
        "version": STATE_VERSION,
        "fps": cfg.fps,
        "window": cfg.window,
        "feature_dim": int(feature_dim),
        "whisper": {"model": whisper.get("model"), "dim": int(feature_dim)},
        "d_model": cfg.d_model,
        "layers": cfg.layers,
        "heads": cfg.heads,
        "style_dim": cfg.style_dim,
        "lip_components": cfg.lip_components,
        "dropout": cfg.dropout,
        "mouth_landmarks": list(MOUTH),
        "identities": list(identities),
        "adapted": None,
    }


def to_state(model: A2E) -> dict[str, Tensor]:
    """Weights, buffers and meta as one flat tensor dict (safetensors-ready)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state["meta.json"] = torch.frombuffer(bytearray(json.dumps(model.meta).encode()), dtype=torch.uint8)
    return state


def from_state(state: dict[str, Tensor], source: str = "A2E weights") -> A2E:
    """Rebuild the model from `to_state`'s dict; a clear error for anything else."""
    try:
        meta = json.loads(bytes(state["meta.json"].numpy()).decode())
        if meta.get("version") != STATE_VERSION:
            raise GGError(f"{source}: A2E state version {meta.get('version')}, this ggtalker reads {STATE_VERSION}; re-run fit-prior", Exit.ARTIFACT)
        model = A2E(meta)
        weights = {"articulation": torch.ones(1), **{k: v for k, v in state.items() if k != "meta.json"}}  # states before it: gain 1
        model.load_state_dict(weights)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise GGError(f"{source}: not an A2E state ({e.__class__.__name__}: {str(e)[:80]}); re-run fit-prior", Exit.ARTIFACT) from e
    return model.eval()


# ---------------------------------------------------------------------------------------------
# inference


@torch.no_grad()
def codes(model: A2E, features: Tensor, style: Tensor) -> Tensor:
    """(T, D) features → (T, 52 + K) standardised codes, as inference makes them: windows of the
    training length with half overlap, cross-faded with a triangular weight, so any length works
    in bounded memory and every frame sees context on both sides (stream.py does the same in
    pieces). Training validates on these, not on isolated windows, to select what runs."""
    w, n = model.meta["window"], len(features)
    starts = list(range(0, max(n - w, 0) + 1, w // 2))
    if starts[-1] + w < n:
        starts.append(n - w)
    out = torch.zeros(n, N_BLENDSHAPES + model.meta["lip_components"], device=features.device)
    total = torch.zeros(n, 1, device=features.device)
    for s in starts:
        chunk = features[s : s + w]
        weight = 1.0 - (torch.arange(len(chunk), device=features.device) + 0.5 - len(chunk) / 2).abs() / (len(chunk) / 2) * 0.98
        out[s : s + len(chunk)] += model(chunk[None], style)[0] * weight[:, None]
        total[s : s + len(chunk)] += weight[:, None]
    return out / total


@torch.no_grad()
def run(model: A2E, features: np.ndarray, style: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whole-sequence prediction at the model rate: (T, 52) blendshapes in [0, 1] and (T, M, 3)
    mouth offsets (cm) from the model's `neutral` (`codes` says how)."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(features, np.float32), device=device)
    bs, mouth = model.decode(codes(model, x, model.style_vector() if style is None else style))
    return bs.clamp(0, 1).cpu().numpy(), mouth.cpu().numpy()


def predict(a2e_state: dict[str, Tensor], audio_path: str | Path, fps: float, whisper: str | Path | None = None, device: str | None = None) -> dict[str, np.ndarray]:
    """Audio file → per-frame expressions at `fps`: blendshapes (T, 52), mouth (T, M, 3) face-space
    points (around the adapted identity's neutral, or the training identities' mean in a prior)
    and mouth_open (T,) inner-lip gap in cm.

    Features come from the whisper model the state was trained with (its name is in the state)
    unless `whisper` names a checkpoint; a mismatched feature size is refused.
    """
    from .. import audio

    model = from_state(a2e_state)
    device = device or audio.default_device()
    model.to(device)
    samples = audio.load_audio(audio_path)
    seconds = len(samples) / audio.SAMPLE_RATE
    n_model = max(1, math.ceil(seconds * model.meta["fps"]))
    feats, info = audio.encode(samples, n_model, model.meta["fps"], whisper or model.meta["whisper"]["model"], device=device)
    if info["dim"] != model.meta["feature_dim"]:
        raise GGError(f"whisper '{info['model']}' gives {info['dim']}-d features but this A2E was trained on {model.meta['feature_dim']}-d ({model.meta['whisper']['model']}); pass that whisper model", Exit.USAGE)
    bs, mouth = run(model, feats.astype(np.float32))
    n_out = max(1, math.ceil(seconds * fps))
    bs = resample(bs, model.meta["fps"], fps, n_out).astype(np.float32)
    mouth = resample(mouth, model.meta["fps"], fps, n_out) + model.neutral.cpu().numpy()
    return {"blendshapes": bs, "mouth": mouth.astype(np.float32), "mouth_open": mouth_gap(mouth).astype(np.float32)}


def predict_expressions(a2e_state: dict[str, Tensor], audio_path: str | Path, fps: float, whisper: str | Path | None = None) -> np.ndarray:
    """(T, 52) blendshapes at `fps` for an audio file: what the avatar's head model is driven by."""
    return predict(a2e_state, audio_path, fps, whisper)["blendshapes"]


def plot_mouth(path: str | Path, audio_path: str | Path, mouth_open: np.ndarray, fps: float) -> None:
    """PNG: the waveform on top, the predicted mouth opening over time below, same time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import audio
    from ..artifacts import atomic_write_bytes

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
