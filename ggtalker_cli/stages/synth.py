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
- **Output**: frames stream into the H.264 encoder (media.VideoWriter, video only) while the
  audio is kept in a temp wav; the speech is muxed in at the end into a hidden temp file renamed
  onto the target, so an interrupted run never leaves a corrupt mp4 there. Nothing but the
  target is ever written: the temps are fresh names made exclusively, and removed. `-o -` writes raw rgb24 frames to stdout;
  `-o x.npz` writes the expressions alone, with a mouth-opening plot beside it.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .. import a2e, artifacts, audio, console, live, media
from ..config import Config, SynthConfig, load_config
from ..device import device_name, device_of
from ..errors import Exit, GGError
from ..stream import Expressions, Frames
from ..synthesis import Synthesizer, load_a2e, read_audio, read_pose_file

ENCODE_QUEUE = 4 * SynthConfig.batch  # frames waiting for the encoder thread


# ---------------------------------------------------------------------------------------------
# audio in


def _file_samples(path: Path, start: float, end: float | None) -> np.ndarray:
    """A whole file decoded (audio.load_audio checks it) and cut to [start, end) seconds."""
    samples = read_audio(path)
    a = round(start * audio.SAMPLE_RATE)
    b = len(samples) if end is None else min(len(samples), round(end * audio.SAMPLE_RATE))
    if b - a < audio.MIN_SECONDS * audio.SAMPLE_RATE:
        raise GGError(f"{path}: {max(b - a, 0) / audio.SAMPLE_RATE:.2f} s of audio in --start/--end; "
                      f"at least {audio.MIN_SECONDS} s is needed", Exit.INPUT_INVALID)
    return samples[a:b]


def _stream_chunks(source: str, start: float, end: float | None) -> Iterator[np.ndarray]:
    """Audio from a file or stdin ('-') decoded as it arrives (media.audio_chunks), cut to [start, end)."""
    if source != "-" and not Path(source).is_file():
        raise GGError(f"{source}: no such audio file; check the path", Exit.INPUT_MISSING)
    skip = round(start * audio.SAMPLE_RATE)
    left = math.inf if end is None else round((end - start) * audio.SAMPLE_RATE)
    blocks = media.audio_chunks(sys.stdin.buffer if source == "-" else Path(source), "stdin" if source == "-" else source)
    try:
        for x in blocks:
            if skip:
                cut = min(skip, len(x))
                x, skip = x[cut:], skip - cut
            x = x[: int(min(left, len(x)))]
            left -= len(x)
            if len(x):
                yield x
            if left <= 0:
                break
    finally:
        blocks.close()


# ---------------------------------------------------------------------------------------------
# output


def _fresh_sibling(path: Path, suffix: str) -> Path:
    """A new hidden file beside `path`, created exclusively (O_EXCL: never a file that was already
    there) with the umask's permissions, so the mp4 renamed from it reads like any other file."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue


class _Output:
    """Where frames go: an mp4 (video temp + wav temp, muxed and renamed at the end), raw rgb24
    on stdout, or nowhere (expressions only). Temps are hidden siblings of the target."""

    def __init__(self, target: str, fps: float, size: int, crf: int):
        self.target, self.fps, self.size, self.crf = target, fps, size, crf
        self.kind = "raw" if target == "-" else "npz" if target.endswith(".npz") else "video"
        self.frames = 0
        self.temps: list[Path] = []
        self.writer = self.wav = self.behind = None
        if self.kind == "video":
            path = Path(target)
            self.temps = [_fresh_sibling(path, suffix) for suffix in (".video.mp4", ".audio.wav", ".tmp.mp4")]
            self.video_tmp, self.wav_tmp, self.final_tmp = self.temps
            try:
                self.writer = media.open_writer(self.video_tmp, fps, size, size, crf=crf)
                self.wav = wave.open(str(self.wav_tmp), "wb")
            except BaseException:
                self.cleanup()
                raise
            self.wav.setnchannels(1)
            self.wav.setsampwidth(2)
            self.wav.setframerate(audio.SAMPLE_RATE)
        self.behind = None if self.kind == "npz" else media.Behind(self._write, ENCODE_QUEUE)

    def audio(self, samples: np.ndarray) -> None:
        if self.wav is not None:
            self.wav.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())

    def write(self, frame: np.ndarray) -> None:
        """Queue one frame for the encoder thread (`_write`)."""
        if self.behind is not None:
            self.behind.put(frame)
        self.frames += 1

    def _write(self, frame: np.ndarray) -> None:
        if self.kind == "video":
            self.writer.write(frame)
            return
        try:
            sys.stdout.buffer.write(frame.tobytes())
        except BrokenPipeError as e:
            raise GGError("stdout closed by the reader; raw frames stopped", Exit.OUTPUT) from e

    def flush(self) -> None:
        """Raw frames so far reach the reader now (streaming): wait for the queue, then flush stdout."""
        if self.kind == "raw":
            self.behind.drain()
            sys.stdout.buffer.flush()

    def close(self) -> None:
        """Finish the mp4: drain the encoder thread, close the encoder, mux the speech, rename onto the target."""
        if self.behind is not None:
            self.behind.close()
            self.behind = None
        if self.kind != "video":
            if self.kind == "raw":
                sys.stdout.buffer.flush()
            return
        self.wav.close()
        self.wav = None
        self.writer.close()
        self.writer = None
        media.mux(self.video_tmp, self.wav_tmp, self.final_tmp)
        os.replace(self.final_tmp, Path(self.target))  # the named output (checked free, or --force)
        self.cleanup()

    def cleanup(self) -> None:
        if self.behind is not None:
            self.behind.abandon()
            self.behind = None
        if self.wav is not None:
            self.wav.close()
        if self.writer is not None:
            self.writer.__exit__(KeyboardInterrupt, None, None)  # kills the encoder, removes its file
        for p in self.temps:
            p.unlink(missing_ok=True)


def _mp4_need(frames: int, size: int, seconds: float) -> int:
    """Bytes an mp4 needs while it is made, generously: H.264 at CRF 18 (counted as 0.1 B/px),
    held twice (the video temp and the muxed copy), plus the 16 kHz 16-bit wav temp."""
    return int(2 * frames * 0.1 * size**2 + seconds * 32_000)


def check_target(target: str, force: bool) -> None:
    """Refuse an unusable -o before any work: existing (without --force), a folder, unwritable."""
    if target == "-":
        if console._state["json"]:
            raise GGError("-o - writes raw frames to stdout, where --json would also go; drop --json", Exit.USAGE)
        return
    path = Path(target)
    if path.suffix.lower() not in (".mp4", ".mov", ".mkv", ".npz"):
        raise GGError(f"{path}: unknown output type; use .mp4 (video), .npz (expressions only) or - (raw rgb24 frames)", Exit.USAGE)
    plot = path.with_suffix(".png")
    if path.suffix.lower() == ".npz" and plot.exists():  # --force names the .npz only, never its side-car
        raise GGError(f"{plot}: already exists, and synth writes the mouth-opening plot of {path.name} there; move it or choose another -o", Exit.OUTPUT)
    if path.is_dir():
        raise GGError(f"{path}: is a folder; pass a file path for -o", Exit.OUTPUT)
    if path.exists() and not force:
        raise GGError(f"{path}: output already exists; pass --force to replace it", Exit.OUTPUT)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise GGError(f"{parent}: output folder does not exist; create it or choose another -o", Exit.OUTPUT)
    try:  # os.access says yes to root everywhere; only a real file says whether it can be written
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise GGError(f"{parent}: cannot write files there ({e.strerror}); choose a writable -o", Exit.OUTPUT) from e


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so temps are removed and the target is never half-written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# the stage


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
    check_target(out, force)
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
    if clock is not None:  # fed at the pace it arrives: a file at real-time pace, PCM as it comes
        chunks, total = raw or live.paced(_file_samples(Path(audio_source), start, end)), None
    elif stream:
        chunks, total = _stream_chunks(audio_source, start, end), None
    else:
        samples = _file_samples(Path(audio_source), start, end)
        step = int(sc.chunk_s * audio.SAMPLE_RATE)
        chunks, total = (samples[i : i + step] for i in range(0, len(samples), step)), math.ceil(len(samples) / audio.SAMPLE_RATE * fps)
        if synth is not None and out != "-":  # an mp4 of known length
            artifacts.check_disk_space(Path(out), _mp4_need(total, synth.size, len(samples) / audio.SAMPLE_RATE))
    timings: dict[str, float] = {}
    kept: list[Frames] = []
    output = None
    tic = time.perf_counter()
    try:
        with _sigterm_as_interrupt(), console.progress() as bar:
            output = _Output(out, fps, synth.size if synth else 0, crf)
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
        if _write_expressions(Path(out), kept, fps, audio_source, a2e_source, start, end):
            summary["plot"] = str(Path(out).with_suffix(".png"))
    else:
        summary.update(size=synth.size, body=synth.body.kind,
                       ms_per_frame={k: round(1000 * v / max(n, 1), 3) for k, v in timings.items()})
    return summary


def _write_expressions(path: Path, groups: list[Frames], fps: float, source: str, a2e_source: str, start: float, end: float | None) -> bool:
    """expressions.npz (blendshapes, mouth, mouth_open, fps) + the mouth-opening plot (a2e.plot_mouth,
    which reads the audio file itself: made for a whole file, not for stdin or a cut); -> plotted."""
    import io

    bs = np.concatenate([g.blendshapes for g in groups])
    mouth = np.concatenate([g.mouth for g in groups])
    opening = np.concatenate([g.mouth_open for g in groups])
    buffer = io.BytesIO()
    np.savez(buffer, blendshapes=bs, mouth=mouth, mouth_open=opening, fps=np.float32(fps), mouth_landmarks=np.asarray(a2e.MOUTH),
             audio=np.str_(source), a2e=np.str_(a2e_source), start_s=np.float32(start))
    artifacts.atomic_write_bytes(path, buffer.getvalue())
    if source == "-" or start != 0 or end is not None:
        return False
    a2e.plot_mouth(path.with_suffix(".png"), source, opening, fps)
    return True
