"""Media I/O speed: in-process PyAV (what ggtalker uses) against the ffmpeg command line through a pipe.

    python bench/media_io.py [--out bench/results/media_io.json]

Two numbers decide the backend (issue 16), each taken for PyAV (media.decode / media.open_writer)
and for the ffmpeg binary driven the way the old media.py did it (ffmpeg-python, a raw rgb24
pipe): imageio-ffmpeg's static binary, and a system ffmpeg too when one is on PATH.
- decode: the 71-s real clip (cnn_anchor_71s_512_25fps.mp4: H.264 + mp3) to 512² RGB frames at
  25 fps, all 1779 of them, as preprocess reads it.
- encode: 250 real 512² frames to H.264 (CRF 18, veryfast) with 10 s of 16 kHz speech muxed as
  AAC, as synth and eval write; once alone and once beside a renderer (a torch thread doing
  40 ms of work a frame, as synth's encoder thread runs beside the render).
Each also checks the two agree: decoded frame counts and the mean pixel difference, and the
encoded files' frame count and audio length read back. The machine is shared, so the load
average is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import av
import ffmpeg
import numpy as np
import torch

from ggtalker_cli import media

ROOT = Path(__file__).resolve().parent.parent

CLIP = ROOT.parent / "shared" / "data" / "real" / "videos" / "cnn_anchor_71s_512_25fps.mp4"
SIZE, FPS, ENCODE_FRAMES, RENDER_MS = 512, 25, 250, 40


def binaries() -> dict[str, str]:
    import imageio_ffmpeg

    found = {"imageio-ffmpeg " + imageio_ffmpeg.get_ffmpeg_version(): imageio_ffmpeg.get_ffmpeg_exe()}
    if shutil.which("ffmpeg"):
        found["system ffmpeg"] = shutil.which("ffmpeg")
    return found


def pipe_decode(exe: str, path: Path):
    """The old media.decode: ffmpeg's fps + area scale filters, rgb24 frames through a pipe."""
    proc = (ffmpeg.input(str(path)).video.filter("fps", fps=FPS).filter("scale", SIZE, SIZE, flags="area")
            .output("pipe:", format="rawvideo", pix_fmt="rgb24").global_args("-nostdin", "-loglevel", "error")
            .run_async(cmd=exe, pipe_stdout=True))  # fmt: skip
    size = SIZE * SIZE * 3
    while len(buf := proc.stdout.read(size)) == size:
        yield np.frombuffer(buf, np.uint8).reshape(SIZE, SIZE, 3)
    proc.wait()


class PipeWriter:
    """The old media.VideoWriter: rgb24 into ffmpeg's stdin, libx264 + the wav as AAC, -shortest."""

    def __init__(self, exe: str, path: Path, audio: Path):
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{SIZE}x{SIZE}", r=FPS)
        args = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": 18, "preset": "veryfast", "movflags": "+faststart",
                "acodec": "aac", "audio_bitrate": "128k", "shortest": None}  # fmt: skip
        self.proc = (ffmpeg.output(video, ffmpeg.input(str(audio)).audio, str(path), **args).overwrite_output()
                     .global_args("-nostdin", "-loglevel", "error").run_async(cmd=exe, pipe_stdin=True))  # fmt: skip

    def write(self, frame: np.ndarray) -> None:
        self.proc.stdin.write(frame.tobytes())

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait() == 0


def timed_decode(frames) -> tuple[float, int, list[np.ndarray]]:
    """Seconds, frame count, and every 50th frame (to compare the backends)."""
    tic, kept, n = time.perf_counter(), [], 0
    for n, frame in enumerate(frames, start=1):
        if n % 50 == 1:
            kept.append(frame.copy())
    return time.perf_counter() - tic, n, kept


def timed_encode(make, out: Path, frames: list[np.ndarray], beside_render: bool) -> float:
    """Frames through `make(out)` in a media.Behind thread (as synth does); with a renderer, the
    main thread waits for a rendered 'frame' before each put, so the wall is render + whatever
    encoding fails to overlap."""
    writer = make(out)
    behind = media.Behind(writer.write, depth=32)
    tic = time.perf_counter()
    a = torch.randn(256, 256)
    for frame in frames:
        if beside_render:
            t = time.perf_counter()
            while time.perf_counter() - t < RENDER_MS / 1000:
                a = torch.tanh(a @ a * 1e-3)
        behind.put(frame)
    behind.close()
    writer.close()
    return time.perf_counter() - tic


def read_back(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(v))
        c.seek(0)
        a = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(a))
        return {"frames": n, "video_codec": v.codec_context.codec.canonical_name, "audio_codec": a.codec_context.codec.canonical_name,
                "audio_s": round(samples / a.codec_context.sample_rate, 3), "bytes": path.stat().st_size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "media_io.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    doc: dict = {"command": "python bench/media_io.py", "device": f"this CPU, {os.cpu_count()} cores (shared)", "clip": CLIP.name,
                 "pyav": media.backend(), "decode": {}, "encode": {}}  # fmt: skip
    exes = binaries()

    doc["load_before"] = os.getloadavg()[0]
    seconds, n, ref = timed_decode(media.decode(CLIP, FPS, SIZE, SIZE))
    doc["decode"]["pyav"] = {"seconds": round(seconds, 2), "fps": round(n / seconds, 1), "frames": n}
    for name, exe in exes.items():
        seconds, count, kept = timed_decode(pipe_decode(exe, CLIP))
        diff = float(np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(ref, kept)]))
        doc["decode"][name] = {"seconds": round(seconds, 2), "fps": round(count / seconds, 1), "frames": count,
                               "mean_abs_pixel_diff_vs_pyav": round(diff, 3)}  # fmt: skip

    frames = []
    for k, frame in enumerate(media.decode(CLIP, FPS, SIZE, SIZE)):
        frames.append(frame)
        if k + 1 == ENCODE_FRAMES:
            break
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        media.extract_audio(CLIP, wav, ENCODE_FRAMES // FPS * media.AUDIO_RATE)
        writers = {"pyav": lambda out: media.open_writer(out, FPS, SIZE, SIZE, audio=wav)}
        writers.update({name: (lambda out, exe=exe: PipeWriter(exe, out, wav)) for name, exe in exes.items()})
        for name, make in writers.items():
            row = {}
            for beside in (False, True):
                out = Path(tmp) / f"{len(row)}.mp4"
                seconds = timed_encode(make, out, frames, beside)
                key = "beside_render" if beside else "alone"
                row[key] = {"seconds": round(seconds, 2), "fps": round(len(frames) / seconds, 1), **read_back(out)}
            row["render_only_s"] = round(len(frames) * RENDER_MS / 1000, 2)
            doc["encode"][name] = row
    doc["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
