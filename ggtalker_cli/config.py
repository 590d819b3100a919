"""Configuration as data: one dataclass per stage, presets as YAML files that override them.

`load_config("fast")` reads presets/fast.yaml; a path to any YAML file works too. Presets may
set any subset of fields; an unknown section or key, or a value of the wrong type, is an error
that names the file and the key (a typo must never be silently ignored).
"""

from __future__ import annotations

import dataclasses
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
    pose_smoothing: float = 1.0  # one-euro filter: min cutoff (Hz); lower = smoother
    pose_smoothing_beta: float = 0.5  # one-euro filter: speed coefficient (removes lag)
    head_dilate: float = 0.04  # head mask dilation (fraction of crop side)


@dataclass
class AdaptConfig:
    steps: int = 3000
    size: int = 512  # training render size (frames are resized from the clip's size)
    batch: int = 1
    lr: float = 5e-3
    uv_res: int = 128  # UV Gaussian map resolution (one Gaussian per valid texel)
    ssim_weight: float = 0.2
    checkpoint_every: int = 500
    preview_every: int = 500
    seed: int = 0


@dataclass
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if kind in (int, float, str, bool) and type(value) is not kind:
            raise GGError(f"{source}: '{dotted}' must be {kind.__name__}, got {value!r}", Exit.USAGE)
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
