"""No verb overwrites or deletes a file it did not create: the user's inputs and an existing
output survive every failing run byte for byte, and a successful one adds only what it names.

The found bug: synth without an H.264 encoder renamed its speech track onto X.wav beside
`-o X.mp4`, replacing the user's input X.wav. Now the audio is always muxed and the temps are
fresh names, so the directory after a run holds exactly the inputs and the named output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, ffmpeg, streams

from ggtalker_cli import media
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.stages import synth

pytestmark = pytest.mark.usefixtures("one_thread")


def _hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under each root (a file or a folder), keyed by path."""
    found = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert found, roots
    return found


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ggtalker_cli.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory, real_dir) -> Path:
    """1.2 s of real speech as a 16 kHz mono wav: the X.wav of the bug report."""
    path = tmp_path_factory.mktemp("speech") / "X.wav"
    ffmpeg("-i", str(real_dir / "audio" / "en_obama_5s.wav"), "-t", "1.2", "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le", str(path))
    return path


@pytest.fixture()
def beside(tmp_path, speech_wav) -> Path:
    """X.wav in a folder of its own, where synth will write X.mp4."""
    shutil.copy(speech_wav, tmp_path / "X.wav")
    return tmp_path / "X.wav"


@pytest.mark.parametrize("encoder", ["libx264", "mpeg4"])
def test_synth_next_to_its_input_wav_keeps_it(tiny_avatar, beside, monkeypatch, encoder):
    """`synth --audio X.wav -o X.mp4`, with H.264 and with only FFmpeg's native MPEG-4 encoder
    (an FFmpeg built without libx264): X.wav is byte-identical, X.mp4 has video and audio, and
    nothing else appears in the folder."""
    avatar, _, _ = tiny_avatar
    before = _hashes(beside)
    monkeypatch.setattr(media, "video_encoder", lambda: encoder)
    summary = synth.run(avatar, str(beside), str(beside.with_suffix(".mp4")), device="cpu")
    assert _hashes(beside) == before
    assert sorted(p.name for p in beside.parent.iterdir()) == ["X.mp4", "X.wav"]
    found = streams(beside.with_suffix(".mp4"))
    assert found["video"]["codec_name"] == ("h264" if encoder == "libx264" else "mpeg4")
    assert found["video"]["nb_read_frames"] == summary["frames"] == 30
    assert found["audio"]["codec_name"] == "aac" and abs(found["audio"]["duration"] - 1.2) < 0.1


@pytest.mark.parametrize("broken", ["open_writer", "mux"])
def test_synth_whose_encoder_fails_keeps_every_file(tiny_avatar, beside, monkeypatch, broken):
    """No encoder at all (opening it fails) or a mux that fails at the end: the run fails with
    OUTPUT, X.wav and an existing X.mp4 (replaced only on success with --force) are
    byte-identical, and no temp is left."""
    avatar, _, _ = tiny_avatar
    old = beside.with_suffix(".mp4")
    old.write_bytes(b"the user's previous video\n")
    before = _hashes(beside.parent)

    def fail(*args, **kw):
        raise GGError(f"{args[0]}: encoder unavailable", Exit.OUTPUT)

    monkeypatch.setattr(media, broken, fail)
    with pytest.raises(GGError) as e:
        synth.run(avatar, str(beside), str(old), device="cpu", force=True)
    assert e.value.code == Exit.OUTPUT
    assert _hashes(beside.parent) == before
    assert sorted(p.name for p in beside.parent.iterdir()) == ["X.mp4", "X.wav"]


def test_synth_npz_plot_side_car_is_never_replaced(tiny_avatar, beside):
    """`-o X.npz` also writes X.png: an existing X.png (not named by -o) is an error naming it,
    with or without --force, and is left as it was."""
    avatar, _, _ = tiny_avatar
    plot = beside.with_suffix(".png")
    plot.write_bytes(b"the user's picture\n")
    before = _hashes(beside.parent)
    for force in (False, True):
        with pytest.raises(GGError) as e:
            synth.run(avatar, str(beside), str(beside.with_suffix(".npz")), device="cpu", force=force)
        assert e.value.code == Exit.OUTPUT and str(plot) in e.value.message
    assert _hashes(beside.parent) == before


def _fails_keeping(args: list[str], inputs: list[Path], out: Path, code: Exit) -> dict:
    """Run a verb that must fail (with `--force` over an existing output of the user's) and
    check that every input and the old output are byte-identical; return the --json error."""
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("the user's own file in the old output folder\n")
    before = _hashes(*inputs, out)
    siblings = set(out.parent.iterdir())
    done = _cli("--json", *args, "-o", str(out), "--force")
    assert done.returncode == code, done.stderr
    assert _hashes(*inputs, out) == before
    left = {p.name for p in set(out.parent.iterdir()) - siblings}
    assert all(name.startswith(f".{out.name}.") for name in left), left  # only its own resumable work folder
    error = json.loads(done.stdout)
    assert error["exit"] == code and isinstance(error["error"], str)
    return error


def _corrupt_copy(clip: Path, to: Path) -> Path:
    """A copy of a clip whose tracking file is cut short (a disk that filled up mid-copy)."""
    shutil.copytree(clip, to)
    tracking = to / "tracking.npz"
    tracking.write_bytes(tracking.read_bytes()[:200])
    return to


def test_preprocess_failing_keeps_inputs(tmp_path):
    """A video without a face fails in tracking, after decoding: the video and the old clip stay."""
    video = tmp_path / "noface.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=128x128:rate=25:duration=1", "-f", "lavfi", "-i", "sine=frequency=300:duration=1",
           "-pix_fmt", "yuv420p", "-shortest", str(video))  # fmt: skip
    error = _fails_keeping(["preprocess", str(video)], [video], tmp_path / "clip", Exit.INPUT_INVALID)
    assert str(video) in error["error"]


def test_fit_prior_failing_keeps_inputs(clip_128, tmp_path):
    clip = _corrupt_copy(clip_128[0], tmp_path / "clip")
    _fails_keeping(["fit-prior", str(clip), "--steps", "1"], [clip], tmp_path / "prior", Exit.ARTIFACT)


def test_adapt_failing_keeps_inputs(clip_128, tmp_path):
    clip = _corrupt_copy(clip_128[0], tmp_path / "clip")
    _fails_keeping(["adapt", str(clip), "--steps", "1", "--size", "64", "--device", "cpu", "--no-prior"], [clip], tmp_path / "avatar", Exit.ARTIFACT)


def test_synth_failing_keeps_inputs(tiny_avatar, tmp_path):
    avatar, _, _ = tiny_avatar
    noise = tmp_path / "notes.wav"
    noise.write_text("this is not audio\n" * 100)
    out = tmp_path / "talk.mp4"
    out.write_bytes(b"the user's previous video\n")
    before = _hashes(avatar, noise, out)
    done = _cli("--json", "synth", str(avatar), "--audio", str(noise), "-o", str(out), "--force", "--device", "cpu")
    assert done.returncode == Exit.INPUT_INVALID, done.stderr
    assert _hashes(avatar, noise, out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.wav", "talk.mp4"]
    assert json.loads(done.stdout)["exit"] == Exit.INPUT_INVALID


def test_eval_failing_keeps_inputs(tiny_avatar, tmp_path):
    avatar, _, clip = tiny_avatar
    noise = tmp_path / "notes.wav"
    noise.write_text("this is not audio\n" * 100)
    _fails_keeping(["eval", str(avatar), str(clip), "--audio", str(noise), "--frames", "2", "--device", "cpu", "--score", "no"],
                   [avatar, clip, noise], tmp_path / "report", Exit.INPUT_INVALID)  # fmt: skip


def test_written_mp4_reads_back(tmp_path):
    """A written mp4 decodes back to its frames and audio length (the check behind `make demo`)."""
    wav = tmp_path / "tone.wav"
    media.write_wav(wav, 0.3 * np.sin(np.linspace(0, 2 * np.pi * 440 * 2, 2 * media.AUDIO_RATE)).astype(np.float32))
    with media.open_writer(tmp_path / "t.mp4", 25, 64, 64, audio=wav) as w:
        for k in range(40):
            w.write(np.full((64, 64, 3), 6 * k, np.uint8))
    found = streams(tmp_path / "t.mp4")
    assert found["video"]["nb_read_frames"] == 40 and abs(found["audio"]["duration"] - 1.6) < 0.05  # cut to the video (-shortest)
