"""The expression→visual prior: unwrap + generator, mirrored identities, fit-prior e2v (resumable),
and adapt starting from the prior, on short real cuts preprocessed at 128² (rendered at 64²)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from ggtalker_cli import artifacts, e2v_train
from ggtalker_cli.cli import app
from ggtalker_cli.clip import Clip
from ggtalker_cli.clip_view import Data
from ggtalker_cli.config import load_config
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.face_model import HeadModel
from ggtalker_cli.models.e2v import (
    E2V,
    IN_CHANNELS,
    WEIGHTS,
    unwrap,
    with_topology,
)
from ggtalker_cli.priors import choose_prior, reference_frames
from ggtalker_cli.stages import adapt, fit_prior


def tiny_cfg(**e2v):
    e2v = {"size": 64, "uv_res": 32, "channels": [8, 16], "embed_dim": 4, "batch": 2, "steps": 6, "workers": 0, "val_every": 3,
           "val_samples": 2, "checkpoint_every": 3, "max_sources": 2, "adapt_sources": 4, **e2v}
    return load_config("fast", {"e2v": e2v, "adapt": {"size": 64, "uv_res": 64, "steps": 2, "eval_frames": 3}, "inpainter": {"steps": 2}})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def macron_128(tmp_path_factory, macron_cut):
    """A second identity the prior never sees: the adaptation target."""
    from ggtalker_cli.stages import preprocess

    out = tmp_path_factory.mktemp("clips") / "macron_128"
    preprocess.run(macron_cut, out, load_config("fast", {"preprocess": {"size": 128}}))
    return out


@pytest.fixture(scope="module")
def prior(clip_128, tmp_path_factory):
    out = tmp_path_factory.mktemp("priors") / "prior"
    summary = fit_prior.run([clip_128[0]], out, tiny_cfg(), parts="e2v", device="cpu")
    return out, summary


def test_mirrored_identity_is_exact(clip_128):
    """Mirrored landmarks project through the reflected camera onto the flipped landmarks."""
    data = Data(Clip(clip_128[0]), 64, torch.device("cpu"))
    e2v_train.mirror(data)
    i = int(data.train[len(data.train) // 2])
    cam = data.verts[i] @ data.pose[i, :3, :3].T + data.pose[i, :3, 3]
    q = cam @ data.K.T
    assert np.abs((q[:, :2] / q[:, 2:]).numpy() - data.landmarks[i]).max() < 0.01
    assert torch.det(data.pose[i, :3, :3]) == pytest.approx(1.0, abs=1e-4)  # still a rotation
    perm = e2v_train.landmark_mirror()
    assert (perm[perm] == np.arange(478)).all() and perm[1] == 1  # an involution; the nose tip stays


def test_generator_starts_from_the_unwrapped_colours(clip_128):
    """Shapes and ranges; an untrained generator = mean head with the references' colours."""
    clip = Clip(clip_128[0])
    data = Data(clip, 64, torch.device("cpu"))
    template = HeadModel.template()
    model = E2V(template, 32, 8, 16, [8, 16], 4)
    head = with_topology(HeadModel.fit(data.verts[data.train].numpy(), data.blendshapes[data.train].numpy()), template)
    frames = reference_frames(clip.tracking["pose"], data.train, 3)
    assert len(frames) == 3 and set(frames) <= set(data.train.tolist())
    views = [data.load(i) for i in frames]
    idx = torch.as_tensor(frames)
    x = unwrap(model.template, torch.as_tensor(np.stack([v[0] for v in views]))[None], torch.as_tensor(np.stack([v[1] for v in views]))[None],
               head.vertices(data.verts[idx])[None], data.pose[idx][None], data.K.expand(1, 3, 3, 3), torch.ones(1, 3, dtype=torch.bool))
    assert x.shape == (1, IN_CHANNELS, 32, 32) and x.min() >= 0 and x.max() <= 1
    covered = model.template.alive
    assert (x[0][:, ~covered] == 0).all()
    seen = x[0, 3] > 0.5  # colour confidence
    assert 0.1 < seen[covered].float().mean() < 0.9  # the face is seen, the back of the head is not
    with torch.no_grad():
        uv_map = model(x)
        colour = torch.sigmoid(uv_map[0, 11:14])
        assert uv_map.shape == (1, model.template.map.shape[0], 32, 32) and torch.isfinite(uv_map).all()
        assert torch.allclose(colour[:, seen], x[0, :3][:, seen].clamp(0.02, 0.98), atol=1e-4)
        i = int(data.test[0])
        out, _ = model.render(uv_map[0], head.vertices(data.verts[i]), data.pose[i], data.blendshapes[i], data.K, 64, data.plate)
    assert out.rgb.shape == (1, 64, 64, 3) and 0 <= out.rgb.min() and out.rgb.max() <= 1 + 1e-5


def test_fit_prior_e2v_writes_a_prior(prior):
    out, summary = prior
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    part = meta["parts"]["e2v"]
    assert summary["parts"] == ["e2v"] and [c["step"] for c in part["curve"]] == [0, 3, 6]
    assert part["identities"] == ["aoc_128", "aoc_128 (mirrored)"] and part["validation"].startswith("last 10%")
    assert all((out / f).is_file() for f in (WEIGHTS, "e2v_grid.png", "val_loss.png"))
    assert not list(out.glob("*.ckpt"))
    model, info = E2V.load(out / WEIGHTS)
    saved = load_file(str(out / WEIGHTS))
    assert info["size"] == 64 and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_adapt_from_prior_starts_better_than_scratch(prior, macron_128, tmp_path):
    """The prior-initialised map beats the scratch map on held-out frames of an unseen identity
    (both at adapt's 64² UV map: the prior's 32² prediction is upsampled and re-coloured)."""
    cfg = tiny_cfg()
    with_prior = adapt.run(macron_128, tmp_path / "prior", cfg, prior=prior[0], device="cpu")
    scratch = adapt.run(macron_128, tmp_path / "scratch", cfg, device="cpu")
    start = {k: yaml.safe_load((tmp_path / k / "meta.yaml").read_text()) for k in ("prior", "scratch")}
    assert start["prior"]["prior"] == str(prior[0].resolve()) and start["scratch"]["prior"] is None
    assert start["prior"]["prior_sha256"] == artifacts.fingerprint(prior[0], "prior") and start["scratch"]["prior_sha256"] is None
    assert start["prior"]["uv_res"] == start["scratch"]["uv_res"] == 64
    p0, s0 = start["prior"]["initial_metrics"]["psnr_head"], start["scratch"]["initial_metrics"]["psnr_head"]
    assert p0 > s0 + 0.5, (p0, s0)  # 23.9 vs 22.7 dB here (the scratch start is painted from 8 frames too)
    assert with_prior["test_psnr_head"] > scratch["test_psnr_head"]


def test_resume_continues_the_same_stream(clip_128, tmp_path, monkeypatch):
    """Interrupted after 3 steps and resumed == one uninterrupted run, bit for bit."""
    cfg = tiny_cfg(steps=6, val_every=6)
    straight = tmp_path / "straight"
    straight.mkdir()
    e2v_train.train_prior([clip_128[0]], [], straight, cfg, "cpu", resume=False)

    real, calls = e2v_train._to_device, {"n": 0}

    def interrupt(batch, device):  # call 1: the step-0 validation batch; call k + 1: step k
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(batch, device)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    monkeypatch.setattr(e2v_train, "_to_device", interrupt)
    with pytest.raises(KeyboardInterrupt):
        e2v_train.train_prior([clip_128[0]], [], resumed, cfg, "cpu", resume=False)
    monkeypatch.setattr(e2v_train, "_to_device", real)
    assert torch.load(resumed / e2v_train.CHECKPOINT, weights_only=True)["step"] == 3
    summary = e2v_train.train_prior([clip_128[0]], [], resumed, cfg, "cpu", resume=True)
    a, b = load_file(str(straight / WEIGHTS)), load_file(str(resumed / WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [c["step"] for c in summary["curve"]] == [0, 6]  # step 0 from the first run, not repeated


def test_choose_prior(tmp_path):
    with pytest.raises(GGError) as e:
        choose_prior(tmp_path, no_prior=True)
    assert e.value.code == Exit.USAGE
    assert choose_prior(tmp_path, no_prior=False) == tmp_path
    assert choose_prior(None, no_prior=True) is None


def test_prior_for_another_head_model_is_refused(tmp_path):
    """A prior whose UV layout is not this version's must not silently map texels to wrong places."""
    from safetensors.torch import save_file

    model = E2V(HeadModel.template(), 16, 4, 8, [4], 2)
    model.save(tmp_path / WEIGHTS, {"size": 64})
    assert E2V.load(tmp_path / WEIGHTS)[0].arch["uv_res"] == 16
    state = load_file(str(tmp_path / WEIGHTS))
    state["head.charts"] = state["head.charts"].flip(0)
    save_file(state, str(tmp_path / WEIGHTS), metadata={"arch": json.dumps(model.arch), "meta": "{}"})
    with pytest.raises(GGError) as e:
        E2V.load(tmp_path / WEIGHTS)
    assert e.value.code == Exit.ARTIFACT and "another head model" in e.value.message


def test_absurd_learning_rate_is_a_diverged_run(clip_128, tmp_path):
    """e2v.lr 1e6 (a typo'd exponent): exit 9 naming the step and the setting to lower, and no
    partial folder (it diverges before its first checkpoint: nothing to resume)."""
    out = tmp_path / "prior"
    with pytest.raises(GGError, match=r"e2v training diverged at step \d+ .*lower the preset's e2v.lr") as e:
        fit_prior.run([clip_128[0]], out, tiny_cfg(lr=1e6, checkpoint_every=100), parts="e2v", device="cpu")
    assert e.value.code == Exit.DIVERGED
    assert not out.exists() and not any(tmp_path.glob(".prior*"))


def test_adapt_steps_reach_every_part(prior, tiny_avatar, clip_128, tmp_path):
    """`adapt --steps` changes the steps of the head, the inpainter and the A2E adaptation alike,
    and --json reports what each part ran (a prior with both parts: this e2v + tiny_avatar's a2e)."""
    both = Path(shutil.copytree(prior[0], tmp_path / "both"))
    a2e_prior = tiny_avatar[1]
    shutil.copy(a2e_prior / "a2e.safetensors", both / "a2e.safetensors")
    meta = artifacts.read_meta(both, "prior")
    meta["parts"]["a2e"] = artifacts.read_meta(a2e_prior, "prior")["parts"]["a2e"]
    artifacts.write_meta(both, "prior", {k: v for k, v in meta.items() if k not in ("format", "version")})
    preset = tmp_path / "tiny.yaml"  # the base: head 4, inpainter 8, A2E adaptation 200 (the proportions --steps keeps)
    preset.write_text(json.dumps({"adapt": {"size": 64, "uv_res": 64, "steps": 4, "eval_frames": 2}, "inpainter": {"steps": 8, "log_every": 2},
                                  "a2e": {"adapt_steps": 200, "adapt_patience": 100}}))
    args = ["--json", "adapt", str(clip_128[0]), "--prior", str(both), "--preset", str(preset), "--device", "cpu"]
    runs = {}
    for name, steps in (("half", "2"), ("named", "head=2,inpainter=3")):
        result = CliRunner().invoke(app, [*args, "--steps", steps, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))["steps"]
    assert runs == {"half": {"head": 2, "inpainter": 4, "a2e": 100}, "named": {"head": 2, "inpainter": 3, "a2e": 100}}
    meta = artifacts.read_meta(tmp_path / "half", "avatar")
    assert meta["steps"] == 2 and meta["inpainter"]["steps_run"] == 4 and meta["a2e"]["log"]["steps_run"] == 100


def test_heads_fitted_in_worker_processes_equal_the_in_process_ones(clip_128, macron_128, monkeypatch):
    """The corpus path (one spawned process per clip) must give every identity the head it
    gets in-process: same shell, bit-identical neutral and basis."""
    cfg = tiny_cfg()
    paths = [clip_128[0], macron_128]
    serial = e2v_train._fit_heads(paths, cfg)
    monkeypatch.setattr(e2v_train, "POOL_MIN", 2)
    monkeypatch.setattr(e2v_train.os, "cpu_count", lambda: 2)
    pooled = e2v_train._fit_heads(paths, cfg)
    for (head_a, shell_a), (head_b, shell_b) in zip(serial, pooled):
        assert shell_a == shell_b
        assert torch.equal(head_a.neutral, head_b.neutral) and torch.equal(head_a.basis, head_b.basis)
