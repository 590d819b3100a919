"""Product recipes built from the verbs: `ggtalker demo` (what `make demo` runs).

`demo`: one real video → clip → avatar → a talking mp4, through the ggtalker CLI itself (each
verb in its own process, its command printed, as a user would type it). Defaults to a real clip
in ../shared/data/real when that folder is there (the project's test footage); otherwise pass
your own `--video` (and `--audio` for the new speech). Without CUDA it runs small (128² avatar,
400 head steps: minutes on a laptop CPU); with CUDA at 512². Everything lands in out/demo/
(git-ignored). A step is skipped when its output is current: in this ggtalker's format and made
from what the step would use now (the clip from this video at this size, the avatar from this
clip and the default prior as they are now); anything else is made again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from . import artifacts
from .config import load_config
from .device import device_of
from .errors import Exit, GGError

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
DEMO_VIDEO, DEMO_AUDIO = REAL / "videos" / "obama_20s_450_25fps.mp4", REAL / "audio" / "en_obama_5s.wav"


def _meta(folder: Path, kind: str) -> dict[str, Any] | None:
    """`folder`'s meta.yaml when it holds a `kind` artifact this ggtalker reads, else None."""
    try:
        return artifacts.read_meta(folder, kind)
    except GGError:
        return None


def clip_current(clip: Path, video: Path, size: int) -> bool:
    """Whether `clip` was preprocessed from this very video (its bytes) at this size."""
    meta = _meta(clip, "clip")
    return meta is not None and meta["source"]["sha256"] == artifacts.sha256(video) and meta["size"] == size


def avatar_current(avatar: Path, clip: Path) -> bool:
    """Whether `avatar` was adapted from `clip` and from its prior as both are now (a pulled
    priors/default changes the prior's weights under the same path)."""
    meta = _meta(avatar, "avatar")
    if meta is None:
        return False
    try:
        prior = meta.get("prior")
        return meta["clip"]["sha256"] == artifacts.fingerprint(clip, "clip") and (
            prior is None or meta.get("prior_sha256") == artifacts.fingerprint(Path(prior), "prior"))
    except GGError:  # the prior is gone or in an older format: adapt again
        return False


def ggtalker(*args: str) -> None:
    """One verb in its own process, its command shown; a failure stops the recipe with its exit code."""
    print("$ ggtalker " + " ".join(args), flush=True)
    code = subprocess.run([sys.executable, "-m", "ggtalker_cli.cli", *args], cwd=ROOT).returncode
    if code != 0:
        raise GGError(f"demo stopped: `ggtalker {args[0]}` failed (its message is above)", Exit(code) if code in iter(Exit) else Exit.INTERNAL)


def demo(video: Path | None = None, audio: Path | None = None, out: Path | None = None) -> dict[str, str]:
    video = video or (DEMO_VIDEO if DEMO_VIDEO.is_file() else None)
    audio = audio or (DEMO_AUDIO if DEMO_AUDIO.is_file() else None)
    out = out or ROOT / "out" / "demo"
    if video is None:
        raise GGError("no video: pass --video your_talking_head.mp4 (make demo VIDEO=...; ../shared/data/real is not here)", Exit.USAGE)
    cuda = device_of("auto").type == "cuda"
    clip, avatar, talking = out / "clip", out / "avatar", out / "talking.mp4"
    size = 512 if cuda else 256
    if not clip_current(clip, video, size):
        ggtalker("preprocess", str(video), "-o", str(clip), "--size", str(size), "--force")
    if not avatar_current(avatar, clip):
        preset, render, head = ("balanced", "512", 3000) if cuda else ("fast", "128", 400)
        cfg = load_config(preset)  # the demo shortens the head fit only: the inpainter and the A2E keep the preset's steps
        steps = f"head={head},inpainter={cfg.inpainter.steps},a2e={cfg.a2e.adapt_steps}"
        ggtalker("adapt", str(clip), "-o", str(avatar), "--preset", preset, "--size", render, "--steps", steps,
                 "--device", "cuda" if cuda else "cpu", "--force")
    ggtalker("synth", str(avatar), "--audio", str(audio or clip / "audio.wav"), "-o", str(talking), "--force")
    print(f"\ndone: {talking}  (avatar: {avatar}, tracking check: {clip / 'contact_sheet.png'})")
    return {"video": str(talking), "avatar": str(avatar), "clip": str(clip)}
