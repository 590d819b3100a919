"""Pictures a person checks at a glance: clip contact sheets, and plots later stages reuse.

matplotlib with the Agg backend (no display needed); overlays are drawn with OpenCV on the
frames themselves so they stay sharp at any figure size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.spatial.transform import Rotation

from .artifacts import atomic_write_bytes

LABEL_COLORS = np.array([[0, 0, 0], [40, 90, 255], [255, 60, 40]], np.float32)  # background, torso, head
FRONTAL = np.diag([1.0, -1.0, -1.0])  # face axes of a face looking straight into an OpenCV camera


def head_angles(pose: np.ndarray) -> np.ndarray:
    """(N, 3) pitch, yaw, roll in degrees relative to a frontal face, from (N, 4, 4) poses."""
    return Rotation.from_matrix(pose[:, :3, :3] @ FRONTAL).as_euler("xyz", degrees=True)


def overlay(image: np.ndarray, labels: np.ndarray | None = None, landmarks: np.ndarray | None = None,
            pose: np.ndarray | None = None, K: np.ndarray | None = None, axis_cm: float = 6.0) -> np.ndarray:
    """A frame with the mask tinted in, landmarks as dots and the head pose as x/y/z axes (r/g/b)."""
    out = image.astype(np.float32)
    if labels is not None:
        tint = LABEL_COLORS[labels]
        alpha = np.where(labels > 0, 0.35, 0.0)[..., None]
        out = out * (1 - alpha) + tint * alpha
    out = np.ascontiguousarray(out.clip(0, 255).astype(np.uint8))
    scale = max(1, image.shape[0] // 256)
    if landmarks is not None:
        for x, y in np.round(landmarks).astype(int):
            cv2.circle(out, (int(x), int(y)), scale, (255, 255, 0), -1, cv2.LINE_AA)
    if pose is not None and K is not None:
        axes = np.array([[0, 0, 0], [axis_cm, 0, 0], [0, axis_cm, 0], [0, 0, axis_cm]], np.float64)
        cam = axes @ pose[:3, :3].T + pose[:3, 3]
        uv = cam @ K.T
        uv = np.round(uv[:, :2] / uv[:, 2:]).astype(int)
        for k, color in zip((1, 2, 3), ((255, 0, 0), (0, 255, 0), (0, 0, 255))):
            cv2.line(out, tuple(uv[0]), tuple(uv[k]), color, 2 * scale, cv2.LINE_AA)
    return out


def save_figure(fig: plt.Figure, path: Path, dpi: int = 100) -> None:
    """Write a figure as PNG atomically and free it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def contact_sheet(path: Path, thumbs: Sequence[tuple[int, np.ndarray]], fps: float, series: dict[str, np.ndarray],
                  valid: np.ndarray, interpolated: np.ndarray, test_start: int, title: str) -> None:
    """Thumbnails (frame index, overlaid image) in a row grid above time plots of `series`.

    Lost frames are shaded red, interpolated ones orange; the dashed line starts the test split.
    """
    cols = min(4, len(thumbs))
    rows = int(np.ceil(len(thumbs) / cols))
    n_plots = len(series)
    fig = plt.figure(figsize=(4 * cols, 4 * rows + 1.8 * n_plots), constrained_layout=True)
    grid = fig.add_gridspec(rows + n_plots, cols, height_ratios=[4] * rows + [1.8] * n_plots)
    for k, (index, image) in enumerate(thumbs):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        ax.imshow(image)
        ax.set_title(f"frame {index} ({index / fps:.1f} s)", fontsize=9)
        ax.axis("off")
    t = np.arange(len(valid)) / fps
    for k, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(grid[rows + k, :])
        values = np.asarray(values)
        ax.plot(t, values, lw=0.8)
        if values.ndim == 2 and values.shape[1] == 3:
            ax.legend(["pitch", "yaw", "roll"], fontsize=7, loc="upper right", ncol=3)
        ax.set_ylabel(name, fontsize=9)
        ax.set_xlim(0, t[-1] if len(t) > 1 else 1)
        ax.axvline(test_start / fps, color="k", ls="--", lw=0.8)
        for mask, color in ((~valid & ~interpolated, "red"), (interpolated, "orange")):
            for start, stop in _runs(mask):
                ax.axvspan(start / fps, stop / fps, color=color, alpha=0.3, lw=0)
        if k == n_plots - 1:
            ax.set_xlabel("time (s)")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the True runs of a boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))
