"""Audio–mouth sync of an A2E model alone (no render): av_sync_lag of its predicted inner-lip gap
against every speech file of the bench (other speakers and languages).

    python bench/a2e_sync.py priors/default/a2e.safetensors [AVATAR/a2e.safetensors ...] -o bench/results/a2e_sync.json
    python bench/a2e_sync.py priors/default/a2e.safetensors --adapt out/clips/tedlieu_60s_256_25fps,... -o ...

With --adapt, the first model is adapted to each clip (adapt_a2e, balanced preset) with and without
`a2e.adapt_realign` (training on the clip's audio shifted by its own measured lag), and both are scored.

Files under 8 s are listed as not measured (metrics.SYNC_MIN_SECONDS). Separates the model's own
timing from what rendering and mouth detection add (eval's render_lag covers that part).
`lag_vs_first`: each model's mouth against the first model's (the prior's) on the same speech
(metrics.mouth_sync, from 4 s): two mouth tracks have a sharp peak where sound and mouth on an
8-s file can slip to the neighbouring syllable's (±5-7 frames at 25 fps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from ggtalker_cli import audio, metrics
from ggtalker_cli.a2e_train import adapt_a2e
from ggtalker_cli.config import load_config
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
    ap.add_argument("--adapt", default="", help="comma-separated clip folders to adapt the first model to")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    models = {str(m): load_file(str(m)) for m in args.models}
    for clip in filter(None, args.adapt.split(",")):
        for realign in (False, True):
            cfg = load_config("balanced", {"a2e": {"adapt_realign": realign}}).a2e
            state, log = adapt_a2e(models[str(args.models[0])], clip, cfg, device="cpu")
            models[f"{Path(clip).name} adapted{' + realigned' if realign else ''} (source lag {log['source_lag']})"] = state
    speech = {p.name: audio.load_audio(p) for p in sorted(args.speech.glob("*.wav"))}
    first = models[str(args.models[0])]
    reference = {file: mouth_track(first, samples, args.fps) for file, samples in speech.items()}
    rows = []
    for name, state in models.items():
        for file, samples in speech.items():
            mouth = mouth_track(state, samples, args.fps)
            lag, r = metrics.av_sync(samples, audio.SAMPLE_RATE, args.fps, mouth)
            rel = metrics.mouth_sync(reference[file], mouth, args.fps)[0]
            rows.append({"model": name, "speech": file, "seconds": round(len(samples) / audio.SAMPLE_RATE, 1),
                         "av_sync_lag": metrics.jsonable(round(lag, 2)), "av_sync_r": metrics.jsonable(round(r, 3)),
                         "lag_vs_first": metrics.jsonable(round(rel, 2))})  # fmt: skip
            print(f"{name} {file}: {rows[-1]['seconds']} s, lag {lag:+.2f}, r {r:.2f}, vs first model {rel:+.2f}", flush=True)

    def within(name: str, key: str) -> str:
        lags = [r[key] for r in rows if r["model"] == name and r[key] is not None]
        return f"{sum(abs(x) <= 1 for x in lags)}/{len(lags)}"

    command = "python bench/a2e_sync.py " + " ".join(map(str, args.models)) + (f" --adapt {args.adapt}" if args.adapt else "") + f" -o {args.out}"
    doc = {"command": command, "definition": metrics.DEFINITIONS["av_sync_lag"],
           "lag_vs_first": "metrics.mouth_sync of the model's mouth against the first model's on the same speech (> 0: after it)",
           "within_1_frame": {name: within(name, "av_sync_lag") for name in models},
           "vs_first_within_1_frame": {name: within(name, "lag_vs_first") for name in models}, "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
