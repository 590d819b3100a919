"""`ggtalker fit-prior CLIP_DIR... -o PRIOR_DIR`: train the cross-identity priors.

The verb: expand the clips (`clip.expand_clips`: clip folders, folders of them, list files; a
person's clips are one identity, `clip.person`), check them, choose the identities held out (`priors.choose_holdout`), run
each asked part's trainer (`priors.TRAINERS`) in a fixed hidden sibling (`.NAME.partial`) so
`--resume` continues from the trainers' checkpoints, and rename it into place with its meta.yaml
only when every asked part has finished. Under `torchrun` (WORLD_SIZE > 1) every rank trains
with DDP and rank 0 writes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import artifacts, console, priors
from ..clip import expand_clips
from ..config import Config
from ..device import distributed
from ..errors import Exit, GGError, out_of_memory


def run(clips: list[Path], out: Path, cfg: Config, parts: str = "a2e", holdout: list[str] | None = None,
        resume: bool = False, force: bool = False, device: str | None = None) -> dict[str, Any]:
    names = priors.parse_parts(parts)
    clips = expand_clips(clips)
    for name in names:
        if getattr(cfg, name).steps < 1:
            raise GGError(f"{name}.steps {getattr(cfg, name).steps}: a prior needs at least 1 training step; "
                          f"raise --steps or the preset's {name}.steps", Exit.USAGE)
    held = priors.choose_holdout(clips, holdout or [], cfg.a2e.holdout_fraction)  # reads every meta.yaml: a wrong folder fails here, before training
    rank, world, device = distributed(device)
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
            console.info(f"fit-prior: training {name} on {len(clips) - len(held)} clips, validating on {len(held) or 'their own late frames'}")
            with out_of_memory(f"training the {name} prior (batch {getattr(cfg, name).batch} per GPU)",
                               f"lower {name}.batch in a preset YAML (--preset FILE), then re-run with --resume"):
                summaries[name] = priors.TRAINERS[name](clips, held, work, cfg, device, resume, rank, world)
    except (GGError, OSError):
        if rank == 0 and not any(work.glob("*.ckpt")):  # refused before the first checkpoint: nothing to resume
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if world > 1:  # torchrun's ranks end here; an open NCCL group leaks and warns at exit
            torch.distributed.destroy_process_group()
    if rank != 0:
        return {}
    priors.plot_curves(work / "val_loss.png", summaries)
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
            "note": priors.PRIOR_NOTE,
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
        "steps": {n: s.get("steps") for n, s in summaries.items()},
        **{f"{n}_best_val_loss": s.get("best_val_loss", math.nan) for n, s in summaries.items()},
    }
