"""synth's input and output: speech sources, the output target, and the expressions file.

In: `file_samples` (a whole file, cut to --start/--end), `stream_chunks` (a file or stdin
decoded as it arrives), `speech` (which of those, or live PCM, a verb mode reads). Out:
`check_target` refuses an unusable -o before any work; `Output` takes frames to an mp4 (video
temp + wav temp, muxed and renamed onto the target at the end), raw rgb24 on stdout, or nowhere
(expressions only), so an interrupted run never leaves a corrupt mp4 and nothing but the target
is ever written; `write_expressions` writes `-o x.npz` and its mouth-opening plot.
`sigterm_as_interrupt` makes SIGTERM unwind like Ctrl-C, so the temps are removed.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import sys
import tempfile
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import a2e, audio, console, live, media
from .artifacts import atomic_write_bytes
from .config import SynthConfig
from .errors import Exit, GGError
from .stream import Frames
from .synthesis import read_audio

ENCODE_QUEUE = 4 * SynthConfig.batch  # frames waiting for the encoder thread


def file_samples(path: Path, start: float, end: float | None) -> np.ndarray:
    """A whole file decoded (audio.load_audio checks it) and cut to [start, end) seconds."""
    samples = read_audio(path)
    a = round(start * audio.SAMPLE_RATE)
    b = len(samples) if end is None else min(len(samples), round(end * audio.SAMPLE_RATE))
    if b - a < audio.MIN_SECONDS * audio.SAMPLE_RATE:
        raise GGError(f"{path}: {max(b - a, 0) / audio.SAMPLE_RATE:.2f} s of audio in --start/--end; "
                      f"at least {audio.MIN_SECONDS} s is needed", Exit.INPUT_INVALID)
    return samples[a:b]


def stream_chunks(source: str, start: float, end: float | None) -> Iterator[np.ndarray]:
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


def speech(source: str, start: float, end: float | None, *, stream: bool, raw: Iterator[np.ndarray] | None, live_mode: bool,
           chunk_s: float) -> tuple[Iterator[np.ndarray], float | None]:
    """The speech a run reads, as chunks of samples: live (`live_mode`: live PCM `raw` as it
    comes, else the file at real-time pace), streamed (decoded as it arrives), or a whole file
    cut in `chunk_s` pieces. -> (chunks, seconds of audio when known in advance)."""
    if live_mode:
        return raw or live.paced(file_samples(Path(source), start, end)), None
    if stream:
        return stream_chunks(source, start, end), None
    samples = file_samples(Path(source), start, end)
    step = int(chunk_s * audio.SAMPLE_RATE)
    return (samples[i : i + step] for i in range(0, len(samples), step)), len(samples) / audio.SAMPLE_RATE


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


class Output:
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


def mp4_need(frames: int, size: int, seconds: float) -> int:
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
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so temps are removed and the target is never half-written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_expressions(path: Path, groups: list[Frames], fps: float, source: str, a2e_source: str, start: float, end: float | None) -> bool:
    """expressions.npz (blendshapes, mouth, mouth_open, fps) + the mouth-opening plot (a2e.plot_mouth,
    which reads the audio file itself: made for a whole file, not for stdin or a cut); -> plotted."""
    import io

    bs = np.concatenate([g.blendshapes for g in groups])
    mouth = np.concatenate([g.mouth for g in groups])
    opening = np.concatenate([g.mouth_open for g in groups])
    buffer = io.BytesIO()
    np.savez(buffer, blendshapes=bs, mouth=mouth, mouth_open=opening, fps=np.float32(fps), mouth_landmarks=np.asarray(a2e.MOUTH),
             audio=np.str_(source), a2e=np.str_(a2e_source), start_s=np.float32(start))
    atomic_write_bytes(path, buffer.getvalue())
    if source == "-" or start != 0 or end is not None:
        return False
    a2e.plot_mouth(path.with_suffix(".png"), source, opening, fps)
    return True
