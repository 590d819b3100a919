"""Training the A2E flow: the cross-identity prior (`fit-prior --parts a2e`) and its adaptation
to one identity (called by `adapt`), both on the shared loop (`training.Loop`).

A training step draws windows, a flow time t ~ U(0, 1) and noise per window, builds
x_t = (1 - t)·noise + t·code and fits the clean code (`A2E.loss`). Style dropout (null row) and
condition dropout (null style and null audio, the CFG branch) are drawn per window.

Data discipline (DESIGN.md section 5): a clip's test frames (its last 10%) are never used, not
for training, not for validation, not for early stopping. The prior validates on the training
frames of identities it does not train on (an identity is a person, `clip.person`: all of their
clips); a person's style row is shared by their clips, and windows are drawn so that a person with
L training frames gets a share ∝ L**`person_balance` (one speaker's 25 minutes do not drown 60
people's seconds); adaptation stops early on
the last `adapt_val_fraction` of the clip's training frames, which it does not fit. Validation
is the same loss on fixed windows at fixed flow times and noise, so it is deterministic and
comparable between steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import training
from .a2e import (
    ClipData,
    fit_lip_basis,
    load_clip,
    mouth_gap,
    prior_lag,
    realign,
    run,
    source_lag,
    training_rows,
)
from .config import A2EConfig
from .errors import Exit, GGError
from .models.a2e import A2E, from_state, make_meta, to_state

Span = tuple[int, int, int]  # (clip index, first frame, end frame) at the model frame rate
VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)  # flow times every validation window is scored at


def _windows(clips: list[ClipData], spans: list[Span], starts: list[tuple[int, int]], window: int, device) -> dict[str, Tensor]:
    """Stack windows (clip index, start) into padded tensors; padding frames are invalid."""
    feats, bs, mouth, valid = [], [], [], []
    for ci, s in starts:
        c, end = clips[ci], next(e for i, b, e in spans if i == ci and b <= s < e)
        sl = slice(s, min(s + window, end))
        pad = window - (sl.stop - sl.start)
        feats.append(np.pad(c.features[sl], ((0, pad), (0, 0))))
        bs.append(np.pad(c.blendshapes[sl], ((0, pad), (0, 0))))
        mouth.append(np.pad(c.mouth[sl], ((0, pad), (0, 0), (0, 0))))
        valid.append(np.pad(c.valid[sl], (0, pad)))
    return {k: torch.as_tensor(np.stack(v), device=device) for k, v in (("features", feats), ("blendshapes", bs), ("mouth", mouth), ("valid", valid))}


def _sample(spans: list[Span], rng: np.random.Generator, n: int, window: int, weight: dict[int, float] | None = None) -> list[tuple[int, int]]:
    """n random windows, spans chosen in proportion to their length times their clip's frame
    `weight` (default 1: every frame equally likely)."""
    lengths = np.array([(e - b) * (1.0 if weight is None else weight[i]) for i, b, e in spans], np.float64)
    picks = rng.choice(len(spans), size=n, p=lengths / lengths.sum())
    return [(spans[k][0], spans[k][1] + int(rng.integers(0, max(1, spans[k][2] - spans[k][1] - window + 1)))) for k in picks]


def _flow_loss(net, model: A2E, b: dict[str, Tensor], style: Tensor, t: Tensor, noise: Tensor, cfg: A2EConfig,
               audio: Tensor | None = None, feature_noise: float = 0.0, feature_dropout: float = 0.0) -> tuple[Tensor, dict[str, float]]:  # fmt: skip
    """The loss of predicting the windows' clean code from x_t = (1 - t)·noise + t·code."""
    code = model.encode(b["blendshapes"], b["mouth"])
    xt = (1 - t[:, None, None]) * noise + t[:, None, None] * code
    pred = net(xt, t, b["features"], style, audio, feature_noise, feature_dropout)
    return model.loss(pred, b["blendshapes"], b["mouth"], b["valid"], cfg.lip_weight, cfg.temporal_weight, cfg.gap_weight)


class _Validation:
    """Fixed windows over `spans` (evenly spaced, at most `cfg.val_windows`), each scored at
    VAL_TIMES with noise fixed by the seed: a deterministic estimate of the flow loss."""

    def __init__(self, clips: list[ClipData], spans: list[Span], cfg: A2EConfig, code_dim: int, device):
        starts = [(ci, s) for ci, b, e in spans for s in range(b, max(b + 1, e - cfg.window + 1), cfg.window)]
        if len(starts) > cfg.val_windows:
            starts = [starts[i] for i in np.linspace(0, len(starts) - 1, cfg.val_windows).round().astype(int)]
        self.batch = _windows(clips, spans, starts, cfg.window, device)
        rng = training.generator(cfg.seed, 7919)
        self.noise = [torch.as_tensor(rng.standard_normal((len(starts), cfg.window, code_dim), dtype=np.float32), device=device) for _ in VAL_TIMES]
        self.cfg, self.device = cfg, device

    @torch.no_grad()
    def __call__(self, model: A2E, style: Tensor) -> float:
        model.eval()
        n = len(self.batch["features"])
        total = 0.0
        for t, noise in zip(VAL_TIMES, self.noise):
            loss, _ = _flow_loss(model, model, self.batch, style.expand(n, -1), torch.full((n,), t, device=self.device), noise * model.audio_driven, self.cfg)
            total += float(loss)
        model.train()
        return total / len(VAL_TIMES)


def _check_features(clips: list[ClipData]) -> dict:
    dims = {c.features.shape[1] for c in clips}
    models = {c.whisper.get("model") for c in clips}
    if len(dims) > 1 or len(models) > 1:
        listing = ", ".join(f"{c.name}: {c.whisper.get('model')} {c.features.shape[1]}-d" for c in clips)
        raise GGError(f"clips have audio features of different whisper models ({listing}); re-run preprocess with one --whisper", Exit.INPUT_INVALID)
    return {"model": models.pop(), "dim": dims.pop()}


def frame_weights(clips: list[ClipData], balance: float) -> list[float]:
    """The weight of one training frame of each clip: a person (clip.person) with L training
    frames in all draws a share ∝ L**balance (1: every frame alike; 0: every person alike)."""
    total: dict[str, int] = {}
    for c in clips:
        total[c.person] = total.get(c.person, 0) + c.n_train
    return [float(max(total[c.person], 1)) ** (balance - 1.0) for c in clips]


def _init_statistics(model: A2E, clips: list[ClipData], weights: list[float]) -> None:
    """The code's normalisation from the training identities, each weighing as it is sampled:
    the universal lip PCA, the blendshape deviations' spread and the identity means a prior
    stands on (the mean over people, not over clips)."""
    basis, lip_std = fit_lip_basis(clips, model.meta["lip_components"], weights)
    rows, w = training_rows(clips, "blendshapes", weights)
    mean = (w[:, None] * rows).sum(0) / w.sum()
    std = np.sqrt((w[:, None] * (rows - mean) ** 2).sum(0) / w.sum())
    model.lip_basis.copy_(torch.as_tensor(basis))
    model.lip_std.copy_(torch.as_tensor(lip_std))
    model.bs_std.copy_(torch.as_tensor(np.maximum(std, 0.02), dtype=torch.float32))  # near-constant blendshapes stay tame
    people = sorted({c.person for c in clips})
    for field in ("bs_neutral", "neutral"):
        means = [np.mean([getattr(c, field) for c in clips if c.person == who], 0) for who in people]
        getattr(model, field).copy_(torch.as_tensor(np.mean(means, 0), dtype=torch.float32))


def train_prior(clip_dirs: list[Path], holdout: list[str], work: Path, cfg: A2EConfig, device: str, resume: bool, rank: int = 0, world: int = 1) -> dict:
    """Train the A2E prior; write `work/a2e.safetensors`; return this part's summary for meta.yaml.

    Checkpoints (model, optimiser, schedule, best weights, curve) go to `work/a2e.ckpt` every
    `checkpoint_every` steps and on SIGINT/SIGTERM, atomically; `resume` continues from it.
    Under DDP each rank samples its own windows (seeded by rank) and rank 0 writes.
    """
    from safetensors.torch import save_file

    clips = [load_clip(p, cfg.fps) for p in clip_dirs]
    whisper = _check_features(clips)
    train = [i for i, c in enumerate(clips) if c.name not in holdout]
    if not train:
        raise GGError("every clip is held out; train on at least one identity", Exit.USAGE)
    if holdout:
        val_spans = [(i, 0, c.n_train) for i, c in enumerate(clips) if c.name in holdout]
        train_spans = [(i, 0, clips[i].n_train) for i in train]
    else:  # one identity: validate on the end of each clip's training frames instead
        cut = {i: clips[i].n_train - max(1, round(cfg.adapt_val_fraction * clips[i].n_train)) for i in train}
        val_spans = [(i, cut[i], clips[i].n_train) for i in train]
        train_spans = [(i, 0, cut[i]) for i in train]
    train_spans = [s for s in train_spans if s[2] - s[1] >= 2]
    identities = list(dict.fromkeys(clips[i].person for i in train))  # people, in the order given
    row_of = {who: k for k, who in enumerate(identities)}
    style_of = {i: row_of[clips[i].person] for i in train}
    weight = dict(zip(train, frame_weights([clips[i] for i in train], cfg.person_balance)))

    torch.manual_seed(cfg.seed)
    model = A2E(make_meta(cfg, whisper["dim"], whisper, identities))
    _init_statistics(model, [clips[i] for i in train], [weight[i] for i in train])
    model.to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    sched = training.warmup_cosine(opt, cfg.steps, min(200, cfg.steps // 10))
    validate = _Validation(clips, val_spans, cfg, model.code_dim, device)
    best, curve, start = training.Best(), [], 0
    ckpt = work / "a2e.ckpt"
    saved = training.load(ckpt, device) if resume else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        best.load(saved["best"])
        start, curve = saved["step"], [tuple(x) for x in saved["curve"]]
    null = torch.tensor(model.null_style, device=device)

    def step(i: int) -> dict[str, Tensor]:
        rng = training.generator(cfg.seed, rank, i)
        training.seed_torch(cfg.seed, rank, i)
        starts = _sample(train_spans, rng, cfg.batch, cfg.window, weight)
        b = _windows(clips, train_spans, starts, cfg.window, device)
        idx = torch.tensor([style_of[ci] for ci, _ in starts], device=device)
        drop = torch.as_tensor(rng.random(len(idx)) < cfg.style_dropout, device=device)
        audio = torch.as_tensor(rng.random(len(idx)) >= cfg.cond_dropout, device=device)
        style = model.style(torch.where(drop | ~audio, null, idx))
        t = torch.as_tensor(rng.random(len(idx)), dtype=torch.float32, device=device)
        noise = torch.randn(len(idx), cfg.window, model.code_dim, device=device) * model.audio_driven
        loss, _ = _flow_loss(net, model, b, style, t, noise, cfg, audio, cfg.feature_noise, cfg.feature_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.detach()}

    def validation(done: int) -> str:
        val = validate(model, model.style.weight[-1:].detach())
        curve.append((done, loop.values["loss"], val))
        best.offer(val, done, model)
        return f"loss {loop.values['loss']:.3f} val {val:.3f} (best {best.value:.3f})"

    def checkpoint(done: int) -> None:
        if rank == 0:
            training.save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": done,
                                 "curve": [list(x) for x in curve], "best": best.to_dict()})  # fmt: skip

    model.train()
    loop = training.Loop("a2e training", cfg.steps, start=start, fix="lower the preset's a2e.lr or re-run with --resume",
                         checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, checkpoint_last=True)  # fmt: skip
    loop.every(cfg.val_every, validation)
    loop.run(step)
    model.load_state_dict(best.state)
    if rank == 0:
        save_file(to_state(model.eval()), str(work / "a2e.safetensors"))
    return {
        "file": "a2e.safetensors",
        "whisper": whisper,
        "fps": cfg.fps,
        "identities": identities,
        "held_out": sorted(holdout),
        "validation": "training frames of held-out identities" if holdout else f"last {cfg.adapt_val_fraction:.0%} of each clip's training frames",
        "steps": cfg.steps,
        "best_step": int(best.step),
        "best_val_loss": round(best.value, 5),
        "curve": [{"step": s, "train": round(t, 5), "val": round(v, 5)} for s, t, v in curve],
    }


def spread_ratio(model: A2E, data: ClipData, span: slice, seed: int = 0) -> float:
    """std of the sampled mouth opening / std of the tracked one over `span` of the clip (valid
    frames): 1 is the tracked motion's range, a mean-regressing model is far below."""
    _, mouth = run(model, data.features[: span.stop], seed=seed)
    predicted, tracked = mouth_gap(mouth[span] + data.neutral), mouth_gap(data.mouth[span] + data.neutral)
    ok = data.valid[span]
    return float(predicted[ok].std() / max(float(tracked[ok].std()), 1e-6))


def adapt_a2e(prior_state: dict[str, Tensor], clip: str | Path, cfg: A2EConfig, device: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Fine-tune the prior's A2E to one identity's clip; return (adapted state, log).

    A new style vector (started from the null style) trains at `adapt_style_lr`, every other
    A2E layer at `adapt_lr` (whisper stays frozen: its features are precomputed; freezing
    A2E's own front end cost the deterministic model 0.13-0.15 of test mouth r, docs/a2e.md).
    Validation every 50 steps on the held-out end of the training frames; training stops after
    `adapt_patience` validations without improvement and the best weights are kept, so
    adaptation can only improve on the prior there (the prior itself is step 0). With
    `adapt_ema` > 0 the weights validated and kept are an exponential moving average of the
    steps' (the style vector's too).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_state(prior_state).to(device)
    cfg = dataclasses.replace(cfg, window=model.meta["window"])  # the window the prior was trained on
    data = load_clip(clip, model.meta["fps"])
    if data.features.shape[1] != model.meta["feature_dim"]:
        raise GGError(f"{clip}: {data.features.shape[1]}-d audio features but the prior uses {model.meta['feature_dim']}-d ({model.meta['whisper']['model']}); re-run preprocess with that whisper", Exit.INPUT_INVALID)
    # The prior is in sync on other speech (bench/a2e_sync.py); fine-tuned on a source whose lips
    # lead its sound it learns that lead (Ted Lieu −2.3 frames → −2 on every other speech file).
    # Under 8 s the sound cannot measure the source's offset; the prior's own mouth can.
    lag, measured_by = source_lag(clip, model.meta["fps"]), "audio"
    if not math.isfinite(lag):
        lag, measured_by = prior_lag(model, data), "prior"
    shift = round(lag) if cfg.adapt_realign and math.isfinite(lag) else 0
    data = realign(data, shift)
    n_val = max(1, round(cfg.adapt_val_fraction * data.n_train))
    fit_spans, val_spans = [(0, 0, data.n_train - n_val)], [(0, data.n_train - n_val, data.n_train)]
    if fit_spans[0][2] < 2:
        raise GGError(f"{clip}: only {data.n_train} training frames; too short to adapt lip motion", Exit.INPUT_INVALID)
    model.neutral.copy_(torch.as_tensor(data.neutral))
    model.bs_neutral.copy_(torch.as_tensor(data.bs_neutral))
    model.adapted_style.copy_(model.style.weight[-1].detach())
    style = torch.nn.Parameter(model.adapted_style.clone())
    model.style.requires_grad_(False)  # the training identities' rows; the new one is `style`
    tuned = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": tuned, "lr": cfg.adapt_lr}, {"params": [style], "lr": cfg.adapt_style_lr}])
    ema = training.EMA([*tuned, style], cfg.adapt_ema) if cfg.adapt_ema > 0 else None
    validate = _Validation([data], val_spans, cfg, model.code_dim, device)
    best = training.Best(patience=cfg.adapt_patience)
    best.offer(validate(model, style.detach()[None]), 0, model)
    log = {"prior_val_loss": round(best.value, 5), "curve": [(0, round(best.value, 5))], "stopped_early": False}
    batch = min(cfg.batch, 16)

    def step(i: int) -> dict[str, Tensor]:
        rng = training.generator(cfg.seed, i)
        training.seed_torch(cfg.seed, i)
        b = _windows([data], fit_spans, _sample(fit_spans, rng, batch, cfg.window), cfg.window, device)
        t = torch.as_tensor(rng.random(batch), dtype=torch.float32, device=device)
        noise = torch.randn(batch, cfg.window, model.code_dim, device=device) * model.audio_driven
        loss, _ = _flow_loss(model, model, b, style[None].expand(batch, -1), t, noise, cfg, None, cfg.adapt_feature_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()
        return {"loss": loss.detach()}

    def validation(done: int) -> str:
        with ema.applied() if ema is not None else contextlib.nullcontext():  # the average is what is scored and kept
            model.adapted_style.copy_(style.detach())  # part of the state Best keeps
            val = validate(model, style.detach()[None])
            best.offer(val, done, model)
        log["curve"].append((done, round(val, 5)))
        if best.exhausted:
            log["stopped_early"] = True
            loop.stop()
        return f"val {val:.3f} (best {best.value:.3f})"

    model.train()
    loop = training.Loop(f"A2E adaptation to {data.name}", cfg.adapt_steps, fix="lower a2e.adapt_lr in the preset")
    loop.every(50, validation)
    steps_run = loop.run(step) if cfg.adapt_steps else 0
    model.load_state_dict(best.state)
    model.meta = {**model.meta, "adapted": data.name}
    model.eval()
    tail = slice(data.n_train - n_val, data.n_train)
    log.update(best_step=best.step, best_val_loss=round(best.value, 5), steps_run=steps_run, val_frames=n_val,
               source_lag=None if not math.isfinite(lag) else round(lag, 2),
               source_lag_by=measured_by if math.isfinite(lag) else None, realigned_frames=shift,
               mouth_spread_ratio=round(spread_ratio(model, data, tail), 3))  # fmt: skip
    return to_state(model), log
