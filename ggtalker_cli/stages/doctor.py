"""`ggtalker doctor`: what this machine has — the first thing to run when something fails.

Reports Python/package versions, compute devices, which FFmpeg reads and writes media (PyAV's
libraries, and the file they were loaded from), and where every registered model asset
resolves from (explicit/env, cache, offline package, or missing), without downloading anything.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from typing import Any

from .. import __version__, assets, console, media

_PACKAGES = ("torch", "gsplat", "mediapipe", "openai-whisper", "insightface", "onnxruntime", "av", "numpy", "opencv-python-headless", "typer", "rich")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ffmpeg() -> dict[str, Any]:
    """The FFmpeg ggtalker uses (in process, through PyAV) and where it came from; a system
    ffmpeg binary on PATH is listed for reference only: nothing here runs it."""
    return {**media.backend(), "system_binary": shutil.which("ffmpeg")}


def _devices() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


def run() -> dict[str, Any]:
    report: dict[str, Any] = {
        "ggtalker": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "devices": _devices(),
        "ffmpeg": _ffmpeg(),
        "assets": {},
    }
    for name in sorted(assets.REGISTRY):
        path, source, tried = assets.locate(name, download=False)
        report["assets"][name] = {"path": str(path) if path else None, "source": source, "tried": tried if path is None else []}
    problems = [f"{n}: missing" for n, a in report["assets"].items() if a["path"] is None]
    if report["ffmpeg"]["video_encoder"] != "libx264":
        problems.append(f"FFmpeg ({report['ffmpeg']['libavcodec']}) has no libx264: videos are MPEG-4 Part 2; pip install --force-reinstall av")
    report["problems"] = problems
    for problem in problems:
        console.warn(problem)
    return report
