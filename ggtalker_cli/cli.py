"""The `ggtalker` command: a thin Typer layer over ggtalker_cli.stages.

Each verb parses flags into a Config (preset + overrides) and calls its stage's `run()`, which
returns a JSON-able summary. Expected failures are GGError: one line on stderr, a documented
exit code (errors.Exit), and under --json one object `{"error": ..., "exit": N}` on stdout.
`--json` and `--quiet` go before or after the verb. Stages are imported lazily so
`ggtalker --help` stays instant.
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from . import __version__, console
from .config import load_config, set_steps
from .errors import Exit, GGError

app = typer.Typer(
    name="ggtalker",
    help="Audio-driven 3D Gaussian talking heads: preprocess → fit-prior → adapt → synth → eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: flags read `--resume`, not typer's rich `--resume <bool>`
)

PresetOpt = typer.Option(None, "--preset", help="Preset name (fast, balanced, sharp, quality) or a YAML file.")
ForceOpt = typer.Option(False, "--force", help="Replace an existing output folder.")
SeedOpt = typer.Option(None, "--seed", help="Random seed (same seed, same result).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, or auto (cuda when available).")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint.")


def _version(value: bool) -> None:
    """Eager: answers before click asks for a verb (a group callback would run only with one)."""
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _global(
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary (or the error) on stdout; before or after the verb."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or info on stderr (errors still print); before or after the verb."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True, callback=_version),
) -> None:
    console.configure(quiet=quiet, json_mode=json_out)


def _json_error(message: str, code: int) -> None:
    """Under --json, a failure is the one object a script reads on stdout."""
    if console._state["json"]:
        sys.stdout.write(json.dumps({"error": message, "exit": code}) + "\n")
        sys.stdout.flush()


def _report(message: str, code: int) -> None:
    """One failure: a line on stderr (and the --json object)."""
    console.err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    _json_error(message, code)


def _fail(e: GGError) -> NoReturn:
    _report(e.message, int(e.code))
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
        _report("interrupted: partial work kept; re-run with --resume to continue", int(Exit.INTERRUPTED))
        raise typer.Exit(int(Exit.INTERRUPTED)) from None
    console.emit(summary)


@app.command()
def preprocess(
    video: Path = typer.Argument(..., help="Talking-head video (any container, frame rate, size)."),
    out: Path = typer.Option(..., "-o", "--out", help="Clip folder to create."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Output frame rate (default 25)."),
    size: Optional[int] = typer.Option(None, "--size", help="Square crop side in pixels (default 512)."),
    preset: Optional[str] = PresetOpt,
    allow_no_audio: bool = typer.Option(False, "--allow-no-audio", help="Accept a video without audio (no audio features)."),
    person: Optional[str] = typer.Option(None, "--person", help="Who speaks (default: the folder's name); fit-prior takes one person's clips as one identity."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run, skipping finished steps."),
    force: bool = ForceOpt,
) -> None:
    """Track a talking-head video into a clip folder (frames, landmarks, pose, masks, audio)."""
    from .stages import preprocess as stage

    overrides = {"preprocess": {k: v for k, v in {"fps": fps, "size": size}.items() if v is not None}}
    _run(
        lambda: stage.run(video, out, load_config(preset, overrides), allow_no_audio=allow_no_audio, resume=resume, force=force, person=person), out
    )


@app.command()
def doctor() -> None:
    """Report versions, devices, where FFmpeg comes from and where each model file resolves from."""
    from .stages import doctor as stage

    _run(stage.run)


@app.command()
def adapt(
    clip: Path = typer.Argument(..., help="Clip folder made by `ggtalker preprocess`."),
    out: Path = typer.Option(..., "-o", "--out", help="Avatar folder to create."),
    prior: Optional[Path] = typer.Option(None, "--prior", help="Prior folder with an e2v part to start from (default: priors/default when present)."),
    no_prior: bool = typer.Option(False, "--no-prior", help="Adapt from scratch, even when the default prior exists."),
    steps: Optional[str] = typer.Option(
        None, "--steps", help="Head training steps; the inpainter's and the A2E adaptation's scale with them (or set each: head=N,inpainter=N,a2e=N)."
    ),
    size: Optional[int] = typer.Option(None, "--size", help="Training/render resolution in pixels (square)."),
    seed: Optional[int] = SeedOpt,
    preset: Optional[str] = PresetOpt,
    device: str = DeviceOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
) -> None:
    """Fit a Gaussian head avatar to one clip (held-out metrics, previews, PLY export)."""
    from .priors import choose_prior
    from .stages import adapt as stage

    def run() -> dict:
        cfg = load_config(preset, {"adapt": {k: v for k, v in {"size": size, "seed": seed}.items() if v is not None}})
        if steps is not None:
            set_steps(cfg, "adapt", steps)
        return stage.run(clip, out, cfg, prior=choose_prior(prior, no_prior), device=device, resume=resume, force=force)

    _run(run, out)


@app.command("fit-prior")
def fit_prior(
    clips: list[Path] = typer.Argument(
        ..., help="Clip folders made by `ggtalker preprocess` (one identity a person), folders of them, or text files listing them one a line."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Prior folder to create."),
    parts: str = typer.Option("a2e", "--parts", help="Comma-separated parts to train: a2e, e2v."),
    holdout: Optional[str] = typer.Option(
        None, "--holdout", help="Comma-separated clips or people held out for validation, with all of that person's clips (default: every k-th person)."
    ),
    steps: Optional[str] = typer.Option(None, "--steps", help="Training steps of every part (or set each: a2e=N,e2v=N; preset default otherwise)."),
    seed: Optional[int] = SeedOpt,
    preset: Optional[str] = PresetOpt,
    device: str = DeviceOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
) -> None:
    """Train the cross-identity priors (audio→expression; expression→visual) on many clips."""
    from .stages import fit_prior as stage

    names = [h.strip() for h in holdout.split(",") if h.strip()] if holdout else None

    def run() -> dict:
        cfg = load_config(preset, {"a2e": {"seed": seed}, "e2v": {"seed": seed}} if seed is not None else None)
        if steps is not None:
            set_steps(cfg, "fit-prior", steps)
        return stage.run(clips, out, cfg, parts=parts, holdout=names, resume=resume, force=force, device=None if device == "auto" else device)

    _run(run, out)


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
    crf: Optional[int] = typer.Option(None, "--crf", help="x264 quality (0 lossless … 51 worst; default synth.crf, 18 ≈ visually lossless)."),
    device: str = DeviceOpt,
    stream: bool = typer.Option(False, "--stream", help="Read audio as it arrives (file or stdin) and write frames as they are ready."),
    whisper: Optional[str] = typer.Option(None, "--whisper", help="Whisper model name or .pt (default: the one the A2E was trained with)."),
    preset: Optional[str] = PresetOpt,
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    latency: Optional[float] = typer.Option(
        None,
        "--latency",
        help="With --stream: live mode, frames within about this many seconds of their audio (approximate lips; file at real"
        "-time pace, or raw s16le 16 kHz PCM from '-', unix:PATH or a FIFO).",
    ),
) -> None:
    """Make the avatar say new speech: a lip-synced mp4 (or expressions, or raw frames)."""
    from .stages import synth as stage

    _run(lambda: stage.run(avatar, audio, out, a2e_path=a2e, clip=clip, pose=pose, yaw=yaw, pitch=pitch, orbit=orbit, background=background,
                           size=size, fps=fps, start=start, end=end, crf=crf, device=device, stream=stream, whisper=whisper, force=force,
                           cfg=load_config(preset), latency=latency), out)


@app.command()
def demo(
    video: Optional[Path] = typer.Option(None, "--video", help="Talking-head video (default: the project's real Obama clip when ../shared is here)."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="New speech for the avatar (default: a real speech file, else the clip's own)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for clip/, avatar/ and talking.mp4 (default out/demo)."),
) -> None:
    """One video → clip → avatar → talking mp4 with the verbs above (what `make demo` runs)."""
    from .recipes import demo as recipe

    _run(lambda: recipe(video, audio, out), out)


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
    preset: Optional[str] = PresetOpt,
    force: bool = ForceOpt,
) -> None:
    """Score an avatar on its clip's held-out frames and any audio: report.json/md/html, plots, videos."""
    from .stages import eval as stage

    _run(lambda: stage.run(avatar, clip, out, audios=audio, a2e_path=a2e, device=device, size=size, max_frames=frames, score=score,
                           score_only=score_only, force=force, cfg=load_config(preset)), out)


GLOBAL_FLAGS = ("--json", "--quiet", "-q")


def _globals_first(args: list[str]) -> list[str]:
    """`ggtalker preprocess v.mp4 -o c --json` as `ggtalker --json preprocess ...`: click reads a
    group's own flags only before the verb, and no verb has a flag of these names."""
    end = args.index("--") if "--" in args else len(args)
    head = args[:end]
    return [a for a in head if a in GLOBAL_FLAGS] + [a for a in head if a not in GLOBAL_FLAGS] + args[end:]


def main() -> None:
    args = _globals_first(sys.argv[1:])
    try:
        code = app(args=args, prog_name="ggtalker", standalone_mode=False)
    except GGError as e:  # raised while parsing config before a stage starts
        _report(e.message, int(e.code))
        sys.exit(int(e.code))
    except typer.TyperException as e:  # a bad flag or argument: click's usage message, exit 2
        console._state["json"] = "--json" in args  # it may fail before the flag is read
        e.show()
        _json_error(e.format_message(), e.exit_code)
        sys.exit(e.exit_code)
    except typer.Abort:
        _report("interrupted", int(Exit.INTERRUPTED))
        sys.exit(int(Exit.INTERRUPTED))
    except Exception as e:  # a bug: the traceback follows, and a script still gets its object
        _json_error(f"internal error: {type(e).__name__}: {e}", int(Exit.INTERNAL))
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
