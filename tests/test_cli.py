"""The command line itself: global flags after the verb, the --json error object, plain flags in
help, and `doctor` naming the FFmpeg in use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from ggtalker_cli.errors import Exit


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ggtalker_cli.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_failure_is_one_object_on_stdout(tmp_path, where):
    missing = tmp_path / "nope.mp4"
    verb = ["preprocess", str(missing), "-o", str(tmp_path / "c")]
    done = _cli(*(["--json", *verb] if where == "before" else [*verb, "--json"]))
    assert done.returncode == Exit.INPUT_MISSING
    assert json.loads(done.stdout) == {"error": f"{missing}: no such file; check the path", "exit": Exit.INPUT_MISSING}
    assert done.stdout.count("\n") == 1 and str(missing) in done.stderr  # humans still read stderr
    assert not (tmp_path / "c").exists()


def test_usage_error_under_json_is_an_object_too(tmp_path):
    done = _cli("synth", str(tmp_path), "--bogus", "--json")
    assert done.returncode == Exit.USAGE
    error = json.loads(done.stdout)
    assert error["exit"] == Exit.USAGE and "--bogus" in error["error"]


def test_quiet_after_the_verb_leaves_only_the_error(tmp_path):
    done = _cli("preprocess", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "c"), "-q")
    assert done.returncode == Exit.INPUT_MISSING and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.mp4'}: no such file; check the path"]


def test_help_shows_boolean_flags_as_flags():
    done = _cli("adapt", "--help")
    assert done.returncode == 0
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip().startswith("--")}
    for flag in ("--resume", "--force", "--no-prior", "--help"):
        assert "<bool>" not in lines[flag], lines[flag]
    assert "<str>" in lines["--steps"]  # options that take a value still say what (N or head=N,inpainter=M,a2e=K)


def test_version():
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip()


def test_doctor_names_where_ffmpeg_comes_from():
    done = _cli("doctor", "--json")
    report = json.loads(done.stdout)["ffmpeg"]
    assert report["library"].startswith("PyAV ") and report["ffmpeg"]
    assert report["source"] in ("bundled in the av wheel", "a system FFmpeg library (PyAV built from source)")
    assert "libavcodec" in report["libavcodec"] and report["video_encoder"] in ("libx264", "mpeg4")
