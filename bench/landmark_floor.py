"""The landmark detector's own noise on real clips: video-mode tracking vs single-image landmarks.

    python bench/landmark_floor.py out/clips/* --out out/bench/landmark_floor.json

For each clip, on its test frames (the last 10%): LMD between the clip's tracking.npz landmarks
(VIDEO mode, tracked through the whole clip) and IMAGE-mode landmarks of the same frames, in px
at 512², the correlation of the two mouth-opening and blink tracks, and the same between IMAGE
mode on the frames and on the frames shifted by 1 px (metrics.detector_floor;
docs/evaluation.md, "Floor for LMD"). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from ggtalker_cli.clip import Clip
from ggtalker_cli.errors import GGError
from ggtalker_cli.metrics import detector_floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--all-frames", action="store_true", help="use every frame, not only the test split")
    args = ap.parse_args()

    rows = []
    for path in args.clips:
        try:
            clip = Clip(path)
        except GGError as e:
            print(f"skipped {path}: {e}")
            continue
        idx = range(len(clip)) if args.all_frames else clip.test_indices
        tr = clip.tracking
        names = [str(n) for n in tr["blendshape_names"]] if "blendshape_names" in tr else None
        if names is None:
            print(f"skipped {path}: tracking.npz has no blendshape_names")
            continue
        floor = detector_floor((clip.frame(i) for i in idx), tr["landmarks"][idx], tr["blendshapes"][idx], names, clip.size)
        rows.append({"clip": path.name, "size": clip.size, "fps": clip.fps, **{k: round(v, 4) if isinstance(v, float) else v for k, v in floor.items()}})

    result = {"bench": "landmark_floor", "date": date.today().isoformat(), "split": "all" if args.all_frames else "test", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Detector noise floor ({result['split']} frames, {result['date']})\n")
    print("| clip | size | frames (detected) | LMD tracking vs image | mouth_open r | blink r | LMD 1-px shift | mouth_open r shift |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clip']} | {r['size']} | {r['frames']} ({r['detected']}) | {r['lmd']:.3f} | {r['mouth_open_r']:.3f} | {r['blink_r']:.3f} "
              f"| {r['lmd_shift']:.3f} | {r['mouth_open_r_shift']:.3f} |")


if __name__ == "__main__":
    main()
