"""Per-clip properties that bound held-out head PSNR, without training (docs/short_clips.md).

For each preprocessed clip: how far its test poses are from every training pose, how much fine
detail its head holds, and the "1-px floor": the head PSNR (adapt's protocol: head over the
background plate, inside the ground-truth head mask) of each test target against itself shifted
one pixel sideways. A render that is perfect but one pixel off scores that; a clip whose floor is
below 30 dB cannot pass a 30-dB gate without sub-pixel registration of what moves (hair).

    python bench/clip_floor.py out/clips/* --out bench/results/clip_floor.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from ggtalker_cli import metrics
from ggtalker_cli.clip import Clip


def rotation_gap(poses: np.ndarray, queries: np.ndarray, pool: np.ndarray, exclude: int = 0) -> float:
    """Median over `queries` of the angle (degrees) to the nearest head rotation among `pool`,
    leaving out pool frames within `exclude` frames of the query (a held-out block's view)."""
    R = poses[:, :3, :3]
    gaps = []
    for q in queries:
        cands = pool[np.abs(pool - q) > exclude]
        cos = (np.einsum("ij,nij->n", R[q], R[cands]) - 1) / 2
        gaps.append(np.degrees(np.arccos(np.clip(cos, -1, 1))).min())
    return float(np.median(gaps))


def head_target(clip: Clip, i: int, plate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target, head mask): the frame's head over the plate, as adapt scores it, float32 in [0,1]."""
    frame = clip.frame(i).astype(np.float32) / 255.0
    head = clip.mask(i) == 2
    return np.where(head[..., None], frame, plate), head


def sharpness(target: np.ndarray, head: np.ndarray, side: int = 256) -> float:
    """Variance of the Laplacian of the grey image inside the eroded head mask, at side²."""
    grey = cv2.cvtColor(cv2.resize(target, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY) * 255.0
    inner = cv2.erode(cv2.resize(head.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST), np.ones((5, 5), np.uint8)) > 0
    return float(cv2.Laplacian(grey.astype(np.float64), cv2.CV_64F)[inner].var())


def properties(folder: Path) -> dict:
    clip = Clip(folder)
    poses, train, test = clip.tracking["pose"], clip.train_indices, clip.test_indices
    plate = clip.background.astype(np.float32) / (255.0 if clip.background.dtype == np.uint8 else 1.0)
    floors, sharp = [], []
    for i in test:
        target, head = head_target(clip, int(i), plate)
        floors.append(metrics.psnr(np.roll(target, 1, axis=1), target, mask=head))
        sharp.append(sharpness(target, head))
    return {
        "clip": folder.name,
        "frames": clip.n_frames,
        "test_frames": len(test),
        "test_rotation_gap_deg": round(rotation_gap(poses, test, train), 2),
        "train_rotation_gap_deg": round(rotation_gap(poses, train, train, exclude=len(test)), 2),
        "floor_1px_psnr_head": round(float(np.mean(floors)), 2),
        "sharpness": round(float(np.mean(sharp)), 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", type=Path, nargs="+", help="preprocessed clip folders")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    print("| clip | frames (test) | test rot NN ° | train rot NN ° | 1-px floor dB | sharpness |\n|---|---|---|---|---|---|")
    for folder in args.clips:
        r = properties(folder)
        rows.append(r)
        print(f"| {r['clip']} | {r['frames']} ({r['test_frames']}) | {r['test_rotation_gap_deg']:.2f} | {r['train_rotation_gap_deg']:.2f} "
              f"| {r['floor_1px_psnr_head']:.2f} | {r['sharpness']:.0f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"command": "python bench/clip_floor.py " + " ".join(str(c) for c in args.clips), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
