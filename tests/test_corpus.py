"""bench/corpus.py: media re-created from a repository snapshot by repo@commit:path, verified by
sha256; a changed or missing file is named, a blob that does not match the manifest is not written."""

from __future__ import annotations

import hashlib
import subprocess

import yaml

from bench import corpus


def snapshot(tmp_path, content: bytes):
    """A one-commit repository at <mirrors>/owner+name/repo holding `content` at media/talk.mp4."""
    work = tmp_path / "mirrors" / "owner+name" / "repo"
    (work / "media").mkdir(parents=True)
    (work / "media" / "talk.mp4").write_bytes(content)
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "media"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    return tmp_path / "mirrors", commit


def manifest(tmp_path, commit: str, sha: str):
    clip = {"id": "talk1", "person": "someone", "identity": "a person", "language": "en", "repo": "owner/name", "commit": commit,
            "path": "media/talk.mp4", "sha256": sha, "bytes": 5, "duration": 3.0, "fps": 25.0, "res": "64x64", "licence": "MIT", "notes": ""}  # fmt: skip
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump({"clips": [clip]}))
    return path


def test_extract_then_check_names_a_changed_file(tmp_path):
    content = b"\x00\x00\x00\x18ftypmp42 not really a video"
    mirrors, commit = snapshot(tmp_path, content)
    data = tmp_path / "data"
    clips = corpus.load(manifest(tmp_path, commit, hashlib.sha256(content).hexdigest()))
    assert corpus.check(clips, data) == [f"talk1: {data / 'media' / 'talk1.mp4'} missing"]
    assert corpus.extract(clips, mirrors, data) == 0
    assert (data / "media" / "talk1.mp4").read_bytes() == content and corpus.check(clips, data) == []
    (data / "media" / "talk1.mp4").write_bytes(content + b"x")
    assert [b.split(":")[0] for b in corpus.check(clips, data)] == ["talk1"]
    assert corpus.main(["check", "--manifest", str(tmp_path / "corpus.yaml"), "--data", str(data)]) == 1


def test_extract_refuses_a_blob_that_differs_from_the_manifest(tmp_path, capsys):
    mirrors, commit = snapshot(tmp_path, b"the real bytes")
    data = tmp_path / "data"
    clips = corpus.load(manifest(tmp_path, commit, "0" * 64))
    assert corpus.extract(clips, mirrors, data) == 1
    assert "does not match the manifest sha256; not written" in capsys.readouterr().out
    assert not (data / "media" / "talk1.mp4").exists()
