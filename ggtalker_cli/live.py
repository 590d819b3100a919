"""Live synthesis: speech arriving in real time in, expression frames out within a fixed latency.

stream.py is exact (equal to `a2e.predict`) but a frame waits up to ~36 s for whisper's
centred 30-s windows. Here a frame waits only for a fixed small look-ahead of audio:

- **Steps on a fixed grid.** Step k runs when the audio reaches sample k·hop; the frames whose
  span ends `lookahead` frames before that become final and go out. The grid depends on the
  audio alone, never on how it was cut or paced, so the same audio gives the same frames
  (tests check it), and a slow step is caught up by running the missed steps, never by
  skipping: a machine slower than real time shows as a growing latency, not as other frames.
- **Whisper at the right edge.** Each step encodes the last `context_s` seconds ending at the
  step's sample: past context and the look-ahead, nothing later. `padded`, the piece is
  zero-padded to whisper's 30 s, exactly as offline features of a clip under 30 s are made
  (the A2E's training distribution); `cut`, the encoder runs on the piece's positions only
  (whisper.cpp's `audio_ctx`), ~4x cheaper on CPU for 8 s, at a quality cost the bench reports.
  `auto` (LiveConfig.whisper_window) pads on CUDA, where a 30-s pass costs ~35 ms on an H200,
  and cuts on CPU, where it costs seconds.
  Each frame's features come from the step that emits it (one whisper pass per step).
- **A2E at the right edge** (`LiveA2E`, the one place that touches the model). Its window of
  the model's training length ends at the last look-ahead frame; the frames just final are read
  from its positions before the look-ahead. No cross-fade: each frame is predicted once.
- **Resampling** to the output rate, linear at frame centres (`a2e.resample`'s rule), an output
  frame once its upper neighbour is decoded.

Trade-off against stream.py (the exact mode, which stays the default of `--stream`): a frame
here sees `lookahead` of future audio instead of >= 5 s, whisper's context is `context_s`
instead of 30 s centred, and the A2E window is right-aligned instead of cross-faded, so the lip
motion is an approximation of the offline one; bench/live_stream.py measures how far (mouth r,
lip-vertex error and A/V lag on held-out frames of real clips, both modes). In exchange a frame
is out within latency ≈ frame length + lookahead + hop + compute, instead of ~36 s.

Latency is measured, not assumed (`Source` + `Clock`): a reader thread stamps each chunk's
arrival as it arrives, even while the main loop is busy, and a frame's latency runs from the
arrival of the first sample it shows (the frame's start, the earliest and so the worst of its
samples) to the moment it is out.

Ending: the input's end (EOF, a closed pipe or socket) flushes the remaining frames, seeing no
audio past the end, and the output is complete (exit 0); SIGINT/SIGTERM stop at once, leave
no output file and exit 130 (the stage's usual interruption path).
"""

from __future__ import annotations

import math
import os
import queue
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import a2e, audio
from .config import LiveConfig
from .errors import Exit, GGError
from .stream import Frames

READ_BYTES = 640  # 20 ms of 16-bit mono at 16 kHz: what a pipe or socket read waits for at most
PACE_S = 0.01  # a file fed at real-time pace arrives in 10-ms pieces, like a sound card's callbacks


class LiveA2E:
    """A window of whisper features → expression frames: the only use of the A2E in live mode.

    What it assumes of the model (the adapter to change when the A2E changes):
    - it maps a window of at most `window` consecutive feature rows at `fps` (the model's frame
      rate) to one expression per row, and sees nothing outside the window;
    - the result is a deterministic function of the window (a sampling model must draw its
      noise from a generator seeded by the absolute frame index, so a frame does not depend on
      the chunking; if it conditions on the frames it already emitted, keep them here);
    - rows near the window's right edge, with only `lookahead` rows after them, are usable.
    Output: blendshapes (T, 52) in [0, 1] and face-space mouth points (T, M, 3) in cm.
    """

    def __init__(self, state: dict[str, torch.Tensor], device: str):
        self.model = a2e.from_state(state).to(device)
        meta = self.model.meta
        self.device, self.window, self.fps = device, int(meta["window"]), float(meta["fps"])
        self.feature_dim, self.whisper = int(meta["feature_dim"]), meta["whisper"]["model"]
        self.style = self.model.style_vector()
        self.neutral = self.model.neutral.cpu().numpy()

    @torch.no_grad()
    def __call__(self, features: np.ndarray, first: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Expressions of rows [first:] of `features` (T, D), T <= window, the rows before
        `first` being past context; `start` is the absolute model frame of row 0, which the
        flow-matching sampler's per-frame noise follows (a2e.codes)."""
        x = torch.as_tensor(np.asarray(features, np.float32), device=self.device)
        bs, mouth = self.model.decode(a2e.codes(self.model.eval(), x, self.style, start=start)[first:])
        return bs.clamp(0, 1).cpu().numpy(), mouth.cpu().numpy() + self.neutral


@torch.no_grad()
def encode_edge(net, piece: np.ndarray, pad: bool, device: str) -> torch.Tensor:
    """(rows, D) whisper encoder output of `piece` (at most 30 s, a multiple of 320 samples
    without `pad`): whisper's AudioEncoder.forward, with the positional embedding cut to the
    piece's length when not padded (that forward insists on exactly 30 s)."""
    import whisper  # slow import (numba): only when features are really computed

    chunk = np.zeros(audio.WINDOW if pad else len(piece), np.float32)
    chunk[: len(piece)] = piece
    mel = whisper.log_mel_spectrogram(torch.from_numpy(chunk), net.dims.n_mels, device=device)
    enc = net.encoder
    x = mel[None].to(torch.float16 if device.startswith("cuda") else torch.float32)  # whisper's own dtype choice
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(x)))).permute(0, 2, 1)
    x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
    for block in enc.blocks:
        x = block(x)
    return enc.ln_post(x)[0].half().float()  # float16 values, as audio.Encoder.window gives


class LiveExpressions:
    """`push(samples)` / `finish()` → `Frames` at `fps`, each within the latency budget.

    The same interface as stream.Expressions, so synth renders either; `latency_s` is the audio
    a frame waits for (frame length + look-ahead + hop), compute comes on top.
    """

    def __init__(self, state: dict[str, torch.Tensor], fps: float, latency: float, cfg: LiveConfig | None = None,
                 whisper: str | Path | None = None, device: str = "cpu"):  # fmt: skip
        cfg = cfg or LiveConfig()
        self.a2e = LiveA2E(state, device)
        self.fps, self.mfps, self.device = float(fps), self.a2e.fps, device
        if cfg.whisper_window not in ("auto", "padded", "cut"):
            raise GGError(f"live.whisper_window {cfg.whisper_window!r}: use auto, padded or cut", Exit.USAGE)
        self.pad = cfg.whisper_window == "padded" or (cfg.whisper_window == "auto" and device.startswith("cuda"))
        frame = 1 / self.mfps
        if latency <= frame:
            raise GGError(f"--latency {latency}: must exceed one model frame ({frame:.2f} s)", Exit.USAGE)
        w = self.a2e.window
        self.lookahead = min(w // 2, max(1, round(latency * cfg.lookahead_share * self.mfps)))  # model frames; the A2E sees no further
        self.hop_frames = max(1, round(latency * cfg.hop_share * self.mfps))
        self.hop = round(self.hop_frames * audio.SAMPLE_RATE / self.mfps)  # samples between steps
        context = max(cfg.context_s, (self.hop_frames + 2 * w) / self.mfps)  # every frame a step reads lies inside its pass
        self.context = min(round(context * audio.SAMPLE_RATE) // 320 * 320, audio.WINDOW)
        self.encoder = audio.Encoder(whisper or self.a2e.whisper, device, dim=self.a2e.feature_dim)
        self.buf, self.buf0, self.samples = np.zeros(0, np.float32), 0, 0  # audio kept from sample buf0 on
        self.steps = 0  # grid steps run
        self.n_model = 0  # model frames emitted
        self.model_bs, self.model_mouth, self.m0 = np.zeros((0, a2e.N_BLENDSHAPES), np.float32), np.zeros((0, len(a2e.MOUTH), 3), np.float32), 0
        self.n_out = 0
        self.latency_s = 1 / self.fps + (self.lookahead + self.hop_frames) / self.mfps
        self._warm_up()

    def _warm_up(self) -> None:
        """Load whisper and run one step on silence now: the first real step must not pay for it."""
        self.a2e(self._features(self.context, 0, self.a2e.window, np.zeros(self.context, np.float32)), 0)

    @property
    def seconds(self) -> float:
        return self.samples / audio.SAMPLE_RATE

    def _features(self, end: int, lo: int, hi: int, buf: np.ndarray | None = None) -> np.ndarray:
        """(hi - lo, D) float16-valued features of model frames [lo, hi) from one whisper pass over
        the context ending at sample `end` of the stream (or of `buf`)."""
        n = min(self.context, end)
        if not self.pad:
            n = max(320, n // 320 * 320)
        start = max(0, end - n)
        piece = self.buf[start - self.buf0 : end - self.buf0] if buf is None else buf[start:end]
        rows = encode_edge(self.encoder.net(), piece, self.pad, self.device)
        w = torch.from_numpy(audio.frame_weights(np.arange(lo, hi), self.mfps, start / audio.SAMPLE_RATE, len(rows))).to(rows.device)
        return (w @ rows).half().float().cpu().numpy()

    def _emit_model(self, end: int, final: int, ahead: int) -> None:
        """Decode model frames [n_model, final) from one whisper pass ending at sample `end`, each
        A2E window ending `ahead` frames after the block it emits (none at the audio's end)."""
        w = self.a2e.window
        block = max(1, (w - ahead) // 2)  # frames per A2E window: at least as much past context
        blocks = [(a, min(a + block, final)) for a in range(self.n_model, final, block)]
        spans = [(max(0, b + ahead - w), b + ahead) for _, b in blocks]
        lo = min(s for s, _ in spans)
        feats = self._features(end, lo, final + ahead)
        for (a, b), (s, hi) in zip(blocks, spans):
            bs, mouth = self.a2e(feats[s - lo : hi - lo], a - s, s)
            self.model_bs = np.concatenate([self.model_bs, bs[: b - a]])
            self.model_mouth = np.concatenate([self.model_mouth, mouth[: b - a]])
        self.n_model = final
        keep = end - self.context  # later passes start no earlier
        if keep > self.buf0:
            self.buf, self.buf0 = self.buf[keep - self.buf0 :], keep

    def _resample(self, end: int, last: int | None) -> Frames:
        """Output frames [n_out, end), linear between model frames at frame centres; `last` is
        the final model frame index (the end of the audio) or None mid-stream."""
        j = np.arange(self.n_out, end)
        pos = (j + 0.5) * self.mfps / self.fps - 0.5
        pos = np.clip(pos, 0, self.n_model - 1 if last is None else last)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, self.n_model - 1)
        w = (pos - lo)[:, None]
        bs = (1 - w) * self.model_bs[lo - self.m0] + w * self.model_bs[hi - self.m0]
        mouth = (1 - w[..., None]) * self.model_mouth[lo - self.m0] + w[..., None] * self.model_mouth[hi - self.m0]
        self.n_out = end
        drop = (int(lo[-1]) if len(lo) else self.m0) - self.m0
        if drop > 0:
            self.model_bs, self.model_mouth, self.m0 = self.model_bs[drop:], self.model_mouth[drop:], self.m0 + drop
        return Frames(int(j[0]) if len(j) else end, bs.astype(np.float32), mouth.astype(np.float32), a2e.mouth_gap(mouth).astype(np.float32))

    def push(self, samples: np.ndarray) -> Frames:
        self.buf = np.concatenate([self.buf, np.asarray(samples, np.float32)])
        self.samples += len(samples)
        while (self.steps + 1) * self.hop <= self.samples:
            self.steps += 1
            end = self.steps * self.hop
            final = math.floor(end / audio.SAMPLE_RATE * self.mfps + 1e-9) - self.lookahead
            if final > self.n_model:
                self._emit_model(end, final, self.lookahead)
        # output frame j is final once its upper neighbour is decoded: (j + 0.5)·mfps/fps - 0.5 < n_model - 1
        ready = math.ceil((self.n_model - 0.5) * self.fps / self.mfps - 0.5 - 1e-9)
        return self._resample(max(self.n_out, ready), None)

    def finish(self) -> Frames:
        """The remaining frames, from whisper at the audio's end: no look-ahead past it."""
        if self.seconds < audio.MIN_SECONDS:
            raise GGError(f"audio is {self.seconds:.2f} s long; at least {audio.MIN_SECONDS} s of speech is needed", Exit.INPUT_INVALID)
        n_model = max(1, math.ceil(self.seconds * self.mfps))
        if n_model > self.n_model:
            self._emit_model(self.samples, n_model, 0)
        return self._resample(max(1, math.ceil(self.seconds * self.fps)), n_model - 1)


# ---------------------------------------------------------------------------------------------
# audio in, at the pace it arrives


def paced(samples: np.ndarray) -> Iterator[np.ndarray]:
    """A decoded file as live audio: PACE_S pieces, each handed over when its last sample would
    have been captured had the speech started now."""
    step = round(PACE_S * audio.SAMPLE_RATE)
    t0 = time.perf_counter()
    for a in range(0, len(samples), step):
        b = min(a + step, len(samples))
        delay = t0 + b / audio.SAMPLE_RATE - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield samples[a:b]


def pcm(fd: int) -> Iterator[np.ndarray]:
    """Raw 16 kHz mono signed 16-bit little-endian PCM from a file descriptor (stdin, a FIFO, a
    socket) as it arrives, until EOF."""
    pending = b""
    while block := os.read(fd, READ_BYTES):
        pending += block
        usable = len(pending) // 2 * 2
        if usable:
            yield np.frombuffer(pending[:usable], "<i2").astype(np.float32) / 32768
            pending = pending[usable:]


def listen(path: Path) -> Iterator[np.ndarray]:
    """PCM from the first client of a Unix socket created at `path` (removed again at the end)."""
    if path.exists():
        raise GGError(f"{path}: already exists; pass a new socket path after unix:", Exit.OUTPUT)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        server.listen(1)
        conn, _ = server.accept()
        with conn:
            yield from pcm(conn.fileno())
    finally:
        server.close()
        path.unlink(missing_ok=True)


def raw_source(spec: str) -> Iterator[np.ndarray] | None:
    """Live PCM input named by `spec` ('-' stdin, 'unix:PATH', a FIFO's path), or None for a file
    (decoded whole and fed by `paced`)."""
    if spec == "-":
        return pcm(0)
    if spec.startswith("unix:"):
        return listen(Path(spec[5:]))
    if Path(spec).exists() and stat.S_ISFIFO(os.stat(spec).st_mode):
        return _fifo(Path(spec))
    return None


def _fifo(path: Path) -> Iterator[np.ndarray]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield from pcm(fd)
    finally:
        os.close(fd)


class Clock:
    """Arrival time of every sample (per chunk) and the latency of every frame put out."""

    def __init__(self, fps: float):
        self.fps, self.ends, self.times, self.latencies = fps, [0], [0.0], []

    def arrived(self, n: int, at: float) -> None:
        self.ends.append(self.ends[-1] + n)
        self.times.append(at)

    def shown(self, start: int, n: int) -> None:
        """Frames [start, start + n) are out now: each waited since its first sample arrived."""
        now = time.perf_counter()
        first = np.floor(np.arange(start, start + n) / self.fps * audio.SAMPLE_RATE).astype(np.int64)
        chunk = np.minimum(np.searchsorted(self.ends, first, side="right"), len(self.ends) - 1)
        self.latencies.extend((now - np.asarray(self.times)[chunk]).tolist())

    def summary(self) -> dict[str, float]:
        lat = np.asarray(self.latencies)
        if not len(lat):
            return {}
        return {"latency_s_p50": round(float(np.percentile(lat, 50)), 3), "latency_s_p95": round(float(np.percentile(lat, 95)), 3),
                "latency_s_max": round(float(lat.max()), 3)}  # fmt: skip


class Source:
    """Chunks of `chunks` read by a thread as they come, stamped on arrival into `clock`;
    iterating gives everything that arrived since the last time (waiting for at least one)."""

    def __init__(self, chunks: Iterator[np.ndarray], clock: Clock):
        self.clock = clock
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(chunks,), daemon=True)
        self._thread.start()

    def _read(self, chunks: Iterator[np.ndarray]) -> None:
        try:
            for chunk in chunks:
                self._queue.put((chunk, time.perf_counter()))
            self._queue.put(None)
        except BaseException as e:  # noqa: BLE001  (raised in the consumer's thread)
            self._queue.put(e)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            items = [self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            parts = []
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    if parts:
                        yield np.concatenate(parts)
                    return
                chunk, at = item
                self.clock.arrived(len(chunk), at)
                parts.append(chunk)
            yield np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# the client's side: what a live run's latency is, measured outside the process


@dataclass
class Run:
    """One live run seen from outside: when each frame arrived, and each frame's latency from
    the writing of its first sample (NaN before the speech reached it)."""

    arrivals: np.ndarray  # (frames,) perf_counter seconds
    latencies: np.ndarray  # (frames,) seconds
    returncode: int
    log: str  # the process's stderr


def drive(args: list[str], pcm: bytes, frame_bytes: int, fps: float, pace: bool = True, stop_after: int | None = None,
          interrupt_after: float | None = None, env: dict | None = None) -> Run:  # fmt: skip
    """Run a live `ggtalker synth ... --audio - -o -` (`args`) as a speaking client does: wait for
    its ready line, write `pcm` (16 kHz mono s16le) to its stdin in 20-ms pieces, each when its
    last sample is "spoken" (`pace`) or as fast as it reads, closing stdin after `stop_after`
    bytes or at the end, or send SIGINT `interrupt_after` seconds in; read its raw frames."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # stderr read all along: a full pipe would block the process
        for line in proc.stderr:
            log.append(line.decode(errors="replace"))
            if "live: ready" in log[-1]:
                ready.set()
        ready.set()

    sent: list[float] = []

    def speak() -> None:
        t0 = time.perf_counter()
        try:
            for a in range(0, len(pcm) if stop_after is None else stop_after, READ_BYTES):
                if pace:
                    time.sleep(max(0.0, t0 + (a + READ_BYTES) / 2 / audio.SAMPLE_RATE - time.perf_counter()))
                proc.stdin.write(pcm[a : a + READ_BYTES])
                proc.stdin.flush()
                sent.append(time.perf_counter())
            proc.stdin.close()
        except BrokenPipeError:  # the process stopped first
            pass

    threading.Thread(target=drain, daemon=True).start()
    ready.wait()
    speaker = threading.Thread(target=speak, daemon=True)
    speaker.start()
    if interrupt_after is not None:
        threading.Timer(interrupt_after, proc.send_signal, (signal.SIGINT,)).start()
    arrivals = []
    while len(proc.stdout.read(frame_bytes)) == frame_bytes:
        arrivals.append(time.perf_counter())
    code = proc.wait()
    speaker.join()
    piece = (np.arange(len(arrivals)) / fps * audio.SAMPLE_RATE * 2 // READ_BYTES).astype(int)  # holding each frame's first sample
    written = np.asarray(sent + [np.nan])[np.minimum(piece, len(sent))]
    return Run(np.asarray(arrivals), np.asarray(arrivals) - written, code, "".join(log))
