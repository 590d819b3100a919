"""Whisper feature throughput of `audio.encode`: real-time factor on CPU or GPU.

    python bench/whisper_speed.py                                   # CPU, whisper base via assets
    python bench/whisper_speed.py --device cuda --random-base       # GPU box (no weights there)

The encoder's cost does not depend on its weights or on what the audio says, so a GPU machine
that cannot receive the 145 MB base checkpoint times a random-weight model of base's exact
dimensions (`--random-base`) on band-limited noise. Reports wall-clock and process-CPU real-time
factors (wall time on a shared CPU also counts other people's work) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ggtalker_cli import audio

BASE_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                 n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--random-base", action="store_true", help="time a random-weight model with whisper base's dimensions")
    ap.add_argument("--work", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    model: str | Path = "base"
    if args.random_base:
        from whisper.model import ModelDimensions, Whisper

        args.work.mkdir(parents=True, exist_ok=True)
        model = args.work / "random-base.pt"
        dims = ModelDimensions(**BASE_DIMS)
        torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).half().state_dict()}, model)
    rng = np.random.default_rng(0)
    samples = np.convolve(rng.normal(0, 0.1, int(args.minutes * 60 * audio.SAMPLE_RATE)), np.ones(4) / 4, "same").astype(np.float32)
    n_frames = int(len(samples) / audio.SAMPLE_RATE * args.fps)
    audio.encode(samples[: audio.SAMPLE_RATE], 25, args.fps, model, device=args.device)  # load + warm up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    feats, info = audio.encode(samples, n_frames, args.fps, model, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    seconds = len(samples) / audio.SAMPLE_RATE
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": info["model"],
        "audio_s": seconds,
        "windows": info["windows"],
        "wall_s": round(wall, 3),
        "rtf_wall": round(seconds / wall, 1),
        "rtf_cpu": round(seconds / cpu, 1),
        "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20) if args.device.startswith("cuda") else None,
        "rows": list(feats.shape),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
