"""bench/staging.py: frames packed into one 4:4:4 H.264 video through PyAV (no ffmpeg binary on
the GPU machines or here) and unpacked back into the same number of near-identical JPEGs."""

from __future__ import annotations

import subprocess

import av
import cv2
import numpy as np
import pytest

from bench import staging
from bench.priors_at_scale import _python


def frames(folder, n=6, side=64):
    folder.mkdir(parents=True)
    colours = []
    for i in range(n):
        bgr = np.zeros((side, side, 3), np.uint8)
        bgr[:] = (40 * i, 200 - 30 * i, 120)
        bgr[: side // 2, : side // 2] = 255 - bgr[0, 0]  # a corner block, so area resizing is seen
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 98])
        colours.append(bgr)
    return colours


def test_encode_frames_writes_444_h264_at_the_asked_size(tmp_path):
    colours = frames(tmp_path / "frames")
    video = tmp_path / "frames.mp4"
    staging.encode_frames(sorted((tmp_path / "frames").glob("*.jpg")), video, crf=12, size=32)
    with av.open(str(video)) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (32, 32)
        assert stream.codec_context.pix_fmt == "yuv444p" and stream.codec_context.name == "h264"
        decoded = [f.to_ndarray(format="bgr24") for f in c.decode(stream)]
    assert len(decoded) == len(colours)
    for got, want in zip(decoded, colours, strict=True):
        assert np.abs(got.astype(int) - cv2.resize(want, (32, 32), interpolation=cv2.INTER_AREA)).mean() < 3


def test_pack_then_unpack_gives_back_every_frame(tmp_path):
    clip = tmp_path / "clip"
    colours = frames(clip / "frames")
    (clip / "meta.yaml").write_text("n_frames: 6\n")
    (clip / "contact_sheet.png").write_bytes(b"not carried")
    staging.pack(clip, tmp_path / "packed")
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["frames.mp4", "meta.yaml"]
    staging.unpack(tmp_path / "packed", tmp_path / "back")
    back = sorted((tmp_path / "back" / "frames").glob("*.jpg"))
    assert len(back) == len(colours) and (tmp_path / "back" / "meta.yaml").exists()
    for f, want in zip(back, colours, strict=True):  # two JPEG generations and a YUV round trip
        assert np.abs(cv2.imread(str(f)).astype(int) - want).mean() < 4


def test_parts_split_a_thinned_clip_into_disjoint_carries():
    """`shrink --part P/N`: N disjoint frame sets, each within --max-frames, together the clip
    thinned to N × max-frames; one part is the plain thinning."""
    whole, step = staging.kept_frames(1261, 200)
    assert step == 7 and np.array_equal(whole, np.arange(0, 1261, 7))
    parts = [staging.kept_frames(1261, 200, p, 3) for p in range(3)]
    frames_of = [set(k.tolist()) for k, _ in parts]
    assert all(len(k) <= 200 for k, _ in parts) and all(s == 9 for _, s in parts)
    assert sum(map(len, frames_of)) == len(set.union(*frames_of)) == len(range(0, 1261, 3))
    assert np.array_equal(staging.kept_frames(50, 0)[0], np.arange(50))  # 0: every frame


def test_a_timed_fit_stops_cleanly_and_says_so():
    """bench.priors_at_scale's multi-call fit: past its time the run gets SIGTERM, which
    ggtalker's training loop answers by checkpointing and exiting 130 (resumable, not a failure)."""
    checkpoints_on_term = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(130)); time.sleep(60)"
    assert _python("-c", checkpoints_on_term, seconds=1) is False
    assert _python("-c", "pass", seconds=30) is True
    with pytest.raises(subprocess.CalledProcessError):
        _python("-c", "raise SystemExit(3)")
