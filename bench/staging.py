"""Staging clips for the device tool's GPU machines, which carry 64 MiB per call and have OpenCV
but no ffmpeg binary (encoding goes through PyAV, ggtalker_cli.media): the one helper that gpu_batch, adapt_gpu, fit_prior_gpu.sh and
priors_at_scale share.

    python -m bench.staging pack CLIP DEST          # here: frames as one near-lossless H.264 video (CRF 12), the rest copied
    python -m bench.staging unpack DEST CLIP        # there: the video decoded back into frames/%06d.jpg
    python -m bench.staging shrink out/clips/* -o out/carry/prior --size 256 --max-frames 240 [--drop-audio] [--part P/N]

Train and test frames go through the same re-encode, so quality numbers measured there compare
like with like. `shrink` writes the packed layout at `--size` (frames, masks, plate, K and
landmarks scaled) and, where a clip is longer than `--max-frames`, keeps every k-th frame
(k = ceil(n / max)): the expression→visual prior wants many poses and expressions per identity
more than neighbouring frames; `--part P/N` keeps the P-th of N disjoint sets of such frames
(each ≤ `--max-frames`), for a corpus that reaches the GPU in N calls. Thinning divides the frame rate by k and keeps the audio whole (or
drops it: `--drop-audio`), so the folder is still a valid clip; a frame that was a test frame
(the last 10%) stays one. The tracking is stored compressed. `face_landmarker.task` is copied
beside the shrunk clips: the GPU image has no mediapipe model, and the head model reads its
canonical mesh from it (point GGTALKER_FACE_LANDMARKER at the copy there; the .sh recipes do).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

from ggtalker_cli import assets, media

SKIP = {"frames", "contact_sheet.png"}


def encode_frames(frames: list[Path], video: Path, crf: int, size: int | None = None) -> None:
    """JPEG frames -> one near-lossless H.264 video (4:4:4, 25 fps), optionally area-resized to size²."""
    first = cv2.imread(str(frames[0]), cv2.IMREAD_COLOR)
    height, width = (size, size) if size else first.shape[:2]
    with media.open_writer(video, 25, width, height, crf=crf, pix_fmt="yuv444p", preset="slow") as writer:
        for f in frames:
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if size:
                bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
            writer.write(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def pack(clip: Path, dest: Path, crf: int = 12) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for item in clip.iterdir():
        if item.name in SKIP:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)
    encode_frames(sorted((clip / "frames").glob("*.jpg")), dest / "frames.mp4", crf)


def unpack(packed: Path, clip: Path) -> None:
    """The packed clip back into a clip folder; meta.yaml is written last, so its presence means done."""
    clip.mkdir(parents=True, exist_ok=True)
    for item in packed.iterdir():
        if item.name in ("frames.mp4", "meta.yaml"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, clip / item.name, **({"dirs_exist_ok": True} if item.is_dir() else {}))
    (clip / "frames").mkdir(exist_ok=True)
    video = cv2.VideoCapture(str(packed / "frames.mp4"))
    index = 0
    while True:
        ok, frame = video.read()
        if not ok:
            break
        cv2.imwrite(str(clip / "frames" / f"{index:06d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        index += 1
    if index == 0:
        raise SystemExit(f"{packed / 'frames.mp4'}: no frames decoded")
    shutil.copy2(packed / "meta.yaml", clip / "meta.yaml")
    print(f"{clip}: {index} frames")


def kept_frames(n: int, max_frames: int, part: int = 0, parts: int = 1) -> tuple[np.ndarray, int]:
    """Frames of an n-frame clip that part `part` of `parts` keeps -> (indices, their stride).

    The clip is thinned to about max_frames × parts frames (every k-th) and part p takes every
    parts-th of those from the p-th: each part stays under the carry's share, the parts are
    disjoint, and together they hold parts times the frames one carry could."""
    step = max(1, math.ceil(n / (max_frames * parts))) if max_frames > 0 else 1
    return np.arange(0, n, step)[part::parts], step * parts


def shrink(clip: Path, dest: Path, size: int, max_frames: int, crf: int, drop_audio: bool, part: tuple[int, int] = (0, 1)) -> int:
    meta = yaml.safe_load((clip / "meta.yaml").read_text())
    n, old = int(meta["n_frames"]), int(meta["size"])
    keep, step = kept_frames(n, max_frames, *part)
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
        meta["audio"] = {"present": False, "features": None, "features_reason": "dropped by bench/staging.py shrink --drop-audio"}
    if files.get("audio"):
        shutil.copy2(clip / files["audio"], dest / files["audio"])
    if files.get("audio_features"):
        np.save(dest / files["audio_features"], np.load(clip / files["audio_features"])[keep])
    if files.get("identity"):
        shutil.copy2(clip / files["identity"], dest / files["identity"])

    encode_frames([clip / files["frames"] / f"{i:06d}.jpg" for i in keep], dest / "frames.mp4", crf, size)

    n_train = int(meta["split"]["train"][1])
    t = int(np.searchsorted(keep, n_train))
    K = np.asarray(meta["K"], np.float64)
    K[:2] *= scale
    meta.update(size=size, n_frames=len(keep), fps=float(meta["fps"]) / step, K=K.round(6).tolist(), split={"train": [0, t], "test": [t, len(keep)]})
    meta["files"] = {**files, "contact_sheet": None}
    meta["packed"] = {"from": str(clip.resolve()), "size": old, "n_frames": n, "every": step, "first": int(keep[0]),
                      "part": f"{part[0]}/{part[1]}", "by": "bench/staging.py shrink"}
    (dest / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return len(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("pack", "unpack"):
        p = sub.add_parser(name)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
    sh = sub.add_parser("shrink", help="smaller clips for a GPU run of fit-prior / adapt")
    sh.add_argument("clips", type=Path, nargs="+")
    sh.add_argument("-o", "--out", type=Path, required=True)
    sh.add_argument("--size", type=int, default=256)
    sh.add_argument("--max-frames", type=int, default=240, help="thin longer clips to about this many frames (0: keep all)")
    sh.add_argument("--crf", type=int, default=14)
    sh.add_argument("--drop-audio", action="store_true", help="leave audio and its features out (the e2v prior does not read them)")
    sh.add_argument("--part", default="0/1", help="P/N: the P-th of N disjoint frame sets of each clip (a corpus carried in N device calls)")
    args = parser.parse_args()
    if args.cmd != "shrink":
        (pack if args.cmd == "pack" else unpack)(args.src, args.dst)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(assets.resolve("face_landmarker"), args.out / "face_landmarker.task")
    part = tuple(int(x) for x in args.part.split("/"))
    for clip in args.clips:
        n = shrink(clip, args.out / clip.name, args.size, args.max_frames, args.crf, args.drop_audio, part)
        mb = sum(f.stat().st_size for f in (args.out / clip.name).rglob("*") if f.is_file()) / 2**20
        print(f"{clip.name}: {n} frames at {args.size}², {mb:.1f} MiB")


if __name__ == "__main__":
    main()
