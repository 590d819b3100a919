"""Issue 8's reliability matrix (docs/errors.md): the bad-input rows no other test file asserts,
kill -9 then --resume of fit-prior, untrusted artifacts, a full disk, CUDA out of memory, and
what --seed guarantees.

Every refusal is checked the same way (`refused`): the documented exit code, exactly one
`error:` line on stderr that names the file and the fix, and nothing left at the target path —
neither the output nor a hidden sibling of it, unless the row expects a resumable partial folder.
Verbs run in-process through Typer's runner (milliseconds per row); the kill -9 and the
cross-process determinism tests start real processes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import ffmpeg, same_tensors
from test_a2e import make_clip
from typer.testing import CliRunner, Result

from ggtalker_cli import a2e_train, artifacts, clip_view, head_fit, training
from ggtalker_cli.cli import app
from ggtalker_cli.config import Config, load_config
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.models.e2v import E2V
from ggtalker_cli.priors import DEFAULT_PRIOR

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny settings: the runs that get past the checks finish in seconds on one CPU thread
A2E = {"window": 16, "d_model": 16, "layers": 1, "heads": 2, "lip_components": 4, "style_dim": 8, "steps": 12, "batch": 4,
       "val_every": 4, "checkpoint_every": 4}
ADAPT = {"size": 64, "steps": 8, "uv_res": 24, "upsample_at": 0.6, "prune_every": 2, "refine_after": 0.3, "checkpoint_every": 4,
         "eval_frames": 1, "log_every": 1}


def cli(*args: object) -> Result:
    """One `ggtalker -q ...` run in this process (progress and info off; errors still print)."""
    return CliRunner().invoke(app, ["-q", *map(str, args)])


def leftovers(target: Path) -> list[str]:
    """What a run left at `target` or beside it (the hidden temporary and partial siblings)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name == target.name or p.name.startswith(f".{target.name}."))


def refused(result: Result, code: Exit, *words: object, target: Path | None = None, left: tuple[str, ...] = ()) -> None:
    """Assert one refusal (see the module docstring)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == int(code), (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    if target is not None:
        assert leftovers(target) == list(left)


def preset(folder: Path, settings: dict) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


def edit_meta(folder: Path, change: Callable[[dict], None]) -> Path:
    path = folder / "meta.yaml"
    meta = yaml.safe_load(path.read_text())
    change(meta)
    path.write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


class Payload:
    """Unpickling this runs a shell command (pickle calls os.system while rebuilding it): the
    classic crafted checkpoint. The command only creates `marker`, so a test sees whether it ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> Path:
    """Write a torch checkpoint at `path` whose loading with pickle would create `marker`."""
    torch.save({"state": Payload(marker), "step": 1}, path)
    return path


@pytest.fixture
def clip(clip_128, tmp_path) -> Path:
    """A private copy of the real 128² clip, to damage."""
    return Path(shutil.copytree(clip_128[0], tmp_path / "clip"))


@pytest.fixture
def avatar(tiny_avatar, tmp_path) -> Path:
    """A private copy of the tiny avatar (its A2E included), to damage."""
    return Path(shutil.copytree(tiny_avatar[0], tmp_path / "avatar"))


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> list[Path]:
    """Two small synthetic clips in the clip format (test_a2e's), enough to fit an A2E prior."""
    root = tmp_path_factory.mktemp("voices")
    return [make_clip(root / f"id{k}", seed=k, n=120) for k in range(2)]


@pytest.fixture(scope="module")
def wav(real_dir) -> Path:
    return real_dir / "audio" / "en_obama_5s.wav"


# ------------------------------------------------------------------ presets and flags, every verb that takes them

VERBS = ["preprocess", "adapt", "fit-prior"]


@pytest.fixture(scope="module")
def verb_args(aoc_cut, clip_128) -> dict[str, list]:
    """Each verb with real inputs, so that only the preset or the flag under test is wrong."""
    return {"preprocess": ["preprocess", aoc_cut], "adapt": ["adapt", clip_128[0], "--no-prior", "--device", "cpu"],
            "fit-prior": ["fit-prior", clip_128[0], "--device", "cpu"]}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize(
    "text, code, words",
    [
        ("adapt: [steps: 3\n", Exit.USAGE, "invalid YAML at line"),
        ("adapt:\n  stepz: 3\n", Exit.USAGE, "unknown key 'adapt.stepz'; valid keys here:"),
        ("adapt:\n  steps: many\n", Exit.USAGE, "'adapt.steps' must be int, got 'many'"),
        ("adapt:\n  seed: -1\n", Exit.USAGE, "'adapt.seed' must be ≥ 0, got -1"),
        ("adapt:\n  checkpoint_every: 0\n", Exit.USAGE, "'adapt.checkpoint_every' is a step interval and must be ≥ 1, got 0; for the fewest, set it above"),
        ("a2e:\n  val_every: -2\n", Exit.USAGE, "'a2e.val_every' is a step interval and must be ≥ 1, got -2"),
        ("- adapt\n", Exit.USAGE, "a preset must be a mapping of sections"),
    ],
    ids=["bad-yaml", "unknown-key", "wrong-type", "negative-int", "zero-interval", "negative-interval", "not-a-mapping"],
)
def test_bad_preset_file(verb, text, code, words, verb_args, tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    refused(cli(*verb_args[verb], "-o", out, "--preset", path), code, path, words, target=out)


def test_float_settings_read_scientific_notation(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; a learning rate written that way is a float,
    while a word in a float setting is still refused."""
    path = tmp_path / "preset.yaml"
    path.write_text("e2v:\n  lr: 1e-4\ninpainter:\n  lr: 2E+0\n")
    cfg = load_config(path)
    assert (cfg.e2v.lr, cfg.inpainter.lr) == (1e-4, 2.0)
    path.write_text("e2v:\n  lr: 1e-4x\n")
    with pytest.raises(GGError, match="'e2v.lr' must be float, got '1e-4x'"):
        load_config(path)


@pytest.mark.parametrize("verb", VERBS)
def test_preset_name_and_file_must_exist(verb, verb_args, tmp_path):
    out, missing = tmp_path / "out", tmp_path / "mine.yaml"
    refused(cli(*verb_args[verb], "-o", out, "--preset", "turbo"), Exit.USAGE, "unknown preset 'turbo'; choose one of:", target=out)
    refused(cli(*verb_args[verb], "-o", out, "--preset", missing), Exit.INPUT_MISSING, missing, "preset file not found", target=out)


@pytest.mark.parametrize(
    "verb, section, words",
    [("adapt", "adapt", "--steps -5: expected a step count ≥ 1 or head=N,inpainter=N,a2e=N"),
     ("fit-prior", "a2e", "--steps -5: expected a step count ≥ 1 or a2e=N,e2v=N")],
    ids=["adapt", "fit-prior"],
)
def test_negative_steps_and_seed(verb, section, words, verb_args, tmp_path):
    out = tmp_path / "out"
    refused(cli(*verb_args[verb], "-o", out, "--steps", "-5"), Exit.USAGE, words, target=out)
    refused(cli(*verb_args[verb], "-o", out, "--seed", "-1"), Exit.USAGE, f"'{section}.seed' must be ≥ 0, got -1", target=out)


def test_every_step_interval_must_be_positive():
    """Each `*_every` setting of every section (a modulus in its training loop) refuses 0 at load,
    so a new one is covered too; prune_every's 0 means never."""
    cfg = Config()
    intervals = [(s.name, f.name) for s in fields(cfg) for f in fields(getattr(cfg, s.name)) if f.name.endswith("_every")]
    assert ("a2e", "val_every") in intervals and ("inpainter", "log_every") in intervals
    for section, key in intervals:
        if key == "prune_every":
            assert load_config(None, {section: {key: 0}}).adapt.prune_every == 0
            continue
        with pytest.raises(GGError, match=rf"'{section}\.{key}' is a step interval and must be ≥ 1, got 0") as e:
            load_config(None, {section: {key: 0}})
        assert e.value.code == Exit.USAGE


def test_fit_prior_needs_a_step(voices, tmp_path):
    """--steps refuses 0 (test_negative_steps_and_seed's message); a preset's 0 is refused by the verb."""
    out, preset = tmp_path / "prior", tmp_path / "none.yaml"
    preset.write_text("a2e:\n  steps: 0\n")
    refused(cli("fit-prior", *voices, "-o", out, "--steps", "0"), Exit.USAGE, "--steps 0: expected a step count ≥ 1 or a2e=N,e2v=N", target=out)
    refused(cli("fit-prior", *voices, "-o", out, "--preset", preset), Exit.USAGE, "a2e.steps 0: a prior needs at least 1 training step; raise --steps",
            target=out)


# ------------------------------------------------------------------ preprocess


def test_preprocess_a_folder_as_video(tmp_path):
    folder, out = tmp_path / "videos", tmp_path / "clip"
    folder.mkdir()
    refused(cli("preprocess", folder, "-o", out), Exit.INPUT_MISSING, folder, "not a file; pass a video file", target=out)


def test_preprocess_8k_video(aoc_cut, tmp_path):
    """7680×4320 (at 5 fps, to keep the test short): tracked at ≤ 960 px, cropped from full resolution."""
    video, out = tmp_path / "8k.mp4", tmp_path / "clip"
    ffmpeg("-t", "2.4", "-i", str(aoc_cut), "-vf", "fps=5,scale=-2:4320,pad=7680:4320:(ow-iw)/2:0", "-c:v", "libx264", "-preset", "ultrafast",
           "-crf", "30", str(video))
    result = cli("preprocess", video, "-o", out, "--size", "64")
    assert result.exit_code == 0, result.stderr
    meta = artifacts.read_meta(out, "clip")
    assert (meta["source"]["width"], meta["source"]["height"]) == (7680, 4320) and meta["n_frames"] == 60
    assert meta["tracking"]["detected_fraction"] == 1.0 and meta["tracking"]["rigid_reproj_px_median"] < 1.0  # at 64²


def test_preprocess_face_lost_for_a_stretch(aoc_cut, tmp_path):
    """The last second black (longer than the 12-frame gaps that are interpolated): accepted, with
    one warning line, and those frames are flagged so no stage trains on them."""
    video, out = tmp_path / "lost.mp4", tmp_path / "clip"
    ffmpeg("-i", str(aoc_cut), "-vf", "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='gte(t,2)'", "-c:v", "libx264",
           "-preset", "ultrafast", "-c:a", "copy", str(video))
    result = cli("preprocess", video, "-o", out, "--size", "64")
    assert result.exit_code == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    lost = artifacts.read_meta(out, "clip")["tracking"]["lost_frames"]
    assert 20 <= lost <= 30 and f"lost.mp4: the face was lost for {lost} frames" in line and "never trained on" in line
    with np.load(out / "tracking.npz") as d:
        assert (~d["valid"] & ~d["interpolated"]).sum() == lost


def test_preprocess_face_lost_mid_clip_is_rejoined(aoc_cut, tmp_path):
    """0.8 s black in the middle (20 frames, longer than the interpolated gaps): the face before and
    after is one person, tracked on both sides, the gap flagged; it was refused as 'face found in
    only 47%' when the gap split the track in two."""
    video, out = tmp_path / "gap.mp4", tmp_path / "clip"
    ffmpeg("-i", str(aoc_cut), "-vf", "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(t,1,1.76)'", "-c:v", "libx264",
           "-preset", "ultrafast", "-c:a", "copy", str(video))
    result = cli("preprocess", video, "-o", out, "--size", "64")
    assert result.exit_code == 0, result.stderr
    tracking_meta = artifacts.read_meta(out, "clip")["tracking"]
    assert 18 <= tracking_meta["lost_frames"] <= 22 and tracking_meta["detected_fraction"] > 0.7
    with np.load(out / "tracking.npz") as d:
        lost = np.flatnonzero(~d["valid"] & ~d["interpolated"])
        assert d["valid"][:20].all() and d["valid"][-20:].all() and 20 <= lost.min() and lost.max() < 50


# ------------------------------------------------------------------ adapt: the clip folder
# Each damage takes a healthy clip copy and returns (the CLIP argument, the path the message names).


def _missing(c: Path) -> tuple[Path, Path]:
    return c.parent / "no_such_clip", c.parent / "no_such_clip"


def _empty_folder(c: Path) -> tuple[Path, Path]:
    (c.parent / "empty").mkdir()
    return c.parent / "empty", c.parent / "empty"


def _a_file(c: Path) -> tuple[Path, Path]:
    (c.parent / "clip.mp4").write_bytes(b"\0" * 100)
    return c.parent / "clip.mp4", c.parent / "clip.mp4"


def _an_avatar(c: Path) -> tuple[Path, Path]:
    return c, edit_meta(c, lambda m: m.update(format="ggtalker-avatar"))


def _other_version(c: Path) -> tuple[Path, Path]:
    return c, edit_meta(c, lambda m: m.update(version=99))


def _corrupt_meta(c: Path) -> tuple[Path, Path]:
    (c / "meta.yaml").write_text("format: [ggtalker-clip\n")
    return c, c / "meta.yaml"


def _empty_meta(c: Path) -> tuple[Path, Path]:
    (c / "meta.yaml").write_text("")
    return c, c / "meta.yaml"


def _no_split(c: Path) -> tuple[Path, Path]:
    return c, edit_meta(c, lambda m: m.pop("split"))


def _no_background(c: Path) -> tuple[Path, Path]:
    (c / "background.png").unlink()
    return c, c / "background.png"


def _no_last_mask(c: Path) -> tuple[Path, Path]:
    last = max((c / "masks").iterdir())
    last.unlink()
    return c, last


def _truncated_tracking(c: Path) -> tuple[Path, Path]:
    return c, truncate(c / "tracking.npz")


def _short_tracking(c: Path) -> tuple[Path, Path]:
    """Tracking for 5 frames fewer than the clip has (mismatched counts)."""
    with np.load(c / "tracking.npz") as d:
        arrays = {k: d[k] if k == "blendshape_names" else d[k][:-5] for k in d.files}
    np.savez(c / "tracking.npz", **arrays)
    return c, c / "tracking.npz"


@pytest.mark.parametrize(
    "damage, code, words",
    [
        pytest.param(_missing, Exit.INPUT_MISSING, ["no such clip folder; check the path"], id="nonexistent"),
        pytest.param(_empty_folder, Exit.ARTIFACT, ["not a ggtalker clip (no meta.yaml); pass a folder made by `ggtalker preprocess`"], id="empty-folder"),
        pytest.param(_a_file, Exit.ARTIFACT, ["not a ggtalker clip (no meta.yaml)"], id="a-file"),
        pytest.param(_an_avatar, Exit.ARTIFACT, ["not a ggtalker clip (format 'ggtalker-avatar'); pass a folder made by"], id="wrong-kind"),
        pytest.param(_other_version, Exit.ARTIFACT, ["clip format version 99 but this ggtalker reads version 1; re-create it"], id="other-version"),
        pytest.param(_corrupt_meta, Exit.ARTIFACT, ["unreadable YAML (ParserError); re-create the clip"], id="corrupt-meta"),
        pytest.param(_empty_meta, Exit.ARTIFACT, ["not a ggtalker clip (format None)"], id="empty-meta"),
        pytest.param(_no_split, Exit.ARTIFACT, ["missing or malformed field ('split'); re-create the clip"], id="meta-field-missing"),
        pytest.param(_no_background, Exit.ARTIFACT, ["named in", "but missing; the clip is incomplete, re-create it"], id="missing-file"),
        pytest.param(_no_last_mask, Exit.ARTIFACT, ["but missing; the clip is incomplete, re-create it"], id="missing-frame"),
        pytest.param(_truncated_tracking, Exit.ARTIFACT, ["unreadable (", "); re-create the clip"], id="truncated-tracking"),
        pytest.param(_short_tracking, Exit.ARTIFACT, ["70 frames of tracking for 75 frames; re-create the clip"], id="frame-count-mismatch"),
    ],
)
def test_adapt_refuses_a_bad_clip(clip, tmp_path, damage, code, words):
    argument, named = damage(clip)
    out = tmp_path / "avatar"
    refused(cli("adapt", argument, "-o", out, "--no-prior", "--device", "cpu"), code, named, *words, target=out)


def test_adapt_output_exists_or_unwritable(clip_128, tmp_path):
    out = tmp_path / "avatar"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["adapt", clip_128[0], "--no-prior", "--device", "cpu"]
    refused(cli(*args, "-o", out), Exit.OUTPUT, out, "output already exists; pass --force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(out) == ["avatar"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(cli(*args, "-o", blocker / "avatar"), Exit.OUTPUT, f"{blocker}: cannot create output folder", "choose a writable -o")
    assert blocker.read_text() == "x"


def test_adapt_prior_must_exist(clip_128, tmp_path):
    out, prior = tmp_path / "avatar", tmp_path / "no_prior"
    refused(cli("adapt", clip_128[0], "-o", out, "--prior", prior, "--device", "cpu"), Exit.INPUT_MISSING, prior, "no such prior folder", target=out)


def _truncated_a2e(prior: Path) -> Path:
    return truncate(prior / "a2e.safetensors")


def _e2v_as_a2e(prior: Path) -> Path:
    shutil.copy(prior / "e2v.safetensors", prior / "a2e.safetensors")
    return prior / "a2e.safetensors"


@pytest.mark.parametrize(
    "damage, words",
    [(_truncated_a2e, "unreadable A2E weights (SafetensorError); re-run fit-prior"), (_e2v_as_a2e, "not an A2E state (KeyError")],
    ids=["truncated", "not-an-a2e"],
)
def test_adapt_prior_a2e_is_checked_before_training(clip_128, tmp_path, monkeypatch, damage, words):
    """adapt fine-tunes the prior's a2e part only after the head and inpainter are trained: a
    damaged one is refused before any of that (it used to fail with a traceback at the end)."""
    prior = Path(shutil.copytree(DEFAULT_PRIOR, tmp_path / "prior"))
    evil, out = damage(prior), tmp_path / "avatar"

    def no_training(*args, **kwargs):
        raise AssertionError("adapt began loading frames before refusing the prior")

    monkeypatch.setattr(clip_view.Data, "__init__", no_training)
    refused(cli("adapt", clip_128[0], "-o", out, "--prior", prior, "--device", "cpu"), Exit.ARTIFACT, evil, words, target=out)


# ------------------------------------------------------------------ fit-prior


def _features_short(voices: list[Path], root: Path) -> tuple[list[Path], Path]:
    """One clip whose audio features have fewer rows than it has frames (mismatched counts)."""
    clip = Path(shutil.copytree(voices[0], root / "short"))
    np.save(clip / "audio_features.npy", np.load(clip / "audio_features.npy")[:-10])
    return [clip, voices[1]], clip / "audio_features.npy"


def _no_features(voices: list[Path], root: Path) -> tuple[list[Path], Path]:
    """One clip preprocessed without whisper weights (no audio features)."""
    clip = Path(shutil.copytree(voices[0], root / "mute"))
    edit_meta(clip, lambda m: m["files"].update(audio_features=None))
    return [clip, voices[1]], clip


def _other_version_clip(voices: list[Path], root: Path) -> tuple[list[Path], Path]:
    clip = Path(shutil.copytree(voices[0], root / "old"))
    return [clip, voices[1]], edit_meta(clip, lambda m: m.update(version=0))


def _missing_clip(voices: list[Path], root: Path) -> tuple[list[Path], Path]:
    return [voices[0], root / "gone"], root / "gone"


def _same_name(voices: list[Path], root: Path) -> tuple[list[Path], Path]:
    twin = Path(shutil.copytree(voices[0], root / "elsewhere" / voices[0].name))
    return [voices[0], twin], Path(voices[0].name)


@pytest.mark.parametrize(
    "clips, code, words",
    [
        pytest.param(_missing_clip, Exit.INPUT_MISSING, ["no such clip folder; check the path"], id="nonexistent"),
        pytest.param(_other_version_clip, Exit.ARTIFACT, ["clip format version 0 but this ggtalker reads version 1"], id="other-version"),
        pytest.param(_features_short, Exit.ARTIFACT, ["110 rows for 120 frames; re-create the clip"], id="feature-count-mismatch"),
        pytest.param(_no_features, Exit.INPUT_INVALID, ["no audio_features.npy; re-run `ggtalker preprocess` with whisper weights"], id="no-features"),
        pytest.param(_same_name, Exit.USAGE, ["clip folders must have distinct names (they name clips)"], id="duplicate-clip-name"),
    ],
)
def test_fit_prior_refuses_bad_clips(voices, tmp_path, clips, code, words):
    given, named = clips(voices, tmp_path)
    out = tmp_path / "prior"
    preset_file = preset(tmp_path, {"a2e": A2E})
    refused(cli("fit-prior", *given, "-o", out, "--preset", preset_file, "--device", "cpu"), code, named, *words, target=out)


def test_fit_prior_output_and_holdout(voices, tmp_path):
    out = tmp_path / "prior"
    out.mkdir()
    refused(cli("fit-prior", *voices, "-o", out, "--device", "cpu"), Exit.OUTPUT, out, "output already exists; pass --force")
    assert list(out.iterdir()) == [] and leftovers(out) == ["prior"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(cli("fit-prior", *voices, "-o", blocker / "prior", "--device", "cpu"), Exit.OUTPUT,
            f"{blocker}: cannot create output folder", "choose a writable -o")
    refused(cli("fit-prior", *voices, "-o", tmp_path / "p2", "--holdout", "id7"), Exit.USAGE, "--holdout id7: not among the clips (id0, id1)",
            target=tmp_path / "p2")
    refused(cli("fit-prior", *voices, "-o", tmp_path / "p2", "--parts", "a2e,lips"), Exit.USAGE, "--parts: unknown part(s) lips; choose from a2e, e2v",
            target=tmp_path / "p2")


# ------------------------------------------------------------------ synth and eval: the avatar folder


def _avatar_missing(a: Path) -> tuple[Path, Path]:
    return a.parent / "no_such_avatar", a.parent / "no_such_avatar"


def _a_clip(a: Path) -> tuple[Path, Path]:
    return a, edit_meta(a, lambda m: m.update(format="ggtalker-clip"))


def _truncated_weights(a: Path) -> tuple[Path, Path]:
    return a, truncate(a / "weights.safetensors")


def _empty_a2e(a: Path) -> tuple[Path, Path]:
    (a / "a2e.safetensors").write_bytes(b"")
    return a, a / "a2e.safetensors"


def _truncated_inpainter(a: Path) -> tuple[Path, Path]:
    return a, truncate(a / "inpainter.safetensors")


def _no_track(a: Path) -> tuple[Path, Path]:
    (a / "synthesis" / "track.npz").unlink()
    return a, a / "synthesis" / "track.npz"


def _clip_moved(a: Path) -> tuple[Path, Path]:
    edit_meta(a, lambda m: m["clip"].update(path=str(a.parent / "moved_clip")))
    return a, a.parent / "moved_clip"


AVATAR_ROWS = [
    pytest.param(_avatar_missing, Exit.INPUT_MISSING, ["no such avatar folder; check the path"], id="nonexistent"),
    pytest.param(_a_clip, Exit.ARTIFACT, ["not a ggtalker avatar (format 'ggtalker-clip'); pass a folder made by `ggtalker adapt`"], id="wrong-kind"),
    pytest.param(_truncated_weights, Exit.ARTIFACT, ["unreadable avatar weights (SafetensorError); re-run ggtalker adapt"], id="truncated-weights"),
    pytest.param(_truncated_inpainter, Exit.ARTIFACT, ["missing or unreadable inpainter weights (SafetensorError)"], id="truncated-inpainter"),
    pytest.param(_no_track, Exit.ARTIFACT, ["missing or unreadable synthesis track (FileNotFoundError); re-run ggtalker adapt"], id="missing-file"),
    pytest.param(_clip_moved, Exit.INPUT_MISSING, ["the avatar's clip (its body frames) is not there; pass --clip CLIP_DIR"], id="clip-moved"),
]


@pytest.mark.parametrize("damage, code, words", [*AVATAR_ROWS, pytest.param(_empty_a2e, Exit.ARTIFACT, ["unreadable A2E weights"], id="empty-a2e")])
def test_synth_refuses_a_bad_avatar(avatar, wav, tmp_path, damage, code, words):
    argument, named = damage(avatar)
    out = tmp_path / "talk.mp4"
    refused(cli("synth", argument, "--audio", wav, "-o", out, "--device", "cpu"), code, named, *words, target=out)


@pytest.mark.parametrize("damage, code, words", AVATAR_ROWS)
def test_eval_refuses_a_bad_avatar(avatar, tmp_path, damage, code, words):
    argument, named = damage(avatar)
    out = tmp_path / "report"
    refused(cli("eval", argument, "-o", out, "--device", "cpu", "--score", "no"), code, named, *words, target=out)


@pytest.fixture
def other_clip(clip) -> Path:
    """The avatar's clip with 10 frames fewer (a different clip than it was adapted on)."""

    def shorten(meta: dict) -> None:
        n = meta["n_frames"] - 10
        meta.update(n_frames=n, split={"train": [0, n - 7], "test": [n - 7, n]})

    edit_meta(clip, shorten)
    return clip


@pytest.mark.parametrize("verb", ["synth", "eval"])
def test_clip_of_another_length_is_refused(tiny_avatar, other_clip, wav, tmp_path, verb):
    avatar = tiny_avatar[0]
    out = tmp_path / ("talk.mp4" if verb == "synth" else "report")
    args = ["synth", avatar, "--audio", wav, "-o", out, "--clip", other_clip] if verb == "synth" else ["eval", avatar, other_clip, "-o", out]
    refused(cli(*args, "--device", "cpu"), Exit.INPUT_INVALID, other_clip, "65 frames but the avatar was adapted on 75; pass the avatar's own clip", target=out)


def test_synth_pose_file_unreadable(tiny_avatar, wav, tmp_path):
    pose, out = tmp_path / "pose.npz", tmp_path / "talk.mp4"
    np.savez(pose, pose=np.eye(4)[None].repeat(3, 0))
    truncate(pose)
    refused(cli("synth", tiny_avatar[0], "--audio", wav, "-o", out, "--pose", pose, "--device", "cpu"), Exit.INPUT_INVALID, pose,
            "unreadable pose file (BadZipFile); expected an .npz with 'pose'", target=out)


def test_eval_output_audio_and_score_only(tiny_avatar, tmp_path):
    avatar = tiny_avatar[0]
    out = tmp_path / "report"
    out.mkdir()
    refused(cli("eval", avatar, "-o", out), Exit.OUTPUT, out, "output already exists; pass --force")
    assert list(out.iterdir()) == [] and leftovers(out) == ["report"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(cli("eval", avatar, "-o", blocker / "report", "--score", "no"), Exit.OUTPUT, f"{blocker}: cannot create output folder", "choose a writable -o")
    missing = tmp_path / "speech.wav"
    refused(cli("eval", avatar, "-o", tmp_path / "r2", "--audio", missing), Exit.INPUT_MISSING,
            missing, "no such audio file; check --audio", target=tmp_path / "r2")
    refused(cli("eval", "-o", out, "--score-only"), Exit.INPUT_MISSING, out, "no report.json to score; run `ggtalker eval AVATAR_DIR -o")
    refused(cli("eval", avatar, "-o", tmp_path / "r3", "--score", "maybe"), Exit.USAGE, "--score maybe: expected auto, yes or no", target=tmp_path / "r3")


# ------------------------------------------------------------------ untrusted artifacts: code never runs, paths stay inside


def test_the_payload_is_live(tmp_path):
    """The crafted checkpoint does run its command when unpickled, so the refusals below mean something."""
    marker = tmp_path / "ran"
    torch.load(plant(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_crafted_adapt_checkpoint(clip_128, tmp_path):
    """An interrupted avatar's checkpoint swapped for a payload: --resume refuses it before it runs."""
    out, marker = tmp_path / "avatar", tmp_path / "ran"
    work = artifacts.work_dir_for(out)
    work.mkdir(parents=True)
    evil = plant(work / head_fit.CHECKPOINT, marker)
    result = cli("adapt", clip_128[0], "-o", out, "--resume", "--no-prior", "--device", "cpu", "--preset", preset(tmp_path, {"adapt": ADAPT}))
    refused(result, Exit.ARTIFACT, evil, "refused: this checkpoint holds more than tensors", "rerun without --resume", target=out, left=(".avatar.partial",))
    assert not marker.exists()


def test_crafted_fit_prior_checkpoint(voices, tmp_path):
    out, marker = tmp_path / "prior", tmp_path / "ran"
    work = artifacts.work_dir_for(out)
    work.mkdir()
    evil = plant(work / "a2e.ckpt", marker)
    result = cli("fit-prior", *voices, "-o", out, "--resume", "--device", "cpu", "--preset", preset(tmp_path, {"a2e": A2E}))
    refused(result, Exit.ARTIFACT, evil, "refused: this checkpoint holds more than tensors", target=out, left=(".prior.partial",))
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, words",
    [("weights.safetensors", "unreadable avatar weights"), ("a2e.safetensors", "unreadable A2E weights"),
     ("inpainter.safetensors", "unreadable inpainter weights")],
    ids=["head", "a2e", "inpainter"],
)
def test_pickle_disguised_as_avatar_weights(avatar, wav, tmp_path, name, words):
    marker, out = tmp_path / "ran", tmp_path / "talk.mp4"
    evil = plant(avatar / name, marker)
    refused(cli("synth", avatar, "--audio", wav, "-o", out, "--device", "cpu"), Exit.ARTIFACT, evil, words, target=out)
    assert not marker.exists()


def test_pickle_disguised_as_e2v_prior_and_checkpoint(tmp_path):
    """The e2v loaders: prior weights (safetensors only) and the training checkpoint (weights_only)."""
    marker = tmp_path / "ran"
    for load, name in ((E2V.load, "e2v.safetensors"), (artifacts.load_checkpoint, "e2v.ckpt")):
        with pytest.raises(GGError) as e:
            load(plant(tmp_path / name, marker))
        assert e.value.code == Exit.ARTIFACT and str(tmp_path / name) in e.value.message
    assert not marker.exists()


def _pickled_tracking(c: Path, marker: Path) -> Path:
    with np.load(c / "tracking.npz") as d:
        arrays = {k: d[k] for k in d.files}
    np.savez(c / "tracking.npz", **arrays, extra=np.array([Payload(marker)], dtype=object))
    return c / "tracking.npz"


def _yaml_tag(c: Path, marker: Path) -> Path:
    (c / "meta.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    return c / "meta.yaml"


@pytest.mark.parametrize(
    "craft, words",
    [(_pickled_tracking, "unreadable (ValueError); re-create the clip"), (_yaml_tag, "unreadable YAML (ConstructorError); re-create the clip")],
    ids=["pickled-array", "yaml-python-tag"],
)
def test_crafted_clip_files(clip, tmp_path, craft, words):
    marker, out = tmp_path / "ran", tmp_path / "avatar"
    evil = craft(clip, marker)
    refused(cli("adapt", clip, "-o", out, "--no-prior", "--device", "cpu"), Exit.ARTIFACT, evil, words, target=out)
    assert not marker.exists()


def _escape_parent(c: Path) -> str:
    shutil.copytree(c / "frames", c.parent / "elsewhere")
    edit_meta(c, lambda m: m["files"].update(frames="../elsewhere"))
    return "'../elsewhere'"


def _absolute(c: Path) -> str:
    outside = shutil.copy(c / "tracking.npz", c.parent / "tracking.npz")
    edit_meta(c, lambda m: m["files"].update(tracking=str(outside)))
    return repr(str(outside))


def _symlink_out(c: Path) -> str:
    shutil.move(c / "background.png", c.parent / "background.png")
    (c / "background.png").symlink_to(c.parent / "background.png")
    return "'background.png'"


@pytest.mark.parametrize("escape", [_escape_parent, _absolute, _symlink_out], ids=["dot-dot", "absolute", "symlink"])
def test_clip_paths_must_stay_inside(clip, tmp_path, escape):
    named, out = escape(clip), tmp_path / "avatar"
    refused(cli("adapt", clip, "-o", out, "--no-prior", "--device", "cpu"), Exit.ARTIFACT, clip / "meta.yaml", f"path {named} points outside the artifact",
            target=out)


def test_avatar_and_prior_paths_must_stay_inside(avatar, tiny_avatar, wav, tmp_path):
    out = tmp_path / "talk.mp4"
    shutil.move(avatar / "inpainter.safetensors", tmp_path / "inpainter.safetensors")
    edit_meta(avatar, lambda m: m["inpainter"].update(file="../inpainter.safetensors"))
    refused(cli("synth", avatar, "--audio", wav, "-o", out, "--device", "cpu"), Exit.ARTIFACT, avatar / "meta.yaml",
            "path '../inpainter.safetensors' points outside the artifact", target=out)
    prior = Path(shutil.copytree(tiny_avatar[1], tmp_path / "prior"))
    shutil.move(prior / "a2e.safetensors", tmp_path / "a2e.safetensors")
    (prior / "a2e.safetensors").symlink_to(tmp_path / "a2e.safetensors")
    refused(cli("synth", tiny_avatar[0], "--a2e", prior, "--audio", wav, "-o", out, "--device", "cpu"), Exit.ARTIFACT, prior / "meta.yaml",
            "path 'a2e.safetensors' points outside the artifact", target=out)


# ------------------------------------------------------------------ resources: a full disk, CUDA out of memory


@pytest.fixture
def small_disk(monkeypatch):
    """Every filesystem reports 1 MiB free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**40, used=2**40 - 2**20, free=2**20))


@pytest.mark.parametrize("verb", ["preprocess", "adapt", "synth"])
def test_too_little_disk_space_is_refused_before_writing(verb, small_disk, aoc_cut, clip_128, tiny_avatar, wav, tmp_path):
    out = tmp_path / ("talk.mp4" if verb == "synth" else "out")
    args = {"preprocess": ["preprocess", aoc_cut], "adapt": ["adapt", clip_128[0], "--no-prior", "--device", "cpu"],
            "synth": ["synth", tiny_avatar[0], "--audio", wav, "--device", "cpu", "--size", "512"]}[verb]  # 512²: over 1 MiB of mp4
    refused(cli(*args, "-o", out), Exit.OUTPUT, out, f"{tmp_path} has 1.0 MiB free but about", "is needed; free disk space there or choose another -o")
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere, not even a temporary


def test_disk_filling_up_mid_run(voices, tmp_path, monkeypatch):
    """The checkpoint write hits a full disk (a real ENOSPC from /dev/full): one line, exit 5, no prior."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")

    def onto_full_disk(path: Path, data: bytes) -> None:
        with open("/dev/full", "wb") as f:
            f.write(data)

    monkeypatch.setattr(training, "atomic_write_bytes", onto_full_disk)
    out = tmp_path / "prior"
    result = cli("fit-prior", *voices, "-o", out, "--device", "cpu", "--preset", preset(tmp_path, {"a2e": A2E}))
    refused(result, Exit.OUTPUT, out, f"disk full ({os.strerror(errno.ENOSPC)}); free disk space there or choose another -o", target=out)


def _out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)")


def test_adapt_out_of_memory(clip_128, tmp_path, monkeypatch):
    monkeypatch.setattr(head_fit.Trainer, "step", _out_of_memory)
    out = tmp_path / "avatar"
    result = cli("adapt", clip_128[0], "-o", out, "--no-prior", "--device", "cpu", "--preset", preset(tmp_path, {"adapt": ADAPT}))
    refused(result, Exit.RESOURCE, "CUDA out of memory adapting at 64² (adapt.uv_res 24, adapt.batch 1); lower --size, adapt.uv_res or adapt.batch",
            "then re-run with --resume", target=out)  # failed before its first checkpoint: nothing to resume, nothing left


def test_fit_prior_out_of_memory(voices, tmp_path, monkeypatch):
    monkeypatch.setattr(a2e_train, "_sample", _out_of_memory)
    out = tmp_path / "prior"
    result = cli("fit-prior", *voices, "-o", out, "--device", "cpu", "--preset", preset(tmp_path, {"a2e": A2E}))
    refused(result, Exit.RESOURCE, "CUDA out of memory training the a2e prior (batch 4 per GPU); lower a2e.batch in a preset YAML", target=out)


@pytest.mark.parametrize(
    "verb, settings, words, left",
    [
        ("fit-prior", {"a2e": {**A2E, "lr": 1e6}}, ("a2e training diverged at step", "lower the preset's a2e.lr"), ()),
        ("adapt", {"adapt": {**ADAPT, "lr_scale": 1e6}}, ("adapt diverged at step", "lower the learning rates in the preset"), ()),
        ("adapt", {"adapt": ADAPT, "inpainter": {"steps": 4, "log_every": 2, "lr": 1e6}},
         ("inpainter training diverged (held-out full PSNR", "lower inpainter.lr"),
         (".avatar.partial",)),  # the fitted head's checkpoint stays, resumable
    ],
    ids=["fit-prior", "adapt", "adapt-inpainter"],
)
def test_absurd_learning_rate_is_a_diverged_run(verb, settings, words, left, voices, clip_128, tmp_path):
    """A learning rate of 1e6 in a preset (a typo'd exponent) drives the loss to NaN/inf within
    two steps (the inpainter's bounded outputs stay finite: it ends far below the paste it starts
    as): exit 9 and one line naming the step (or held-out PSNR) and the rate to lower. A run that failed before
    its first checkpoint leaves no partial folder; the inpainter diverges after the head is fitted,
    whose checkpoint stays for --resume."""
    out = tmp_path / {"fit-prior": "prior", "adapt": "avatar"}[verb]
    inputs = voices if verb == "fit-prior" else [clip_128[0], "--no-prior"]
    refused(cli(verb, *inputs, "-o", out, "--device", "cpu", "--preset", preset(tmp_path, settings)), Exit.DIVERGED, *words, target=out, left=left)


# ------------------------------------------------------------------ kill -9, --resume, and what --seed guarantees

# Runs the CLI in a fresh process; with GGTALKER_TEST_KILL_AT=k it SIGKILLs itself when the a2e
# trainer draws the batch of its k-th step, or (GGTALKER_TEST_KILL_IN=adapt) when adapt starts its
# k-th step (0-based): no handler, no finally, exactly a kill -9 or a pre-emption.
DRIVER = """
import os, signal, sys
from ggtalker_cli import a2e_train, cli, head_fit
sample, step, calls = a2e_train._sample, head_fit.Trainer.step, [0]
kill_at, kill_in = int(os.environ.get("GGTALKER_TEST_KILL_AT", "0")), os.environ.get("GGTALKER_TEST_KILL_IN", "a2e")
def counted(*args):
    calls[0] += 1
    if kill_in == "a2e" and calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return sample(*args)
def stepped(self, i, *args):
    if kill_in == "adapt" and kill_at and i == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, i, *args)
a2e_train._sample, head_fit.Trainer.step = counted, stepped
sys.argv = ["ggtalker", *sys.argv[1:]]
cli.main()
"""


def start(*args: object, kill_at: int = 0, kill_in: str = "a2e") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GGTALKER_TEST_KILL_AT": str(kill_at), "GGTALKER_TEST_KILL_IN": kill_in}
    return subprocess.Popen([sys.executable, "-c", DRIVER, "-q", *map(str, args)], env=env, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> int:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), stderr
    return proc.returncode


def test_fit_prior_kill9_then_resume_is_exact(voices, tmp_path):
    """Killed with SIGKILL during step 11 of 12 (last checkpoint: step 8), then --resume: the
    prior equals an uninterrupted run's bit for bit, in separate processes."""
    args = ["fit-prior", *voices, "--device", "cpu", "--seed", "5", "--preset", preset(tmp_path, {"a2e": A2E})]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    runs = [start(*args, "-o", straight), start(*args, "-o", killed, kill_at=11)]  # both at once: one core each
    assert [finish(p) for p in runs] == [0, -signal.SIGKILL]
    work = artifacts.work_dir_for(killed)
    assert leftovers(killed) == [work.name] and artifacts.load_checkpoint(work / "a2e.ckpt")["step"] == 8
    assert finish(start(*args, "-o", killed, "--resume")) == 0
    assert leftovers(killed) == ["killed"]
    assert same_tensors(straight / "a2e.safetensors", killed / "a2e.safetensors")
    curves = [artifacts.read_meta(p, "prior")["parts"]["a2e"]["curve"] for p in (straight, killed)]
    assert curves[0] == curves[1] and [c["step"] for c in curves[0]] == [4, 8, 12]


def test_adapt_kill9_then_resume_is_exact(clip_128, tmp_path):
    """adapt killed with SIGKILL at step 7 of 8 (last checkpoint: after step 3, checkpoint_every
    4), then --resume: weights, synthesis track and training log equal an uninterrupted run's."""
    args = ["adapt", clip_128[0], "--device", "cpu", "--no-prior", "--seed", "3", "--preset", preset(tmp_path, {"adapt": ADAPT, "inpainter": {"steps": 2}})]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    runs = [start(*args, "-o", straight), start(*args, "-o", killed, kill_at=7, kill_in="adapt")]
    assert [finish(p) for p in runs] == [0, -signal.SIGKILL]
    work = artifacts.work_dir_for(killed)
    assert leftovers(killed) == [work.name] and artifacts.load_checkpoint(work / head_fit.CHECKPOINT)["step"] == 4
    assert finish(start(*args, "-o", killed, "--resume")) == 0
    assert leftovers(killed) == ["killed"]
    assert same_tensors(straight / "weights.safetensors", killed / "weights.safetensors")
    ta, tb = np.load(straight / "synthesis" / "track.npz"), np.load(killed / "synthesis" / "track.npz")
    assert all(np.array_equal(ta[k], tb[k]) for k in ta.files)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (p / "train_log.jsonl").read_text().splitlines()] for p in (straight, killed)]
    assert logs[0] == logs[1] and [r["step"] for r in logs[0]] == list(range(8))


def test_adapt_same_seed_same_avatar_in_separate_processes(clip_128, tmp_path):
    """What the README promises for --seed on CPU: two runs in two processes, bit-identical
    outputs; a third with another seed differs (the seed is what decides)."""
    args = ["adapt", clip_128[0], "--device", "cpu", "--no-prior", "--preset", preset(tmp_path, {"adapt": ADAPT, "inpainter": {"steps": 2}})]
    runs = [start(*args, "--seed", seed, "-o", tmp_path / name) for name, seed in (("a", 3), ("b", 3), ("other", 4))]
    assert [finish(p) for p in runs] == [0, 0, 0]
    a, b = tmp_path / "a", tmp_path / "b"
    assert same_tensors(a / "weights.safetensors", b / "weights.safetensors")
    assert not same_tensors(a / "weights.safetensors", tmp_path / "other" / "weights.safetensors")
    # the inpainter's held-out scores come from its weights and must agree to the last digit, and
    # so must the shipping decision and the weights shipped
    inp_a, inp_b = (yaml.safe_load((x / "meta.yaml").read_text())["inpainter"] for x in (a, b))
    assert inp_a["check"] == inp_b["check"] and inp_a.get("rejected") == inp_b.get("rejected")
    assert inp_a.get("rejected") or same_tensors(a / "inpainter.safetensors", b / "inpainter.safetensors")
    ta, tb = np.load(a / "synthesis" / "track.npz"), np.load(b / "synthesis" / "track.npz")
    assert all(np.array_equal(ta[k], tb[k]) for k in ta.files)
