"""Video and audio I/O in process through FFmpeg's own libraries (PyAV): probe, decode, extract, encode, mux.

Why PyAV: its wheels ship FFmpeg's libraries (H.264 through libx264, AAC, every demuxer), so
`pip install` is the whole set-up and no ffmpeg/ffprobe binary is needed: a bare machine, a GPU
box or CI reads and writes video the same way. Timestamps, rotation and stream metadata come
from libavformat itself rather than from a parsed ffprobe report, and frames never cross a
pipe. bench/media_io.py measures it against the ffmpeg command line (bench/results/media_io.json).

Frames are decoded one at a time, so a long video never sits in memory. The display matrix is
applied here, as the ffmpeg command line's autorotate does, so every frame we yield is upright
and `Probe.width/height` are the upright size.
"""

from __future__ import annotations

import math
import queue
import threading
import wave
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import Exit, GGError

try:
    import av
except ImportError:  # only files need it: raw PCM in, raw frames out (`synth --stream --latency`) runs without it
    av = None


def _require_av() -> None:
    """A clear error where a media file is actually read or written on a machine without PyAV."""
    if av is None:
        raise GGError("PyAV is not installed (every video and audio file is read and written through it); pip install av", Exit.RESOURCE)

AUDIO_RATE = 16000  # every clip's audio.wav: 16 kHz mono PCM (whisper's input rate)
AUDIO_BITRATE = 128_000  # AAC in every mp4 we write
VIDEO_FORMATS = "an mp4/mov/mkv/webm video"


@dataclass
class Probe:
    """What the container says about a video, after rotation."""

    path: str
    container: str
    codec: str
    width: int  # upright (rotation applied)
    height: int
    rotation: int  # degrees counter-clockwise, as stored in the file (display matrix or `rotate` tag)
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


def _why(e: BaseException) -> str:
    """FFmpeg's own reason, without PyAV's errno and file name decoration."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _open(path: Path, fix: str, unreadable: str = "not a readable media file", noun: str = "a video file") -> av.container.InputContainer:
    """Open a media file for reading; a missing, empty or unparsable one is a one-line GGError."""
    _require_av()
    path = Path(path)
    if not path.exists():
        raise GGError(f"{path}: no such file; check the path", Exit.INPUT_MISSING)
    if not path.is_file():
        raise GGError(f"{path}: not a file; pass {noun}", Exit.INPUT_MISSING)
    if path.stat().st_size == 0:
        raise GGError(f"{path}: file is empty; pass {noun}", Exit.INPUT_INVALID)
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise GGError(f"{path}: {unreadable} ({_why(e)}); pass {fix}", Exit.INPUT_INVALID) from e


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first real video stream (cover art in an m4a/mp3 is an 'attached picture', not video)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _origin(container: av.container.InputContainer) -> Fraction:
    """The container's start time (libavformat's AV_TIME_BASE microseconds): t = 0 of decode()."""
    return Fraction(container.start_time or 0, av.time_base)


def _first_rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Rotation of the first decodable frame (the decoder attaches the stream's display matrix)."""
    try:
        for frame in container.decode(stream):
            return round(frame.rotation) % 360
    except av.FFmpegError:
        pass  # an undecodable stream is decode()'s error to report, with its frame position
    return 0


def probe(path: Path, vfr_tolerance: float = 0.02) -> Probe:
    """Read container metadata; a file FFmpeg cannot parse is INPUT_INVALID."""
    path = Path(path)
    with _open(path, VIDEO_FORMATS) as container:
        v, a = _video_stream(container), next(iter(container.streams.audio), None)
        if v is None:
            kind = "an audio-only file" if a is not None else "no video stream"
            raise GGError(f"{path}: {kind}; pass a video of the person talking", Exit.INPUT_INVALID)
        nominal = float(v.base_rate or v.guessed_rate or 0)
        average = float(v.average_rate or 0)
        duration = _seconds(v.duration, v.time_base) or (container.duration or 0) / av.time_base
        origin = _origin(container)
        # decode() resamples from the container's start (a late video start repeats the first
        # frame), so audio is aligned to that same origin, not to the video's own start.
        audio_start = float(Fraction(a.start_time) * a.time_base - origin) if a is not None and a.start_time is not None else 0.0
        w, h = v.codec_context.width, v.codec_context.height
        info = {"container": container.format.name, "codec": v.codec_context.codec.canonical_name, "n_frames": v.frames or None, "audio_start": audio_start}
        ctx = a.codec_context if a is not None else None
        audio = (ctx.codec.canonical_name, ctx.sample_rate or None, ctx.channels or None) if ctx is not None else (None, None, None)
        rotation = _first_rotation(container, v)
    if rotation in (90, 270):
        w, h = h, w
    return Probe(
        path=str(path),
        width=w,
        height=h,
        rotation=rotation,
        fps_nominal=nominal,
        fps_average=average or nominal,
        vfr=nominal > 0 and average > 0 and abs(nominal - average) / nominal > vfr_tolerance,
        duration=duration,
        audio_codec=audio[0],
        audio_rate=audio[1],
        audio_channels=audio[2],
        **info,
    )


def _slot(t: Fraction, rate: Fraction) -> int:
    """Output frame index of time t: nearest, ties away from zero (FFmpeg's fps filter, round=near)."""
    return math.floor(t * rate + Fraction(1, 2))


def decode(path: Path, fps: float, width: int, height: int) -> Iterator[np.ndarray]:
    """Yield upright RGB uint8 frames (height, width, 3) at a constant `fps`, one at a time.

    Resampling is by timestamps, as FFmpeg's `fps` filter does it: output frame k shows the last
    input frame whose time rounds to k or earlier, so frames are repeated or dropped and
    variable-frame-rate input comes out at a constant rate without drifting off the audio. Time
    0 is the container's start: a video stream that starts late repeats its first frame. A frame
    that will be dropped is never converted to RGB. (width, height) is the output size: the
    probe's upright size, or a smaller one to track faster.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    container = _open(path, VIDEO_FORMATS)
    try:
        stream = _video_stream(container)
        if stream is None:
            raise GGError(f"{path}: no video stream; pass a video of the person talking", Exit.INPUT_INVALID)
        stream.thread_type = "AUTO"  # frame + slice threads: decoding keeps up with two cores
        origin, base = _origin(container), stream.time_base
        held, held_end, emitted = None, 0, 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.pts * base - origin
                slot = _slot(t, rate)
                if held is not None and slot > emitted:
                    image = _rgb(held, width, height)
                    for _ in range(slot - emitted):
                        yield image
                    emitted = slot
                held, held_end = frame, _slot(t + (frame.duration or 0) * base, rate)
        except av.FFmpegError as e:
            raise GGError(f"{path}: video decoding failed ({_why(e)}); the file may be corrupt, re-export it", Exit.INPUT_INVALID) from e
        if held is not None:
            image = _rgb(held, width, height)
            for _ in range(max(held_end, emitted + 1) - emitted):
                yield image
    finally:
        container.close()


def _rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """Scale (area-averaging: ffmpeg's scale flags=area), convert to RGB, then turn upright.
    Read-only: a repeated frame is one array yielded several times."""
    turns = round(frame.rotation) % 360 // 90
    w, h = (height, width) if turns % 2 else (width, height)
    rgb = frame.reformat(w, h, "rgb24", interpolation="AREA", src_color_range=frame.color_range or None).to_ndarray()
    rgb = np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
    rgb.flags.writeable = False
    return rgb


def _audio_blocks(source: Path | BinaryIO, name: str, fmt: str, rate: int) -> Iterator[np.ndarray]:
    """The first audio stream of a file (or a pipe) as mono `fmt` ('s16' or 'flt') at `rate`,
    in blocks as they are decoded. FFmpeg's resampler downmixes and resamples, exactly as the
    command line's `-ac 1 -ar RATE` does, so any container, codec, rate and sample width works."""
    _require_av()
    try:
        if isinstance(source, Path):
            container = _open(source, "a wav, mp3, m4a or video file", "not an audio or video file FFmpeg can read", "an audio file")
        else:
            container = av.open(source, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise GGError(f"{name}: not a readable audio stream ({_why(e)}); pass a wav, mp3 or m4a", Exit.INPUT_INVALID) from e
    try:
        stream = next(iter(container.streams.audio), None)
        if stream is None:
            raise GGError(f"{name}: contains no audio stream; pass a file with speech in it", Exit.INPUT_INVALID)
        resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1)
            for out in resampler.resample(None):
                yield out.to_ndarray().reshape(-1)
        except av.FFmpegError as e:
            raise GGError(f"{name}: audio decoding failed ({_why(e)}); re-encode it, e.g. to wav", Exit.INPUT_INVALID) from e
    finally:
        container.close()


def read_audio(path: Path, rate: int = AUDIO_RATE) -> np.ndarray:
    """All of a file's first audio stream as float32 mono samples in [-1, 1] at `rate`."""
    blocks = list(_audio_blocks(Path(path), str(path), "flt", rate))
    return np.concatenate(blocks).astype(np.float32, copy=False) if blocks else np.zeros(0, np.float32)


def audio_chunks(source: Path | BinaryIO, name: str, rate: int = AUDIO_RATE) -> Iterator[np.ndarray]:
    """Float32 mono samples as they are decoded: from a file, or from a pipe (stdin) while it is still being written."""
    return _audio_blocks(source, name, "flt", rate)


def extract_audio(path: Path, out: Path, n_samples: int, offset_s: float = 0.0) -> dict:
    """Write `out` as 16 kHz mono s16 PCM of exactly `n_samples` samples, aligned to the video.

    `offset_s` is the audio start relative to the first video frame: positive pads silence in
    front, negative drops the lead-in. The tail is padded or trimmed so the wav lasts exactly as
    long as the frames (the clip contract: one frame's audio per frame).
    """
    blocks = list(_audio_blocks(Path(path), str(path), "s16", AUDIO_RATE))
    pcm = np.concatenate(blocks) if blocks else np.zeros(0, np.int16)
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


def video_encoder() -> str:
    """libx264 where this FFmpeg has it (PyAV's wheels do); else FFmpeg's native MPEG-4 Part 2,
    which every FFmpeg build carries (larger and lossier: previews, not scoring)."""
    _require_av()
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class _AudioTrack:
    """An AAC stream in an output container, fed from an audio file in step with the video, so
    the muxer interleaves the two instead of holding all the video until the audio comes."""

    def __init__(self, container: av.container.OutputContainer, source: Path):
        self._container = container
        self._stream = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        self._stream.bit_rate = AUDIO_BITRATE
        self._blocks = _audio_blocks(Path(source), str(source), "flt", AUDIO_RATE)
        self._pending = np.zeros(0, np.float32)
        self._sent = 0

    def feed(self, until_s: float | None) -> None:
        """Encode the audio up to `until_s` seconds (None: all of it)."""
        limit = math.inf if until_s is None else round(until_s * AUDIO_RATE)
        while self._sent < limit:
            if not len(self._pending):
                self._pending = next(self._blocks, None)
                if self._pending is None:
                    self._pending = np.zeros(0, np.float32)
                    return
            take = int(min(len(self._pending), limit - self._sent))
            frame = av.AudioFrame.from_ndarray(self._pending[None, :take].astype(np.float32), format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, self._sent, Fraction(1, AUDIO_RATE)
            self._container.mux(self._stream.encode(frame))
            self._pending, self._sent = self._pending[take:], self._sent + take

    def finish(self, until_s: float | None) -> None:
        self.feed(until_s)
        self._blocks.close()
        self._container.mux(self._stream.encode(None))


class VideoWriter:
    """Encode RGB frames to H.264 (yuv420p, plays everywhere) with an optional audio file muxed
    beside them as AAC, cut to the video's length (ffmpeg's -shortest). `pix_fmt="yuv444p"` and a
    slower `preset` give the near-lossless intermediates bench/staging.py carries to the GPU
    (x264 only: the MPEG-4 fallback stays yuv420p).

    Use as a context manager; frames are encoded as they come, so memory stays flat. On an
    exception inside the block the partial file is removed.
    """

    def __init__(
        self, path: Path, fps: float, width: int, height: int, audio: Path | None = None, crf: int = 18, pix_fmt: str = "yuv420p", preset: str = "veryfast"
    ):
        _require_av()
        self.path = Path(path)
        self.width, self.height, self.frames = width, height, 0
        self.rate = Fraction(fps).limit_denominator(1001)
        try:
            self._out = av.open(str(self.path), "w", options={"movflags": "+faststart"})
        except (av.FFmpegError, ValueError) as e:
            raise GGError(f"{self.path}: cannot write this video ({_why(e)}); use .mp4 or .mkv in a writable folder", Exit.OUTPUT) from e
        try:
            codec = video_encoder()
            options = {"crf": str(crf), "preset": preset} if codec == "libx264" else {"qscale": "3"}
            self._video = self._out.add_stream(codec, rate=self.rate, options=options)
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = pix_fmt if codec == "libx264" else "yuv420p"
            self._video.codec_context.time_base = 1 / self.rate
            self._audio = _AudioTrack(self._out, audio) if audio is not None else None
        except BaseException:
            self._abort()
            raise

    def write(self, frame: np.ndarray) -> None:
        """One frame, (height, width, 3) uint8 RGB, or float in [0, 1]."""
        if frame.dtype != np.uint8:
            frame = (np.clip(frame, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(f"frame shape {frame.shape} != {(self.height, self.width, 3)}")
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        picture.pts, picture.time_base = self.frames, 1 / self.rate
        try:
            self._out.mux(self._video.encode(picture))
            self.frames += 1
            if self._audio is not None:
                self._audio.feed(self.frames / self.rate)
        except av.FFmpegError as e:
            raise GGError(f"{self.path}: video encoding failed ({_why(e)}); check disk space and the output path", Exit.OUTPUT) from e

    def close(self) -> None:
        try:
            self._out.mux(self._video.encode(None))
            if self._audio is not None:
                self._audio.finish(self.frames / self.rate)
            self._out.close()
        except av.FFmpegError as e:
            self._abort()
            raise GGError(f"{self.path}: video encoding failed ({_why(e)}); check disk space and the output path", Exit.OUTPUT) from e

    def _abort(self) -> None:
        """Drop the partial file (this writer created it)."""
        try:
            self._out.close()
        except (av.FFmpegError, OSError, ValueError):
            pass  # the file is being thrown away
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
            return
        self._abort()


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


def open_writer(
    path: Path, fps: float, width: int, height: int, audio: Path | None = None, crf: int = 18, pix_fmt: str = "yuv420p", preset: str = "veryfast"
) -> VideoWriter:
    """`with open_writer("out.mp4", 25, 512, 512, audio="a.wav") as w: w.write(frame)`."""
    return VideoWriter(path, fps, width, height, audio, crf, pix_fmt, preset)


def mux(video: Path, audio: Path, out: Path) -> None:
    """Copy the video stream of `video` and encode `audio` (AAC) beside it into `out`.

    The two start together at t = 0, which is what keeps a synthesised video in sync with its
    speech; a video written while the audio was still arriving gets its sound this way.
    """
    _require_av()
    try:
        with av.open(str(video), metadata_errors="ignore") as src, av.open(str(out), "w", options={"movflags": "+faststart"}) as dst:
            v_in = src.streams.video[0]
            v_out = dst.add_stream_from_template(v_in)
            track = _AudioTrack(dst, audio)
            for packet in src.demux(v_in):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                track.feed(float(packet.dts * v_in.time_base))
                packet.stream = v_out
                dst.mux(packet)
            track.finish(None)
    except av.FFmpegError as e:
        Path(out).unlink(missing_ok=True)
        raise GGError(f"{out}: muxing audio failed ({_why(e)}); check disk space and the output path", Exit.OUTPUT) from e


def backend() -> dict[str, str]:
    """Where our FFmpeg comes from, for `ggtalker doctor`: PyAV's version, the FFmpeg version it
    was built with, and the file its libavcodec was loaded from (the wheel's bundled copy, or a
    system library when PyAV was built from source)."""
    if av is None:
        return {"library": "PyAV not installed (pip install av): no video or audio file can be read or written"}
    loaded = "?"
    try:
        with open("/proc/self/maps") as maps:
            loaded = next((line.split()[-1] for line in maps if "libavcodec" in line), "?")
    except OSError:
        pass  # not Linux: the version strings still say which FFmpeg it is
    source = "bundled in the av wheel" if "/av.libs/" in loaded else "a system FFmpeg library (PyAV built from source)"
    return {"library": f"PyAV {av.__version__}", "ffmpeg": av.ffmpeg_version_info, "source": source, "libavcodec": loaded, "video_encoder": video_encoder()}
