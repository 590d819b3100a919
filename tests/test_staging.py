"""bench/staging.py: frames packed into one 4:4:4 H.264 video through PyAV (no ffmpeg binary on
the GPU machines or here) and unpacked back into the same number of near-identical JPEGs."""

from __future__ import annotations

import av
import cv2
import numpy as np

from bench import staging


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
