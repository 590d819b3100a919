"""A2E: data loading, the flow sampler (seeded, chunk-exact), state round trip, prior training
(fit-prior), adaptation, prediction.

Clips are synthetic but follow the clip format: their "audio features" are smooth random
signals and the tracked mouth opens as a fixed function of them (with a per-identity gain), so a
model that learns anything audio-driven must beat the mean-expression baseline on test frames.
"""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from ggtalker_cli import a2e, artifacts, metrics
from ggtalker_cli.a2e_train import adapt_a2e
from ggtalker_cli.config import load_config
from ggtalker_cli.errors import Exit, GGError
from ggtalker_cli.models import a2e as net
from ggtalker_cli.stages import fit_prior

D = 24
MIX = np.random.default_rng(123).normal(size=(D, 3))  # shared "phonetics": features -> articulation


def make_clip(folder, seed: int, n: int = 250, fps: float = 25.0, gain: float = 1.0):
    """A minimal valid clip whose mouth opening is driven by its features."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n + 8, D))
    kernel = np.hanning(9) / np.hanning(9).sum()
    feats = np.stack([np.convolve(raw[:, j], kernel, "valid") for j in range(D)], 1)[:n]  # smooth in time
    drive = feats @ MIX  # (n, 3)
    jaw = gain * np.log1p(np.exp(2 * drive[:, 0]))  # >= 0: how far the mouth opens
    verts = np.tile(rng.normal(scale=3.0, size=(1, 478, 3)), (n, 1, 1))
    verts[:, [14, 87, 178, 317, 402, 17, 152]] += np.array([0, -0.4, 0])[None, None] * jaw[:, None, None]
    verts[:, [61, 291]] += np.array([0.2, 0, 0])[None, None] * drive[:, 1:2, None]
    blend = np.zeros((n, 52), np.float32)
    blend[:, 25] = np.clip(jaw / 3, 0, 1)  # jawOpen
    blend[:, 9] = 1 / (1 + np.exp(-drive[:, 2]))
    folder.mkdir(parents=True)
    (folder / "frames").mkdir()
    (folder / "masks").mkdir()
    for i in (0, n - 1):
        cv2.imwrite(str(folder / "frames" / f"{i:06d}.jpg"), np.zeros((8, 8, 3), np.uint8))
        cv2.imwrite(str(folder / "masks" / f"{i:06d}.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(folder / "background.png"), np.zeros((8, 8, 3), np.uint8))
    valid = np.ones(n, bool)
    valid[5] = False
    np.savez(folder / "tracking.npz", landmarks=np.zeros((n, 478, 2), np.float32), verts=verts.astype(np.float32), blendshapes=blend,
             blendshape_names=np.array([f"bs{i}" for i in range(52)]), pose=np.tile(np.eye(4), (n, 1, 1)), valid=valid,
             interpolated=~valid, blink=np.zeros(n, np.float32), mouth_open=jaw.astype(np.float32))  # fmt: skip
    np.save(folder / "audio_features.npy", feats.astype(np.float16))
    n_train = n - n // 10
    artifacts.write_meta(folder, "clip", {
        "fps": fps, "size": 8, "n_frames": n, "K": np.eye(3).tolist(),
        "files": {"frames": "frames", "masks": "masks", "tracking": "tracking.npz", "background": "background.png",
                  "audio_features": "audio_features.npy"},
        "split": {"train": [0, n_train], "test": [n_train, n]},
        "audio": {"present": True, "sample_rate": 16000, "features": {"file": "audio_features.npy", "model": "synthetic", "dim": D}},
    })  # fmt: skip
    return folder


def small_cfg(**a2e_overrides):
    base = dict(window=32, d_model=48, layers=2, heads=2, lip_components=6, steps=300, batch=16, lr=2e-3, val_every=50,
                checkpoint_every=100, adapt_steps=300, adapt_lr=1e-3, adapt_patience=3, dropout=0.1, feature_noise=0.1,
                feature_dropout=0.0, weight_decay=0.01, sample_steps=4, guidance=1.0, val_windows=64)  # fmt: skip
    base.update(a2e_overrides)
    return load_config("fast", {"a2e": base})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [make_clip(root / f"id{k}", seed=k, gain=1.0 + 0.2 * k, fps=30.0 if k == 1 else 25.0) for k in range(4)]


@pytest.fixture(scope="module")
def prior(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("priors") / "prior"
    summary = fit_prior.run(clips, out, small_cfg(), parts="a2e", holdout=["id3"], device="cpu")
    return out, summary


def test_one_person_is_one_identity(clips, tmp_path):
    """Two clips of one speaker share one style row, and the sampling weight of a frame makes a
    person's share of the windows ∝ (their training frames) ** person_balance."""
    import shutil

    from safetensors.torch import load_file

    from ggtalker_cli.a2e_train import frame_weights

    copies = [tmp_path / n for n in ("spk_a", "spk_b", "other")]
    for src, dst in zip(clips[:3], copies):
        shutil.copytree(src, dst)
    for c in copies[:2]:
        meta = yaml.safe_load((c / "meta.yaml").read_text())
        (c / "meta.yaml").write_text(yaml.safe_dump({**meta, "person": "speaker"}))
    data = [a2e.load_clip(c, 25.0) for c in copies]
    assert [d.person for d in data] == ["speaker", "speaker", "other"]
    w = frame_weights(data, 0.5)
    share = {p: sum(wi * d.n_train for wi, d in zip(w, data) if d.person == p) for p in ("speaker", "other")}
    frames = {p: sum(d.n_train for d in data if d.person == p) for p in ("speaker", "other")}
    assert share["speaker"] / share["other"] == pytest.approx((frames["speaker"] / frames["other"]) ** 0.5)
    assert frame_weights(data, 1.0) == [1.0, 1.0, 1.0]
    summary = fit_prior.run(copies, tmp_path / "prior", small_cfg(steps=20, val_every=10), parts="a2e", holdout=["other"], device="cpu")
    meta = artifacts.read_meta(tmp_path / "prior", "prior")
    assert summary["held_out"] == ["other"] and meta["parts"]["a2e"]["identities"] == ["speaker"]
    state = load_file(str(tmp_path / "prior" / "a2e.safetensors"))
    assert state["style.weight"].shape[0] == 2  # the speaker's row and the null row


def test_resample_matches_rates():
    x = np.arange(30, dtype=np.float64)[:, None]  # 1 s at 30 fps, value = frame index
    y = a2e.resample(x, 30.0, 25.0, 25)
    assert y.shape == (25, 1)
    assert np.allclose(y[:, 0], np.clip((np.arange(25) + 0.5) * 30 / 25 - 0.5, 0, 29))
    assert a2e.resample(x, 25.0, 25.0, 30) is x


def test_load_clip_targets(clips):
    data = a2e.load_clip(clips[1], 25.0)  # a 30 fps clip seen at 25 fps
    assert len(data.features) == round(250 * 25 / 30) == len(data.blendshapes) == len(data.mouth)
    assert data.mouth.shape[1:] == (len(net.MOUTH), 3)
    assert not data.valid[4] and data.valid[10]  # the untracked frame 5 is masked at 25 fps too
    mean_offset = data.mouth[: data.n_train][data.valid[: data.n_train]].mean(0)
    assert np.abs(mean_offset).max() < 0.05  # offsets are from the training-frame mean


def test_realign_shifts_features_against_targets(clips):
    """A source whose lips lead its sound by 2 frames trains on audio from 2 frames later."""
    data = a2e.load_clip(clips[1], 25.0)
    ahead = a2e.realign(data, -2)
    assert np.array_equal(ahead.features[:-2], data.features[2:]) and np.array_equal(ahead.mouth, data.mouth)
    assert not ahead.valid[-2:].any() and np.array_equal(ahead.valid[:-2], data.valid[:-2])
    behind = a2e.realign(data, 3)
    assert np.array_equal(behind.features[3:], data.features[:-3]) and not behind.valid[:3].any()
    assert a2e.realign(data, 0) is data
    lag = a2e.source_lag(clips[1], 25.0)
    assert type(lag) is float and np.isnan(lag)  # 7.5 s of training frames: under av_sync's 8 s, no shift (a plain float: it goes to meta.yaml)


def _state(**meta_overrides) -> net.A2E:
    cfg = dataclasses.replace(small_cfg().a2e, **meta_overrides)
    model = net.A2E(net.make_meta(cfg, D, {"model": "synthetic"}, ["a", "b"]))
    torch.nn.init.normal_(model.head[1].weight, std=0.3)  # the head starts at zero (the mean expression)
    return model.eval()


def test_prior_measures_a_short_sources_offset(prior, clips):
    """Under 8 s the sound cannot say how far a source's mouth trails it; the prior's mouth can."""
    from safetensors.torch import load_file

    model = net.from_state(load_file(prior[0] / "a2e.safetensors"))
    data = a2e.load_clip(clips[0], 25.0)
    assert abs(a2e.prior_lag(model, data)) < 0.5  # made in sync
    late = a2e.realign(data, -3)  # sound 3 frames ahead of the mouth it drives
    assert a2e.prior_lag(model, late) == pytest.approx(3.0, abs=0.5)


def test_frame_noise_is_a_function_of_the_frame():
    whole = a2e.frame_noise(7, 0, 300, 5)
    assert whole.shape == (300, 5) and abs(whole.std() - 1) < 0.1
    assert np.array_equal(a2e.frame_noise(7, 61, 130, 5), whole[61:130])  # any span draws the same rows
    assert not np.array_equal(a2e.frame_noise(8, 0, 300, 5), whole)
    assert a2e.frame_noise(7, 10, 10, 5).shape == (0, 5)


@pytest.mark.parametrize("n", [5, 16, 17, 57, 140])
def test_sampler_is_exact_for_any_chunking_and_seeded(n):
    """A stream's codes equal the whole-sequence sample bit for bit for every chunk size (short
    audio, exactly one window, end-aligned windows); the seed decides the sample. At a sampling
    temperature below 1 too: it scales the noise, which stays a function of the frame."""
    model = _state(window=16, sample_steps=3, guidance=2.0, sample_temperature=0.5)
    features = torch.randn(n, D, generator=torch.Generator().manual_seed(n))
    reference = a2e.codes(model, features, seed=3)
    assert reference.shape == (n, model.code_dim) and torch.isfinite(reference).all()
    for chunk in (1, 7, 16, 33):
        sampler = a2e.Sampler(model, seed=3)
        pieces = [sampler.push(features[i : i + chunk]) for i in range(0, n, chunk)]
        lag = [min(i + chunk, n) - sum(map(len, pieces[: k + 1])) for k, i in enumerate(range(0, n, chunk))]
        assert max(lag) <= sampler.latency == 16 + 3 * 8 - 1  # a frame is out once `latency` rows follow it
        got = torch.cat([*pieces, sampler.finish()])
        assert torch.equal(got, reference), (chunk, (got - reference).abs().max())
    assert torch.equal(a2e.codes(model, features, seed=3), reference)
    assert not torch.equal(a2e.codes(model, features, seed=4), reference)
    piece = a2e.Sampler(model, seed=3, start=100)  # a piece of a longer sequence draws that piece's noise
    piece.push(features)
    kept = piece.x[0]  # the rows not yet trimmed, in the piece's own frame numbers
    assert torch.equal(kept.data, torch.as_tensor(a2e.frame_noise(3, 100 + kept.base, 100 + kept.end, model.code_dim)) * (0.5 * model.audio_driven))


def test_temperature_scales_the_starting_noise():
    """Temperature 1 is the flow as trained; 0 starts every seed at the mean code, so the sample
    no longer depends on the seed; the state's value is the default."""
    model = _state(sample_temperature=1.0)
    feats = torch.randn(40, D, generator=torch.Generator().manual_seed(0))
    assert model.meta["sample_temperature"] == 1.0
    assert torch.equal(a2e.codes(model, feats, seed=1), a2e.codes(model, feats, seed=1, temperature=1.0))
    assert not torch.equal(a2e.codes(model, feats, seed=1, temperature=0.5), a2e.codes(model, feats, seed=1))
    assert torch.equal(a2e.codes(model, feats, seed=1, temperature=0.0), a2e.codes(model, feats, seed=2, temperature=0.0))
    cool = net.from_state(net.to_state(_state(sample_temperature=0.5)))
    assert cool.meta["sample_temperature"] == 0.5
    assert torch.equal(a2e.codes(cool, feats, seed=1), a2e.codes(cool, feats, seed=1, temperature=0.5))


def test_guidance_and_steps():
    """Guidance 1 is the conditional model alone; w extrapolates from the unconditional branch
    (null style, null audio)."""
    model = _state()
    torch.nn.init.normal_(model.null_audio)
    x, t, f = torch.randn(1, 20, model.code_dim), torch.full((1,), 0.4), torch.randn(1, 20, D)
    style = model.style_vector()
    cond = model(x, t, f, style)
    uncond = model(x, t, f, model.style.weight[-1:], torch.tensor([False]))
    assert torch.equal(model.guided(x, t, f, style, 1.0), cond)
    assert torch.allclose(model.guided(x, t, f, style, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)
    assert not torch.allclose(cond, uncond)
    feats = torch.randn(40, D)
    assert not torch.equal(a2e.codes(model, feats, guidance=1.0), a2e.codes(model, feats, guidance=3.0))


def test_state_round_trip_and_old_states():
    model = _state()
    again = net.from_state(net.to_state(model))
    x, t, f = torch.randn(2, 20, model.code_dim), torch.rand(2), torch.randn(2, 20, D)
    style = model.style(torch.tensor([0, 2]))
    assert torch.equal(model(x, t, f, style), again(x, t, f, again.style(torch.tensor([0, 2]))))
    with pytest.raises(GGError) as e:
        net.from_state({"weight": torch.zeros(3)})
    assert e.value.code == Exit.ARTIFACT
    v3 = net.to_state(model)  # a flow A2E from before sample_temperature (the shipped prior's): samples as it did
    meta = {k: v for k, v in model.meta.items() if k != "sample_temperature"}
    v3["meta.json"] = torch.frombuffer(bytearray(json.dumps({**meta, "version": 3}).encode()), dtype=torch.uint8)
    read = net.from_state(v3)
    assert read.meta["version"] == net.STATE_VERSION == 4 and read.meta["sample_temperature"] == 1.0
    assert json.loads(bytes(net.to_state(read)["meta.json"].numpy()))["version"] == 4
    assert torch.equal(a2e.codes(read, f[0], seed=5), a2e.codes(model, f[0], seed=5, temperature=1.0))
    old = net.to_state(model)
    old["meta.json"] = torch.frombuffer(bytearray(b'{"version": 2}'), dtype=torch.uint8)  # the deterministic A2E's states
    with pytest.raises(GGError, match="A2E state version 2 .*re-run fit-prior for a prior, or adapt with a current prior") as e:
        net.from_state(old, "avatar/a2e.safetensors")
    assert e.value.code == Exit.ARTIFACT and str(e.value).startswith("avatar/a2e.safetensors: ")


def test_starts_at_mean_and_keeps_upper_face_there():
    """A new model samples the identity mean; eyes and brows stay there whatever the audio."""
    model = net.A2E(net.make_meta(small_cfg().a2e, D, {"model": "synthetic"}, ["a"]))
    model.bs_neutral.fill_(0.3)
    bs, mouth = a2e.run(model, np.random.default_rng(0).normal(size=(50, D)))
    assert np.allclose(bs, 0.3) and np.allclose(mouth, 0)
    torch.nn.init.normal_(model.head[1].weight)
    bs, _ = a2e.run(model, np.random.default_rng(0).normal(size=(50, D)))
    upper = list(net.UPPER_FACE)
    assert np.allclose(bs[:, upper], 0.3) and not np.allclose(bs[:, 25], 0.3)  # jawOpen moves


def _scores(mouth: np.ndarray, data: a2e.ClipData) -> tuple[float, float, float, float]:
    """(mouth r, lip-vertex error, no-audio error, spread ratio) on the clip's test frames."""
    test = slice(data.n_train, None)
    driven, tracked = a2e.mouth_gap(mouth[test] + data.neutral), a2e.mouth_gap(data.mouth[test] + data.neutral)
    lips = slice(0, net.N_LIPS)
    err = np.linalg.norm(mouth[test][:, lips] - data.mouth[test][:, lips], axis=-1).mean()
    return metrics.pearson(driven, tracked), err, np.linalg.norm(data.mouth[test][:, lips], axis=-1).mean(), driven.std() / tracked.std()


def test_fit_prior_writes_prior_and_learns(prior, clips):
    """On an identity it never saw, the sampled mouth follows the tracked one (r > 0.8), beats
    the no-audio mean shape and moves as much as the tracked mouth does (no mean regression)."""
    out, summary = prior
    meta = artifacts.read_meta(out, "prior")
    assert set(meta["parts"]) == {"a2e"} and meta["held_out"] == ["id3"] and (out / "val_loss.png").is_file()
    assert not list(out.glob("*.ckpt"))
    part = meta["parts"]["a2e"]
    curve = [c["val"] for c in part["curve"]]
    assert part["identities"] == ["id0", "id1", "id2"]
    assert min(curve) < curve[0] and part["best_val_loss"] == min(curve) == summary["a2e_best_val_loss"]
    from safetensors.torch import load_file

    model = net.from_state(load_file(out / "a2e.safetensors"))
    assert model.meta["sample_steps"] == 4 and model.meta["guidance"] == 1.0
    data = a2e.load_clip(clips[3], 25.0)  # the held-out identity, its test frames
    r, lip, mean, spread = _scores(a2e.run(model, data.features)[1], data)
    assert r > 0.8 and lip < 0.6 * mean and 0.5 < spread < 1.3, (r, lip, mean, spread)  # its gain 1.6 is beyond the training ones (1-1.4)


def test_adaptation_beats_prior_on_its_identity(prior, clips):
    from safetensors.torch import load_file

    state = load_file(prior[0] / "a2e.safetensors")
    adapted, log = adapt_a2e(state, clips[3], small_cfg().a2e, device="cpu")
    assert log["best_val_loss"] <= log["prior_val_loss"] and log["steps_run"] >= log["best_step"]
    assert 0.7 < log["mouth_spread_ratio"] < 1.3  # on its validation tail
    model = net.from_state(adapted)
    assert model.meta["adapted"] == "id3"
    data = a2e.load_clip(clips[3], 25.0)
    prior_r, prior_err, mean_err, _ = _scores(a2e.run(net.from_state(state), data.features)[1], data)
    r, err, _, _ = _scores(a2e.run(model, data.features)[1], data)
    assert err <= prior_err * 1.05 and prior_err < mean_err and r >= prior_r - 0.05, (err, prior_err, mean_err, r, prior_r)


def test_adaptation_with_a_weight_average(prior, clips):
    """With adapt_ema the kept weights are an average, not a step's: other weights, and still
    never worse than the prior on the validation tail."""
    from safetensors.torch import load_file

    state = load_file(prior[0] / "a2e.safetensors")
    plain, _ = adapt_a2e(state, clips[3], small_cfg(adapt_steps=100, adapt_ema=0.0).a2e, device="cpu")
    averaged, log = adapt_a2e(state, clips[3], small_cfg(adapt_steps=100, adapt_ema=0.9).a2e, device="cpu")
    assert log["best_val_loss"] < log["prior_val_loss"] and log["best_step"] > 0, log
    assert not torch.equal(plain["head.1.weight"], averaged["head.1.weight"])


def test_resume_continues_from_checkpoint(clips, tmp_path):
    out = tmp_path / "prior"
    cfg = small_cfg(steps=100, checkpoint_every=50)
    work = artifacts.work_dir_for(out)
    work.mkdir(parents=True)
    from ggtalker_cli.a2e_train import train_prior

    first = train_prior(clips[:2], [], work, dataclasses.replace(cfg.a2e, steps=50), "cpu", resume=False)
    assert (work / "a2e.ckpt").is_file() and first["steps"] == 50
    summary = fit_prior.run(clips[:2], out, cfg, holdout=[], resume=True, device="cpu")
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    assert [c["step"] for c in meta["parts"]["a2e"]["curve"]] == [50, 100]  # steps 1-50 not repeated
    assert summary["held_out"] == [] and summary["parts"] == ["a2e"]


def test_predict_expressions_and_plot(tmp_path, tiny_whisper):
    """Audio file → expressions at any fps through the real whisper path (tiny random whisper)."""
    import ffmpeg
    from conftest import FFMPEG

    wav = tmp_path / "speech.mp3"
    ffmpeg.input("aevalsrc=0.5*sin(2*PI*300*t)*sin(2*PI*3*t):s=44100:d=1.3", f="lavfi").output(str(wav)).overwrite_output().run(cmd=FFMPEG, quiet=True)
    model = net.A2E(net.make_meta(small_cfg().a2e, 32, {"model": "tiny-random"}, ["a"]))
    torch.nn.init.normal_(model.head[1].weight, std=0.3)
    state = net.to_state(model)
    for fps in (25.0, 30.0):
        out = a2e.predict(state, wav, fps, whisper=tiny_whisper, device="cpu")
        n = out["blendshapes"].shape[0]
        assert abs(n - 1.3 * fps) <= 2 and out["mouth"].shape == (n, len(net.MOUTH), 3) and out["mouth_open"].shape == (n,)
        assert out["blendshapes"].min() >= 0 and out["blendshapes"].max() <= 1
    again = a2e.predict(state, wav, 30.0, whisper=tiny_whisper, device="cpu")
    assert np.array_equal(again["blendshapes"], out["blendshapes"])  # seed 0 both times
    assert not np.array_equal(a2e.predict(state, wav, 30.0, whisper=tiny_whisper, device="cpu", seed=1)["blendshapes"], out["blendshapes"])
    png = tmp_path / "mouth.png"
    a2e.plot_mouth(png, wav, out["mouth_open"], 30.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wrong = net.to_state(net.A2E(net.make_meta(small_cfg().a2e, 48, {"model": "other"}, ["a"])))
    with pytest.raises(GGError, match="32-d features but this A2E was trained on 48-d"):
        a2e.predict(wrong, wav, 25.0, whisper=tiny_whisper, device="cpu")
