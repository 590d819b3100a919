"""Head / torso / background labels without segmentation weights, and the clean background plate.

No segmentation model exists offline, so the landmarks seed a classical method:
- a shape prior per frame from the landmarks: the face hull and the core of a skull ellipse are
  surely head, far outside the head above the jaw is surely background, the rest (hair, neck,
  shoulders) is weighed by position and decided by colour;
- one colour model per clip: GrabCut segments a mosaic of keyframes once, and the colours of
  its foreground and background become a log-odds lookup table; per frame, colour + prior is
  a table lookup and a blur at `work` resolution (~1 ms at 128²), upsampled to the crop;
- temporal consistency by a per-pixel majority over three consecutive frames (the stream runs
  one frame behind, the result has no lag);
- head vs torso/neck split by the jaw line (the lower face oval, continued sideways a quarter
  face below the chin so hair hanging beside the neck stays with the head).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from .tracking import CHIN, FACE_OVAL, FOREHEAD

BACKGROUND, TORSO, HEAD = 0, 1, 2
_CHEEK_R, _CHEEK_L = 234, 454
_JAW_R, _JAW_L = 58, 288  # oval points below the ear lobes, where the jaw line leaves the head


def _jaw_polyline(lm: np.ndarray, width: int) -> np.ndarray:
    """The head/neck boundary: the lower face oval from ear to ear, then sideways and down to a
    quarter face below the chin, then out to the borders. Hair hanging beside the neck (a bob,
    long hair) thus stays with the head, which it moves with; the neck below the jaw does not."""
    oval = np.array(FACE_OVAL)
    i0, i1 = list(oval).index(_JAW_L), list(oval).index(_JAW_R)
    lower = lm[oval[i0 : i1 + 1]]  # 288 → ... → 152 → ... → 58 (clockwise through the chin)
    fh = float(np.linalg.norm(lm[FOREHEAD] - lm[CHIN]))
    fw = float(np.linalg.norm(lm[_CHEEK_R] - lm[_CHEEK_L]))
    drop = lm[CHIN, 1] + 0.25 * fh
    far = 4.0 * width
    left, right = lower[0], lower[-1]  # image right and left ends (for a frontal face)
    return np.vstack([[left[0] + far, drop], [left[0] + 0.35 * fw, drop], lower, [right[0] - 0.35 * fw, drop], [right[0] - far, drop]])


def _below(poly: np.ndarray, size: int) -> np.ndarray:
    """Mask of the pixels under an x-monotone-ish polyline (the region to the image bottom)."""
    region = np.vstack([poly, [[poly[-1, 0], 4 * size], [poly[0, 0], 4 * size]]])
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(region).astype(np.int32)], 1)
    return mask.astype(bool)


def _hull(lm: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(lm[:468]).astype(np.int32)), 1)
    return mask.astype(bool)


def prior(lm: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape prior from landmarks (pixels of a size×size image).

    Returns the GrabCut seed (sure head inside the face hull and the skull ellipse's core, sure
    background far outside the head above the jaw, probable elsewhere), a spatial log-odds map
    (positive inside the head ellipse and the neck/shoulder wedge, falling off outside) and the
    region below the jaw line (for the head/torso split).
    """
    fh = float(np.linalg.norm(lm[FOREHEAD] - lm[CHIN]))
    fw = float(np.linalg.norm(lm[_CHEEK_R] - lm[_CHEEK_L]))
    up = (lm[FOREHEAD] - lm[CHIN]) / max(fh, 1e-6)
    right = np.array([-up[1], up[0]])
    center = (lm[FOREHEAD] + lm[CHIN]) / 2 + up * 0.15 * fh
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - center[0], ys - center[1]
    # elliptic radius in the face's own frame: 1 on an ellipse hugging skull, hair and ears
    r = np.hypot((dx * right[0] + dy * right[1]) / (0.62 * fw), (dx * up[0] + dy * up[1]) / (0.7 * fh))
    hull = _hull(lm, size)
    below = _below(_jaw_polyline(lm, size), size)
    chin = lm[CHIN]
    wedge = np.array([chin + [-0.4 * fw, 0], chin + [0.4 * fw, 0], chin + [1.8 * fw, 1.6 * fh], chin + [-1.8 * fw, 1.6 * fh]])
    torso = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(torso, np.round(wedge).astype(np.int32), 1)
    torso = torso.astype(bool) & below

    # above the jaw: favours the head up to a little outside the ellipse, so hair that colour
    # separates from the background is kept; below it: the neck/shoulder wedge
    spatial = np.where(below, np.where(torso, 1.0, -1.0), np.clip(2.0 * (1.0 - r) + 0.5, -2.0, 3.0)).astype(np.float32)
    seed = np.where((spatial > 0) | (r < 1.35), cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seed[~below & (r > 1.6)] = cv2.GC_BGD
    seed[(cv2.erode(hull.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) | (~below & (r < 0.8))] = cv2.GC_FGD
    return seed, spatial, below


class Segmenter:
    """Per-clip colour model + per-frame shape prior. `keyframes`: (rgb image, landmarks) pairs.

    The colour model is learned once: GrabCut (its graph cut is ~30 ms per 128² frame, too slow
    to run on every frame) segments a mosaic of keyframes, and the foreground/background colour
    histograms of its result become a lookup table of log-odds. Per frame, colour log-odds plus
    the landmark shape prior, smoothed spatially, decide each pixel: about 1 ms at 128².
    """

    BITS = 4  # colour histogram: 16 levels per channel

    def __init__(self, keyframes: Sequence[tuple[np.ndarray, np.ndarray]], work: int = 128):
        self.work = work
        tiles, seeds = [], []
        for image, lm in keyframes:
            small, lm_small = self._small(image, lm)
            tiles.append(small)
            seeds.append(prior(lm_small, work)[0])
        cols = int(np.ceil(np.sqrt(len(tiles))))
        rows = int(np.ceil(len(tiles) / cols))
        mosaic = np.zeros((rows * work, cols * work, 3), np.uint8)
        seed = np.full((rows * work, cols * work), cv2.GC_BGD, np.uint8)
        used = np.zeros(seed.shape, bool)  # empty mosaic cells must not count as background
        for k, (tile, s) in enumerate(zip(tiles, seeds)):
            r, c = divmod(k, cols)
            cell = (slice(r * work, (r + 1) * work), slice(c * work, (c + 1) * work))
            mosaic[cell], seed[cell], used[cell] = tile, s, True
        cv2.grabCut(mosaic, seed, None, np.zeros((1, 65)), np.zeros((1, 65)), 3, cv2.GC_INIT_WITH_MASK)
        fg = (seed == cv2.GC_FGD) | (seed == cv2.GC_PR_FGD)
        bins = self._bins(mosaic)
        n = 1 << (3 * self.BITS)
        hist_fg = np.bincount(bins[fg & used], minlength=n).reshape((1 << self.BITS,) * 3).astype(np.float64)
        hist_bg = np.bincount(bins[~fg & used], minlength=n).reshape((1 << self.BITS,) * 3).astype(np.float64)
        p_fg = gaussian_filter(hist_fg, 0.7) + 1.0
        p_bg = gaussian_filter(hist_bg, 0.7) + 1.0
        self.lut = np.clip(np.log(p_fg / p_fg.sum()) - np.log(p_bg / p_bg.sum()), -4, 4).astype(np.float32).ravel()

    def _bins(self, image: np.ndarray) -> np.ndarray:
        q = (image >> (8 - self.BITS)).astype(np.int32)
        return (q[..., 0] << (2 * self.BITS)) | (q[..., 1] << self.BITS) | q[..., 2]

    def _small(self, image: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = self.work / image.shape[0]
        return cv2.resize(image, (self.work, self.work), interpolation=cv2.INTER_AREA), lm * scale

    def foreground(self, image: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Foreground (person) and the below-jaw region at work resolution, and the landmarks there."""
        small, lm_small = self._small(image, lm)
        seed, spatial, below = prior(lm_small, self.work)
        logit = cv2.GaussianBlur(self.lut[self._bins(small)] + spatial, (0, 0), 1.5)
        fg = ((logit > 0) & (seed != cv2.GC_BGD)) | (seed == cv2.GC_FGD)
        return _fill_holes(fg, max_area=0.02 * fg.size), below, lm_small


def _fill_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill background specks enclosed by the person (dark hair strands, teeth, earrings)."""
    n, comp, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    h, w = mask.shape
    out = mask.copy()
    for k in range(1, n):
        x, y, bw, bh, area = stats[k]
        if area <= max_area and x > 0 and y > 0 and x + bw < w and y + bh < h:
            out[comp == k] = True
    return out


def _labels(fg: np.ndarray, below: np.ndarray, lm: np.ndarray, size: int) -> np.ndarray:
    """Work-resolution masks → size×size labels, edges smoothed by a soft upsample.

    The face hull is drawn at full size so the head label covers every landmark exactly.
    """
    hull = _hull(lm, len(fg))
    fg = cv2.morphologyEx((fg | hull).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, comp = cv2.connectedComponents(fg, connectivity=4)
    if n > 2:  # keep the person: the component that holds the face
        keep = np.bincount(comp[hull], minlength=n)
        keep[0] = 0
        fg = (comp == int(np.argmax(keep))).astype(np.uint8)
    soft = cv2.resize(cv2.GaussianBlur(fg.astype(np.float32), (3, 3), 0), (size, size), interpolation=cv2.INTER_LINEAR) > 0.5
    below_big = cv2.resize(below.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    labels = np.zeros((size, size), np.uint8)
    labels[soft & below_big] = TORSO
    labels[(soft & ~below_big) | _hull(lm * (size / len(fg)), size)] = HEAD
    return labels


def segment(segmenter: Segmenter, frames: Iterable[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[np.ndarray]:
    """Labels (size, size) uint8 for each (image, landmarks in its pixels), temporally smoothed.

    Each frame's foreground is the per-pixel majority of its own cut and its two neighbours'
    (at the ends: its own), which removes one-frame flicker; the stream runs one frame behind.
    """
    window: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque(maxlen=3)  # (fg, below, landmarks)
    for k, (image, lm) in enumerate(frames):
        window.append(segmenter.foreground(image, lm))
        if k == 0:
            continue
        if k == 1:
            yield _labels(*window[0], size)
        else:
            votes = window[0][0].astype(np.uint8) + window[1][0] + window[2][0]
            yield _labels(votes >= 2, *window[1][1:], size)
    if window:
        yield _labels(*window[-1], size)


def background_plate(samples: Iterable[tuple[np.ndarray, np.ndarray]], margin: int = 2) -> tuple[np.ndarray, float]:
    """Clean background from (image, labels) samples: per-pixel median of the pixels labelled
    background (eroded by `margin` so hair fringes do not bleed in); pixels never seen as
    background are inpainted. Returns the plate and the fraction that had to be inpainted.

    The masked median is a sort: unseen samples get a value above 255 so they sort last, and
    the median of the seen ones is picked by index.
    """
    images, masks = [], []
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    for image, labels in samples:
        images.append(image)
        masks.append(cv2.erode((labels == BACKGROUND).astype(np.uint8), kernel).astype(bool))
    stack = np.stack(images)  # (F, H, W, 3) uint8: F is a few dozen samples
    seen = np.stack(masks)
    count = seen.sum(0)  # (H, W)
    plate = np.zeros(stack.shape[1:], np.uint8)
    for y in range(0, stack.shape[1], 64):  # row blocks keep the 16-bit copy small
        block = stack[:, y : y + 64].astype(np.uint16)
        block[~seen[:, y : y + 64]] = 256
        block = np.moveaxis(block, 0, -1).copy()  # samples last: the sort runs on contiguous rows
        block.sort(axis=-1)
        mid = (np.maximum(count[y : y + 64], 1) - 1) // 2
        plate[y : y + 64] = np.take_along_axis(block, mid[..., None, None].repeat(3, -2), axis=-1)[..., 0].clip(0, 255)
    never = count == 0
    if never.any():
        radius = max(3, stack.shape[1] // 64)
        plate = cv2.inpaint(plate, never.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    return plate, float(never.mean())
