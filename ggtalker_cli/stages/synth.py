"""`ggtalker synth AVATAR_DIR --audio speech.wav -o out.mp4`: speech in, a talking video out.

audio → whisper features → A2E expressions (stream.Expressions, equal to `a2e.predict`) →
head landmarks (`HeadModel.drive`) → Gaussian head render → body inpainter over a replayed
body frame → H.264 with the speech muxed in sync.

- **Expressions** come from the avatar's adapted A2E (`a2e.safetensors`) or `--a2e` (a prior).
  Audio is consumed in chunks and frames are rendered as soon as they are final, in batch and
  `--stream` mode alike (same code, same frames); memory is flat in the audio's length.
- **Eyes**: the A2E predicts a conditional mean, in which blinks average away. The eye and brow
  blendshapes therefore come from the replayed training frame's own tracking: the clip's real
  blinks and gaze, at its real blink rate, in step with the replayed head motion.
- **Body and pose**: the clip's training frames played forward and backward (ping-pong), so any
  audio length works, each with its refined head pose (`synthesis/track.npz`); or a pose file
  (`--pose`); turned by `--yaw/--pitch` and a sinusoidal `--orbit` for novel views.
- **Output** (`synth_io.Output`): frames stream into the H.264 encoder while the audio is kept
  in a temp wav; the speech is muxed in at the end into a hidden temp renamed onto the target,
  so an interrupted run never leaves a corrupt mp4 there, and nothing but the target is ever
  written. `-o -` writes raw rgb24 frames to stdout; `-o x.npz` the expressions alone, with a
  mouth-opening plot beside it (`synth_io.write_expressions`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import a2e, artifacts, console, live, synth_io
from ..config import Config, load_config
from ..device import device_name, device_of
from ..errors import Exit, GGError
from ..stream import Expressions, Frames
from ..synthesis import Synthesizer, load_a2e, read_pose_file


def run(
    avatar_dir: Path,
    audio_source: str,
    out: str,
    *,
    a2e_path: Path | None = None,
    clip: Path | None = None,
    pose: Path | None = None,
    yaw: float = 0.0,
    pitch: float = 0.0,
    orbit: float = 0.0,
    background: str | None = None,
    size: int | None = None,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    crf: int | None = None,
    device: str = "auto",
    stream: bool = False,
    whisper: str | None = None,
    force: bool = False,
    latency: float | None = None,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """cfg: the `synth` settings (default: the default preset's); `crf` overrides synth.crf."""
    conf = cfg or load_config()
    sc = conf.synth
    crf = sc.crf if crf is None else crf
    out = str(out)
    synth_io.check_target(out, force)
    if audio_source == "-" and not stream:
        raise GGError("--audio - (stdin) needs --stream", Exit.USAGE)
    if latency is not None and not stream:
        raise GGError("--latency needs --stream (it is the low-latency streaming mode)", Exit.USAGE)
    raw = live.raw_source(audio_source) if latency is not None else None  # live PCM: stdin, unix:PATH, a FIFO
    if raw is not None and (start or end is not None):
        raise GGError("--start/--end cut a file; live PCM input (stdin, unix:, a FIFO) is taken as it comes", Exit.USAGE)
    if start < 0 or (end is not None and end <= start):
        raise GGError(f"--start {start} / --end {end}: need 0 ≤ start < end (seconds of the audio)", Exit.USAGE)
    if not 0 <= crf <= 51:
        raise GGError(f"--crf {crf}: x264 takes 0 (lossless) to 51", Exit.USAGE)
    if raw is None and audio_source != "-" and not Path(audio_source).is_file():
        raise GGError(f"{audio_source}: no such audio file; check --audio", Exit.INPUT_MISSING)
    dev = device_of(device)
    artifacts.read_meta(Path(avatar_dir), "avatar")  # format check first: the clearest error for a foreign folder
    state, a2e_source = load_a2e(Path(avatar_dir), a2e_path)
    expr_only = out.endswith(".npz")
    synth = None if expr_only else Synthesizer(Path(avatar_dir), dev, size, clip, background, cfg=sc)
    fps = float(fps or (synth.clip.fps if synth else artifacts.read_meta(Path(avatar_dir), "avatar").get("synthesis", {}).get("fps", 25.0)))
    if fps <= 0 or fps > 120:
        raise GGError(f"--fps {fps}: use a rate in (0, 120]", Exit.USAGE)
    pose_track = read_pose_file(pose) if pose is not None else None
    clock = None if latency is None else live.Clock(fps)  # live mode: every frame's latency measured (live.py)
    if clock is None:
        expressions = Expressions(state, fps, whisper, device=dev.type)
    else:
        expressions = live.LiveExpressions(state, fps, latency, conf.live, whisper, device=dev.type)
    chunks, seconds = synth_io.speech(audio_source, start, end, stream=stream, raw=raw, live_mode=clock is not None, chunk_s=sc.chunk_s)
    total = None if seconds is None else math.ceil(seconds * fps)
    if total is not None and synth is not None and out != "-":  # an mp4 of known length
        artifacts.check_disk_space(Path(out), synth_io.mp4_need(total, synth.size, seconds))
    timings: dict[str, float] = {}
    kept: list[Frames] = []
    output = None
    tic = time.perf_counter()
    try:
        with synth_io.sigterm_as_interrupt(), console.progress() as bar:
            output = synth_io.Output(out, fps, synth.size if synth else 0, crf)
            task = bar.add_task("synth", total=total)

            def emit(group: Frames) -> None:
                if not len(group):
                    return
                if expr_only:
                    kept.append(group)
                else:
                    idx = np.arange(group.start, group.start + len(group))
                    bodies = synth.bodies(idx, fps)
                    poses = synth.poses(idx, bodies, fps, pose_track, yaw, pitch, orbit)
                    for image in synth.frames(synth.with_eyes(group.blendshapes, bodies), poses, bodies, timings=timings):
                        output.write(image)
                        bar.advance(task)
                    output.flush()
                if clock is not None:
                    clock.shown(group.start, len(group))
                done = group.start + len(group)
                wall = time.perf_counter() - tic
                bar.update(task, completed=done, status=f"{done / fps / max(wall, 1e-9):.2f}× real time")

            if clock is not None and synth is not None:  # one frame now: the first live ones must not pay for kernel set-up
                first = synth.bodies(np.zeros(1, int), fps)
                list(synth.frames(synth.with_eyes(np.zeros((1, a2e.N_BLENDSHAPES)), first), synth.poses(np.zeros(1, int), first, fps), first))
            if clock is not None:  # models loaded and warm: a producer may start speaking now
                console.info(f"live: ready for audio from {audio_source} (latency budget {expressions.latency_s:.2f} s of audio + compute)")
            for chunk in chunks if clock is None else live.Source(chunks, clock):
                output.audio(chunk)
                emit(expressions.push(chunk))
            emit(expressions.finish())
            output.close()
    except BaseException:
        if output is not None:
            output.cleanup()
        raise
    finally:
        if synth is not None:
            synth.close()
    wall = time.perf_counter() - tic
    n = expressions.n_out
    summary: dict[str, Any] = {
        "output": out,
        "frames": n,
        "duration_s": round(expressions.seconds, 3),
        "fps": fps,
        "fps_achieved": round(n / wall, 2),
        "realtime_factor": round(expressions.seconds / wall, 3),
        "device": device_name(dev),
        "a2e": a2e_source,
        "stream": stream,
    }
    if stream:
        summary["latency_s"] = round(expressions.latency_s, 2)
    if clock is not None:
        summary.update(clock.summary())
    if expr_only:
        if synth_io.write_expressions(Path(out), kept, fps, audio_source, a2e_source, start, end):
            summary["plot"] = str(Path(out).with_suffix(".png"))
    else:
        summary.update(size=synth.size, body=synth.body.kind,
                       ms_per_frame={k: round(1000 * v / max(n, 1), 3) for k, v in timings.items()})
    return summary
