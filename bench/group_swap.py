"""Which parameter groups carry an adaptation's gain between two stages (docs/e2v.md).

    python bench/group_swap.py CLIP AFTER --before BEFORE | --prior PRIOR [--size 128] [--eval-frames 32]

BEFORE and AFTER are avatar folders of the same topology (e.g. `adapt --prior` runs of 500 and
1000 steps); with `--prior` instead of `--before`, BEFORE is the map `adapt --prior` starts
from. For each group of the UV map (and the colour MLP) the held-out head PSNR (adapt's
protocol: head over the plate, inside the GT head mask, tracked pose, no refinement) is printed
for BEFORE with that group taken from AFTER, and for AFTER with that group put back to BEFORE's.
A group whose swap moves the number little is not where the training between the two went.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from ggtalker_cli import metrics
from ggtalker_cli.avatar import Avatar
from ggtalker_cli.clip import Clip
from ggtalker_cli.clip_view import Data
from ggtalker_cli.config import load_config
from ggtalker_cli.gaussians import GROUPS
from ggtalker_cli.head_fit import fit_head

SETS = {**{k: [k] for k in (*GROUPS, "feature", "mlp")}, "geometry": ["offset", "quat", "log_scale", "opacity"], "appearance": ["color", "feature", "mlp"]}


@torch.no_grad()
def head_psnr(avatar: Avatar, data: Data, frames: np.ndarray) -> float:
    values = []
    for i in frames:
        _, head, target = data.tensors(data.load(i))
        out, _ = avatar.render(data.verts[i], data.pose[i], data.blendshapes[i], data.K, data.size)
        values.append(metrics.psnr((out.rgb + (1 - out.alpha) * data.plate)[0], target[0], mask=head[0, ..., 0] > 0.5))
    return float(np.mean(values))


@torch.no_grad()
def swapped(dst: Avatar, src: Avatar, groups: list[str]) -> Avatar:
    """dst with `groups` copied from src."""
    out = copy.deepcopy(dst)
    for k in groups:
        if k == "mlp":
            out.color.load_state_dict(src.color.state_dict())
        else:
            out.gmap.groups[k].copy_(src.gmap.groups[k])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clip", type=Path)
    parser.add_argument("after", type=Path)
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--before", type=Path)
    start.add_argument("--prior", type=Path)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--eval-frames", type=int, default=32)
    args = parser.parse_args()
    clip = Clip(args.clip)
    data = Data(clip, min(args.size, clip.size), torch.device("cpu"))
    frames = data.test[np.linspace(0, len(data.test) - 1, min(args.eval_frames, len(data.test))).astype(int)]
    after = Avatar.load(args.after)
    if args.prior is not None:
        from ggtalker_cli.priors import init_from_prior

        cfg = load_config("balanced", {"adapt": {"size": data.size, "uv_res": after.gmap.res}})
        head, _ = fit_head(clip, data, cfg.adapt)
        before = init_from_prior(args.prior, clip, head, cfg)
    else:
        before = Avatar.load(args.before)
    rows = {"before": head_psnr(before, data, frames), "after": head_psnr(after, data, frames)}
    for name, groups in SETS.items():
        rows[name] = {"before_with_after": head_psnr(swapped(before, after, groups), data, frames),
                      "after_with_before": head_psnr(swapped(after, before, groups), data, frames)}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
