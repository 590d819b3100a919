"""Adapt real clips on one GPU and report held-out quality and wall-clock (issue 3's numbers).

The GPU machine has no ffmpeg: pack each clip here first (near-lossless H.264 frames, see
bench/staging.py) into an ignored folder, carry it and `.whl` (the gsplat wheel; the GPU image has the rest):

    python -m bench.staging pack out/clips/cnn_anchor_71s_512_25fps .devdata/packed/cnn_anchor_71s_512_25fps

then, through the device tool (carry [".whl", ".devdata/packed"]):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1 && \
    python3 -m bench.adapt_gpu .devdata/packed/* --out $OUT --size 512 --preset balanced

Several settings in one call: repeat the last line with `--set KEY=VALUE ... --tag T` (outputs
NAME-T.json). Per clip it prints one line and writes NAME.json (held-out PSNR/SSIM on head, full frame and
face box, the same before training, adapt wall-clock, peak VRAM and RSS, device) and NAME.png
(held-out previews and the novel-view strip, to look at: never commit renders of these people).
A packed clip (frames.mp4) is unpacked to /tmp first; a plain clip folder is used as is.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bench import staging
from ggtalker_cli import console
from ggtalker_cli.artifacts import read_meta
from ggtalker_cli.config import load_config
from ggtalker_cli.stages import adapt
from kernels import gsplat_backend


def _strip(avatar: Path) -> np.ndarray:
    """Previews stacked above the novel-view strip, padded to one width."""
    images = [cv2.imread(str(p)) for p in sorted((avatar / "previews").glob("*.png"))] + [cv2.imread(str(avatar / "novel_views.png"))]
    width = max(im.shape[1] for im in images)
    return np.concatenate([cv2.copyMakeBorder(im, 0, 0, 0, width - im.shape[1], cv2.BORDER_CONSTANT) for im in images], 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", nargs="+", type=Path, help="clip folders, packed or not")
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.json / NAME.png")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra adapt.KEY override (YAML value)")
    parser.add_argument("--tag", default="", help="suffix of the output names (several settings in one call)")
    parser.add_argument("--no-png", action="store_true", help="write only the JSON (the device tool returns 8 files)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ggtalker_adapt"))
    args = parser.parse_args()

    console.configure(quiet=True, json_mode=False)  # one line per clip; the bar would flood the log
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    tic = time.perf_counter()
    reason = gsplat_backend.unavailable()  # JIT-builds gsplat once, outside the timed runs
    if reason is not None:
        raise SystemExit(f"gsplat unavailable: {reason}")
    print(f"gsplat ready in {time.perf_counter() - tic:.1f} s on {torch.cuda.get_device_name()}", flush=True)

    import yaml

    overrides = {"adapt": {"size": args.size, **({"steps": args.steps} if args.steps else {})}}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides["adapt"][key] = yaml.safe_load(value)
    cfg = load_config(args.preset, overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    for clip in args.clips:
        name = clip.name
        if (clip / "frames.mp4").is_file():
            unpacked = args.work / "clips" / name
            shutil.rmtree(unpacked, ignore_errors=True)
            staging.unpack(clip, unpacked)
            clip = unpacked
        avatar = args.work / "avatars" / name
        torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        summary = adapt.run(clip, avatar, cfg, device="cuda", force=True)
        wall = time.perf_counter() - tic
        meta = read_meta(avatar, "avatar")
        result = {
            "clip": name,
            "device": meta["device"],
            "torch": torch.__version__,
            "size": meta["size"],
            "steps": meta["steps"],
            "gaussians": meta["gaussians"],
            "train_seconds": meta["train_seconds"],
            "timings_s": meta["timings_s"],
            "adapt_wall_seconds": round(wall, 1),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "metrics": meta["metrics"],
            "initial_metrics": meta["initial_metrics"],
            "eval_frames": len(meta["eval"]["frames"]),
            "protocol": meta["eval"]["protocol"],
            "config": meta["config"]["adapt"],
        }
        stem = f"{name}-{args.tag}" if args.tag else name
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        if not args.no_png:
            cv2.imwrite(str(args.out / f"{stem}.png"), _strip(avatar))
        m = result["metrics"]
        print(
            f"{stem}: head PSNR {m['psnr_head']:.2f} SSIM {m['ssim_head']:.3f} (inner {m['psnr_head_inner']:.2f}) | full PSNR {m['psnr_full']:.2f} "
            f"SSIM {m['ssim_full']:.3f} | face PSNR {m['psnr_face']:.2f} | driven head PSNR {m['psnr_head_driven']:.2f} | "
            f"train {result['train_seconds']} s, adapt {result['adapt_wall_seconds']} s, {result['gaussians']} Gaussians, "
            f"VRAM {result['peak_vram_gib']} GiB, RSS {result['peak_rss_gib']} GiB  ({summary['device']})",
            flush=True,
        )


if __name__ == "__main__":
    main()
