"""`ggtalker adapt CLIP_DIR -o AVATAR_DIR`: fit one person's avatar to a preprocessed clip.

The verb: check the clip and the prior, then the head fit (`head_fit`: setup, training on the
shared loop, held-out evaluation, export), the body inpainter (`body`) and the A2E adaptation
(`a2e_train.adapt_a2e`), built in a hidden partial folder that `--resume` continues and renamed
into place with its meta.yaml at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from .. import artifacts, console
from ..avatar import WEIGHTS, Avatar
from ..body import train_avatar_inpainter
from ..clip import Clip
from ..clip_view import Data
from ..config import AdaptConfig, Config
from ..device import device_name, device_of
from ..errors import Exit, GGError, out_of_memory
from ..gaussians import GROUPS
from ..head_fit import CHECKPOINT, LOG, SHELL_FRAMES, Trainer, evaluate, export, fit_head, loss_plot, novel_views, paint, save_png, train

_START = "start.json"  # shell fit + initial metrics of a run, kept for --resume


def _check_prior(prior: Path) -> dict[str, Tensor] | None:
    """Accept only a prior with an expression→visual part, the only part adapt can start from,
    and read its audio→expression part (when it has one) now: adapt fine-tunes that part only
    after training the head, and a damaged file must be refused before, not after, all that work.
    -> the prior's A2E state, or None."""
    meta = artifacts.read_meta(prior, "prior")
    parts = meta.get("parts") or []
    if "e2v" not in parts:
        raise GGError(
            f"{prior}: this prior has no e2v part (parts: {', '.join(map(str, parts)) or 'none'}); "
            "train one with `ggtalker fit-prior`, or drop --prior to adapt from scratch",
            Exit.ARTIFACT,
        )
    if "a2e" not in parts:
        return None
    from ..models.a2e import from_state
    from ..synthesis import load_a2e

    state, path = load_a2e(prior, explicit=prior)  # a prior folder: its a2e part, one ARTIFACT line if unreadable
    from_state(state, path)  # another state version or shape: refused now too
    return state


def _adapt_speech(prior: Path | None, prior_a2e: dict[str, Tensor] | None, clip: Clip, folder: Path, cfg: Config, dev: torch.device) -> dict[str, Any]:
    """Fine-tune the prior's audio→expression part to this person (issue: style adaptation) and
    store it as the avatar's `a2e.safetensors`, which `synth` reads. Without a prior a2e part
    (`prior_a2e`, read by _check_prior), or a clip without audio features, the avatar has none and
    says why (synth then needs --a2e)."""
    if prior_a2e is None:
        return {"file": None, "reason": "no a2e part in the prior; synth needs --a2e PRIOR_DIR"}
    if clip.meta.get("files", {}).get("audio_features") is None:
        return {"file": None, "reason": "the clip has no audio features (whisper weights were missing at preprocess)"}
    from ..a2e_train import adapt_a2e

    state, log = adapt_a2e(prior_a2e, clip.path, cfg.a2e, device=dev.type)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "a2e.safetensors"))
    return {"file": "a2e.safetensors", "prior": str(Path(prior).resolve()), "log": log}


def _disk_need(cfg: AdaptConfig) -> int:
    """Bytes adapt writes at most: a checkpoint is the float32 UV map (a row of channels per
    texel, at the final resolution after any upsample) with Adam's two moments; two checkpoints
    coexist while one replaces the other, then the exported avatar."""
    texels = (cfg.uv_res * (2 if cfg.upsample_at > 0 else 1)) ** 2
    return (sum(GROUPS.values()) + cfg.feature_dim) * texels * 4 * (2 * 3 + 1)


# ---------------------------------------------------------------------- evaluation and export


def run(
    clip_dir: Path,
    out: Path,
    cfg: Config,
    *,
    prior: Path | None = None,
    device: str = "auto",
    resume: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    acfg = cfg.adapt
    dev = device_of(device)
    clip = Clip(clip_dir)
    prior_a2e = _check_prior(prior) if prior is not None else None
    work = artifacts.work_dir_for(out)
    if not resume and work.exists():
        console.warn(f"{work}: discarding an interrupted run (pass --resume to continue it)")
        shutil.rmtree(work)
    torch.manual_seed(acfg.seed)
    if acfg.size > clip.size:
        console.info(f"adapt: training at the clip's {clip.size}² (adapt.size {acfg.size} would only upsample its frames)")
    data = Data(clip, min(acfg.size, clip.size), dev)
    eval_frames = data.test if acfg.eval_frames <= 0 else data.test[np.linspace(0, len(data.test) - 1, min(acfg.eval_frames, len(data.test))).astype(int)]
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    artifacts.check_disk_space(out, _disk_need(acfg))
    oom = out_of_memory(f"adapting at {data.size}² (adapt.uv_res {acfg.uv_res}, adapt.batch {acfg.batch})",
                        "lower --size, adapt.uv_res or adapt.batch (--preset fast is the smallest), then re-run with --resume")
    def resumable(folder: Path) -> bool:
        return (folder / CHECKPOINT).is_file()

    with oom, artifacts.atomic_dir(out, force=force, work=work, resumable=resumable) as folder:
        if resumable(folder):
            trainer, start, seconds = Trainer.resume(folder / CHECKPOINT, data, acfg)
            console.info(f"resuming at step {start} of {acfg.steps}")
        else:
            if resume:
                console.info(f"{work}: no checkpoint to resume from; starting from step 0")
            head, shell = fit_head(clip, data, acfg)
            if prior is not None:
                from ..priors import init_from_prior

                avatar = init_from_prior(prior, clip, head.to(dev), cfg)
            else:
                avatar = Avatar.create(head.to(dev), acfg.uv_res, acfg.feature_dim, acfg.hidden, acfg.seed).to(dev)
                paint(avatar, data, data.train[np.linspace(0, len(data.train) - 1, SHELL_FRAMES).astype(int)])
            trainer, start, seconds = Trainer(data, acfg, avatar.to(dev)), 0, 0.0
            initial = evaluate(trainer.avatar, data, eval_frames)
            # what the run started from, kept beside the checkpoints so a resumed run reports it too
            (folder / _START).write_text(json.dumps({"shell": shell, "initial_metrics": initial}))
        timings["setup"] = time.perf_counter() - tic
        seconds = train(trainer, folder, start, seconds)
        timings["train"] = seconds
        tic = time.perf_counter()
        (folder / "previews").mkdir(exist_ok=True)
        result = evaluate(trainer.avatar, data, eval_frames, folder / "previews")
        mid = int(data.test[len(data.test) // 2])
        save_png(folder / "novel_views.png", novel_views(trainer.avatar, data, mid))
        loss_plot(folder / LOG, folder / "loss.png")
        exported = export(trainer, folder)
        timings["evaluate_export"] = time.perf_counter() - tic
        tic = time.perf_counter()
        inpainter = train_avatar_inpainter(trainer.avatar, data, folder, cfg.inpainter)  # needs export's synthesis track
        timings["inpainter"] = time.perf_counter() - tic
        tic = time.perf_counter()
        speech = _adapt_speech(prior, prior_a2e, clip, folder, cfg, dev)
        timings["a2e"] = time.perf_counter() - tic
        (folder / CHECKPOINT).unlink(missing_ok=True)
        started = json.loads((folder / _START).read_text())
        meta = {
            "clip": {"path": str(Path(clip_dir).resolve()), "sha256": artifacts.fingerprint(clip.path, "clip")},
            "prior": str(Path(prior).resolve()) if prior is not None else None,
            "prior_sha256": artifacts.fingerprint(prior, "prior") if prior is not None else None,
            "device": device_name(dev),
            "train_seconds": round(seconds, 1),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "steps": acfg.steps,
            "size": data.size,
            "shell": started["shell"],
            "metrics": {k: round(v, 4) for k, v in result.items()},
            "initial_metrics": {k: round(v, 4) for k, v in started["initial_metrics"].items()},
            "eval": {
                "frames": [int(x) for x in eval_frames],
                "protocol": "held-out test frames (last 10%), tracked landmarks and pose, no refinement; head = head over the "
                "background plate vs frame head pasted on it, inside the GT head mask (SSIM on its box); full = render "
                "composited over the frame with the GT head region replaced by the plate (no inpainter); face = DESIGN.md "
                "face box; *_driven = mesh driven by the tracked blendshapes through the fitted basis; head_inner = head "
                "mask minus its border band of round(0.02·size) px (metrics.seam_band), a diagnostic of mask-edge error",
            },
            **exported,
            "inpainter": inpainter,
            "a2e": speech,
            "files": {"weights": WEIGHTS, "ply": "head.ply", "log": LOG, "loss_plot": "loss.png", "previews": "previews",
                      "novel_views": "novel_views.png", "track": "synthesis/track.npz"},
            "synthesis": {"body_frames": [int(clip.train_indices[0]), int(clip.train_indices[-1]) + 1], "fps": clip.fps,
                          "track": "synthesis/track.npz"},
            "config": {"adapt": cfg.to_dict()["adapt"], "inpainter": cfg.to_dict()["inpainter"]},
        }
        artifacts.write_meta(folder, "avatar", meta)
        (folder / _START).unlink()  # recorded in meta.yaml
    ran = {"head": acfg.steps, "inpainter": inpainter["steps_run"], "a2e": (speech.get("log") or {}).get("steps_run")}  # a2e: None without one
    return {"avatar": str(out), **{f"test_{k}": round(v, 2) for k, v in result.items()}, "train_seconds": round(seconds, 1), "device": meta["device"],
            "steps": ran}
