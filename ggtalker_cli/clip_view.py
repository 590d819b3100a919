"""A preprocessed clip at a working resolution: the one "clip at size S" adapter.

`intrinsics` and `resize` are how every consumer (the head fit, the priors, synthesis) sees the
clip at its own size; `Data` keeps the tracking, intrinsics and background plate in device
memory and decodes frames and masks on demand; `Prefetch` decodes the frames of the next steps
on background threads (training steps, synthesis batches), so RAM stays flat with clip length.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from .clip import Clip
from .errors import Exit, GGError

PREFETCH = 4  # steps loaded ahead


def intrinsics(clip: Clip, size: int) -> np.ndarray:
    """(3, 3) camera intrinsics of the clip's frames resized to size²."""
    K = clip.K.copy()
    K[:2] *= size / clip.size
    return K


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(size, size, C), same dtype; OpenCV's area filter (anti-aliased down, bilinear up)."""
    if image.shape[0] != size:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image.reshape(size, size, -1)


class Data:
    """The clip at training resolution: frames/masks on demand, tracking and plate in memory."""

    def __init__(self, clip: Clip, size: int, device: torch.device):
        self.clip, self.size, self.device = clip, size, device
        trk = clip.tracking
        valid = trk["valid"].astype(bool)
        self.train = np.asarray([i for i in clip.train_indices if valid[i]])
        self.test = np.asarray([i for i in clip.test_indices if valid[i]])
        if len(self.train) < 2 or len(self.test) < 1:
            raise GGError(
                f"{clip.path}: {len(self.train)} tracked training / {len(self.test)} test frames; adapt needs a longer clip with a visible face",
                Exit.INPUT_INVALID,
            )
        self.K = torch.tensor(intrinsics(clip, size), dtype=torch.float32, device=device)
        self.verts = torch.tensor(trk["verts"], dtype=torch.float32, device=device)
        self.blendshapes = torch.tensor(trk["blendshapes"], dtype=torch.float32, device=device)
        self.pose = torch.tensor(trk["pose"], dtype=torch.float32, device=device)
        self.landmarks = trk["landmarks"] * (size / clip.size)
        self.plate = torch.tensor(self._resize(clip.background), device=device)[None]

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 or float image -> float32 in [0, 1] at size² (area filter: anti-aliased)."""
        return resize(image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0), self.size)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame i and its soft head mask at size², float32 (H, W, 3) and (H, W, 1)."""
        return self._resize(self.clip.frame(int(i))), self._resize((self.clip.mask(int(i)) == 2).astype(np.float32))

    def tensors(self, sample: tuple[np.ndarray, np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
        """-> frame (1, H, W, 3), head mask (1, H, W, 1), target = head over the plate."""
        frame, head = (torch.from_numpy(x).to(self.device, non_blocking=True)[None] for x in sample)
        return frame, head, frame * head + self.plate * (1 - head)


class Prefetch:
    """Loads the frames of the next `ahead` steps on background threads (decode + resize release the GIL).

    `order(step)` names the frames of a step; `get(step)` returns them loaded and queues the steps
    after it. A caller that keeps its own `pool` (synthesis, across calls) passes it in.
    """

    def __init__(self, load: Callable[[int], Any], order: Callable[[int], list[int]], end: int, ahead: int = PREFETCH,
                 pool: ThreadPoolExecutor | None = None):
        self.load, self.order, self.end, self.ahead = load, order, end, ahead
        self.own = pool is None
        self.pool = ThreadPoolExecutor(max_workers=2) if pool is None else pool
        self.pending: dict[int, Any] = {}

    def queue(self, step: int) -> None:
        """Start loading steps [step, step + ahead) that are not loading yet."""
        for s in range(step, min(step + self.ahead, self.end)):
            if s not in self.pending:
                self.pending[s] = [self.pool.submit(self.load, i) for i in self.order(s)]

    def get(self, step: int) -> list[Any]:
        self.queue(step)
        return [f.result() for f in self.pending.pop(step)]

    def close(self) -> None:
        if self.own:
            self.pool.shutdown(wait=True, cancel_futures=True)


