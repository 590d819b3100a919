"""Audio→expression (A2E): a conditional flow-matching transformer over expression-code windows.

The expression code, per frame, is what the avatar is driven by, as deviations from the
identity's mean over its clip's training frames (a person's resting face is not predictable from
audio, their motion is): the 52 mediapipe blendshapes (standardised by their cross-identity
spread) and the mouth geometry, face-space offsets of 47 mouth-region landmarks (the 40 lip
points of `metrics.LIPS` plus 7 on the chin and jaw line) coded by a universal PCA basis fitted
across the prior's training identities (`lip_components` whitened coefficients). The identity
means (`bs_neutral`, `neutral`) are buffers: the training identities' average in a prior, the
person's own once adapted. Eye and brow blendshapes (`UPPER_FACE`) are held at the mean: audio
does not determine blinks or gaze, and synth takes them from the replayed frame.

Why generative: a least-squares regressor predicts the conditional mean, and what the sound does
not determine averages out, so its mouth opening spread 2.4-4.9x less than the tracked one (the
previous, deterministic A2E; docs/a2e.md). GGTalker's A2E is a conditional diffusion transformer;
this one is its rectified-flow form: x_t = (1 - t)·noise + t·code, t in [0, 1], and the network
predicts the clean code x̂ from (x_t, t, whisper features, 64-d speaking style). Predicting the
clean code (not the velocity) lets the loss carry the lip-vertex, mouth-opening and
frame-difference terms on x̂, and makes sampling stable in few steps (`a2e.Sampler`, Euler on
v = (x̂ - x_t) / (1 - t): the last step lands on x̂ itself).

Conditioning: whisper features → LayerNorm → a per-frame projection → two 1-D convolutions (±2
frames of context), plus
the projected noisy code, a sinusoidal embedding of t, sinusoidal positions and the projected
style, summed per frame into a pre-norm transformer encoder over the window, one linear head to
x̂ (zero at the start: an untrained model predicts the identity mean). The style table has a
row per training identity and a last "null" row; training replaces the speaker's row by the null
row on `style_dropout` of windows (a voice nobody saw uses it) and drops style *and* audio
together on `cond_dropout` of windows (a learned null audio token): the unconditional branch of
classifier-free guidance, x̂ = x̂_u + w·(x̂_c - x̂_u), which at w > 1 pushes samples toward what
the audio says.

Loss (`A2E.loss`, on x̂ against the tracked code): L2 on the whitened code + lip-vertex L2 (mm²,
reconstructed through the PCA basis against the tracked offsets) + mouth-opening L2 (mm², the
inner-lip 13→14 vector) + Huber on frame-to-frame differences of blendshapes and lips.

The whole model travels as one tensor dict (`to_state`): weights, buffers and a `meta.json`
uint8 tensor with its hyper-parameters, sampling defaults, the whisper model its features come
from, the model frame rate and the style rows' identity names, so an avatar's files embed it.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from ..errors import Exit, GGError

N_BLENDSHAPES = 52
JAW = (152, 148, 176, 149, 377, 400, 378)  # chin and lower jaw line: the jaw drops with the mouth
MOUTH = tuple(metrics.LIPS) + JAW
N_LIPS = len(metrics.LIPS)  # the first N_LIPS rows of MOUTH are the lip points (lip-vertex error)
UPPER_LIP, LOWER_LIP = MOUTH.index(13), MOUTH.index(14)  # inner-lip centres, as in metrics' mouth_open
# mediapipe order: _neutral, 5 brow, then 14 eye blendshapes (9-22), held at the identity mean.
UPPER_FACE = (0, 1, 2, 3, 4, 5, *range(9, 23))
STATE_VERSION = 4  # 4: + sample_temperature; 3: flow-matching A2E (read as temperature 1); 2: the deterministic regressor


def _sinusoids(positions: Tensor, channels: int) -> Tensor:
    """(…,) positions → (…, channels) sin/cos embedding at geometric frequencies."""
    scales = torch.exp(-math.log(10000) * torch.arange(channels // 2, device=positions.device) / (channels // 2 - 1))
    angle = positions[..., None].float() * scales
    return torch.cat([angle.sin(), angle.cos()], -1)


class A2E(nn.Module):
    def __init__(self, meta: dict):
        super().__init__()
        self.meta = meta
        d, k, m = meta["d_model"], meta["lip_components"], len(MOUTH)
        self.code_dim = N_BLENDSHAPES + k
        self.feature_norm = nn.LayerNorm(meta["feature_dim"])
        self.feature_in = nn.Linear(meta["feature_dim"], d)  # per frame first: convolving 512-d features costs 3x the rest
        self.context = nn.ModuleList([nn.Linear(3 * d, d) for _ in range(2)])  # two ±1-frame convolutions, as matmuls (faster on CPU)
        self.null_audio = nn.Parameter(torch.zeros(d))  # the unconditional branch's audio token
        self.code_in = nn.Linear(self.code_dim, d)
        self.time = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.style = nn.Embedding(len(meta["identities"]) + 1, meta["style_dim"])  # last row: null style
        nn.init.normal_(self.style.weight, std=0.1)
        self.style_proj = nn.Linear(meta["style_dim"], d)
        layer = nn.TransformerEncoderLayer(d, meta["heads"], 2 * d, meta["dropout"], activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, meta["layers"], enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.code_dim))
        nn.init.zeros_(self.head[1].weight)  # starts at the identity mean: the no-audio baseline
        nn.init.zeros_(self.head[1].bias)
        audio_driven = torch.ones(self.code_dim)
        audio_driven[list(UPPER_FACE)] = 0
        self.register_buffer("audio_driven", audio_driven, persistent=False)
        self.register_buffer("bs_std", torch.ones(N_BLENDSHAPES))  # of deviations, across identities
        self.register_buffer("lip_basis", torch.zeros(k, m * 3))
        self.register_buffer("lip_std", torch.ones(k))
        self.register_buffer("bs_neutral", torch.zeros(N_BLENDSHAPES))  # identity means (see top)
        self.register_buffer("neutral", torch.zeros(m, 3))
        self.register_buffer("adapted_style", torch.zeros(meta["style_dim"]))

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

    def forward(self, x: Tensor, t: Tensor, features: Tensor, style: Tensor, audio: Tensor | None = None, noise: float = 0.0, drop: float = 0.0) -> Tensor:
        """Noisy codes x (B, T, C) at flow times t (B,), features (B, T, D), style (B, style_dim)
        → (B, T, C) predicted clean code. `audio` (B,) bool: False replaces that window's audio by
        the null token (the unconditional branch); None keeps all.

        `noise` (Gaussian, on the normalised features) and `drop` (dropout of feature channels)
        are training-time regularisers: with few identities the model otherwise learns which
        speaker and which moment a feature vector belongs to instead of how it sounds.
        """
        f = self.feature_norm(features)
        if noise > 0:
            f = f + noise * torch.randn_like(f)
        if drop > 0:  # whole channels per window: cheaper than per element, and a feature cannot hide in its neighbours
            f = f * (torch.rand(f.shape[0], 1, f.shape[2], device=f.device) >= drop) / (1 - drop)
        a = F.gelu(self.feature_in(f))
        for layer in self.context:
            a = F.gelu(layer(torch.cat([F.pad(a[:, :-1], (0, 0, 1, 0)), a, F.pad(a[:, 1:], (0, 0, 0, 1))], -1)))
        if audio is not None:
            a = torch.where(audio[:, None, None], a, self.null_audio)
        d = a.shape[-1]
        h = a + self.code_in(x * self.audio_driven) + self.time(_sinusoids(t * 1000, d))[:, None] + self.style_proj(style)[:, None]
        h = h + _sinusoids(torch.arange(h.shape[1], device=h.device), d)
        return self.head(self.encoder(h)) * self.audio_driven

    def guided(self, x: Tensor, t: Tensor, features: Tensor, style: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance: x̂_u + scale·(x̂_c - x̂_u), the unconditional branch with the
        null style and null audio; scale 1 is the conditional model alone (one pass)."""
        if scale == 1.0:
            return self(x, t, features, style)
        b = len(x)
        style2 = torch.cat([style.expand(b, -1), self.style.weight[-1:].expand(b, -1)])
        audio = torch.arange(2 * b, device=x.device) < b
        both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([features, features]), style2, audio)
        cond, uncond = both[:b], both[b:]
        return uncond + scale * (cond - uncond)

    def encode(self, blendshapes: Tensor, mouth: Tensor) -> Tensor:
        """Tracked deviations → standardised code: blendshapes (…, 52), mouth offsets (…, M, 3) cm."""
        bs = blendshapes / self.bs_std
        lips = mouth.flatten(-2) @ self.lip_basis.T / self.lip_std
        return torch.cat([bs, lips], -1) * self.audio_driven

    def decode(self, code: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised code → blendshapes (…, 52) around `bs_neutral` (unclamped) and mouth
        offsets (…, M, 3) in cm from `neutral`."""
        bs = code[..., :N_BLENDSHAPES] * self.bs_std + self.bs_neutral
        lips = (code[..., N_BLENDSHAPES:] * self.lip_std) @ self.lip_basis
        return bs, lips.reshape(*lips.shape[:-1], len(MOUTH), 3)

    def loss(self, pred: Tensor, blendshapes: Tensor, mouth: Tensor, valid: Tensor, lip_weight: float, temporal_weight: float, gap_weight: float) -> tuple[Tensor, dict[str, float]]:
        """Code L2 + lip-vertex L2 + mouth-opening L2 + temporal-difference Huber over valid frames.

        pred (B, T, C) predicted clean code; targets (deviations) blendshapes (B, T, 52), mouth
        (B, T, M, 3) cm; valid (B, T).
        """
        target = self.encode(blendshapes, mouth)
        _, pred_mouth = self.decode(pred)
        v = valid.float()
        n = v.sum().clamp(min=1)
        code = (((pred - target) ** 2).sum(-1) / self.audio_driven.sum() * v).sum() / n
        lip = ((((pred_mouth - mouth) * 10).pow(2).sum(-1).mean(-1)) * v).sum() / n  # squared mm per vertex
        gap_err = ((pred_mouth[..., UPPER_LIP, :] - pred_mouth[..., LOWER_LIP, :]) - (mouth[..., UPPER_LIP, :] - mouth[..., LOWER_LIP, :])) * 10
        gap = (gap_err.pow(2).sum(-1) * v).sum() / n
        pair = v[:, 1:] * v[:, :-1]
        bs_pred, bs_target = pred[..., :N_BLENDSHAPES], target[..., :N_BLENDSHAPES]
        d_bs = F.huber_loss(bs_pred.diff(dim=1), bs_target.diff(dim=1), reduction="none", delta=0.5).sum(-1) / self.audio_driven[:N_BLENDSHAPES].sum()
        d_lip = F.huber_loss(pred_mouth.diff(dim=1) * 10, mouth.diff(dim=1) * 10, reduction="none", delta=0.5).mean((-1, -2))
        temporal = ((d_bs + d_lip) * pair).sum() / pair.sum().clamp(min=1)
        total = code + lip_weight * lip + gap_weight * gap + temporal_weight * temporal
        return total, {"code": code.item(), "lip_mm2": lip.item(), "gap_mm2": gap.item(), "temporal": temporal.item()}


def make_meta(cfg, feature_dim: int, whisper: dict, identities: list[str]) -> dict:
    """The hyper-parameters, sampling defaults and provenance a state carries (`cfg` is
    config.A2EConfig)."""
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
        "sample_steps": cfg.sample_steps,
        "sample_temperature": cfg.sample_temperature,
        "guidance": cfg.guidance,
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
    """Rebuild the model from `to_state`'s dict; a clear error for anything else, and for the
    deterministic A2E of earlier versions (its priors and avatars must be re-made). A version 3
    state (before `sample_temperature`) samples as it did, from unscaled noise, and is written
    back as version 4."""
    try:
        meta = json.loads(bytes(state["meta.json"].numpy()).decode())
        if meta.get("version") == 3:
            meta = {**meta, "version": STATE_VERSION, "sample_temperature": 1.0}
        if meta.get("version") != STATE_VERSION:
            raise GGError(
                f"{source}: A2E state version {meta.get('version')} (the deterministic A2E of an earlier ggtalker), this ggtalker "
                f"reads 3-{STATE_VERSION} (flow matching); re-run fit-prior for a prior, or adapt with a current prior for an avatar",
                Exit.ARTIFACT,
            )
        model = A2E(meta)
        model.load_state_dict({k: v for k, v in state.items() if k != "meta.json"})
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise GGError(f"{source}: not an A2E state ({e.__class__.__name__}: {str(e)[:80]}); re-run fit-prior", Exit.ARTIFACT) from e
    return model.eval()
