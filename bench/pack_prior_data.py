"""Shrink clip folders for a GPU run of `fit-prior` / `adapt` (the device tool carries 64 MiB).

    python bench/pack_prior_data.py out/clips/* -o out/carry/prior --size 256 --max-frames 240

Each clip is written in `bench/pack_clip.py`'s packed layout (frames as one near-lossless H.264
video, decoded back to JPEGs there by `python bench/pack_clip.py unpack`), at `--size` (frames,
masks, plate, K and landmarks scaled) and, where a clip is longer than `--max-frames`, with
every k-th frame kept (k = ceil(n / max)): the expression→visual prior wants many poses and
expressions per identity more than neighbouring frames. Thinning divides the frame rate by k and
keeps the audio whole (or drops it: `--drop-audio`), so the folder is still a valid clip;
a frame that was a test frame (the last 10%) stays one. The tracking is stored compressed.

`face_landmarker.task` is copied beside the clips: the GPU image has no mediapipe model, and the
head model reads its canonical mesh from it (point GGTALKER_FACE_LANDMARKER at the copy there;
bench/fit_prior_gpu.sh and bench/train_default_prior.sh do).
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml

from ggtalker_cli import assets


def shrink(clip: Path, dest: Path, size: int, max_frames: int, crf: int, drop_audio: bool) -> int:
    meta = yaml.safe_load((clip / "meta.yaml").read_text())
    n, old = int(meta["n_frames"]), int(meta["size"])
    step = max(1, math.ceil(n / max_frames)) if max_frames > 0 else 1
    keep = np.arange(0, n, step)
    scale = size / old
    dest.mkdir(parents=True, exist_ok=True)
    files = meta["files"]

    with np.load(clip / files["tracking"], allow_pickle=False) as trk:
        arrays = {k: trk[k] if k == "blendshape_names" else trk[k][keep] for k in trk.files}
    arrays["landmarks"] = arrays["landmarks"] * scale
    np.savez_compressed(dest / files["tracking"], **arrays)

    (dest / files["masks"]).mkdir(exist_ok=True)
    for j, i in enumerate(keep):
        labels = cv2.imread(str(clip / files["masks"] / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        small = cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(dest / files["masks"] / f"{j:06d}.png"), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    plate = cv2.imread(str(clip / files["background"]), cv2.IMREAD_COLOR)
    cv2.imwrite(str(dest / files["background"]), cv2.resize(plate, (size, size), interpolation=cv2.INTER_AREA))
    if drop_audio:
        files = {**files, "audio": None, "audio_features": None}
        meta["audio"] = {"present": False, "features": None, "features_reason": "dropped by bench/pack_prior_data.py --drop-audio"}
    if files.get("audio"):
        shutil.copy2(clip / files["audio"], dest / files["audio"])
    if files.get("audio_features"):
        np.save(dest / files["audio_features"], np.load(clip / files["audio_features"])[keep])
    if files.get("identity"):
        shutil.copy2(clip / files["identity"], dest / files["identity"])

    with tempfile.TemporaryDirectory() as tmp:  # the kept frames, numbered consecutively
        for j, i in enumerate(keep):
            (Path(tmp) / f"{j:06d}.jpg").symlink_to((clip / files["frames"] / f"{i:06d}.jpg").resolve())
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-framerate", "25", "-i", f"{tmp}/%06d.jpg", "-vf", f"scale={size}:{size}:flags=area",
             "-c:v", "libx264", "-crf", str(crf), "-preset", "slow", "-pix_fmt", "yuv444p", str(dest / "frames.mp4")],
            check=True,
        )  # fmt: skip

    n_train = int(meta["split"]["train"][1])
    t = int(np.searchsorted(keep, n_train))
    K = np.asarray(meta["K"], np.float64)
    K[:2] *= scale
    meta.update(size=size, n_frames=len(keep), fps=float(meta["fps"]) / step, K=K.round(6).tolist(), split={"train": [0, t], "test": [t, len(keep)]})
    meta["files"] = {**files, "contact_sheet": None}
    meta["packed"] = {"from": str(clip.resolve()), "size": old, "n_frames": n, "every": step, "by": "bench/pack_prior_data.py"}
    (dest / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return len(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", type=Path, nargs="+")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-frames", type=int, default=240, help="thin longer clips to about this many frames (0: keep all)")
    parser.add_argument("--crf", type=int, default=14)
    parser.add_argument("--drop-audio", action="store_true", help="leave audio and its features out (the e2v prior does not read them)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(assets.resolve("face_landmarker"), args.out / "face_landmarker.task")
    for clip in args.clips:
        n = shrink(clip, args.out / clip.name, args.size, args.max_frames, args.crf, args.drop_audio)
        mb = sum(f.stat().st_size for f in (args.out / clip.name).rglob("*") if f.is_file()) / 2**20
        print(f"{clip.name}: {n} frames at {args.size}², {mb:.1f} MiB")


if __name__ == "__main__":
    main()
