"""media.py: probe (rates, VFR, rotation, audio), constant-rate streaming decode, audio, encode.

media.py reads and writes in process (PyAV); the ffmpeg command line (a system one, or
imageio-ffmpeg's binary) is the reference it is held to on the real clips' edge cases."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import FFMPEG

from ggtalker_cli import media
from ggtalker_cli.errors import Exit, GGError


def test_probe_real_clip(aoc_cut):
    p = media.probe(aoc_cut)
    assert (p.width, p.height, p.rotation, p.vfr) == (512, 512, 0, False)
    assert p.fps_nominal == pytest.approx(25) and p.duration == pytest.approx(3.0, abs=0.1)
    assert p.audio_codec == "aac" and p.audio_rate == 16000


def test_probe_flags_variable_frame_rate(real_video):
    p = media.probe(real_video("retalk1_man_suit_6s_700_vfr"))
    assert p.vfr and p.fps_nominal == pytest.approx(30) and p.fps_average == pytest.approx(22.13, abs=0.01)


def test_decode_resamples_vfr_to_constant_rate(real_video):
    path = real_video("retalk1_man_suit_6s_700_vfr")
    p = media.probe(path)
    frames = media.decode(path, 25, 70, 70)
    assert isinstance(frames, types.GeneratorType)  # streamed, never a list of all frames
    n = sum(1 for f in frames if f.shape == (70, 70, 3) and f.dtype == np.uint8)
    assert abs(n - p.duration * 25) <= 1.5


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, degrees):
    """A phone video: stored landscape with a display matrix. Frames come out upright, turned
    counter-clockwise by the stored angle (what players and the ffmpeg command line show)."""
    import av

    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:32, :48] = (255, 0, 0)  # red top-left quarter: shows which way the frame turned
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv444p"
        stream.set_display_rotation(degrees)
        for k in range(5):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = k
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    p = media.probe(path)
    assert p.rotation == degrees and (p.width, p.height) == ((64, 96) if degrees != 180 else (96, 64))
    frames = list(media.decode(path, 25, p.width, p.height))
    expected = np.rot90(stored, degrees // 90)
    assert len(frames) == 5 and frames[0].shape == expected.shape
    assert np.abs(frames[0].astype(int) - expected).mean() < 4


def test_extract_audio_is_exact_length_and_aligned(tmp_path, aoc_cut):
    out = tmp_path / "a.wav"
    n = 3 * media.AUDIO_RATE + 123
    info = media.extract_audio(aoc_cut, out, n, offset_s=0.5)
    pcm, rate = media.read_wav(out)
    assert rate == 16000 and len(pcm) == n
    assert np.abs(pcm[: 8000 - 10]).max() == 0  # 0.5 s of leading silence for a late audio start
    assert np.abs(pcm[8000:]).max() > 0.01 and info["offset_s"] == 0.5


def test_writer_roundtrip_with_audio(tmp_path):
    wav, out = tmp_path / "tone.wav", tmp_path / "out.mp4"
    media.write_wav(wav, 0.3 * np.sin(np.linspace(0, 2 * np.pi * 440, media.AUDIO_RATE)).astype(np.float32))
    ramp = np.linspace(0, 1, 64, dtype=np.float32)
    frames = [np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.float32(k / 10)), -1) for k in range(10)]
    with media.open_writer(out, 10, 64, 64, audio=wav) as w:
        for f in frames:
            w.write(f)
    p = media.probe(out)
    assert p.codec == "h264" and p.audio_codec == "aac" and (p.width, p.height) == (64, 64)
    back = list(media.decode(out, 10, 64, 64))
    assert len(back) == 10
    err = np.abs(back[5].astype(np.float32) / 255 - frames[5]).mean()
    assert err < 0.03


def test_writer_removes_partial_file_on_error(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(ValueError), media.open_writer(out, 10, 32, 32) as w:
        w.write(np.zeros((16, 16, 3), np.uint8))
    assert not out.exists()


@pytest.mark.parametrize(
    "content, code, words",
    [(None, Exit.INPUT_MISSING, "no such file"), (b"", Exit.INPUT_INVALID, "empty"), (b"hello\n" * 50, Exit.INPUT_INVALID, "not a readable media file")],
)
def test_probe_bad_files(tmp_path, content, code, words):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(GGError) as e:
        media.probe(path)
    assert e.value.code == code and words in e.value.message and str(path) in e.value.message


def test_probe_audio_only(real_dir):
    with pytest.raises(GGError, match="audio-only") as e:
        media.probe(real_dir / "audio" / "en_obama_5s.wav")
    assert e.value.code == Exit.INPUT_INVALID


def test_behind_writes_in_order_and_surfaces_the_threads_failure():
    """The encoder thread keeps frame order; its failure reaches the caller (next put or close)."""
    written = []
    behind = media.Behind(written.append, depth=2)
    for k in range(10):
        behind.put(np.full(3, k))
    behind.drain()
    assert [int(f[0]) for f in written] == list(range(10))
    behind.close()

    def fail(frame):
        raise GGError("encoder died", Exit.OUTPUT)

    broken = media.Behind(fail, depth=2)
    broken.put(np.zeros(3))
    with pytest.raises(GGError, match="encoder died"):
        for _ in range(5):  # raised at the first put after the thread failed, at the latest at close
            broken.put(np.zeros(3))
        broken.close()


def test_behind_abandon_drops_what_is_queued():
    import threading

    holding, gate, written = threading.Event(), threading.Event(), []
    behind = media.Behind(lambda f: (holding.set(), gate.wait(5), written.append(f)), depth=8)
    for _ in range(5):
        behind.put(np.zeros(3))
    assert holding.wait(5)  # the thread has the first frame in hand before abandon() begins
    threading.Timer(0.2, gate.set).start()  # the frame in hand finishes after abandon() began
    behind.abandon()
    assert len(written) == 1  # the other four were dropped, not written


def _cli_frames(path, fps: float, size: int) -> np.ndarray:
    """The old media.decode: ffmpeg's fps + area-scale filters, rgb24 through a pipe."""
    raw = subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(path), "-vf", f"fps={fps},scale={size}:{size}:flags=area",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"], capture_output=True, check=True).stdout  # fmt: skip
    return np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3)


@pytest.mark.parametrize(
    "name, fps",
    [("retalk1_man_suit_6s_700_vfr", 25), ("tedlieu_60s_256_25fps", 25), ("aoc_8s_512_25fps", 25), ("retalk4_woman_bluebg_7s_700_30fps", 30),
     ("retalk4_woman_bluebg_7s_700_30fps", 25)],
    ids=["vfr", "yuvj420p", "mpeg4", "30fps", "30fps-to-25"],
)  # fmt: skip
def test_decode_matches_the_ffmpeg_command_line(real_video, name, fps):
    """Same frame count (timestamp resampling of VFR and 30 fps input), same pixels (full-range
    yuvj420p, MPEG-4 Part 2) as the ffmpeg command line, to rounding."""
    path = real_video(name)
    ours = np.stack(list(media.decode(path, fps, 96, 96)))
    theirs = _cli_frames(path, fps, 96)
    assert len(ours) == len(theirs) and abs(len(ours) - media.probe(path).duration * fps) <= 1.5
    assert np.abs(ours.astype(int) - theirs).mean() < 1.0


@pytest.mark.parametrize("name", ["en_musetalk_eng_60s", "en_obama_5s", "macron_speech_12s", "iplap_audio2_21s", "de_german_9s"],
                         ids=["16k-mono", "16k-stereo", "48k-stereo", "44k-stereo", "48k-s24"])  # fmt: skip
def test_audio_matches_the_ffmpeg_command_line(real_dir, name):
    """16-48 kHz, mono/stereo, s16/s24 wavs resample to 16 kHz mono as `ffmpeg -ac 1 -ar 16000` does."""
    path = real_dir / "audio" / f"{name}.wav"
    ours = media.read_audio(path)
    raw = subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "f32le", "pipe:"],
                         capture_output=True, check=True).stdout  # fmt: skip
    theirs = np.frombuffer(raw, np.float32)
    assert len(ours) == len(theirs) and np.abs(ours - theirs).max() < 1e-3


def test_mp3_inside_mp4_is_extracted_whole(real_video, tmp_path):
    """The CNN clip carries mp3 audio in its mp4: all 71 s of it come out, aligned to the frames."""
    path = real_video("cnn_anchor_71s_512_25fps")
    p = media.probe(path)
    assert p.audio_codec == "mp3" and p.audio_rate == 44100
    n = round(p.n_frames / 25 * media.AUDIO_RATE)
    info = media.extract_audio(path, tmp_path / "a.wav", n, p.audio_start)
    pcm, _ = media.read_wav(tmp_path / "a.wav")
    assert len(pcm) == n and abs(info["decoded_s"] - p.duration) < 0.1 and np.abs(pcm[-media.AUDIO_RATE :]).max() > 0.01


def test_without_pyav_the_raw_live_path_imports_and_files_fail_with_the_fix(tmp_path):
    """A GPU host without the av wheel still runs `synth --stream --latency` (raw PCM in, raw
    frames out); reading a media file there says what to install instead of an ImportError."""
    probe_me = tmp_path / "x.mp4"
    probe_me.write_bytes(b"not empty")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'av' or name.startswith('av.'): raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ggtalker_cli.live, ggtalker_cli.stages.synth\n"
        "from ggtalker_cli import media\n"
        "from ggtalker_cli.errors import GGError\n"
        "assert 'pip install av' in media.backend()['library']\n"
        "try:\n"
        f"    media.probe({str(probe_me)!r})\n"
        "except GGError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "PyAV is not installed" in run.stdout and "pip install av" in run.stdout
