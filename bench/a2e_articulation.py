"""How much the prior A2E under-articulates on each real clip, and what the articulation gain costs.

    python -m bench.a2e_articulation out/clips/* -o bench/results/a2e_articulation.json   # CPU

Per clip: the tracked/predicted inner-lip-gap spread over the training frames
(models.a2e.articulation_gain's ratio, prior at gain 1), and the mean lip-vertex error (mm) of the
prior's mouth on the held-out test frames at gain 1, ratio ** 0.5 and ratio (capped at 4),
the figures behind config.A2EConfig.adapt_articulation (docs/a2e.md).
"""

from __future__ import annotations

import json

import numpy as np

from bench.source_lag import prior_over_clips
from ggtalker_cli.models import a2e

FPS = 25.0


def main() -> None:
    args, model = prior_over_clips(__doc__)
    rows = []
    for clip in args.clips:
        data = a2e.load_clip(clip, FPS)
        ratio, _ = a2e.articulation_gain(model, data, 1.0, 4.0)
        _, mouth = a2e.run(model, data.features)
        test = (np.arange(len(data.valid)) >= data.n_train) & data.valid
        err = {f"gain_{name}": round(float(np.linalg.norm((g * mouth - data.mouth) * 10, axis=-1).mean(-1)[test].mean()), 3)
               for name, g in (("1", 1.0), ("sqrt", max(ratio**0.5, 1.0)), ("full", min(ratio, 4.0)))}  # fmt: skip
        rows.append({"clip": clip.name, "test_frames": int(test.sum()), "spread_ratio": round(ratio, 3), "lip_vertex_mm": err})
        print(json.dumps(rows[-1]), flush=True)
    mean = {k: round(float(np.mean([r["lip_vertex_mm"][k] for r in rows])), 3) for k in rows[0]["lip_vertex_mm"]}
    doc = {"command": f"python -m bench.a2e_articulation {' '.join(map(str, args.clips))} --prior {args.prior} -o {args.out}",
           "device": "cpu", "mean_lip_vertex_mm": mean, "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
