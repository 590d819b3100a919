"""How far each real clip's mouth runs from its sound, by the two measures `adapt` uses to
realign the A2E (docs/a2e.md), and how reproducible the short-clip one is.

    python bench/source_lag.py out/clips/* -o bench/results/source_lag.json

Per clip, over its training frames at the A2E rate (25 fps): `audio` = models.a2e.source_lag
(speech envelope vs tracked mouth, metrics.av_sync; only ≥ 8 s) and `prior` = models.a2e.prior_lag
(the prior A2E's predicted mouth from the same audio vs the tracked mouth, metrics.mouth_sync).
`windows_4s`: prior_lag on consecutive 4-s windows of the training frames, to show it is stable
where av_sync would not be measured at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from ggtalker_cli import a2e, metrics

FPS = 25.0
WINDOW_S = 4.0


def windows(model: a2e.A2E, data: a2e.ClipData) -> list[float]:
    """prior_lag on consecutive WINDOW_S windows of the training frames."""
    w = round(WINDOW_S * FPS)
    out = []
    for s in range(0, data.n_train - w + 1, w):
        part = dataclasses.replace(data, features=data.features[s : s + w], mouth=data.mouth[s : s + w], valid=data.valid[s : s + w], n_train=w)
        out.append(round(a2e.prior_lag(model, part), 2))
    return out


def prior_over_clips(doc: str) -> tuple[argparse.Namespace, a2e.A2E]:
    """The command line of the benches that run the prior A2E over clips (clips, --prior, -o), and that prior."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--prior", type=Path, default=Path("priors/default/a2e.safetensors"))
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    return args, a2e.from_state(load_file(str(args.prior)))


def main() -> None:
    args, model = prior_over_clips(__doc__)
    rows = []
    for clip in args.clips:
        data = a2e.load_clip(clip, FPS)
        audio_lag, prior = a2e.source_lag(clip, FPS), a2e.prior_lag(model, data)
        spans = windows(model, data)
        finite = [x for x in spans if math.isfinite(x)]
        rows.append({
            "clip": clip.name, "train_seconds": round(data.n_train / FPS, 1),
            "audio": metrics.jsonable(round(audio_lag, 2)), "prior": metrics.jsonable(round(prior, 2)),
            "windows_4s": [metrics.jsonable(x) for x in spans],
            "windows_max_dev": metrics.jsonable(round(max(abs(x - np.median(finite)) for x in finite), 2) if finite else math.nan),
        })
        print(json.dumps(rows[-1]), flush=True)
    doc = {"command": f"python bench/source_lag.py {' '.join(map(str, args.clips))} --prior {args.prior} -o {args.out}",
           "prior": str(args.prior), "fps": FPS, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
