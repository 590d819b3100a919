"""Video and audio I/O through the system ffmpeg (ffmpeg-python): probe, decode, extract, encode.

Frames are streamed through a pipe one at a time, so a long video never sits in memory.
ffmpeg applies the container's rotation metadata while decoding (its default), so every frame
we see is upright and `Probe.width/height` are the upright size.
"""

from __future__ import annotations

import queue
import shutil
import threading
import wave
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from .errors import Exit, GGError

AUDIO_RATE = 16000  # every clip's audio.wav: 16 kHz mono PCM (whisper's input rate)


@dataclass
class Probe:
    """What the container says about a video, after rotation."""

    path: str
    container: str
    codec: str
    width: int  # upright (rotation applied)
    height: int
    rotation: int  # degrees, as stored in the file (display matrix or `rotate` tag)
    fps_nominal: float  # r_frame_rate: the timebase-derived "real" rate
    fps_average: float  # avg_frame_rate: frames / duration
    vfr: bool  # nominal and average rates disagree beyond the tolerance
    duration: float  # seconds (video stream, else container)
    n_frames: int | None  # as stored, when the container says
    audio_codec: str | None  # None: no audio stream
    audio_rate: int | None
    audio_channels: int | None
    audio_start: float  # audio start minus the container's start (the decode origin), seconds

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(text: str | None) -> float:
    try:
        value = float(Fraction(text or "0/1"))
    except (ValueError, ZeroDivisionError):
        return 0.0
    return value


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(round(float(side["rotation"]))) % 360
    return int(stream.get("tags", {}).get("rotate", 0)) % 360


def probe(path: Path, vfr_tolerance: float = 0.02) -> Probe:
    """Read container metadata with ffprobe; a file ffprobe cannot parse is INPUT_INVALID."""
    path = Path(path)
    if not path.exists():
        raise GGError(f"{path}: no such file; check the path", Exit.INPUT_MISSING)
    if not path.is_file():
        raise GGError(f"{path}: not a file; pass a video file", Exit.INPUT_MISSING)
    if path.stat().st_size == 0:
        raise GGError(f"{path}: file is empty; pass a video file", Exit.INPUT_INVALID)
    try:
        info = ffmpeg.probe(str(path))
    except ffmpeg.Error as e:
        last = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        why = last[-1].split(": ")[-1] if last else "unreadable"
        raise GGError(f"{path}: not a readable media file ({why}); pass an mp4/mov/mkv/webm video", Exit.INPUT_INVALID) from e
    except FileNotFoundError as e:
        raise GGError("ffprobe not found; install ffmpeg (apt-get install -y ffmpeg)", Exit.RESOURCE) from e
    streams = info.get("streams", [])
    video = [s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not video:
        kind = "an audio-only file" if audio else "no video stream"
        raise GGError(f"{path}: {kind}; pass a video of the person talking", Exit.INPUT_INVALID)
    v = video[0]
    a = audio[0] if audio else None
    rotation = _rotation(v)
    w, h = int(v["width"]), int(v["height"])
    if rotation in (90, 270):
        w, h = h, w
    nominal, average = _rate(v.get("r_frame_rate")), _rate(v.get("avg_frame_rate"))
    duration = float(v.get("duration") or info.get("format", {}).get("duration") or 0.0)
    vfr = nominal > 0 and average > 0 and abs(nominal - average) / nominal > vfr_tolerance
    # decode() resamples from the container's start (the fps filter fills a late video start by
    # repeating the first frame), so audio is aligned to that same origin, not to the video's.
    origin = float(info.get("format", {}).get("start_time") or 0.0)
    return Probe(
        path=str(path),
        container=info.get("format", {}).get("format_name", "?"),
        codec=v.get("codec_name", "?"),
        width=w,
        height=h,
        rotation=rotation,
        fps_nominal=nominal,
        fps_average=average or nominal,
        vfr=vfr,
        duration=duration,
        n_frames=int(v["nb_frames"]) if str(v.get("nb_frames", "")).isdigit() else None,
        audio_codec=a.get("codec_name") if a else None,
        audio_rate=int(a["sample_rate"]) if a and a.get("sample_rate") else None,
        audio_channels=int(a["channels"]) if a and a.get("channels") else None,
        audio_start=(float(a.get("start_time") or 0.0) - origin) if a else 0.0,
    )


class _Stderr:
    """Drain a process's stderr in a thread (a full pipe would stall ffmpeg), keep the tail."""

    def __init__(self, stream) -> None:
        self.lines: deque[str] = deque(maxlen=20)
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self.lines.append(line.decode(errors="replace").rstrip())

    def last(self) -> str:
        self._thread.join(timeout=5)
        return self.lines[-1] if self.lines else "no message"


def decode(path: Path, fps: float, width: int, height: int) -> Iterator[np.ndarray]:
    """Yield upright RGB uint8 frames (height, width, 3) at a constant `fps`, one at a time.

    ffmpeg's `fps` filter resamples by timestamps (duplicating or dropping frames), which turns
    variable-frame-rate input into a constant rate without drifting off the audio. (width,
    height) is the output size: the probe's upright size, or a smaller one to track faster.
    """
    stream = ffmpeg.input(str(path)).video.filter("fps", fps=fps).filter("scale", width, height, flags="area")
    proc = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24").global_args("-nostdin", "-loglevel", "error").run_async(
        pipe_stdout=True, pipe_stderr=True
    )
    errors = _Stderr(proc.stderr)
    size = width * height * 3
    try:
        while True:
            buf = proc.stdout.read(size)
            if len(buf) < size:
                break
            yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
    if code != 0:
        raise GGError(f"{path}: video decoding failed ({errors.last()}); the file may be corrupt, re-export it", Exit.INPUT_INVALID)


def extract_audio(path: Path, out: Path, n_samples: int, offset_s: float = 0.0) -> dict:
    """Write `out` as 16 kHz mono s16 PCM of exactly `n_samples` samples, aligned to the video.

    `offset_s` is the audio start relative to the first video frame: positive pads silence in
    front, negative drops the lead-in. The tail is padded or trimmed so the wav lasts exactly as
    long as the frames (the clip contract: one frame's audio per frame).
    """
    try:
        raw, _ = (
            ffmpeg.input(str(path))
            .audio.output("pipe:", format="s16le", ac=1, ar=AUDIO_RATE)
            .global_args("-nostdin", "-loglevel", "error")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as e:
        last = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise GGError(f"{path}: audio decoding failed ({last[-1] if last else 'no message'}); re-export the file", Exit.INPUT_INVALID) from e
    pcm = np.frombuffer(raw, np.int16)
    decoded = len(pcm)
    shift = int(round(offset_s * AUDIO_RATE))
    pcm = np.concatenate([np.zeros(shift, np.int16), pcm]) if shift > 0 else pcm[-shift:]
    pcm = np.pad(pcm[:n_samples], (0, max(0, n_samples - len(pcm))))
    write_wav(out, pcm)
    return {"decoded_s": decoded / AUDIO_RATE, "written_s": n_samples / AUDIO_RATE, "offset_s": offset_s}


def write_wav(path: Path, pcm: np.ndarray, rate: int = AUDIO_RATE) -> None:
    """Mono s16 wav (pcm int16, or float in [-1, 1])."""
    if pcm.dtype != np.int16:
        pcm = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A mono s16 wav (as written by this module) as float32 in [-1, 1] and its rate."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise GGError(f"{path}: expected 16-bit mono wav; re-create it with ggtalker", Exit.ARTIFACT)
        data = np.frombuffer(w.readframes(w.getnframes()), np.int16)
        return data.astype(np.float32) / 32768.0, w.getframerate()


class VideoWriter:
    """Encode RGB frames to H.264 (yuv420p, plays everywhere) and mux an optional wav.

    Use as a context manager; frames go through a pipe, so memory stays flat. On an exception
    inside the block the partial file is removed.
    """

    def __init__(self, path: Path, fps: float, width: int, height: int, audio: Path | None = None, crf: int = 18):
        self.path = Path(path)
        self.width, self.height = width, height
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps)
        streams = [video]
        if audio is not None:
            streams.append(ffmpeg.input(str(audio)).audio)
        args = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": "veryfast", "movflags": "+faststart"}
        if audio is not None:
            args.update(acodec="aac", audio_bitrate="128k", shortest=None)
        self._proc = (
            ffmpeg.output(*streams, str(self.path), **args)
            .overwrite_output()
            .global_args("-nostdin", "-loglevel", "error")
            .run_async(pipe_stdin=True, pipe_stderr=True)
        )
        self._errors = _Stderr(self._proc.stderr)
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """One frame, (height, width, 3) uint8 RGB, or float in [0, 1]."""
        if frame.dtype != np.uint8:
            frame = (np.clip(frame, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(f"frame shape {frame.shape} != {(self.height, self.width, 3)}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError as e:
            raise GGError(f"{self.path}: video encoding failed ({self._errors.last()})", Exit.OUTPUT) from e
        self.frames += 1

    def close(self) -> None:
        self._proc.stdin.close()
        if self._proc.wait() != 0:
            raise GGError(f"{self.path}: video encoding failed ({self._errors.last()}); check disk space and the output path", Exit.OUTPUT)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
            return
        self._proc.stdin.close()
        self._proc.kill()
        self._proc.wait()
        self.path.unlink(missing_ok=True)


class OpenCVWriter:
    """Video-only fallback where no ffmpeg binary exists (the GPU machines): OpenCV's MPEG-4
    Part 2 encoder. Larger and lossier than H.264, so meant for previews, never for scoring."""

    def __init__(self, path: Path, fps: float, width: int, height: int):
        import cv2

        self.path, self.width, self.height, self.frames = Path(path), width, height, 0
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not self._writer.isOpened():
            raise GGError(f"{self.path}: OpenCV cannot write this video (no ffmpeg either); install ffmpeg", Exit.OUTPUT)

    def write(self, frame: np.ndarray) -> None:
        if frame.dtype != np.uint8:
            frame = (np.clip(frame, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(f"frame shape {frame.shape} != {(self.height, self.width, 3)}")
        self._writer.write(np.ascontiguousarray(frame[..., ::-1]))
        self.frames += 1

    def close(self) -> None:
        self._writer.release()

    def __enter__(self) -> OpenCVWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close()
        if kind is not None:
            self.path.unlink(missing_ok=True)


class Behind:
    """Calls `write(frame)` in a thread behind a bounded queue, so encoding (x264 through a pipe,
    OpenCV, stdout) overlaps rendering the next batch instead of following it. A failure in
    the thread surfaces at the next `put` or at `close`."""

    def __init__(self, write: Callable[[np.ndarray], None], depth: int):
        self._write, self._error, self._drop = write, None, False
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (frame := self._queue.get()) is not None:
            if self._error is None and not self._drop:
                try:
                    self._write(frame)
                except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
                    self._error = e
            self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, frame: np.ndarray) -> None:
        self._raise()
        self._queue.put(frame)

    def drain(self) -> None:
        """Wait until every queued frame is written; re-raise the thread's failure."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Drain, then end the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop without writing what is queued (the output is being thrown away)."""
        self._drop = True
        try:
            self._queue.put(None, timeout=10)
        except queue.Full:  # the thread is stuck in a write; it is a daemon and dies with us
            return
        self._thread.join(timeout=10)


def has_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


def open_writer(path: Path, fps: float, width: int, height: int, audio: Path | None = None, crf: int = 18) -> VideoWriter | OpenCVWriter:
    """`with open_writer("out.mp4", 25, 512, 512, audio="a.wav") as w: w.write(frame)`.

    Without an ffmpeg binary a video-only OpenCV writer stands in (audio needs ffmpeg to mux).
    """
    if has_ffmpeg():
        return VideoWriter(path, fps, width, height, audio, crf)
    if audio is not None:
        raise GGError(f"{path}: muxing audio needs ffmpeg, which is not installed; install it (apt-get install -y ffmpeg)", Exit.RESOURCE)
    return OpenCVWriter(path, fps, width, height)


def mux(video: Path, audio: Path, out: Path) -> None:
    """Copy the video stream of `video` and encode `audio` (AAC) beside it into `out`.

    The two start together at t = 0, which is what keeps a synthesised video in sync with its
    speech; a video written while the audio was still arriving gets its sound this way.
    """
    streams = [ffmpeg.input(str(video)).video, ffmpeg.input(str(audio)).audio]
    try:
        ffmpeg.output(*streams, str(out), vcodec="copy", acodec="aac", audio_bitrate="128k", movflags="+faststart").overwrite_output().global_args(
            "-nostdin", "-loglevel", "error"
        ).run(capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        last = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise GGError(f"{out}: muxing audio failed ({last[-1] if last else 'no message'}); check disk space and the output path", Exit.OUTPUT) from e

