"""`Clip(path)`: the validated, lazily loaded view of a clip/ folder that every stage reads;
`expand_clips`: clip folders given as folders, folders of them or list files (fit-prior's input);
`person`: whose clip it is (the identity a prior trains, validates and holds out by).

Nothing heavy happens on open: meta.yaml is parsed and checked, the files it names are checked
to exist inside the folder; frames and masks are read one at a time on request, tracking arrays
on first use (without pickle).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from . import console
from .artifacts import META, NUMPY_ERRORS, inside, read_meta
from .errors import Exit, GGError

TRACKING_KEYS = ("landmarks", "verts", "blendshapes", "pose", "valid", "interpolated", "blink", "mouth_open")


class Clip:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_meta(self.path, "clip")
        try:
            self.fps = float(self.meta["fps"])
            self.size = int(self.meta["size"])
            self.n_frames = int(self.meta["n_frames"])
            self.K = np.asarray(self.meta["K"], np.float64).reshape(3, 3)
            files = self.meta["files"]
            train, test = self.meta["split"]["train"], self.meta["split"]["test"]
        except (KeyError, TypeError, ValueError) as e:
            raise GGError(f"{self.path / 'meta.yaml'}: missing or malformed field ({e}); re-create the clip with `ggtalker preprocess`", Exit.ARTIFACT) from e
        self.train_indices = np.arange(int(train[0]), int(train[1]))
        self.test_indices = np.arange(int(test[0]), int(test[1]))
        self._frames = inside(self.path, files["frames"])
        self._masks = inside(self.path, files["masks"])
        self.tracking_path = inside(self.path, files["tracking"])
        self.background_path = inside(self.path, files["background"])
        self.audio_path = inside(self.path, files["audio"]) if files.get("audio") else None
        self.features_path = inside(self.path, files["audio_features"]) if files.get("audio_features") else None
        self.identity_path = inside(self.path, files["identity"]) if files.get("identity") else None
        required = [self.tracking_path, self.background_path, self._frame_file(0), self._frame_file(self.n_frames - 1),
                    self._mask_file(0), self._mask_file(self.n_frames - 1)]
        optional = [p for p in (self.audio_path, self.features_path, self.identity_path) if p is not None]
        for p in required + optional:
            if not p.is_file():
                raise GGError(f"{p}: named in {self.path / 'meta.yaml'} but missing; the clip is incomplete, re-create it", Exit.ARTIFACT)

    def __len__(self) -> int:
        return self.n_frames

    @property
    def person(self) -> str:
        """Whose clip this is: meta.yaml's `person` (`preprocess --person`), else the folder's name."""
        return person(self.path, self.meta)

    def _frame_file(self, i: int) -> Path:
        return self._frames / f"{i:06d}.jpg"

    def _mask_file(self, i: int) -> Path:
        return self._masks / f"{i:06d}.png"

    def _check(self, i: int) -> int:
        if not -self.n_frames <= i < self.n_frames:
            raise IndexError(f"frame {i} out of range for a clip of {self.n_frames} frames")
        return i % self.n_frames

    def frame(self, i: int) -> np.ndarray:
        """Frame i, (size, size, 3) uint8 RGB."""
        path = self._frame_file(self._check(i))
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise GGError(f"{path}: unreadable frame; re-create the clip", Exit.ARTIFACT)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def mask(self, i: int) -> np.ndarray:
        """Labels of frame i, (size, size) uint8: 0 background, 1 torso/neck, 2 head."""
        path = self._mask_file(self._check(i))
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise GGError(f"{path}: unreadable mask; re-create the clip", Exit.ARTIFACT)
        return labels

    @cached_property
    def tracking(self) -> dict[str, np.ndarray]:
        """Per-frame arrays (see docs/architecture.md): landmarks, verts, blendshapes, pose, ..."""
        try:
            with np.load(self.tracking_path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except NUMPY_ERRORS as e:
            raise GGError(f"{self.tracking_path}: unreadable ({e.__class__.__name__}); re-create the clip", Exit.ARTIFACT) from e
        missing = [k for k in TRACKING_KEYS if k not in arrays]
        if missing:
            raise GGError(f"{self.tracking_path}: no {', '.join(missing)} arrays; re-create the clip", Exit.ARTIFACT)
        if len(arrays["pose"]) != self.n_frames:
            raise GGError(f"{self.tracking_path}: {len(arrays['pose'])} frames of tracking for {self.n_frames} frames; re-create the clip", Exit.ARTIFACT)
        return arrays

    @cached_property
    def background(self) -> np.ndarray:
        """The clean background plate, (size, size, 3) uint8 RGB."""
        return cv2.cvtColor(cv2.imread(str(self.background_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    def audio_features(self) -> np.ndarray | None:
        """(n_frames, D) float16 whisper features, one row per frame; None when not made."""
        if self.features_path is None:
            return None
        try:
            return np.load(self.features_path, allow_pickle=False)
        except NUMPY_ERRORS as e:
            raise GGError(f"{self.features_path}: unreadable ({e.__class__.__name__}); re-create the clip", Exit.ARTIFACT) from e


def person(path: Path, meta: dict | None = None) -> str:
    """The identity of the clip at `path`: its meta.yaml `person`, else the folder's name.

    Several clips of one person (one speaker's many short recordings) are one identity to a
    prior: one speaking style, validated and held out together, one share of the training windows.
    """
    meta = read_meta(Path(path), "clip") if meta is None else meta
    return str(meta.get("person") or Path(path).resolve().name)


def expand_clips(given: list[Path]) -> list[Path]:
    """Clip folders from clip folders, folders of clip folders (subfolders that are not clips, e.g.
    a failed batch preprocess, are skipped with a warning) and text files listing clip folders one
    a line (`#` comments; relative paths are read from the list's folder), in the order given."""
    clips: list[Path] = []
    for item in map(Path, given):
        if not item.exists() or (item / META).is_file():
            clips.append(item)  # a clip folder, or a missing path the caller names (artifacts.read_meta)
            continue
        if item.is_dir():
            subdirs = sorted(d for d in item.iterdir() if d.is_dir())
            found = [d for d in subdirs if (d / META).is_file()]
            skipped = [d.name for d in subdirs if d not in found]
            if found and skipped:  # e.g. videos whose preprocess failed in a batch
                console.warn(f"{item}: skipping {len(skipped)} subfolder(s) that are not clips: {', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}")
            if not found:
                raise GGError(f"{item}: neither a clip folder nor a folder of clip folders (no {META} in it or its subfolders); "
                              "pass folders made by `ggtalker preprocess`", Exit.INPUT_INVALID)  # fmt: skip
            clips += found
            continue
        try:
            lines = item.read_text().splitlines()
        except (UnicodeDecodeError, OSError) as e:
            why = f"not a readable list of clip folders ({e.__class__.__name__}); give a text file with one clip path a line"
            raise GGError(f"{item}: {why}", Exit.INPUT_INVALID) from e
        listed = [ln.split("#", 1)[0].strip() for ln in lines]
        entries = [(n, item.parent / t) for n, t in enumerate(listed, 1) if t]
        if not entries:
            raise GGError(f"{item}: the list of clips is empty; write one clip folder path a line", Exit.INPUT_INVALID)
        for n, clip in entries:
            if not (clip / META).is_file():
                raise GGError(f"{item}:{n}: {clip} is not a clip folder (no {META}); fix the line or preprocess that video", Exit.INPUT_INVALID)
            clips.append(clip)
    return clips
