"""Move clip folders to the GPU machine within the device tool's 64 MiB carry limit.

`pack CLIP DEST` re-encodes the clip's JPEG frames into one near-lossless H.264 video
(CRF 12) and copies everything else; `unpack DEST CLIP` (run on the GPU machine, which has
OpenCV but no ffmpeg binary) decodes it back into `frames/%06d.jpg`. Train and test frames go
through the same re-encode, so quality numbers measured there compare like with like.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

SKIP = {"frames", "contact_sheet.png"}


def pack(clip: Path, dest: Path, crf: int = 12) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for item in clip.iterdir():
        if item.name in SKIP:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-framerate", "25", "-i", str(clip / "frames" / "%06d.jpg"),
         "-c:v", "libx264", "-crf", str(crf), "-preset", "slow", "-pix_fmt", "yuv444p", str(dest / "frames.mp4")],
        check=True,
    )


def unpack(packed: Path, clip: Path) -> None:
    import cv2

    clip.mkdir(parents=True, exist_ok=True)
    for item in packed.iterdir():
        if item.name == "frames.mp4":
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
    print(f"{clip}: {index} frames")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    (pack if args.action == "pack" else unpack)(args.src, args.dst)


if __name__ == "__main__":
    main()
