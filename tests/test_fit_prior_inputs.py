"""fit-prior's inputs: clip folders, folders of clip folders and list files (a corpus of many clips),
with a clear error naming the file for an empty or wrong list, and no prior folder left behind;
`--parts` and `--steps` (N for every part, or a2e=N,e2v=M)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ggtalker_cli import artifacts, priors
from ggtalker_cli.cli import app
from ggtalker_cli.clip import expand_clips
from ggtalker_cli.config import load_config, set_steps
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.stages import fit_prior

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_clip(folder: Path) -> Path:
    """A folder that `expand_clips` takes for a clip (it looks only for meta.yaml; fit-prior validates it)."""
    folder.mkdir(parents=True)
    (folder / "meta.yaml").write_text("format: ggtalker-clip\n")
    return folder


def test_folders_and_lists_expand_in_order(tmp_path):
    corpus = tmp_path / "corpus"
    b, a = fake_clip(corpus / "b"), fake_clip(corpus / "a")
    (corpus / "failed").mkdir()  # a video whose batch preprocess failed: no meta.yaml, skipped
    single = fake_clip(tmp_path / "single")
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = lists / "clips.txt"
    listed.write_text(f"# the corpus\n../single\n\n{b}   # absolute path\n")
    got = expand_clips([corpus, listed, single])
    assert got == [a, b, lists / "../single", b, single]
    assert [p.resolve() for p in got[2:3]] == [single.resolve()]  # relative to the list's folder, not the cwd


@pytest.mark.parametrize(
    "content, message",
    [("", "the list of clips is empty"), ("# nothing yet\n\n", "the list of clips is empty"), ("nowhere/clip\n", "clips.txt:1: ")],
)
def test_bad_list_names_the_file(tmp_path, content, message):
    listed = tmp_path / "clips.txt"
    listed.write_text(content)
    with pytest.raises(GGError) as e:
        expand_clips([listed])
    assert e.value.code == Exit.INPUT_INVALID and str(listed) in str(e.value) and message in str(e.value)


def test_bad_folder_and_binary_file(tmp_path):
    empty = tmp_path / "empty"
    (empty / "not_a_clip").mkdir(parents=True)
    with pytest.raises(GGError, match="neither a clip folder nor a folder of clip folders") as e:
        expand_clips([empty])
    assert str(empty) in str(e.value)
    video = tmp_path / "talk.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42\xff\xfe\x80")
    with pytest.raises(GGError, match="not a readable list of clip folders") as e:
        expand_clips([video])
    assert expand_clips([tmp_path / "missing"]) == [tmp_path / "missing"]  # fit-prior names it (test_reliability)


def test_cli_empty_list_exits_without_output(tmp_path):
    listed = tmp_path / "clips.txt"
    listed.write_text("# to fill\n")
    out = tmp_path / "prior"
    result = CliRunner().invoke(app, ["-q", "fit-prior", str(listed), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == Exit.INPUT_INVALID
    assert f"{listed}: the list of clips is empty" in result.output.replace("\n", "")
    assert not [p for p in tmp_path.iterdir() if p.name != "clips.txt"]  # no prior folder, no partial sibling


def test_fit_prior_from_a_list_trains_on_the_listed_clip(clip_128, tmp_path):
    """A list file with a real clip trains the e2v prior on it and records it in the prior's meta."""
    listed = tmp_path / "clips.txt"
    listed.write_text(f"{clip_128[0]}\n")
    e2v = {"size": 64, "uv_res": 32, "channels": [8, 16], "embed_dim": 4, "batch": 2, "steps": 2, "workers": 0, "val_every": 2,
           "val_samples": 2, "checkpoint_every": 2, "max_sources": 2}  # fmt: skip
    out = tmp_path / "prior"
    fit_prior.run([listed], out, load_config("fast", {"e2v": e2v}), parts="e2v", device="cpu")
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    assert [c["path"] for c in meta["clips"]] == [str(Path(clip_128[0]).resolve())]
    assert (out / "e2v.safetensors").stat().st_size > 0


def test_parts_parsing(monkeypatch):
    assert priors.parse_parts("a2e, a2e") == ["a2e"]
    monkeypatch.setattr(priors, "TRAINERS", {"a2e": priors.TRAINERS["a2e"]})  # a build without e2v
    with pytest.raises(GGError, match="no trainer for this part") as e:
        priors.parse_parts("a2e,e2v")
    assert e.value.code == Exit.USAGE
    with pytest.raises(GGError, match="unknown part"):
        priors.parse_parts("a2e,foo")


def test_steps_set_every_part_or_each():
    """`fit-prior --steps N` is every part's count (the parts are separate priors, not scaled
    together as adapt's are); `a2e=N` sets that part and keeps the preset's others."""
    cfg = load_config("balanced")
    e2v = cfg.e2v.steps
    assert set_steps(cfg, "fit-prior", "300") == {"a2e": 300, "e2v": 300}
    assert (cfg.a2e.steps, cfg.e2v.steps) == (300, 300)
    assert set_steps(load_config("balanced"), "fit-prior", "a2e=50") == {"a2e": 50, "e2v": e2v}
    assert set_steps(load_config("balanced"), "fit-prior", "e2v=7,a2e=5") == {"a2e": 5, "e2v": 7}
    for bad in ("many", "0", "a2e=2,head=3", "e2v=-1"):
        with pytest.raises(GGError, match=r"--steps .*: expected a step count ≥ 1 or a2e=N,e2v=N") as e:
            set_steps(load_config("balanced"), "fit-prior", bad)
        assert e.value.code == Exit.USAGE


def test_cli_reports_the_steps_of_each_part(clip_128, tmp_path):
    """--json says how many steps each trained part ran: the --steps given, per part."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps({"a2e": {"window": 16, "d_model": 32, "layers": 1, "heads": 2, "lip_components": 4, "steps": 100, "batch": 4,
                                          "val_every": 2}}))  # fmt: skip
    out = tmp_path / "prior"
    args = ["--json", "fit-prior", str(clip_128[0]), "-o", str(out), "--preset", str(preset), "--steps", "a2e=3", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    assert summary["steps"] == {"a2e": 3} and artifacts.read_meta(out, "prior")["parts"]["a2e"]["steps"] == 3


def test_a_person_is_held_out_whole(tmp_path):
    """Clips of one person (meta.yaml `person`, from `preprocess --person`) are one identity: held
    out together, whether the clip or the person is named; unnamed clips are their own person."""
    clips = [tmp_path / n for n in ("s1_a", "s1_b", "bob", "carol")]
    for c in clips:
        c.mkdir()
        artifacts.write_meta(c, "clip", {"person": "speaker1" if c.name.startswith("s1_") else None})
    assert priors.choose_holdout(clips, ["s1_b"], 0.2) == ["s1_a", "s1_b"]
    assert priors.choose_holdout(clips, ["speaker1", "bob"], 0.2) == ["bob", "s1_a", "s1_b"]
    auto = priors.choose_holdout(clips, [], 0.34)  # 3 people, k = 1
    assert len(auto) in (1, 2) and (set(auto) == {"s1_a", "s1_b"} or len(auto) == 1)
    with pytest.raises(GGError, match="--holdout dave: not among the clips") as e:
        priors.choose_holdout(clips, ["dave"], 0.2)
    assert e.value.code == Exit.USAGE
