"""synth: audio → lip-synced mp4 on a tiny real avatar (64², CPU), streaming, options, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ffmpeg, streams
from safetensors.torch import load_file

from ggtalker_cli import a2e, audio
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.stages import synth
from ggtalker_cli.stream import Expressions

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def speech(tmp_path_factory, real_dir) -> Path:
    """2.4 s of real English speech as 44.1 kHz stereo mp3 (resampled and downmixed on the way in)."""
    path = tmp_path_factory.mktemp("speech") / "speech.mp3"
    ffmpeg("-i", str(real_dir / "audio" / "en_obama_5s.wav"), "-t", "2.4", "-ar", "44100", "-ac", "2", str(path))
    return path


def _cli(*args: str, stdin=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ggtalker_cli.cli", *args], capture_output=True, stdin=stdin, timeout=600, env=env, check=False, **kw)


def _probe(path: Path) -> dict[str, dict]:
    return streams(path)


def test_mp4_frames_and_audio_match_the_speech(tiny_avatar, speech, tmp_path):
    avatar, _, _ = tiny_avatar
    out = tmp_path / "talk.mp4"
    summary = synth.run(avatar, str(speech), str(out), device="cpu")
    streams = _probe(out)
    seconds = len(audio.load_audio(speech)) / audio.SAMPLE_RATE
    assert abs(int(streams["video"]["nb_read_frames"]) - seconds * 25) <= 1
    assert streams["video"]["codec_name"] == "h264" and streams["video"]["pix_fmt"] == "yuv420p"
    assert streams["audio"]["codec_name"] == "aac"
    assert abs(float(streams["audio"]["duration"]) - seconds) < 0.1
    assert summary["frames"] == int(streams["video"]["nb_read_frames"])
    assert summary["body"] == "inpainter" and summary["device"] == "cpu" and summary["fps_achieved"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_expressions_npz_and_plot(tiny_avatar, speech, tmp_path):
    avatar, _, _ = tiny_avatar
    out = tmp_path / "expr.npz"
    summary = synth.run(avatar, str(speech), str(out), device="cpu")
    with np.load(out) as d:
        n = summary["frames"]
        assert d["blendshapes"].shape == (n, 52) and d["mouth"].shape == (n, len(a2e.MOUTH), 3) and d["mouth_open"].shape == (n,)
        assert float(d["fps"]) == 25.0 and np.isfinite(d["blendshapes"]).all()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_stream_chunks_equal_predict(tiny_avatar, speech):
    """The incremental pipeline reproduces a2e.predict whatever the chunking."""
    _, prior, _ = tiny_avatar
    state = load_file(str(prior / "a2e.safetensors"))
    reference = a2e.predict(state, speech, 30.0, device="cpu")
    samples = audio.load_audio(speech)
    for chunk in (len(samples), 4001):
        stream = Expressions(state, 30.0, device="cpu")
        groups = [stream.push(samples[i : i + chunk]) for i in range(0, len(samples), chunk)] + [stream.finish()]
        assert [g.start for g in groups] == list(np.cumsum([0] + [len(g) for g in groups[:-1]]))
        np.testing.assert_allclose(np.concatenate([g.blendshapes for g in groups]), reference["blendshapes"], atol=1e-6)
        np.testing.assert_allclose(np.concatenate([g.mouth_open for g in groups]), reference["mouth_open"], atol=1e-5)


def test_streaming_equals_batch_frames(tiny_avatar, speech, tmp_path):
    """--stream (file or stdin) gives the batch mode's frames byte for byte. Stdin gets a wav:
    ffmpeg cannot skip an mp3's encoder delay on a pipe, so piped mp3 decodes to other samples."""
    avatar, _, _ = tiny_avatar
    wav = tmp_path / "speech.wav"
    ffmpeg("-i", str(speech), str(wav))
    frame = SIZE * SIZE * 3
    for source in (speech, wav):
        batch = _cli("-q", "synth", str(avatar), "--audio", str(source), "-o", "-", "--device", "cpu")
        assert batch.returncode == 0, batch.stderr.decode()
        assert len(batch.stdout) % frame == 0 and len(batch.stdout) // frame == round(2.4 * 25)
        if source == speech:
            streamed = _cli("-q", "synth", str(avatar), "--audio", str(source), "--stream", "-o", "-", "--device", "cpu")
        else:
            with open(source, "rb") as f:
                streamed = _cli("-q", "synth", str(avatar), "--audio", "-", "--stream", "-o", "-", "--device", "cpu", stdin=f)
        assert streamed.returncode == 0, streamed.stderr.decode()
        assert streamed.stdout == batch.stdout


def test_pose_view_and_background_options(tiny_avatar, speech, tmp_path, capsysbinary):
    avatar, _, _ = tiny_avatar
    csv = tmp_path / "pose.csv"
    csv.write_text("yaw,pitch,roll,tx,ty,tz\n" + "".join(f"{5 * np.sin(k / 3):.3f},0,0,0,0,28\n" for k in range(10)))
    runs, pixels = {}, {}
    for name, kw in {"plain": {}, "turned": {"yaw": 25.0, "pitch": -10.0, "orbit": 10.0}, "pose": {"pose": csv},
                     "white": {"background": "white", "fps": 20.0, "start": 0.5, "end": 1.5}, "large": {"size": 96}}.items():
        capsysbinary.readouterr()
        runs[name] = synth.run(avatar, str(speech), "-", device="cpu", end=kw.pop("end", 1.0), **kw)
        side = kw.get("size", SIZE)
        pixels[name] = np.frombuffer(capsysbinary.readouterr().out, np.uint8).reshape(-1, side, side, 3)
        assert len(pixels[name]) == runs[name]["frames"]
    assert runs["plain"]["frames"] == 25 and runs["white"]["frames"] == 20  # 1 s at 25 fps; [0.5, 1.5) s at 20 fps
    for name in ("turned", "pose"):
        assert np.abs(pixels[name].astype(int) - pixels["plain"]).mean() > 1.0
    assert (pixels["white"][:, :3, :3] > 240).all()  # the top-left corner is background


def _refused(done: subprocess.CompletedProcess, code: Exit, words: str, target: Path | None = None) -> None:
    message = done.stderr.decode()
    assert done.returncode == code, message
    assert words in message and "Traceback" not in message
    assert len([line for line in message.splitlines() if line.strip()]) == 1
    if target is not None:
        assert not target.exists()


def test_bad_inputs_are_refused(tiny_avatar, speech, tmp_path):
    avatar, _, _ = tiny_avatar
    target = tmp_path / "out.mp4"
    _refused(_cli("synth", str(avatar), "--audio", str(tmp_path / "missing.wav"), "-o", str(target)), Exit.INPUT_MISSING, "no such audio file", target)
    _refused(_cli("synth", str(avatar), "--audio", str(speech), "-o", "/proc/out.mp4"), Exit.OUTPUT, "cannot write files there")
    _refused(_cli("synth", str(avatar), "--audio", str(speech), "-o", str(tmp_path / "nowhere" / "o.mp4")), Exit.OUTPUT, "does not exist")
    _refused(_cli("synth", str(avatar), "--audio", "-", "-o", str(target)), Exit.USAGE, "needs --stream", target)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio at all\n")
    _refused(_cli("synth", str(avatar), "--audio", str(not_audio), "-o", str(target), "--device", "cpu"), Exit.INPUT_INVALID, "notes.wav", target)
    target.write_bytes(b"keep me")
    _refused(_cli("synth", str(avatar), "--audio", str(speech), "-o", str(target)), Exit.OUTPUT, "--force")
    assert target.read_bytes() == b"keep me"
    # an avatar folder of another format version
    old = tmp_path / "old_avatar"
    old.mkdir()
    meta = yaml.safe_load((avatar / "meta.yaml").read_text())
    (old / "meta.yaml").write_text(yaml.safe_dump({**meta, "version": 99}))
    _refused(_cli("synth", str(old), "--audio", str(speech), "-o", str(tmp_path / "o2.mp4")), Exit.ARTIFACT, "format version 99", tmp_path / "o2.mp4")


def test_interrupted_synth_leaves_no_file(tiny_avatar, real_dir, tmp_path):
    avatar, _, _ = tiny_avatar
    target = tmp_path / "long.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ggtalker_cli.cli", "-q", "synth",
                             str(avatar), "--audio", str(real_dir / "audio" / "en_musetalk_eng_60s.wav"),
                             "-o", str(target), "--device", "cpu"], stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name.endswith(".video.mp4") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == Exit.INTERRUPTED
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # temps removed too


def test_synth_and_eval_settings_come_from_the_preset(tiny_avatar, tmp_path):
    """`synth:` and `eval:` are preset sections like any other; the frames do not depend on how
    many are rendered per call (synth.batch), only the call count does."""
    import torch

    from ggtalker_cli.config import load_config
    from ggtalker_cli.synthesis import Synthesizer

    preset = tmp_path / "p.yaml"
    preset.write_text("synth:\n  batch: 3\n  chunk_s: 1.0\n  crf: 30\neval:\n  video_crf: 20\n  strip_frames: 2\n")
    cfg = load_config(preset)
    assert (cfg.synth.batch, cfg.synth.chunk_s, cfg.synth.crf, cfg.eval.video_crf, cfg.eval.strip_frames) == (3, 1.0, 30, 20, 2)
    with pytest.raises(GGError, match="unknown key 'synth.batchsize'"):
        load_config(None, {"synth": {"batchsize": 3}})
    frames = []
    for synth_cfg in (None, cfg.synth):
        s = Synthesizer(tiny_avatar[0], torch.device("cpu"), cfg=synth_cfg)
        try:
            idx = np.arange(10)
            bodies = s.bodies(idx, s.clip.fps)
            frames.append(np.stack(list(s.frames(s.track["blendshapes"][bodies], s.poses(idx, bodies, s.clip.fps), bodies))))
        finally:
            s.close()
    assert frames[0].shape == (10, 64, 64, 3) and np.abs(frames[0].astype(int) - frames[1]).max() <= 1
