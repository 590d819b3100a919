"""eval: report schema, metrics beside their baselines, the two-phase (render → score) split, the page."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ffmpeg

from ggtalker_cli import evaluation, report
from ggtalker_cli.stages import eval as ev

PIXEL = ("psnr", "ssim", "psnr_face", "ssim_face", "psnr_seam")
LANDMARK = ("lmd", "mouth_open_r", "av_sync_lag", "av_sync_lag_rel", "av_sync_r", "blink_rate")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rendered(tiny_avatar, real_dir, tmp_path_factory):
    """An eval report with scoring deferred (as on a GPU machine without mediapipe), plus one
    OOD speech clip."""
    avatar, _, _ = tiny_avatar
    root = tmp_path_factory.mktemp("eval")
    ood = root / "german.wav"
    ffmpeg("-i", str(real_dir / "audio" / "de_german_9s.wav"), "-t", "1.6", str(ood))
    summary = ev.run(avatar, None, root / "report", audios=[ood], device="cpu", score="no")
    return root / "report", summary


@pytest.fixture(scope="module")
def scored(rendered, tmp_path_factory):
    """The same report finished by `eval --score-only` (needs mediapipe and its model)."""
    if not evaluation.can_score():
        pytest.skip("mediapipe or face_landmarker.task not available")
    folder = tmp_path_factory.mktemp("scored") / "report"
    shutil.copytree(rendered[0], folder)
    summary = ev.run(None, None, folder, score_only=True)
    return folder, summary


def _report(folder):
    return json.loads((folder / "report.json").read_text())


def test_render_phase_report_is_valid_and_marks_pending(rendered):
    folder, summary = rendered
    rep = _report(folder)
    assert report.validate(rep) == []
    assert summary["pending"] and rep["pending"]
    assert set(rep["variants"]) == set(evaluation.VARIANTS)
    for name in ("tracked", "audio", "no_audio", "tracked_paste", "retrieval_landmarks", "retrieval_blendshapes_pose"):
        for key in PIXEL:
            entry = rep["variants"][name]["metrics"][key]
            assert entry["definition"] == key and isinstance(entry["value"], float) and math.isfinite(entry["value"]), (name, key)
    assert rep["variants"]["audio"]["metrics"]["lmd"]["value"] is None
    assert rep["variants"]["audio"]["metrics"]["lmd"]["status"].startswith("pending")
    assert rep["protocol"]["frames"] == rep["clip"]["test_frames"][1] - rep["clip"]["test_frames"][0]
    speed = rep["speed"]["metrics"]
    assert speed["synth_fps"]["value"] > 0 and speed["render_ms"]["value"] > 0 and speed["adapt_s"]["value"] > 0
    assert all(v["status"].startswith("not computed") for v in rep["optional"].values())
    (ood,) = rep["ood"]
    assert ood["frames"] == 40 and ood["metrics"]["a2e_av_sync_lag"]["value"] is None  # 1.6 s: too short to measure
    assert "not measured" in ood["metrics"]["a2e_av_sync_lag"]["note"]
    for name in ("gt", "audio", "tracked", "no_audio", "error_audio", "ood_0"):
        assert (folder / "videos" / f"{name}.mp4").stat().st_size > 0
    for name in ("report.md", "report.html", "strips.png", "bars.png", "mouth.png", "data.npz", "audio/test.wav"):
        assert (folder / name).is_file(), name


def test_score_only_fills_landmark_metrics(scored):
    folder, summary = scored
    rep = _report(folder)
    assert report.validate(rep) == [] and rep["pending"] == [] and not summary["pending"]
    for name in ("tracked", "audio", "no_audio", "retrieval_landmarks", "retrieval_blendshapes_pose", "gt"):
        for key in LANDMARK:
            entry = rep["variants"][name]["metrics"][key]
            assert entry["definition"] == key and "status" not in entry, (name, key)
    assert rep["variants"]["gt"]["metrics"]["mouth_open_r"]["value"] == pytest.approx(1.0)
    for name in ("tracked", "audio", "no_audio", "retrieval_landmarks"):  # lip-sync against the real video
        lag = rep["variants"][name]["metrics"]["mouth_lag"]
        assert lag["definition"] == "mouth_lag" and lag["value"] in range(-10, 11), (name, lag)
    assert "mouth_lag" not in rep["variants"]["gt"]["metrics"]
    assert rep["speed"]["metrics"]["render_ms"]["definition"] == "render_ms_batch"
    assert rep["variants"]["gt"]["metrics"]["lmd"]["value"] == 0.0
    floor = rep["variants"]["detector_floor"]["metrics"]
    assert 0 < floor["lmd"]["value"] < 5 and floor["lmd_shift"]["definition"] == "lmd"
    # the ground truth's own landmarks are much closer to it than any render
    assert rep["variants"]["tracked"]["metrics"]["lmd"]["value"] > floor["lmd_shift"]["value"]
    assert rep["ood"][0]["metrics"]["av_sync_lag"]["value"] is None  # 1.6 s of audio: under the 8-s minimum
    assert rep["ood"][0]["metrics"]["render_lag"]["value"] in range(-10, 11)  # the written video vs what A2E drove
    assert (folder / "scores.npz").is_file()
    assert "pending" not in (folder / "report.md").read_text().split("## Out-of-distribution")[0]


def test_validator_rejects_broken_reports(rendered):
    rep = _report(rendered[0])
    broken = copy.deepcopy(rep)
    del broken["speed"]
    broken["variants"]["audio"]["metrics"]["psnr"]["value"] = "high"
    broken["variants"]["audio"]["metrics"]["ssim"]["definition"] = "made_up"
    broken["variants"]["tracked"]["metrics"]["psnr"]["value"] = math.inf
    broken["variants"]["tracked"]["kind"] = "magic"
    broken["schema_version"] = 99
    errors = "\n".join(report.validate(broken))
    for words in ("missing 'speed'", "'high'", "made_up", "not valid JSON", "magic", "99"):
        assert words in errors
    ok = copy.deepcopy(rep)
    ok["variants"]["tracked"]["metrics"]["psnr"]["value"] = "inf"  # identical images: +inf is legitimate
    assert report.validate(ok) == []


def test_retrieval_finds_an_identical_training_frame(clip_128):
    from ggtalker_cli.clip import Clip

    clip = Clip(clip_128[0])
    train = clip.train_indices[:-1]
    # test on training frames themselves: each is its own nearest neighbour
    found = evaluation.nearest_training(clip, train, train[::7])
    for name in ("retrieval_landmarks", "retrieval_blendshapes_pose"):
        np.testing.assert_array_equal(found[name], train[::7])


def test_report_page_in_headless_chromium(rendered, tmp_path):
    folder = rendered[0]
    text = (folder / "report.html").read_text()
    files = report.referenced_files(text)
    assert any(f.endswith(".mp4") for f in files) and any(f.endswith(".png") for f in files)
    assert all((folder / f).is_file() for f in files)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=15000", "--dump-dom", (folder / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    status = re.search(r'data-status="([^"]*)"', done.stdout)
    assert status is not None, done.stderr[-2000:]
    assert status.group(1) == "ok"
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []

