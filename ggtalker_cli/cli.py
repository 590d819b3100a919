"""The `ggtalker` command: a thin Typer layer over ggtalker_cli.stages.

Each verb parses flags into a Config (preset + overrides) and calls its stage's `run()`, which
returns a JSON-able summary. Expected failures are GGError: one line on stderr, a documented
exit code (errors.Exit). Stages are imported lazily so `ggtalker --help` stays instant.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer

from . import __version__, console
from .config import load_config
from .errors import Exit, GGError

app = typer.Typer(
    name="ggtalker",
    help="Audio-driven 3D Gaussian talking heads: preprocess → fit-prior → adapt → synth → eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PresetOpt = typer.Option(None, "--preset", help="Preset name (fast, balanced, quality) or a YAML file.")
ForceOpt = typer.Option(False, "--force", help="Replace an existing output folder.")
SeedOpt = typer.Option(None, "--seed", help="Random seed (same seed, same result).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, or auto (cuda when available).")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint.")


@app.callback()
def _global(
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or info on stderr (errors still print)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    console.configure(quiet=quiet, json_mode=json_out)


def _fail(e: GGError) -> NoReturn:
    console.err.print(f"[red]error:[/red] {e.message}", soft_wrap=True)
    raise typer.Exit(int(e.code))


def _run(stage: Callable[[], dict[str, Any]], out: Path | str | None = None) -> None:
    """Call a stage, print its summary, map failures to one line and an exit code.

    A disk that fills up mid-run (ENOSPC/EDQUOT from any write) is an expected failure too: the
    stages write through temporary folders, so the target `out` is untouched.
    """
    try:
        summary = stage()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _fail(GGError(f"{e.filename or out}: disk full ({e.strerror}); free disk space there or choose another -o, then run again", Exit.OUTPUT))
    except GGError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.err.print("[red]interrupted[/red]: partial work kept; re-run with --resume to continue")
        raise typer.Exit(int(Exit.INTERRUPTED))
    console.emit(summary)


@app.command()
def preprocess(
    video: Path = typer.Argument(..., help="Talking-head video (any container, frame rate, size)."),
    out: Path = typer.Option(..., "-o", "--out", help="Clip folder to create."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Output frame rate (default 25)."),
    size: Optional[int] = typer.Option(None, "--size", help="Square crop side in pixels (default 512)."),
    preset: Optional[str] = PresetOpt,
    allow_no_audio: bool = typer.Option(False, "--allow-no-audio", help="Accept a video without audio (no audio features)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run, skipping finished steps."),
    force: bool = ForceOpt,
) -> None:
    """Track a talking-head video into a clip folder (frames, landmarks, pose, masks, audio)."""
    from .stages import preprocess as stage

    overrides = {"preprocess": {k: v for k, v in {"fps": fps, "size": size}.items() if v is not None}}
    _run(
        lambda: stage.run(video, out, load_config(preset, overrides), allow_no_audio=allow_no_audio, resume=resume, force=force), out
    )


@app.command()
def doctor() -> None:
    """Report versions, devices, ffmpeg and where each model file resolves from."""
    from .stages import doctor as stage

    _run(stage.run)


@app.command()
def adapt(
    clip: Path = typer.Argument(..., help="Clip folder made by `ggtalker preprocess`."),
    out: Path = typer.Option(..., "-o", "--out", help="Avatar folder to create."),
    prior: Optional[Path] = typer.Option(None, "--prior", help="Prior folder with an e2v part to start from (default: priors/default when present)."),
    no_prior: bool = typer.Option(False, "--no-prior", help="Adapt from scratch, even when the default prior exists."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (preset default otherwise)."),
    size: Optional[int] = typer.Option(None, "--size", help="Training/render resolution in pixels (square)."),
    seed: Optional[int] = SeedOpt,
    preset: Optional[str] = PresetOpt,
    device: str = DeviceOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
) -> None:
    """Fit a Gaussian head avatar to one clip (held-out metrics, previews, PLY export)."""
    from .models.e2v import choose_prior
    from .stages import adapt as stage

    overrides = {"adapt": {k: v for k, v in {"steps": steps, "size": size, "seed": seed}.items() if v is not None}}
    _run(lambda: stage.run(clip, out, load_config(preset, overrides), prior=choose_prior(prior, no_prior), device=device, resume=resume, force=force), out)


@app.command("fit-prior")
def fit_prior(
    clips: list[Path] = typer.Argument(..., help="Clip folders made by `ggtalker preprocess` (one identity each), folders of them, or text files listing them one a line."),
    out: Path = typer.Option(..., "-o", "--out", help="Prior folder to create."),
    parts: str = typer.Option("a2e", "--parts", help="Comma-separated parts to train: a2e, e2v."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Comma-separated clip names held out for validation (default: every k-th clip)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per part (preset default otherwise)."),
    seed: Optional[int] = SeedOpt,
    preset: Optional[str] = PresetOpt,
    device: str = DeviceOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
) -> None:
    """Train the cross-identity priors (audio→expression; expression→visual) on many clips."""
    from .stages import fit_prior as stage

    given = {k: v for k, v in {"steps": steps, "seed": seed}.items() if v is not None}
    overrides = {"a2e": given, "e2v": given}
    names = [h.strip() for h in holdout.split(",") if h.strip()] if holdout else None
    _run(
        lambda: stage.run(clips, out, load_config(preset, overrides), parts=parts, holdout=names, resume=resume, force=force,
                          device=None if device == "auto" else device),  # fmt: skip
        out,
    )


@app.command()
def synth(
    avatar: Path = typer.Argument(..., help="Avatar folder made by `ggtalker adapt`."),
    audio: str = typer.Option(..., "--audio", "-a", help="Speech file (wav, mp3, m4a, any ffmpeg reads); '-' = stdin with --stream."),
    out: str = typer.Option(..., "-o", "--out", help="out.mp4 (video), expressions.npz (expressions + plot), or - (raw rgb24 frames on stdout)."),
    a2e: Optional[Path] = typer.Option(None, "--a2e", help="Audio→expression model: a prior folder or a2e .safetensors (default: the avatar's)."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="The avatar's clip folder, if it moved since adapt (body frames)."),
    pose: Optional[Path] = typer.Option(None, "--pose", help="Head poses: .npz with 'pose' (N,4,4), or CSV yaw,pitch,roll,tx,ty,tz per frame."),
    yaw: float = typer.Option(0.0, "--yaw", help="Turn the head by this many degrees (novel view)."),
    pitch: float = typer.Option(0.0, "--pitch", help="Tilt the head by this many degrees (novel view)."),
    orbit: float = typer.Option(0.0, "--orbit", help="Sweep the view left-right by ± this many degrees (6 s period)."),
    background: Optional[str] = typer.Option(None, "--background", help="Replace the background: an image file or a colour (white, #00ff00)."),
    size: Optional[int] = typer.Option(None, "--size", help="Output side in pixels (default: the avatar's)."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Output frame rate (default: the clip's)."),
    start: float = typer.Option(0.0, "--start", help="Start this many seconds into the audio."),
    end: Optional[float] = typer.Option(None, "--end", help="Stop at this many seconds into the audio."),
    crf: int = typer.Option(18, "--crf", help="x264 quality (0 lossless … 51 worst; 18 ≈ visually lossless)."),
    device: str = DeviceOpt,
    stream: bool = typer.Option(False, "--stream", help="Read audio as it arrives (file or stdin) and write frames as they are ready."),
    whisper: Optional[str] = typer.Option(None, "--whisper", help="Whisper model name or .pt (default: the one the A2E was trained with)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Make the avatar say new speech: a lip-synced mp4 (or expressions, or raw frames)."""
    from .stages import synth as stage

    _run(lambda: stage.run(avatar, audio, out, a2e_path=a2e, clip=clip, pose=pose, yaw=yaw, pitch=pitch, orbit=orbit, background=background,
                           size=size, fps=fps, start=start, end=end, crf=crf, device=device, stream=stream, whisper=whisper, force=force), out)  # fmt: skip


@app.command("eval")
def eval_(
    avatar: Optional[Path] = typer.Argument(None, help="Avatar folder made by `ggtalker adapt` (omit with --score-only)."),
    clip: Optional[Path] = typer.Argument(None, help="Its clip folder, if it moved since adapt (default: the one adapt recorded)."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder to create (report.json, report.md, report.html, PNGs, videos)."),
    audio: Optional[list[Path]] = typer.Option(None, "--audio", help="Out-of-distribution speech to score lip-sync on (repeatable)."),
    a2e: Optional[Path] = typer.Option(None, "--a2e", help="Audio→expression model: a prior folder or a2e .safetensors (default: the avatar's)."),
    size: Optional[int] = typer.Option(None, "--size", help="Evaluation side in pixels (default: the avatar's, normally the clip's)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Score only the first N test frames (quick runs)."),
    device: str = DeviceOpt,
    score: str = typer.Option("auto", "--score", help="Landmark scoring: auto (where mediapipe is), yes (required), no (render only)."),
    score_only: bool = typer.Option(False, "--score-only", help="Finish the landmark scoring of an existing report folder (-o)."),
    force: bool = ForceOpt,
) -> None:
    """Score an avatar on its clip's held-out frames and any audio: report.json/md/html, plots, videos."""
    from .stages import eval as stage

    _run(lambda: stage.run(avatar, clip, out, audios=audio, a2e_path=a2e, device=device, size=size, max_frames=frames, score=score,
                           score_only=score_only, force=force), out)  # fmt: skip


def main() -> None:
    try:
        app()
    except GGError as e:  # raised while parsing config before a stage starts
        console.err.print(f"[red]error:[/red] {e.message}", soft_wrap=True)
        sys.exit(int(e.code))


if __name__ == "__main__":
    main()
