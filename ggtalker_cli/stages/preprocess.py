"""`ggtalker preprocess VIDEO -o CLIP_DIR`: a talking-head video → a clip/ folder (format 1).

The verb: refuse an unusable video or output before any work, then build the clip
(`preprocessing.build`: track, audio, crop, frames, masks, background, features, identity,
contact sheet, meta.yaml) in the partial folder `.CLIP_DIR.partial`, whose finished steps
`--resume` skips, and rename it to CLIP_DIR in one step.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from .. import console, preprocessing
from ..artifacts import atomic_dir, check_disk_space, check_output_dir, sha256, work_dir_for
from ..config import Config
from ..errors import Exit, GGError
from ..preprocessing import STEPS_DIR


def run(video: Path, out: Path, cfg: Config, *, allow_no_audio: bool = False, resume: bool = False, force: bool = False,
        person: str | None = None) -> dict:
    started = time.perf_counter()
    video, out = Path(video), Path(out)
    pc = cfg.preprocess
    probe = preprocessing.check_input(video, pc, allow_no_audio)
    check_output_dir(out, force)
    check_disk_space(out, preprocessing.disk_need(probe, pc))
    work = work_dir_for(out)
    params = {"sha256": sha256(video), "config": dataclasses.asdict(pc), "allow_no_audio": allow_no_audio}
    params_file = work / STEPS_DIR / "params.json"
    if work.exists():
        if resume and params_file.is_file() and json.loads(params_file.read_text()) == params:
            console.info(f"resuming from {work}")
        elif resume:
            raise GGError(f"{work}: partial work from another input or settings; re-run without --resume to start over", Exit.USAGE)
        else:
            shutil.rmtree(work)
    try:
        with atomic_dir(out, force=force, work=work) as tmp:
            steps = preprocessing.Steps(tmp)
            params_file.write_text(json.dumps(params))
            summary = preprocessing.build(video, tmp, probe, pc, steps, params["sha256"], person)
            shutil.rmtree(tmp / STEPS_DIR)
    except GGError:
        shutil.rmtree(work, ignore_errors=True)  # an input/output problem: nothing worth resuming
        raise
    total = time.perf_counter() - started
    summary.update(clip=str(out), seconds=round(total, 2), fps_throughput=round(summary["n_frames"] / total, 1),
                   resumed_steps=steps.skipped)
    return summary
