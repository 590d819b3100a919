"""`make demo`: one real video → clip → avatar → a talking mp4, with the ggtalker CLI itself.

Defaults to a real clip in ../shared/data/real when that folder is there (the project's test
footage); otherwise pass your own `--video` (and `--audio` for the new speech). Without CUDA it
runs small (128² avatar, few hundred steps: minutes on a laptop CPU); with CUDA at 512².
Everything lands in out/demo/ (git-ignored). Each step is skipped when its output exists in the
current format (an artifact from an older ggtalker is re-made).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from ggtalker_cli import artifacts
from ggtalker_cli.errors import GGError

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "real"


def _default(kind: str, name: str) -> Path | None:
    path = REAL / kind / name
    return path if path.is_file() else None


def current(folder: Path, kind: str) -> bool:
    """Whether `folder` holds a `kind` artifact this ggtalker reads (so the step can be skipped)."""
    try:
        artifacts.read_meta(folder, kind)
    except GGError:
        return False
    return True


def ggtalker(*args: str) -> None:
    command = [sys.executable, "-m", "ggtalker_cli.cli", *args]
    print("$ ggtalker " + " ".join(args), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"demo stopped: `ggtalker {args[0]}` failed (its message is above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--video", type=Path, default=_default("videos", "obama_20s_450_25fps.mp4"))
    parser.add_argument("--audio", type=Path, default=_default("audio", "en_obama_5s.wav"))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    args = parser.parse_args()
    if args.video is None:
        raise SystemExit("no video: pass VIDEO=your_talking_head.mp4 (../shared/data/real is not here)")
    cuda = torch.cuda.is_available()
    clip, avatar, out = args.out / "clip", args.out / "avatar", args.out / "talking.mp4"
    if not current(clip, "clip"):
        ggtalker("preprocess", str(args.video), "-o", str(clip), "--size", "512" if cuda else "256", "--force")
    if not current(avatar, "avatar"):
        size, steps = ("512", "3000") if cuda else ("128", "400")
        ggtalker("adapt", str(clip), "-o", str(avatar), "--preset", "balanced" if cuda else "fast", "--size", size,
                 "--steps", steps, "--device", "cuda" if cuda else "cpu", "--force")  # fmt: skip
    audio = args.audio or clip / "audio.wav"
    ggtalker("synth", str(avatar), "--audio", str(audio), "-o", str(out), "--force")
    print(f"\ndone: {out}  (avatar: {avatar}, tracking check: {clip / 'contact_sheet.png'})")


if __name__ == "__main__":
    main()
