"""3D consistency of avatars on novel views, with no ground truth there (issue 5's must-show).

Why: a turned head has no ground-truth frame to compare with, but a face that stays a face is
found by a face landmarker, and its landmarks land where the avatar's own mesh says they are.
A prior-initialised avatar should keep both up better than one trained from scratch.

    python bench/novel_views.py out/nv/prior out/nv/scratch -o bench/results/novel_views \\
        --grid out/nv/novel_views_grid.png [--frames 12] [--size 512] [--threads 2]

Protocol, per avatar folder (made by `ggtalker adapt`; label = folder name):
- frames: `--frames` evenly spaced held-out test frames of the avatar's clip (its last 10%, never
  trained on), driven by their tracked face-space landmarks, blendshapes and pose;
- views: the pose turned by yaw −30, −15, 0, +15, +30° about the head's vertical axis through
  its mean vertex (`synth.turn`, as `synth --yaw`; positive turns the face to its left);
- picture: rendered at `--size`² (whatever size the avatar was trained at) and composited as
  `synth`/`eval` do with the plate paste (`Synthesizer.frames(paste=True)`): the frame's dilated
  head region ∪ the render's footprint is filled from the clip's background plate and the
  rendered head laid over it, on the frame's own body; `--inpainter` uses the avatar's inpainter;
- detection: `metrics.detect_landmarks` (mediapipe FaceLandmarker, IMAGE mode, one face);
  `detected` = share of views where it finds a face;
- `reproj_px`: for each detected view, the mean over all 478 mediapipe indices k of
  ||detected_k − projected_k||, where projected_k is the avatar's mesh landmark k (its vertices
  0..477, the frame's tracked landmarks its Gaussians are bound to) projected through the turned
  pose and the clip's intrinsics; px at 512² (scaled by 512/size); then the mean over detected
  views. Not centred: a face drawn in the wrong place counts. `reproj_centred_px` is the same
  with each 478-point set minus its own centroid (shape and rotation only, no 2-D shift).
- reference `real`: the real test frames (yaw 0 only) vs their own tracking, the detector's
  floor (IMAGE mode on one frame vs the clip's VIDEO-mode tracking).

Writes `results.json` and `table.md` into -o, and a PNG grid (avatar rows × yaw columns, middle
test frame) to --grid, with a `_landmarks` twin (mediapipe's landmarks red, the projected mesh
landmarks green); --grid must be under out/ (a real person; out/ is git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ggtalker_cli.metrics import LMD_SIZE, detect_landmarks
from ggtalker_cli.synthesis import Synthesizer, turn

YAWS = (-30, -15, 0, 15, 30)
TILE = 256  # grid tile side


def _errors(found: np.ndarray, projected: np.ndarray, size: int) -> dict[str, Any]:
    """Detection rate and mean landmark distances (px at 512²) over views where a face was found."""
    ok = np.isfinite(found).all(axis=(1, 2))
    f, p = found[ok] * (LMD_SIZE / size), projected[ok] * (LMD_SIZE / size)
    raw = np.linalg.norm(f - p, axis=-1).mean(1)
    centred = np.linalg.norm((f - f.mean(1, keepdims=True)) - (p - p.mean(1, keepdims=True)), axis=-1).mean(1)

    def mean(x: np.ndarray) -> float | None:  # None: no face found in any view
        return round(float(x.mean()), 2) if len(x) else None

    per_view = iter(raw.round(2).tolist())
    return {"views": len(ok), "detected": round(float(ok.mean()), 3), "reproj_px": mean(raw), "reproj_centred_px": mean(centred),
            "reproj_px_per_view": [next(per_view) if found_one else None for found_one in ok]}


@torch.no_grad()
def measure(folder: Path, n: int, size: int, inpainter: bool) -> tuple[dict[str, dict], dict[int, np.ndarray], np.ndarray]:
    """-> per-yaw numbers (plus `real`), the middle frame's annotated view per yaw, the test frames."""
    synth = Synthesizer(folder, torch.device("cpu"), size=size)
    trk, K = synth.clip.tracking, synth.K
    valid = trk["valid"].astype(bool)
    test = np.asarray([i for i in synth.clip.test_indices if valid[i]])
    frames = test[np.linspace(0, len(test) - 1, min(n, len(test))).astype(int)]
    bases = torch.as_tensor(trk["verts"][frames], dtype=torch.float32)
    exprs = synth.track["blendshapes"][frames]
    rows, shown = {}, {}
    for yaw in YAWS:
        poses = torch.stack([torch.as_tensor(synth.track["pose"][i], dtype=torch.float32) @ turn(synth.centre, yaw, 0.0) for i in frames])
        images = list(synth.frames(exprs, poses, frames, bases.numpy(), paste=not inpainter))
        q = (bases @ poses[:, :3, :3].transpose(1, 2) + poses[:, None, :3, 3]) @ K.T
        projected = (q[..., :2] / q[..., 2:]).numpy().astype(np.float64)
        found, _ = detect_landmarks(images)
        rows[str(yaw)] = _errors(found, projected, size)
        m = len(frames) // 2
        shown[yaw] = np.stack([annotate(images[m]), annotate(images[m], found[m], projected[m])])
    real = [synth.load(int(i))[0] for i in frames]
    found, _ = detect_landmarks(real)
    rows["real"] = _errors(found, trk["landmarks"][frames] * (size / synth.clip.size), size)
    synth.close()
    return rows, shown, frames


def annotate(image: np.ndarray, found: np.ndarray | None = None, projected: np.ndarray | None = None) -> np.ndarray:
    """A TILE² copy, with the projected mesh landmarks (green) and mediapipe's (red) if given."""
    s = TILE / image.shape[0]
    out = cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)
    for points, colour in ((projected, (0, 255, 0)), (found, (255, 0, 0))):
        if points is None:
            continue
        for x, y in points[np.isfinite(points).all(1)] * s:
            cv2.circle(out, (int(x), int(y)), 1, colour, -1)
    return out


def table(results: dict[str, dict]) -> str:
    labels = list(results)
    head = "| yaw ° | " + " | ".join(f"{a} detected | {a} reproj px | {a} centred px" for a in labels) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(labels))]
    for yaw in [str(y) for y in YAWS] + ["real"]:
        cells = []
        for a in labels:
            r = results[a][yaw]
            cells += [f"{r['detected']:.0%}", *(f"{r[k]:.2f}" if r[k] is not None else "–" for k in ("reproj_px", "reproj_centred_px"))]
        lines.append(f"| {'real frame (0)' if yaw == 'real' else yaw} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("avatars", type=Path, nargs="+", help="avatar folders (ggtalker adapt); rows in this order")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for results.json and table.md")
    parser.add_argument("--grid", type=Path, default=Path("out/novel_views/grid.png"), help="PNG grid, under out/")
    parser.add_argument("--frames", type=int, default=12, help="held-out test frames per avatar")
    parser.add_argument("--size", type=int, default=512, help="render size (any multiple of 8)")
    parser.add_argument("--inpainter", action="store_true", help="composite with the avatar's inpainter, not the plate paste")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if not args.grid.resolve().is_relative_to((Path(__file__).resolve().parents[1] / "out").resolve()):
        parser.error("--grid must be under out/ (the pictures show a real person)")
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    results, strips, frames = {}, [], None
    for folder in args.avatars:
        rows, shown, frames = measure(folder, args.frames, args.size, args.inpainter)
        results[folder.name] = rows
        strips.append(np.concatenate([shown[y] for y in YAWS], 2))  # (2: clean, landmarks, H, W·yaws, 3)
    seconds = time.perf_counter() - tic
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate((args.grid, args.grid.with_name(args.grid.stem + "_landmarks.png"))):
        cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([s[k] for s in strips], 0), cv2.COLOR_RGB2BGR))
    summary = {
        "avatars": {f.name: str(f) for f in args.avatars},
        "date": datetime.date.today().isoformat(),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "size": args.size,
        "composite": "inpainter" if args.inpainter else "plate paste (synth/eval without the inpainter)",
        "test_frames": [int(i) for i in frames],
        "yaws": list(YAWS),
        "protocol": __doc__.split("Protocol, per avatar folder")[1].split("Writes")[0].strip(),
        "results": results,
        "seconds": round(seconds, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results))
    print(table(results) + f"\n{seconds:.0f} s")


if __name__ == "__main__":
    main()
