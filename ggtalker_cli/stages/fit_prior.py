"""`ggtalker fit-prior CLIP_DIR... -o PRIOR_DIR`: train the cross-identity priors.

Each part (`a2e`, `e2v`) has one trainer in `TRAINERS`; a trainer writes its weights into
the partial prior folder and returns the summary stored under `parts.<name>` in meta.yaml. The
folder is built in a fixed hidden sibling (`.NAME.partial`) so `--resume` continues from the
trainers' checkpoints, and renamed into place only when every asked part has finished.

Clips are given as clip folders, folders of clip folders (subfolders that are not clips, e.g. a
failed batch preprocess, are skipped with a warning), or text files listing clip folders one a line
(`#` comments; relative paths are read from the list's folder), in any mix; `expand_clips` turns
them into one list. One clip is one identity. Validation holds out whole identities: those named with `--holdout`,
else every k-th clip by name (`a2e.holdout_fraction` of them, at least one when there are 3 or
more clips). Under `torchrun` (WORLD_SIZE > 1) every rank trains with DDP and rank 0 writes.
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import artifacts, console
from ..config import Config
from ..device import device_of
from ..errors import Exit, GGError, out_of_memory

PRIOR_NOTE = (
    "Research/non-commercial: trained on third-party footage of real people (see the clips' sources); "
    "do not redistribute it or use it to impersonate anyone."
)


def _train_a2e(clips: list[Path], holdout: list[str], work: Path, cfg: Config, device: str, resume: bool, rank: int, world: int) -> dict:
    from ..a2e_train import train_prior

    return train_prior(clips, holdout, work, cfg.a2e, device, resume, rank, world)


def _train_e2v(clips: list[Path], holdout: list[str], work: Path, cfg: Config, device: str, resume: bool, rank: int, world: int) -> dict:
    from ..e2v_train import train_prior

    return train_prior(clips, holdout, work, cfg, device, resume, rank, world)


# Part name -> trainer(clips, holdout, work, cfg, device, resume, rank, world) -> summary dict.
TRAINERS: dict[str, Callable[..., dict]] = {"a2e": _train_a2e, "e2v": _train_e2v}
KNOWN_PARTS = ("a2e", "e2v")


def parse_parts(text: str) -> list[str]:
    """'a2e,e2v' → ['a2e', 'e2v']: known names, no repeats, each with a trainer."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in KNOWN_PARTS]
    if not parts or unknown:
        raise GGError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KNOWN_PARTS)}", Exit.USAGE)
    missing = [p for p in parts if p not in TRAINERS]
    if missing:
        raise GGError(f"--parts {','.join(missing)}: no trainer for this part in this version of ggtalker yet; use --parts {','.join(TRAINERS)}", Exit.USAGE)
    return list(dict.fromkeys(parts))


def expand_clips(given: list[Path]) -> list[Path]:
    """Clip folders from clip folders, folders of clip folders and list files, in the order given."""
    clips: list[Path] = []
    for item in map(Path, given):
        if not item.exists() or (item / artifacts.META).is_file():
            clips.append(item)  # a clip folder; run() names a missing one
            continue
        if item.is_dir():
            subdirs = sorted(d for d in item.iterdir() if d.is_dir())
            found = [d for d in subdirs if (d / artifacts.META).is_file()]
            skipped = [d.name for d in subdirs if d not in found]
            if found and skipped:  # e.g. videos whose preprocess failed in a batch
                console.warn(f"{item}: skipping {len(skipped)} subfolder(s) that are not clips: {', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}")
            if not found:
                raise GGError(f"{item}: neither a clip folder nor a folder of clip folders (no {artifacts.META} in it or its subfolders); "
                              "pass folders made by `ggtalker preprocess`", Exit.INPUT_INVALID)  # fmt: skip
            clips += found
            continue
        try:
            lines = item.read_text().splitlines()
        except (UnicodeDecodeError, OSError) as e:
            why = f"not a readable list of clip folders ({e.__class__.__name__}); give a text file with one clip path a line"
            raise GGError(f"{item}: {why}", Exit.INPUT_INVALID) from e
        listed = [ln.split("#", 1)[0].strip() for ln in lines]
        entries = [(n, item.parent / t) for n, t in enumerate(listed, 1) if t]
        if not entries:
            raise GGError(f"{item}: the list of clips is empty; write one clip folder path a line", Exit.INPUT_INVALID)
        for n, clip in entries:
            if not (clip / artifacts.META).is_file():
                raise GGError(f"{item}:{n}: {clip} is not a clip folder (no {artifacts.META}); fix the line or preprocess that video", Exit.INPUT_INVALID)
            clips.append(clip)
    return clips


def choose_holdout(clips: list[Path], named: list[str], fraction: float) -> list[str]:
    """Identities (clip folder names) held out for validation."""
    names = [p.resolve().name for p in clips]
    if len(set(names)) != len(names):
        raise GGError(f"clip folders must have distinct names (they name identities): {', '.join(names)}", Exit.USAGE)
    if named:
        unknown = [n for n in named if n not in names]
        if unknown:
            raise GGError(f"--holdout {', '.join(unknown)}: not among the clips ({', '.join(names)})", Exit.USAGE)
        return list(named)
    if len(names) < 3:
        return []
    k = max(1, round(fraction * len(names)))
    ordered = sorted(names)
    return ordered[len(ordered) // (2 * k) :: max(1, len(ordered) // k)][:k]


def _distributed(device: str | None) -> tuple[int, int, str]:
    """(rank, world size, device): torch.distributed is initialised when torchrun launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, str(device_of(device or "auto"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, device or "cpu"


def _plot(path: Path, parts: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, summary in parts.items():
        curve = summary.get("curve") or []
        if curve:
            ax.plot([c["step"] for c in curve], [c["val"] for c in curve], label=f"{name} val")
            ax.plot([c["step"] for c in curve], [c["train"] for c in curve], ls=":", alpha=0.6, label=f"{name} train (batch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    artifacts.atomic_write_bytes(path, buffer.getvalue())


def run(clips: list[Path], out: Path, cfg: Config, parts: str = "a2e", holdout: list[str] | None = None,
        resume: bool = False, force: bool = False, device: str | None = None) -> dict[str, Any]:
    names = parse_parts(parts)
    clips = expand_clips(clips)
    for name in names:
        if getattr(cfg, name).steps < 1:
            raise GGError(f"{name}.steps {getattr(cfg, name).steps}: a prior needs at least 1 training step; "
                          f"raise --steps or the preset's {name}.steps", Exit.USAGE)
    for c in clips:
        artifacts.read_meta(c, "clip")  # fail on a wrong folder before any training
    held = choose_holdout(clips, holdout or [], cfg.a2e.holdout_fraction)
    rank, world, device = _distributed(device)
    work = artifacts.work_dir_for(out)
    if rank == 0:
        artifacts.check_output_dir(out, force)
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    if world > 1:
        torch.distributed.barrier()
    summaries = {}
    try:
        for name in names:
            console.info(f"fit-prior: training {name} on {len(clips) - len(held)} identities, validating on {len(held) or 'their own late frames'}")
            with out_of_memory(f"training the {name} prior (batch {getattr(cfg, name).batch} per GPU)",
                               f"lower {name}.batch in a preset YAML (--preset FILE), then re-run with --resume"):
                summaries[name] = TRAINERS[name](clips, held, work, cfg, device, resume, rank, world)
    except (GGError, OSError):
        if rank == 0 and not any(work.glob("*.ckpt")):  # refused before the first checkpoint: nothing to resume
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if world > 1:  # torchrun's ranks end here; an open NCCL group leaks and warns at exit
            torch.distributed.destroy_process_group()
    if rank != 0:
        return {}
    _plot(work / "val_loss.png", summaries)
    artifacts.write_meta(
        work,
        "prior",
        {
            "parts": summaries,
            "clips": [{"name": c.resolve().name, "path": str(c.resolve())} for c in clips],
            "held_out": held,
            "config": cfg.to_dict(),
            "device": device,
            "world_size": world,
            "note": PRIOR_NOTE,
        },
    )
    for checkpoint in work.glob("*.ckpt"):  # resumable state, not part of the artifact
        checkpoint.unlink()
    with artifacts.atomic_dir(out, force=force, work=work):
        pass
    return {
        "prior": str(out),
        "parts": names,
        "held_out": held,
        **{f"{n}_best_val_loss": s.get("best_val_loss", math.nan) for n, s in summaries.items()},
    }
