"""Audio–mouth sync of an A2E model alone (no render): av_sync_lag of its predicted inner-lip gap
against every speech file of the bench (other speakers and languages).

    python bench/a2e_sync.py priors/default/a2e.safetensors [AVATAR/a2e.safetensors ...] -o bench/results/a2e_sync.json

Files under 8 s are listed as not measured (metrics.SYNC_MIN_SECONDS). Separates the model's own
timing from what rendering and mouth detection add (eval's render_lag covers that part).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from ggtalker_cli import audio, metrics
from ggtalker_cli.stream import Expressions

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "audio"


def mouth_track(state: dict, samples: np.ndarray, fps: float) -> np.ndarray:
    """The model's inner-lip gap per frame, streamed exactly as synth drives the avatar."""
    expressions = Expressions(state, fps, device="cpu")
    groups = [expressions.push(samples), expressions.finish()]
    return np.concatenate([g.mouth_open for g in groups if len(g)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="a2e.safetensors files (a prior's or an avatar's)")
    ap.add_argument("--speech", type=Path, default=SPEECH)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for model in args.models:
        state = load_file(str(model))
        for path in sorted(args.speech.glob("*.wav")):
            samples = audio.load_audio(path)
            lag, r = metrics.av_sync(samples, audio.SAMPLE_RATE, args.fps, mouth_track(state, samples, args.fps))
            rows.append({"model": str(model), "speech": path.name, "seconds": round(len(samples) / audio.SAMPLE_RATE, 1),
                         "av_sync_lag": metrics.jsonable(round(lag, 2)), "av_sync_r": metrics.jsonable(round(r, 3))})  # fmt: skip
            print(f"{model.parent.name} {path.name}: {rows[-1]['seconds']} s, lag {lag:+.2f}, r {r:.2f}", flush=True)
    measured = [r for r in rows if r["av_sync_lag"] is not None]
    doc = {"command": "python bench/a2e_sync.py " + " ".join(map(str, args.models)) + f" -o {args.out}", "definition": metrics.DEFINITIONS["av_sync_lag"],
           "measured": len(measured), "within_1_frame": sum(abs(r["av_sync_lag"]) <= 1 for r in measured), "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
