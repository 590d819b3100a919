"""Live synthesis (synth --stream --latency): same frames for any chunking, frames within the
latency when speech arrives at real-time pace, a clean stop when the input ends, is cut or
the process is interrupted. Tiny real avatar (64², CPU), whisper base, real speech."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ffmpeg, streams
from safetensors.torch import load_file

from ggtalker_cli import audio, live, media, metrics
from ggtalker_cli.config import Config, LiveConfig
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.stream import Expressions

SIZE = 64
LATENCY = 1.5  # the budget asked for; on a shared 2-core CPU compute comes on top, hence the slack below
SLACK_S = 2.0  # generous: other jobs share these two cores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def speech(tmp_path_factory, real_dir) -> Path:
    """4 s of real English speech, 16 kHz mono 16-bit (what live PCM input carries)."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    ffmpeg("-i", str(real_dir / "audio" / "en_obama_5s.wav"), "-t", "4", "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le", str(path))
    return path


def _pcm(path: Path) -> bytes:
    samples, _ = media.read_wav(path)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _args(avatar: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "ggtalker_cli.cli", "synth", str(avatar), "--audio", "-", "--stream", "--latency", str(LATENCY),
            "-o", out, "--device", "cpu", "--size", str(SIZE)]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_same_frames_for_any_chunking_and_close_to_offline(tiny_avatar, speech):
    """The step grid depends on the audio only: two chunkings give identical frames; the frame
    count is the offline one and the mouth follows the offline (exact) one."""
    avatar, _, _ = tiny_avatar
    state = load_file(str(avatar / "a2e.safetensors"))
    samples, _ = media.read_wav(speech)
    runs = []
    for chunk in (160, 5003):
        stream = live.LiveExpressions(state, 30.0, 0.5, LiveConfig(context_s=3.0), device="cpu")
        groups = [stream.push(samples[i : i + chunk]) for i in range(0, len(samples), chunk)] + [stream.finish()]
        groups = [g for g in groups if len(g)]
        assert [g.start for g in groups] == list(np.cumsum([0] + [len(g) for g in groups[:-1]]))  # consecutive, none twice
        runs.append(np.concatenate([g.mouth_open for g in groups]))
    assert np.array_equal(runs[0], runs[1])
    offline = Expressions(state, 30.0, device="cpu")
    exact = np.concatenate([offline.push(samples).mouth_open, offline.finish().mouth_open])
    assert len(runs[0]) == len(exact) == int(np.ceil(len(samples) / audio.SAMPLE_RATE * 30))
    assert metrics.pearson(runs[0], exact) > 0.5


def test_bad_latency_is_refused(tiny_avatar, speech):
    avatar, _, _ = tiny_avatar
    state = load_file(str(avatar / "a2e.safetensors"))
    with pytest.raises(GGError, match="must exceed one model frame") as e:
        live.LiveExpressions(state, 25.0, 0.02, device="cpu")
    assert e.value.code == Exit.USAGE
    with pytest.raises(GGError, match="needs --stream"):
        from ggtalker_cli.stages import synth

        synth.run(avatar, str(speech), "-", latency=0.5, device="cpu")


def test_frames_arrive_within_the_latency(tiny_avatar, speech, tmp_path):
    """A file fed at real-time pace (live.paced) through the stage: every frame's latency, from
    its first sample's arrival to the frame being out (live.Clock), is within the budget plus
    compute. The audio path only (-o x.npz): on a GPU rendering a frame costs milliseconds, on
    this shared CPU it alone runs below real time (the bench reports that), and a 3-s whisper
    context keeps the audio path ahead of real time here."""
    from ggtalker_cli.stages import synth

    avatar, _, _ = tiny_avatar
    out = tmp_path / "expressions.npz"
    summary = synth.run(avatar, str(speech), str(out), stream=True, latency=LATENCY, cfg=Config(live=LiveConfig(context_s=3.0)), device="cpu")
    assert summary["frames"] == int(np.ceil(summary["duration_s"] * 25)) == len(np.load(out)["mouth_open"])
    assert summary["latency_s"] < LATENCY  # the audio a frame waits for; the rest of the budget is compute
    assert summary["latency_s_p95"] < LATENCY + SLACK_S, summary


def test_stdin_frames_come_while_speaking_and_stop_at_the_end(tiny_avatar, speech):
    """Speech written to stdin at real-time pace (live.drive, as a client would): raw frames come
    out while the speech goes on, the process ends by itself when stdin closes, with every frame."""
    avatar, _, _ = tiny_avatar
    pcm = _pcm(speech)
    run = live.drive(_args(avatar, "-"), pcm, SIZE * SIZE * 3, 25.0, env=ENV)  # 25 fps: the tiny clip's
    assert run.returncode == 0, run.log
    assert len(run.arrivals) == int(np.ceil(len(pcm) / 32000 * 25))
    written = run.arrivals - run.latencies  # when each frame's first sample was written
    assert run.arrivals[0] < written[-1]  # the first frame is out before the last sample is spoken


def test_cut_input_finishes_the_mp4_and_sigint_leaves_nothing(tiny_avatar, speech, tmp_path):
    avatar, _, _ = tiny_avatar
    pcm = _pcm(speech)
    out = tmp_path / "cut.mp4"
    run = live.drive(_args(avatar, str(out)), pcm, 1, 25.0, stop_after=2 * 32000, env=ENV)  # the speaker stops after 2 s: a closed pipe
    assert run.returncode == 0, run.log
    frames = streams(out)["video"]["nb_read_frames"]
    assert int(frames) == 50  # 2 s at 25 fps: every frame of the speech that came, none more
    stopped = tmp_path / "stopped.mp4"
    run = live.drive(_args(avatar, str(stopped)), pcm, 1, 25.0, interrupt_after=2.0, env=ENV)
    assert run.returncode == Exit.INTERRUPTED, run.log
    assert not stopped.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4"]  # no temps left behind


def test_unix_socket_source(tmp_path):
    """A client's PCM through `unix:PATH`: samples as sent, the socket file removed at the end."""
    import socket

    path = tmp_path / "in.sock"
    chunks = live.raw_source(f"unix:{path}")
    sent = (np.arange(-4000, 4000, dtype=np.int16) * 4).astype("<i2")
    got: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: got.extend(chunks), daemon=True)
    reader.start()
    for _ in range(100):
        if path.exists():
            break
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        client.sendall(sent.tobytes()[:-1])  # an odd byte count: the half sample is dropped at EOF
    reader.join(timeout=10)
    samples = np.concatenate(got)
    assert np.array_equal(samples, sent[:-1].astype(np.float32) / 32768)
    assert not path.exists()
