"""Ground-truth validation of the audio-mouth lag (metrics.av_sync) on real clips.

On a real talking video the picture and the sound are in sync, so a lag measure must give the
same number on every stretch of one clip, and ideally ~0. Per clip this prints the whole-clip
lag, the held-out test split's, and for sliding windows (hop = half a window) how many land
within ±1 frame of 0 and of the clip's own whole-length lag; the former definition (`av_lag`:
raw RMS envelope against the mouth-opening level, integer peak in ±10) is shown beside it.
Windows shorter than metrics.SYNC_MIN_SECONDS are measured with that minimum lowered to the
shortest window (4 s), to show why it exists. Writes bench/results/av_lag_gt.json.

    python bench/av_lag_gt.py out/clips/*
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ggtalker_cli import metrics
from ggtalker_cli.clip import Clip
from ggtalker_cli.media import read_wav

WINDOWS = (4, 6, 8, 12, 20)  # seconds


def old_lag(samples: np.ndarray, rate: int, fps: float, mouth: np.ndarray) -> float:
    """The former av_lag: raw RMS envelope vs the mouth-opening level, integer peak in ±10."""
    lag, r = metrics.peak_shift(metrics.audio_envelope(samples, rate, fps, len(mouth)), mouth, 10)
    return float(lag) if math.isfinite(r) else math.nan


def new_lag(samples: np.ndarray, rate: int, fps: float, mouth: np.ndarray) -> float:
    return metrics.av_sync(samples, rate, fps, mouth)[0]


MEASURES = {"av_lag (old)": old_lag, "av_sync_lag": new_lag}


def window(samples: np.ndarray, rate: int, fps: float, mouth: np.ndarray, start: int, stop: int) -> tuple:
    """The measures' arguments for frames [start, stop) and the audio shown with them."""
    return samples[round(start * rate / fps) : round(stop * rate / fps)], rate, fps, mouth[start:stop]


def clip_result(path: Path) -> dict:
    """Whole clip, test split and sliding windows of one clip, for every measure."""
    clip = Clip(path)
    samples, rate = read_wav(clip.audio_path)
    mouth = clip.tracking["mouth_open"].astype(np.float64)
    fps, n = clip.fps, len(mouth)
    spans = {"full": [(0, n)], "test": [(int(clip.test_indices[0]), n)]}
    for seconds in WINDOWS:
        w = round(seconds * fps)
        spans[f"{seconds}s"] = [(s, s + w) for s in range(0, n - w + 1, w // 2)]
    out = {"seconds": round(n / fps, 2), "test_seconds": round((n - int(clip.test_indices[0])) / fps, 2)}
    minimum, metrics.SYNC_MIN_SECONDS = metrics.SYNC_MIN_SECONDS, float(min(WINDOWS))
    try:
        for name, measure in MEASURES.items():
            out[name] = {key: [measure(*window(samples, rate, fps, mouth, a, b)) for a, b in ss] for key, ss in spans.items()}
    finally:
        metrics.SYNC_MIN_SECONDS = minimum
    return out


def within(lags: list[float], centre: float) -> str:
    """'hits/measured' of lags within ±1 frame of centre (NaN: not measured, no peak in range)."""
    ok = [x for x in lags if math.isfinite(x)]
    return f"{sum(abs(x - centre) <= 1 for x in ok)}/{len(ok)}" if ok else "–"


def f(x: float) -> str:
    return f"{x:+.1f}" if math.isfinite(x) else "n/a"


def table(results: dict[str, dict]) -> str:
    header = ["clip", "s", "measure", "whole", "test (s)"] + [f"{w} s: ±1 of 0 / of whole" for w in WINDOWS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for clip, r in results.items():
        for name in MEASURES:
            whole = r[name]["full"][0]
            cells = [clip, f"{r['seconds']:.0f}", name, f(whole), f"{f(r[name]['test'][0])} ({r['test_seconds']:.1f})"]
            cells += [f"{within(r[name][f'{w}s'], 0.0)} / {within(r[name][f'{w}s'], whole)}" if r[name][f"{w}s"] else "" for w in WINDOWS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "av_lag_gt.json")
    args = parser.parse_args()
    results = {p.name: clip_result(p) for p in sorted(args.clips) if (p / "meta.yaml").is_file()}
    print(table(results))
    args.out.write_text(json.dumps({"windows_s": WINDOWS, "clips": results}, indent=1, allow_nan=True) + "\n")


if __name__ == "__main__":
    main()
