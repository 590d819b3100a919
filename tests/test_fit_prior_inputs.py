"""fit-prior's inputs: clip folders, folders of clip folders and list files (a corpus of many clips),
with a clear error naming the file for an empty or wrong list, and no prior folder left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ggtalker_cli.cli import app
from ggtalker_cli.config import load_config
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.stages import fit_prior

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_clip(folder: Path) -> Path:
    """A folder that `expand_clips` takes for a clip (it looks only for meta.yaml; run() validates it)."""
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
    got = fit_prior.expand_clips([corpus, listed, single])
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
        fit_prior.expand_clips([listed])
    assert e.value.code == Exit.INPUT_INVALID and str(listed) in str(e.value) and message in str(e.value)


def test_bad_folder_and_binary_file(tmp_path):
    empty = tmp_path / "empty"
    (empty / "not_a_clip").mkdir(parents=True)
    with pytest.raises(GGError, match="neither a clip folder nor a folder of clip folders") as e:
        fit_prior.expand_clips([empty])
    assert str(empty) in str(e.value)
    video = tmp_path / "talk.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42\xff\xfe\x80")
    with pytest.raises(GGError, match="not a readable list of clip folders") as e:
        fit_prior.expand_clips([video])
    assert fit_prior.expand_clips([tmp_path / "missing"]) == [tmp_path / "missing"]  # run() names it (test_reliability)


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
