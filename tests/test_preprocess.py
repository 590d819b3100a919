"""`ggtalker preprocess` end to end on a real cut, resume, and the bad-input matrix of issue 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ffmpeg

from ggtalker_cli import media, preprocessing, tracking
from ggtalker_cli.clip import Clip
from ggtalker_cli.config import load_config
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.stages import preprocess


def test_clip_contents(clip_128):
    path, summary = clip_128
    clip = Clip(path)
    n = len(clip)
    assert n == pytest.approx(75, abs=1) and clip.size == 128 and clip.fps == 25
    assert clip.person == "aoc_128"  # no --person: the folder names who speaks
    assert summary["tracked_fraction"] >= 0.95
    # the rigid per-person shape through pose + K: within a few px (here at 128², ×4 for 512²)
    assert summary["rigid_reproj_px_median"] * 4 < 4.0
    tr = clip.tracking
    assert tr["landmarks"].shape == (n, 478, 2) and tr["verts"].shape == (n, 478, 3) and tr["pose"].shape == (n, 4, 4)
    uv = tracking.project(tr["verts"].astype(np.float64), tr["pose"].astype(np.float64), clip.K)
    assert np.abs(uv - tr["landmarks"]).max() < 0.05  # verts project exactly through the clip's K
    assert abs(clip.K[0, 2] - 64) < 32 and abs(clip.K[1, 2] - 64) < 32
    assert list(clip.test_indices) == list(range(n - round(0.1 * n), n))
    assert len(clip.train_indices) + len(clip.test_indices) == n
    frame = clip.frame(n - 1)
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8 and frame.std() > 10
    assert clip.background.shape == (128, 128, 3)


def test_audio_matches_frames(clip_128):
    clip = Clip(clip_128[0])
    pcm, rate = media.read_wav(clip.audio_path)
    assert rate == 16000
    assert abs(len(pcm) / rate - len(clip) / clip.fps) <= 1 / clip.fps
    assert np.abs(pcm).max() > 0.05  # real speech, not silence
    feats = clip.audio_features()
    if feats is not None:  # present when whisper weights resolve
        assert feats.shape[0] == len(clip) and feats.dtype == np.float16


def test_masks_cover_the_face(clip_128):
    clip = Clip(clip_128[0])
    tr = clip.tracking
    shares = []
    for i in range(0, len(clip), 7):
        labels = clip.mask(i)
        assert labels.shape == (128, 128) and set(np.unique(labels)) <= {0, 1, 2}
        hull = np.zeros((128, 128), np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(np.round(tr["landmarks"][i][:468]).astype(np.int32)), 1)
        assert (labels[hull > 0] == 2).mean() >= 0.99
        # the head sits above the torso: mean row of head pixels above mean row of torso pixels
        rows = np.arange(128)[:, None].repeat(128, 1)
        if (labels == 1).any():
            assert rows[labels == 2].mean() < rows[labels == 1].mean()
        shares.append(np.bincount(labels.ravel(), minlength=3) / labels.size)
    share = np.mean(shares, 0)
    assert 0.1 < share[0] < 0.8 and 0.1 < share[2] < 0.7


def test_meta_records_the_source_and_contract(clip_128):
    meta = Clip(clip_128[0]).meta
    assert meta["format"] == "ggtalker-clip" and meta["version"] == 1
    assert len(meta["source"]["sha256"]) == 64 and meta["source"]["fps_nominal"] == 25
    assert meta["identity"]["file"] is None or (clip_128[0] / "identity.npy").is_file()
    assert meta["identity"]["file"] is not None or "insightface" in meta["identity"]["reason"]
    assert (clip_128[0] / "contact_sheet.png").stat().st_size > 10_000
    assert not (clip_128[0] / ".steps").exists()


def test_resume_skips_finished_steps(tmp_path, aoc_cut, monkeypatch):
    out = tmp_path / "clip"
    cfg = load_config("fast", {"preprocess": {"size": 64}})
    real_masks = preprocessing._masks

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocessing, "_masks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess.run(aoc_cut, out, cfg)
    assert not out.exists() and (tmp_path / ".clip.partial" / "frames").is_dir()
    monkeypatch.setattr(preprocessing, "_masks", real_masks)
    summary = preprocess.run(aoc_cut, out, cfg, resume=True, person="aoc")  # who speaks: not a step, so it may change on resume
    assert summary["resumed_steps"] == ["track", "audio", "crop", "frames"]
    assert Clip(out).mask(0).shape == (64, 64) and not (tmp_path / ".clip.partial").exists()
    assert Clip(out).person == "aoc"


def test_resume_refuses_other_settings(tmp_path, aoc_cut, monkeypatch):
    out = tmp_path / "clip"
    monkeypatch.setattr(preprocessing, "_crop", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        preprocess.run(aoc_cut, out, load_config("fast", {"preprocess": {"size": 64}}))
    with pytest.raises(GGError, match="another input or settings"):
        preprocess.run(aoc_cut, out, load_config("fast", {"preprocess": {"size": 96}}), resume=True)


# ---------------------------------------------------------------- bad inputs, through the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ggtalker_cli.cli", "preprocess", *args], capture_output=True, text=True, timeout=300)


def _lines(stderr: str) -> list[str]:
    """What a person reads on stderr, without finished progress bars."""
    return [line for line in stderr.splitlines() if line.strip() and "━" not in line]


def _assert_refused(done: subprocess.CompletedProcess, code: Exit, names: Path, out: Path, words: str) -> None:
    lines = _lines(done.stderr)
    assert done.returncode == int(code), done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert str(names) in lines[0] and words in lines[0], lines[0]
    assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.fixture(scope="module")
def bad(tmp_path_factory, cuts, real_dir):
    """The bad inputs, made once: name → path."""
    d = tmp_path_factory.mktemp("bad")
    aoc, katie = cuts / "aoc_8s_512_25fps.mp4", cuts / "katiehill_8s_512_25fps.mp4"
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 100)
    data = aoc.read_bytes()
    (d / "corrupt.mp4").write_bytes(data[: len(data) // 3])  # index (moov) at the end: unreadable
    ffmpeg("-i", str(aoc), "-c", "copy", "-movflags", "+faststart", str(d / "faststart.mp4"))
    data = (d / "faststart.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index first: decodes, then stops
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=256x256:rate=25:duration=3", "-f", "lavfi", "-i", "sine=frequency=300:duration=3",
           "-pix_fmt", "yuv420p", "-shortest", str(d / "noface.mp4"))
    ffmpeg("-i", str(aoc), "-i", str(katie), "-filter_complex", "[0:v][1:v]hstack[v]", "-map", "[v]", "-map", "0:a",
           "-c:v", "libx264", "-preset", "ultrafast", str(d / "twofaces.mp4"))
    ffmpeg("-i", str(aoc), "-an", "-c:v", "copy", str(d / "silent.mp4"))
    ffmpeg("-i", str(aoc), "-t", "1.2", "-c", "copy", str(d / "short.mp4"))
    return d


@pytest.mark.parametrize(
    "name, code, words",
    [
        ("missing.mp4", Exit.INPUT_MISSING, "no such file"),
        ("empty.mp4", Exit.INPUT_INVALID, "empty"),
        ("text.mp4", Exit.INPUT_INVALID, "not a readable media file"),
        ("corrupt.mp4", Exit.INPUT_INVALID, "not a readable media file"),
        ("truncated.mp4", Exit.INPUT_INVALID, "truncated or damaged"),
        ("noface.mp4", Exit.INPUT_INVALID, "face was found in only 0%"),
        ("twofaces.mp4", Exit.INPUT_INVALID, "2 faces of similar size"),
        ("silent.mp4", Exit.INPUT_INVALID, "no audio stream; pass --allow-no-audio"),
        ("short.mp4", Exit.INPUT_INVALID, "need at least 2 s"),
    ],
)
def test_bad_input_refused(bad, tmp_path, name, code, words):
    out = tmp_path / "clip"
    _assert_refused(_cli(str(bad / name), "-o", str(out), "--size", "64"), code, bad / name, out, words)


def test_audio_only_file_refused(real_dir, tmp_path):
    wav = real_dir / "audio" / "en_obama_5s.wav"
    out = tmp_path / "clip"
    _assert_refused(_cli(str(wav), "-o", str(out)), Exit.INPUT_INVALID, wav, out, "audio-only")


def test_unwritable_output_refused(aoc_cut, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "clip"  # a folder under a regular file can never be created (even as root)
    done = _cli(str(aoc_cut), "-o", str(out))
    lines = _lines(done.stderr)
    assert done.returncode == int(Exit.OUTPUT) and len(lines) == 1 and str(blocker) in lines[0]
    assert blocker.read_text() == "x"


def test_existing_output_refused_without_force(aoc_cut, tmp_path):
    out = tmp_path / "clip"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = _cli(str(aoc_cut), "-o", str(out))
    lines = _lines(done.stderr)
    assert done.returncode == int(Exit.OUTPUT) and len(lines) == 1 and "--force" in lines[0] and str(out) in lines[0]
    assert (out / "keep.txt").read_text() == "mine"


def test_silent_video_accepted_with_flag(bad, tmp_path):
    out = tmp_path / "clip"
    done = _cli(str(bad / "silent.mp4"), "-o", str(out), "--size", "64", "--allow-no-audio")
    assert done.returncode == 0, done.stderr
    clip = Clip(out)
    assert clip.audio_path is None and clip.audio_features() is None
    assert clip.meta["audio"]["present"] is False and len(clip) == pytest.approx(75, abs=1)


def test_identity_embedding_when_a_recogniser_resolves(clip_128, tmp_path, monkeypatch):
    """The insightface path, run with a random-weight model of ArcFace's interface (no real
    weights exist offline): aligned crops go through it and a unit embedding is stored."""
    import shutil

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (512, 3, 8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["data", "W"], ["c"], strides=[8, 8]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["fc1"])]
    graph = helper.make_graph(nodes, "arcface", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "arcface.onnx")
    monkeypatch.setenv("GGTALKER_ARCFACE", str(tmp_path / "arcface.onnx"))
    clip = tmp_path / "clip"
    shutil.copytree(clip_128[0], clip)
    info = preprocessing._identity(clip, len(Clip(clip)))
    emb = np.load(clip / info["file"])
    assert emb.shape == (512,) and abs(np.linalg.norm(emb) - 1) < 1e-4 and info["frames"] == 12
