"""On-disk artifacts (clip/, prior/, avatar/): format versions, atomic writes, safe loading.

Every artifact is a folder with a `meta.yaml` naming its kind and format version. Folders are
built under a temporary sibling and renamed into place, so a crash never leaves half an artifact
at the target path. Loading never executes code: YAML through `safe_load`, weights through
safetensors, and every path named inside an artifact must stay inside it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import Exit, GGError

FORMAT_VERSIONS = {"clip": 1, "prior": 1, "avatar": 3}  # avatar 3: the inpainter sees the plate and predicts its fill as a residual on it
MAKERS = {"clip": "ggtalker preprocess", "prior": "ggtalker fit-prior", "avatar": "ggtalker adapt"}  # named in the fixes
META = "meta.yaml"
# what np.load raises on a damaged .npy/.npz (a truncated .npz is a broken zip archive)
NUMPY_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse an existing target unless --force, and an unwritable parent, before any work."""
    path = Path(path)
    if path.exists() and not force:
        raise GGError(f"{path}: output already exists; pass --force to replace it or choose another -o", Exit.OUTPUT)
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGError(f"{parent}: cannot create output folder ({e.strerror}); choose a writable -o", Exit.OUTPUT) from e
    if not os.access(parent, os.W_OK):
        raise GGError(f"{parent}: folder is not writable; choose a writable -o", Exit.OUTPUT)


def check_disk_space(path: Path, need_bytes: int) -> None:
    """Fail before a large write rather than halfway through it (a full disk mid-run costs the
    whole run and can leave the drive unusable for the next one)."""
    folder = next(p for p in Path(path).resolve().parents if p.exists())  # the target's folder may not exist yet
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise GGError(
            f"{path}: {folder} has {_human(free)} free but about {_human(need_bytes)} is needed; free disk space there or choose another -o",
            Exit.OUTPUT,
        )


def _human(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@contextmanager
def atomic_dir(target: Path, force: bool = False, work: Path | None = None, resumable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success rename it to `target`.

    `work` lets a resumable stage keep its partial folder between runs: the same folder is
    reused (not deleted on failure) so `--resume` can skip finished steps; `resumable(work)`,
    when given, decides on failure whether it holds anything worth resuming (otherwise it is
    removed, so a run refused before its first checkpoint leaves nothing beside `target`).
    Without `work` the temporary folder is removed on any failure.
    """
    target = Path(target)
    check_output_dir(target, force)
    if work is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent))
    else:
        tmp = work
        tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if work is None or (resumable is not None and not resumable(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():  # --force: the old target moves into a fresh folder of ours, then goes
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.resolve().parent))
        target.rename(old / target.name)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def work_dir_for(target: Path) -> Path:
    """The fixed partial folder a resumable stage uses for `target` (hidden sibling)."""
    target = Path(target)
    return target.resolve().parent / f".{target.name}.partial"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via temp + fsync + rename, so readers never see a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(*paths: Path) -> str:
    """Hex SHA-256 of the files' bytes in order, read in blocks (videos of gigabytes stay out of RAM).
    What artifacts record to say which input or prior they were made from."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(folder: Path, kind: str) -> str:
    """What identifies a clip or prior's content: the SHA-256 of its meta.yaml and the files its
    users read (a clip's tracking, a prior's weights). An avatar records those of the clip and
    prior it was adapted from, so a step that would reuse it can tell when either changed."""
    folder = Path(folder)
    meta = read_meta(folder, kind)
    files = [inside(folder, meta["files"]["tracking"])] if kind == "clip" else sorted(folder.glob("*.safetensors"))
    return sha256(folder / META, *files)


def write_meta(folder: Path, kind: str, data: dict[str, Any]) -> None:
    """Write `meta.yaml` with the kind and its current format version first."""
    body = {"format": f"ggtalker-{kind}", "version": FORMAT_VERSIONS[kind], **data}
    atomic_write_bytes(Path(folder) / META, yaml.safe_dump(body, sort_keys=False).encode())


def read_meta(folder: Path, kind: str) -> dict[str, Any]:
    """Load and validate `meta.yaml`: right kind, right version, parsed without running code."""
    folder = Path(folder)
    if not folder.exists():
        raise GGError(f"{folder}: no such {kind} folder; check the path", Exit.INPUT_MISSING)
    path = folder / META
    if not path.is_file():
        raise GGError(f"{folder}: not a ggtalker {kind} (no {META}); pass a folder made by `{MAKERS[kind]}`", Exit.ARTIFACT)
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GGError(f"{path}: unreadable YAML ({e.__class__.__name__}); re-create the {kind}", Exit.ARTIFACT) from e
    if not isinstance(meta, dict) or meta.get("format") != f"ggtalker-{kind}":
        found = meta.get("format") if isinstance(meta, dict) else None
        raise GGError(f"{path}: not a ggtalker {kind} (format {found!r}); pass a folder made by `{MAKERS[kind]}`", Exit.ARTIFACT)
    if meta.get("version") != FORMAT_VERSIONS[kind]:
        raise GGError(
            f"{path}: {kind} format version {meta.get('version')} but this ggtalker reads version {FORMAT_VERSIONS[kind]}; re-create it with this version",
            Exit.ARTIFACT,
        )
    return meta


def load_checkpoint(path: Path, device: Any = "cpu") -> Any:
    """A torch checkpoint as plain tensors and containers (`weights_only=True`).

    Checkpoints sit in folders that get copied between machines and people; a pickle that asks
    to build any other object (which is how a pickle runs code) is refused before any of it runs.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise GGError(f"{path}: refused: this checkpoint holds more than tensors (a foreign or tampered file); "
                      "delete it and rerun without --resume", Exit.ARTIFACT) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise GGError(f"{path}: unreadable checkpoint ({e.__class__.__name__}, truncated or not a torch file); "
                      "delete it and rerun without --resume", Exit.ARTIFACT) from e


def inside(folder: Path, relative: str) -> Path:
    """Resolve a path named inside an artifact, refusing anything that escapes the folder."""
    folder = Path(folder).resolve()
    path = (folder / relative).resolve()
    if path != folder and folder not in path.parents:
        raise GGError(f"{folder / META}: path {relative!r} points outside the artifact; refusing to load it", Exit.ARTIFACT)
    return path
