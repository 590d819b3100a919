"""Configuration as data: one dataclass per stage, presets as YAML files that override them.

`load_config("fast")` reads presets/fast.yaml; a path to any YAML file works too. Presets may
set any subset of fields; an unknown section or key, a value of the wrong type, a negative count
or a step interval below 1 is an error that names the file and the key (a typo must never be
silently ignored, nor a 0 that would only fail mid-training).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import Exit, GGError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "balanced"


@dataclass
class PreprocessConfig:
    fps: float = 25.0  # output frame rate (constant)
    size: int = 512  # square crop side in pixels
    crop_scale: float = 2.6  # crop side / face height (head and shoulders with margin)
    crop_shift_y: float = 0.12  # crop centre below the face centre, in face heights (shows neck)
    jpeg_quality: int = 92
    min_duration_s: float = 2.0
    max_gap_frames: int = 12  # lost-face gaps up to this long are interpolated
    min_tracked_fraction: float = 0.5  # below this the video is refused as "no face"
    vfr_tolerance: float = 0.02  # relative frame-interval spread that counts as variable frame rate
    test_fraction: float = 0.1  # last 10% of frames are test frames (DESIGN.md section 5)
    max_faces: int = 2  # faces the landmarker looks for (to notice and skip other people)
    ambiguous_face_ratio: float = 0.5  # a second face this large/persistent (vs the first) is refused
    track_max_side: int = 960  # frames are tracked at most this large (landmarks are resolution-free)
    pose_cutoff_hz: float = 6.0  # zero-phase low-pass on the head pose (offline, so no lag)
    seg_size: int = 128  # segmentation works at this size and is upsampled (keeps it cheap)
    background_samples: int = 64  # frames whose background pixels vote for the clean plate


@dataclass
class AdaptConfig:
    steps: int = 4000
    size: int = 512  # training render size (frames are resized from the clip's size, never up)
    batch: int = 1  # frames per step
    uv_res: int = 256  # UV Gaussian map resolution (one Gaussian per covered texel: ~52k at 256)
    upsample_at: float = 0.0  # fraction of steps at which the UV map doubles its resolution (0: never)
    feature_dim: int = 16  # per-Gaussian feature fed to the colour MLP
    hidden: int = 64  # colour MLP width
    basis_ridge: float = 1.0  # ridge of the per-identity expression basis fit (in frames)
    # learning rates (Adam), decayed exponentially to lr_final × themselves at the last step. Adam
    # moves a parameter by about its rate per step, so a run travels ~steps × rate; with
    # lr_budget_power > 0 a run of N steps scales the head's rates by (lr_steps / N) ** lr_budget_power,
    # at most lr_budget_max (the sharp preset). Higher rates fit the training views closer and
    # the novel views worse (H200, 512²: bench/results/lr_budget.json, docs/e2v.md)
    lr_position: float = 2e-3  # offsets, in units of triangle size
    lr_rotation: float = 1e-3
    lr_scale: float = 5e-3
    lr_opacity: float = 2.5e-2
    lr_color: float = 1e-2
    lr_feature: float = 5e-3
    lr_mlp: float = 1e-3
    lr_refine: float = 5e-4  # per-frame pose/expression corrections (never scaled by the budget)
    lr_final: float = 0.1
    lr_steps: int = 4000
    lr_budget_power: float = 0.0
    lr_budget_max: float = 2.0
    # loss weights
    ssim_weight: float = 0.2
    alpha_weight: float = 0.1  # rendered alpha vs the head mask (silhouette)
    # band just outside the head mask (fraction of the side) where no image or silhouette loss
    # applies: segmentation jitters by a few px frame to frame, and forcing the render to follow it
    # leaves the head's own border half transparent
    edge_ignore: float = 0.006  # 3 px at 512²
    offset_weight: float = 0.01  # Gaussians further than offset_margin triangle sizes from their triangle
    offset_margin: float = 1.0
    scale_weight: float = 0.01  # Gaussians larger than scale_max triangle sizes
    scale_max: float = 1.0
    refine_after: float = 0.3  # fraction of steps before per-frame corrections start
    refine_weight: float = 1e-3  # L2 pull of the corrections, each term in units of:
    refine_rot: float = 0.02  # rad
    refine_trans: float = 0.2  # cm
    refine_expr: float = 0.1  # blendshape weight
    prune_every: int = 500  # steps between pruning Gaussians below prune_opacity (0: never)
    prune_opacity: float = 0.01
    checkpoint_every: int = 500
    log_every: int = 10
    eval_frames: int = 0  # held-out frames evaluated (evenly spaced; 0: all)
    seed: int = 0


@dataclass
class InpainterConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128)  # U-Net widths per level (4 levels: 3 downsamplings)
    steps: int = 2000
    lr: float = 2e-3
    ssim_weight: float = 0.2
    seam_weight: float = 2.0  # extra L1 weight on the head-mask border band
    seam_radius: float = 0.02  # seam band half-width, fraction of the frame side (metrics.psnr_seam's)
    dilate_min: float = 0.01  # training blank-mask dilation drawn per sample in [min, max] (fraction of side)
    dilate_max: float = 0.06
    dilate: float = 0.03  # dilation used at synthesis (inside the training range)
    log_every: int = 50
    seed: int = 0


@dataclass
class A2EConfig:
    """Audio→expression prior (`fit-prior --parts a2e`), its per-identity adaptation and sampling.

    The model is a flow-matching transformer (models/a2e.py); `sample_steps`,
    `sample_temperature` and `guidance` are stored in the state it trains and used by synth and
    eval. Regularisers stay on: with tens of identities a free model learns which speaker and
    moment a whisper feature belongs to instead of how it sounds (docs/a2e.md).
    """

    fps: float = 25.0  # the model's frame rate; clips and synthesis at other rates are resampled
    window: int = 32  # frames per training and sampling window (1.28 s at 25 fps)
    d_model: int = 96
    layers: int = 4
    heads: int = 4
    style_dim: int = 64  # per-identity speaking-style embedding (the paper's size)
    lip_components: int = 16  # PCA components of the mouth-region vertex offsets
    dropout: float = 0.0  # transformer dropout (feature noise and channel dropout regularise; masks cost CPU time)
    style_dropout: float = 0.2  # share of windows trained with the null ("any speaker") style
    cond_dropout: float = 0.1  # share trained with null style and null audio: the unconditional branch (CFG)
    feature_noise: float = 0.3  # Gaussian noise on normalised whisper features
    feature_dropout: float = 0.3  # dropout of whisper feature channels
    weight_decay: float = 0.1
    steps: int = 2000
    batch: int = 16
    lr: float = 5e-4
    lip_weight: float = 1.0  # lip-vertex L2 (mm²) against the code L2 (standardised)
    temporal_weight: float = 0.5  # Huber on frame-to-frame differences of the predicted clean code
    gap_weight: float = 2.0  # L2 (mm²) of the inner-lip opening vector: the mouth opening weighs above the other lip points
    sample_steps: int = 3  # Euler steps from noise to code at synthesis (6 measured worse with temperature 0.5; docs/a2e.md)
    sample_temperature: float = 0.5  # scale of the flow's starting noise (1: the training distribution; lower: less audio-independent motion)
    guidance: float = 2.0  # classifier-free guidance scale (1: the conditional model alone)
    val_every: int = 100
    val_windows: int = 256  # fixed validation windows (each scored at 5 flow times with fixed noise)
    checkpoint_every: int = 500
    holdout_fraction: float = 0.2  # identities held out for validation when none are named
    person_balance: float = 0.5  # a person with L training frames gets ∝ L**this of the windows (1: every frame alike)
    adapt_steps: int = 800
    adapt_lr: float = 1e-3  # every A2E layer; early stopping on held-out frames keeps the prior's mapping (1e-4 … 3e-3: bench/results/a2e_adapt_lr.json)
    adapt_style_lr: float = 1e-2  # the new identity's style vector starts from the null style
    adapt_feature_noise: float = 0.1  # one voice: no need for the prior's heavy feature regularisers
    adapt_patience: int = 4  # validations (every 50 steps) without improvement before stopping
    adapt_val_fraction: float = 0.1  # last share of the training frames used for early stopping
    adapt_ema: float = 0.995  # decay of the weight average adaptation validates and keeps (0: the step's own weights)
    adapt_realign: bool = True  # train on the clip's audio shifted by its own measured audio-mouth lag (≥ 8 s; docs/a2e.md)
    seed: int = 0  # training randomness; synthesis draws its noise from synth's own seed


@dataclass
class E2VConfig:
    """Expression→visual prior (`fit-prior --parts e2v`) and how `adapt --prior` starts from it."""

    size: int = 256  # training render and reference-frame resolution (frames are resized)
    uv_res: int = 128  # predicted UV Gaussian map (adapt from the prior keeps this resolution)
    feature_dim: int = 16  # per-Gaussian feature fed to the colour MLP
    hidden: int = 64  # colour MLP width
    # UV U-Net widths per level. One level (local, 7×7 texels) on purpose: with ~10 identities a
    # deeper net recognises the person and recalls their look, which does not transfer (docs/e2v.md)
    channels: tuple[int, ...] = (64,)
    embed_dim: int = 8  # learned per-texel input channels: where on the head a texel lies
    max_sources: int = 4  # reference frames per training sample (1..max, drawn per sample)
    steps: int = 6000
    batch: int = 8  # samples per step and GPU
    lr: float = 3e-4
    ssim_weight: float = 0.2
    alpha_weight: float = 0.1  # rendered alpha vs the head mask (silhouette)
    offset_weight: float = 0.01  # position regulariser: Gaussians beyond offset_margin triangle sizes
    offset_margin: float = 1.0
    scale_weight: float = 0.01  # Gaussians larger than scale_max triangle sizes
    scale_max: float = 1.0
    flip: bool = True  # mirrored identities (mirrored frames + landmarks) double the training set
    zoom: float = 0.15  # reference frames are cropped by a random zoom in [1, 1 + zoom]
    jitter: float = 0.2  # colour jitter (per-channel gain, contrast, saturation ± jitter), same for a sample's frames
    val_every: int = 250
    val_samples: int = 32  # fixed (reference, target) pairs of the held-out identities
    checkpoint_every: int = 500
    workers: int = 4  # data-loading processes per GPU (0: load in the training process)
    adapt_sources: int = 8  # reference frames adapt unwraps from a clip (spread over head yaw)
    seed: int = 0


@dataclass
class LiveConfig:
    """Low-latency synthesis (`synth --stream --latency L`, live.py): how the latency budget
    L is spent. A frame waits for `lookahead_share`·L of audio after it (what whisper and the
    A2E see of the future) and at most `hop_share`·L for the next step (each step costs one
    whisper pass, so a shorter hop is more compute per second of audio); the rest of L is left
    for computing and the frame's own duration."""

    lookahead_share: float = 0.3
    hop_share: float = 0.3
    context_s: float = 8.0  # past audio whisper sees at each step (at least the A2E window)
    # padded: the context zero-padded to whisper's 30 s, as offline features of a clip under
    # 30 s are made (the A2E's training distribution); cut: the encoder over the context's
    # positions only (whisper.cpp's audio_ctx), ~4x cheaper on CPU at 8 s, lips about as close
    # (bench/results/live_stream.json); auto: padded on CUDA, cut on CPU
    whisper_window: str = "auto"


@dataclass
class SynthConfig:
    """`synth`, and the renders of `eval` (the same synthesis runtime)."""

    crf: int = 18  # x264 quality of synth's mp4 (0 lossless … 51 worst; 18 ≈ visually lossless); --crf overrides it
    chunk_s: float = 2.0  # seconds of audio pushed to the expression stream per step
    batch: int = 8  # frames rendered and composited per call (body frames are decoded 4 batches ahead)
    orbit_period_s: float = 6.0  # one full left-right-left sweep of --orbit


@dataclass
class EvalConfig:
    video_crf: int = 14  # near-transparent H.264: all variants and the ground truth go through it alike
    strip_frames: int = 4  # test frames shown side by side in the report's strips


@dataclass
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    inpainter: InpainterConfig = field(default_factory=InpainterConfig)
    a2e: A2EConfig = field(default_factory=A2EConfig)
    e2v: E2VConfig = field(default_factory=E2VConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    live: LiveConfig = field(default_factory=LiveConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Every `*_every` setting is a step interval the training loops use as `step % every`, where 0
# would divide by zero: it must be ≥ 1, except these, whose 0 means never (checked before use).
ZERO_MEANS_NEVER = {"prune_every"}


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _merge(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from `data`, recursing into nested sections."""
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise GGError(f"{source}: unknown key '{dotted}'; valid keys here: {', '.join(sorted(names))}", Exit.USAGE)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise GGError(f"{source}: '{dotted}' must be a mapping of settings", Exit.USAGE)
            _merge(current, value, source, dotted + ".")
            continue
        kind = hints[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; every user writes it so
        if kind in (int, float, str, bool) and type(value) is not kind:
            raise GGError(f"{source}: '{dotted}' must be {kind.__name__}, got {value!r}", Exit.USAGE)
        if kind is int and key.endswith("_every") and key not in ZERO_MEANS_NEVER and value < 1:
            raise GGError(f"{source}: '{dotted}' is a step interval and must be ≥ 1, got {value}; for the fewest, set it above the step count", Exit.USAGE)
        if kind is int and value < 0:  # every int setting is a count, a size or a seed
            raise GGError(f"{source}: '{dotted}' must be ≥ 0, got {value}", Exit.USAGE)
        setattr(obj, key, value)


def preset_path(preset: str | Path) -> Path:
    """A preset name (fast/balanced/quality) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise GGError(f"{path}: preset file not found; pass a preset name ({', '.join(preset_names())}) or an existing YAML", Exit.INPUT_MISSING)
        return path
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise GGError(f"unknown preset '{preset}'; choose one of: {', '.join(preset_names())}, or pass a .yaml path", Exit.USAGE)
    return path


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


# The trainers a verb runs: part -> (section, key) of that part's step count. adapt's parts are
# one fit of one person, its own trainer first: `--steps N` scales the others with it (SCALED);
# fit-prior's are separate priors: `--steps N` is each part's count.
VERB_STEPS = {
    "adapt": {"head": ("adapt", "steps"), "inpainter": ("inpainter", "steps"), "a2e": ("a2e", "adapt_steps")},
    "fit-prior": {"a2e": ("a2e", "steps"), "e2v": ("e2v", "steps")},
}
SCALED = {"adapt"}


def set_steps(cfg: Config, verb: str, spec: str) -> dict[str, int]:
    """A verb's `--steps`: `part=N,part=M,...` sets the named parts. `N` alone sets every part of
    fit-prior; for adapt it sets its own trainer's steps and scales every other part's by the
    same factor (the preset's proportions are kept: `adapt --steps 8000` on balanced's 4000
    head steps doubles the inpainter's and the A2E adaptation's), and named parts scale the
    others by the first part's factor (1 when it is not named). -> the steps each part will run."""
    parts = VERB_STEPS[verb]
    first = next(iter(parts))
    try:
        if "=" in spec:
            named = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(","))}
        else:
            named = dict.fromkeys([first] if verb in SCALED else parts, int(spec))
    except ValueError:
        named = {"": -1}
    if set(named) - set(parts) or any(v < 1 for v in named.values()):
        raise GGError(f"--steps {spec}: expected a step count ≥ 1 or {','.join(f'{p}=N' for p in parts)}", Exit.USAGE)
    section, key = parts[first]
    factor = named[first] / max(getattr(getattr(cfg, section), key), 1) if first in named and verb in SCALED else 1.0
    for part, (section, key) in parts.items():
        now = getattr(getattr(cfg, section), key)
        setattr(getattr(cfg, section), key, named.get(part, max(1, round(now * factor)) if now > 0 else 0))
    return {part: getattr(getattr(cfg, section), key) for part, (section, key) in parts.items()}


def load_config(preset: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset's YAML, then explicit overrides (from CLI flags)."""
    cfg = Config()
    path = preset_path(preset or DEFAULT_PRESET)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise GGError(f"{path}: invalid YAML{where}; fix the file or use a built-in preset", Exit.USAGE) from e
    if not isinstance(data, dict):
        raise GGError(f"{path}: a preset must be a mapping of sections (preprocess:, adapt:, ...)", Exit.USAGE)
    _merge(cfg, data, str(path))
    if overrides:
        _merge(cfg, overrides, "command-line flags")
    return cfg
