"""Training the A2E model: the cross-identity prior (`fit-prior --parts a2e`) and its adaptation
to one identity (called by `adapt`).

Data discipline (DESIGN.md section 5): a clip's test frames (its last 10%) are never used, not
for training, not for validation, not for early stopping. The prior validates on the training
frames of identities it does not train on (one clip = one identity); adaptation stops early on
the last `adapt_val_fraction` of the clip's training frames, which it does not fit.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import console
from .artifacts import atomic_write_bytes, load_checkpoint
from .config import A2EConfig
from .errors import Exit, GGError
from .models.a2e import (
    A2E,
    ClipData,
    articulation_gain,
    codes,
    fit_lip_basis,
    from_state,
    load_clip,
    make_meta,
    prior_lag,
    realign,
    source_lag,
    to_state,
)

Span = tuple[int, int, int]  # (clip index, first frame, end frame) at the model frame rate


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


def _sample(spans: list[Span], rng: np.random.Generator, n: int, window: int) -> list[tuple[int, int]]:
    """n random windows, spans chosen in proportion to their length (every frame equally likely)."""
    lengths = np.array([e - b for _, b, e in spans], np.float64)
    picks = rng.choice(len(spans), size=n, p=lengths / lengths.sum())
    return [(spans[k][0], spans[k][1] + int(rng.integers(0, max(1, spans[k][2] - spans[k][1] - window + 1)))) for k in picks]


@torch.no_grad()
def _predict_spans(model: A2E, clips: list[ClipData], spans: list[Span], style: Tensor | None, device) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """(codes, targets) of each span, the clip predicted whole as at inference (`codes`:
    cross-faded overlapping windows) from the audio of its training frames. Isolated windows,
    lacking context at their edges, scored worse than what runs and picked other steps."""
    model.eval()
    out = []
    for ci, b, e in spans:
        c = clips[ci]
        code = codes(model, torch.as_tensor(c.features[: c.n_train], device=device), model.style_vector() if style is None else style[None])
        out.append((code[None, b:e], {k: torch.as_tensor(getattr(c, k)[b:e], device=device)[None] for k in ("blendshapes", "mouth", "valid")}))
    model.train()
    return out


def _span_loss(model: A2E, preds: list[tuple[Tensor, dict[str, Tensor]]], cfg: A2EConfig, scale: float = 1.0) -> float:
    """Training loss of `_predict_spans`' codes times `scale`, averaged over valid frames."""
    total, weight = 0.0, 0.0
    for code, t in preds:
        loss, _ = model.loss(code * scale, t["blendshapes"], t["mouth"], t["valid"], cfg.lip_weight, cfg.temporal_weight, cfg.gap_weight)
        n = float(t["valid"].sum())
        total, weight = total + float(loss) * n, weight + n
    return total / max(weight, 1.0)


def _evaluate(model: A2E, clips: list[ClipData], spans: list[Span], style: Tensor | None, cfg: A2EConfig, device) -> float:
    return _span_loss(model, _predict_spans(model, clips, spans, style, device), cfg)


@torch.no_grad()
def _shrink(model: A2E, clips: list[ClipData], spans: list[Span], style: Tensor | None, cfg: A2EConfig, device) -> float:
    """Scale the output layer by the factor in 0, 0.1, ..., 1 with the lowest validation loss;
    return it. The predictions are deviations from the identity mean, so shrinking moves them
    toward the no-audio baseline: a model whose correlation with the truth is r has the least
    squared error at r times its own amplitude, and on voices it never heard the prior is
    over-confident. Factor 0 is the mean expression itself."""
    preds = _predict_spans(model, clips, spans, style, device)
    factor = float(min(np.linspace(0, 1, 11), key=lambda f: _span_loss(model, preds, cfg, f)))
    model.head[1].weight.mul_(factor)
    model.head[1].bias.mul_(factor)
    return factor


def _save(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _check_features(clips: list[ClipData]) -> dict:
    dims = {c.features.shape[1] for c in clips}
    models = {c.whisper.get("model") for c in clips}
    if len(dims) > 1 or len(models) > 1:
        listing = ", ".join(f"{c.name}: {c.whisper.get('model')} {c.features.shape[1]}-d" for c in clips)
        raise GGError(f"clips have audio features of different whisper models ({listing}); re-run preprocess with one --whisper", Exit.INPUT_INVALID)
    return {"model": models.pop(), "dim": dims.pop()}


def train_prior(clip_dirs: list[Path], holdout: list[str], work: Path, cfg: A2EConfig, device: str, resume: bool, rank: int = 0, world: int = 1) -> dict:
    """Train the A2E prior; write `work/a2e.safetensors`; return this part's summary for meta.yaml.

    Checkpoints (model, optimiser, best weights, curve) go to `work/a2e.ckpt` every
    `checkpoint_every` steps, atomically; `resume` continues from it. Under DDP each rank
    samples its own windows (seeded by rank) and rank 0 writes.
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
    identities = [clips[i].name for i in train]
    style_of = {i: k for k, i in enumerate(train)}

    torch.manual_seed(cfg.seed)
    model = A2E(make_meta(cfg, whisper["dim"], whisper, identities))
    basis, lip_std = fit_lip_basis([clips[i] for i in train], cfg.lip_components)
    rows = np.concatenate([clips[i].blendshapes[: clips[i].n_train][clips[i].valid[: clips[i].n_train]] for i in train])
    model.lip_basis.copy_(torch.as_tensor(basis))
    model.lip_std.copy_(torch.as_tensor(lip_std))
    model.bs_std.copy_(torch.as_tensor(np.maximum(rows.std(0), 0.02)))  # near-constant blendshapes stay tame
    model.bs_neutral.copy_(torch.as_tensor(np.mean([clips[i].bs_neutral for i in train], 0)))
    model.neutral.copy_(torch.as_tensor(np.mean([clips[i].neutral for i in train], 0)))
    model.to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(200, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    step, curve, best, best_state = 0, [], math.inf, None
    ckpt = work / "a2e.ckpt"
    if resume and ckpt.is_file():
        saved = load_checkpoint(ckpt, device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        step, curve, best, best_state = saved["step"], [tuple(x) for x in saved["curve"]], saved["best"], saved["best_state"]
        console.info(f"a2e: resumed at step {step}")
    null = torch.tensor(model.null_style, device=device)
    model.train()
    with console.progress() as bar:
        task = bar.add_task("a2e prior", total=cfg.steps, completed=step)
        while step < cfg.steps:
            rng = np.random.default_rng((cfg.seed, rank, step))
            torch.manual_seed(cfg.seed * 1_000_003 + step * 97 + rank)
            starts = _sample(train_spans, rng, cfg.batch, cfg.window)
            b = _windows(clips, train_spans, starts, cfg.window, device)
            idx = torch.tensor([style_of[ci] for ci, _ in starts], device=device)
            idx = torch.where(torch.as_tensor(rng.random(len(idx)) < cfg.style_dropout, device=device), null, idx)
            code = net(b["features"], model.style(idx), cfg.feature_noise, cfg.feature_dropout)
            loss, _ = model.loss(code, b["blendshapes"], b["mouth"], b["valid"], cfg.lip_weight, cfg.temporal_weight, cfg.gap_weight)
            value = loss.item()
            if not math.isfinite(value):
                raise GGError(f"a2e training diverged at step {step} (loss {value}); lower the preset's a2e.lr or re-run with --resume", Exit.DIVERGED)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % cfg.val_every == 0 or step == cfg.steps:
                val = _evaluate(model, clips, val_spans, None, cfg, device)
                curve.append((step, value, val))
                if val < best:
                    best, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
                bar.update(task, status=f"loss {value:.3f} val {val:.3f} (best {best:.3f})")
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                             "curve": [list(x) for x in curve], "best": best, "best_state": best_state})  # fmt: skip
            bar.advance(task)
    model.load_state_dict(best_state)
    shrink = _shrink(model, clips, val_spans, None, cfg, device)
    if rank == 0:
        save_file(to_state(model), str(work / "a2e.safetensors"))
    best_step = min(curve, key=lambda x: x[2])[0]
    return {
        "file": "a2e.safetensors",
        "whisper": whisper,
        "fps": cfg.fps,
        "identities": identities,
        "held_out": sorted(holdout),
        "validation": "training frames of held-out identities" if holdout else f"last {cfg.adapt_val_fraction:.0%} of each clip's training frames",
        "steps": cfg.steps,
        "best_step": int(best_step),
        "best_val_loss": round(best, 5),
        "output_scale": shrink,
        "curve": [{"step": s, "train": round(t, 5), "val": round(v, 5)} for s, t, v in curve],
    }


def adapt_a2e(prior_state: dict[str, Tensor], clip: str | Path, cfg: A2EConfig, device: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Fine-tune the prior's A2E to one identity's clip; return (adapted state, log).

    The audio encoder (whisper) stays frozen, as its features are precomputed; every A2E layer
    trains at the low `adapt_lr` and a new style vector (started from the null style) at
    `adapt_style_lr`. Freezing A2E's own feature front end as well was measured to cost 0.13-0.15
    of test mouth-opening r on the two longest clips (docs/a2e_results.md), so it is tuned too. Validation every 50 steps on the held-out end of the training frames;
    training stops after `adapt_patience` validations without improvement and the best weights
    are kept, so adaptation can only improve on the prior there (the prior itself is step 0).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_state(prior_state).to(device)
    model.articulation.fill_(1.0)  # an adapted state as the start: train and measure at gain 1
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
    shift = int(round(lag)) if cfg.adapt_realign and math.isfinite(lag) else 0
    data = realign(data, shift)
    n_val = max(1, round(cfg.adapt_val_fraction * data.n_train))
    fit_spans, val_spans = [(0, 0, data.n_train - n_val)], [(0, data.n_train - n_val, data.n_train)]
    if fit_spans[0][2] < 2:
        raise GGError(f"{clip}: only {data.n_train} training frames; too short to adapt lip motion", Exit.INPUT_INVALID)
    model.neutral.copy_(torch.as_tensor(data.neutral))
    model.bs_neutral.copy_(torch.as_tensor(data.bs_neutral))
    style = torch.nn.Parameter(model.style.weight[-1].detach().clone())
    model.style.requires_grad_(False)  # the training identities' rows; the new one is `style`
    tuned = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": tuned, "lr": cfg.adapt_lr}, {"params": [style], "lr": cfg.adapt_style_lr}])
    every = 50
    best = _evaluate(model, [data], val_spans, style.detach(), cfg, device)
    log = {"prior_val_loss": round(best, 5), "curve": [(0, round(best, 5))], "stopped_early": False}
    best_state, best_style, best_step, bad = {k: v.clone() for k, v in model.state_dict().items()}, style.detach().clone(), 0, 0
    model.train()
    with console.progress() as bar:
        task = bar.add_task("a2e adapt", total=cfg.adapt_steps)
        for step in range(1, cfg.adapt_steps + 1):
            rng = np.random.default_rng((cfg.seed, step))
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            b = _windows([data], fit_spans, _sample(fit_spans, rng, min(cfg.batch, 16), cfg.window), cfg.window, device)
            code = model(b["features"], style[None].expand(len(b["features"]), -1), cfg.adapt_feature_noise)
            loss, _ = model.loss(code, b["blendshapes"], b["mouth"], b["valid"], cfg.lip_weight, cfg.temporal_weight, cfg.gap_weight)
            if not torch.isfinite(loss):
                raise GGError(f"{clip}: A2E adaptation diverged at step {step}; lower a2e.adapt_lr", Exit.DIVERGED)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.advance(task)
            if step % every:
                continue
            val = _evaluate(model, [data], val_spans, style.detach(), cfg, device)
            log["curve"].append((step, round(val, 5)))
            bar.update(task, status=f"val {val:.3f} (best {best:.3f})")
            if val < best:
                best, best_step, bad = val, step, 0
                best_state, best_style = {k: v.clone() for k, v in model.state_dict().items()}, style.detach().clone()
            else:
                bad += 1
                if bad >= cfg.adapt_patience:
                    log["stopped_early"] = True
                    break
    model.load_state_dict(best_state)
    model.adapted_style.copy_(best_style)
    model.meta = {**model.meta, "adapted": data.name}
    spread, gain = articulation_gain(model, data, cfg.adapt_articulation, cfg.adapt_max_gain)
    model.articulation.fill_(gain)
    log.update(best_step=best_step, best_val_loss=round(best, 5), steps_run=step, val_frames=n_val,
               source_lag=None if not math.isfinite(lag) else round(lag, 2),
               source_lag_by=measured_by if math.isfinite(lag) else None, realigned_frames=shift,
               mouth_spread_ratio=round(spread, 3), articulation=round(gain, 3))  # fmt: skip
    return to_state(model), log
