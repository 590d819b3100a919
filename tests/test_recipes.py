"""`ggtalker demo` reuses a step's output only when it was made from what the step would use now."""

from __future__ import annotations

import shutil

import yaml

from ggtalker_cli import artifacts
from ggtalker_cli.recipes import avatar_current, clip_current


def test_clip_is_current_only_for_its_own_video_and_size(clip_128, aoc_cut, macron_cut):
    clip, _ = clip_128
    assert clip_current(clip, aoc_cut, 128)
    assert not clip_current(clip, aoc_cut, 256)  # the demo's other size: preprocess again
    assert not clip_current(clip, macron_cut, 128)  # `make demo VIDEO=other.mp4` must not reuse this clip
    assert not clip_current(clip.parent / "absent", aoc_cut, 128)


def test_avatar_is_stale_once_its_prior_changes(tiny_avatar, tmp_path):
    avatar, prior, clip = tiny_avatar
    assert avatar_current(avatar, clip)  # adapted from scratch: only the clip counts
    copy = shutil.copytree(avatar, tmp_path / "avatar")
    own_prior = shutil.copytree(prior, tmp_path / "prior")
    meta = yaml.safe_load((copy / "meta.yaml").read_text())

    def record(**fields) -> None:
        (copy / "meta.yaml").write_text(yaml.safe_dump({**meta, **fields}, sort_keys=False))

    record(prior=str(own_prior), prior_sha256=artifacts.fingerprint(own_prior, "prior"))
    assert avatar_current(copy, clip)
    weights = own_prior / "a2e.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a pulled priors/default: new weights, same path
    assert not avatar_current(copy, clip)
    record(prior=str(own_prior))  # an avatar from before priors were fingerprinted
    assert not avatar_current(copy, clip)
    record(prior=str(tmp_path / "gone"), prior_sha256="0" * 64)
    assert not avatar_current(copy, clip)
    record(clip={**meta["clip"], "sha256": "0" * 64})  # adapted from another clip
    assert not avatar_current(copy, clip)
