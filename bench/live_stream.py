"""Live synthesis (`synth --stream --latency L`): latency, throughput, and its lips against the exact mode.

    # here (CPU, whisper base): timing at 128² and the lip metrics on the long real clips
    python bench/live_stream.py out/live/avatar_macron128 --clip out/clips/macron_50s_512_30fps \\
        --quality out/clips/macron_50s_512_30fps out/clips/cnn_anchor_71s_512_25fps out/clips/tedlieu_60s_256_25fps
    # GPU machine (no whisper weights there): timing only, merged into the json made here
    python bench/live_stream.py AVATAR --clip CLIP --device cuda --random-whisper --out $OUT/live_stream.json

Timing: the real CLI in a subprocess, driven as a speaking client does (`live.drive`): after
its ready line, the clip's speech goes to its stdin as 16 kHz s16le PCM in 20-ms pieces at
real-time pace, raw frames come back on stdout, and each frame's latency runs from the writing
of its first sample to the reading of the frame (render, inpaint and pipes included).
`realtime_factor` is a second run fed as fast as it reads: output seconds per wall second
between its 10th-percentile frame and its last. `--random-whisper` times a random-weight whisper
of base's exact dimensions (its cost does not depend on its weights; the frames are nonsense,
the timing is not), for machines without the checkpoint.

Quality (needs the real whisper): for each clip, the exact mode (`stream.Expressions`, equal to
`a2e.predict`) and live mode (`live.LiveExpressions`, per whisper window, context and latency)
predict the mouth at the A2E's 25 fps from the clip's own audio, scored on the clip's held-out
test frames (its last 10%, unseen by adaptation) against the tracked mouth: mouth_r (Pearson r
of the inner-lip gap), lip_mm (mean error of the 40 lip points in face space, mm: a 3-D LMD
proxy) and lag (frames the mouth trails the tracked one, metrics.mouth_sync); plus the live
mouth against the exact one (r, mm, lag). Live runs start on the hop grid a context and 2 s
before the first test frame, which gives the test frames exactly what a run from 0 would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ggtalker_cli import a2e, artifacts, audio, live, media, metrics
from ggtalker_cli.config import LiveConfig
from ggtalker_cli.stream import Expressions

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "live_stream.json"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (load avg {os.getloadavg()[0]:.1f})"


def random_whisper(folder: Path) -> Path:
    from whisper.model import ModelDimensions, Whisper

    from bench.whisper_speed import BASE_DIMS

    path = folder / "random-base.pt"
    dims = ModelDimensions(**BASE_DIMS)
    torch.manual_seed(0)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": Whisper(dims).half().state_dict()}, path)
    return path


def timing(avatar: Path, clip: Path, device: str, latency: float, size: int, seconds: float, whisper: Path | None) -> dict:
    samples, _ = media.read_wav(clip / "audio.wav")
    pcm = (np.clip(samples[: round(seconds * audio.SAMPLE_RATE)], -1, 1) * 32767).astype("<i2").tobytes()
    fps = float(artifacts.read_meta(clip, "clip")["fps"])
    args = [sys.executable, "-m", "ggtalker_cli.cli", "synth", str(avatar), "--clip", str(clip), "--audio", "-", "--stream",
            "--latency", str(latency), "-o", "-", "--device", device, "--size", str(size)]  # fmt: skip
    if whisper is not None:
        args += ["--whisper", str(whisper)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    live.drive(args, pcm[: 2 * 2 * audio.SAMPLE_RATE], size * size * 3, fps, pace=False, env=env)  # compiles and caches kernels (gsplat JIT)
    paced = live.drive(args, pcm, size * size * 3, fps, env=env)
    fast = live.drive(args, pcm, size * size * 3, fps, pace=False, env=env)
    for run in (paced, fast):
        if run.returncode != 0:
            raise SystemExit(f"live synth failed ({run.returncode}):\n{run.log[-2000:]}")
    lat = paced.latencies[np.isfinite(paced.latencies)]
    k = len(fast.arrivals) // 10
    rtf = (len(fast.arrivals) - 1 - k) / fps / max(fast.arrivals[-1] - fast.arrivals[k], 1e-9)
    budget = [line.split("latency budget ")[1].split(" s")[0] for line in paced.log.splitlines() if "latency budget" in line]
    return {
        "device": device_name(device),
        "latency_s_p50": round(float(np.percentile(lat, 50)), 3),
        "latency_s_p95": round(float(np.percentile(lat, 95)), 3),
        "latency_s_max": round(float(lat.max()), 3),
        "realtime_factor": round(float(rtf), 3),
        "audio_wait_s": float(budget[0]) if budget else None,
        "latency_arg": latency,
        "size": size,
        "audio_s": round(len(pcm) / 2 / audio.SAMPLE_RATE, 2),
        "frames": len(paced.arrivals),
        "fps": fps,
        "whisper": "random weights, base dimensions" if whisper is not None and whisper.name == "random-base.pt" else "base",
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
    }


def _scores(mouth: np.ndarray, d: a2e.ClipData, test: np.ndarray, neutral: np.ndarray, fps: float) -> dict:
    pred, truth = mouth[test] - neutral, d.mouth[test]
    gap, tracked = a2e.mouth_gap(pred + d.neutral), a2e.mouth_gap(truth + d.neutral)
    lag, _ = metrics.mouth_sync(tracked, gap, fps)
    return {"mouth_r": round(metrics.pearson(gap, tracked), 3),
            "lip_mm": round(float(10 * np.linalg.norm(pred[:, : a2e.N_LIPS] - truth[:, : a2e.N_LIPS], axis=-1).mean()), 3),
            "lag_frames": round(float(lag), 2)}  # fmt: skip


def quality(clip: Path, state: dict, latencies: list[float], configs: dict[str, LiveConfig]) -> dict:
    model = a2e.from_state(state)
    mfps = float(model.meta["fps"])
    neutral = model.neutral.numpy()
    d = a2e.load_clip(clip, mfps)
    samples, _ = media.read_wav(clip / "audio.wav")
    exact = Expressions(state, mfps, device="cpu")
    off = np.concatenate([g.mouth for g in (exact.push(samples), exact.finish()) if len(g)])
    n = min(len(off), len(d.mouth))
    test = np.arange(d.n_train, n)
    test = test[d.valid[test]]
    out = {"clip": clip.name, "test_frames": len(test), "exact": _scores(off, d, test, neutral, mfps), "live": {}}
    for latency in latencies:
        for name, cfg in configs.items():
            stream = live.LiveExpressions(state, mfps, latency, cfg, device="cpu")
            lead = cfg.context_s + 2 + stream.latency_s
            a0 = max(0, math.floor((d.n_train / mfps - lead) * audio.SAMPLE_RATE / stream.hop)) * stream.hop  # on the step grid
            f0 = round(a0 / audio.SAMPLE_RATE * mfps)
            groups = [stream.push(samples[a0 + i : a0 + i + 3200]) for i in range(0, len(samples) - a0, 3200)] + [stream.finish()]
            mouth = np.concatenate([np.zeros((f0, *off.shape[1:]), np.float32)] + [g.mouth for g in groups if len(g)])[:n]
            scores = _scores(mouth, d, test, neutral, mfps)
            lag, _ = metrics.mouth_sync(a2e.mouth_gap(off[test]), a2e.mouth_gap(mouth[test]), mfps)
            scores["vs_exact"] = {"mouth_r": round(metrics.pearson(a2e.mouth_gap(mouth[test]), a2e.mouth_gap(off[test])), 3),
                                  "lip_mm": round(float(10 * np.linalg.norm(mouth[test, : a2e.N_LIPS] - off[test, : a2e.N_LIPS], axis=-1).mean()), 3),
                                  "lag_frames": round(float(lag), 2)}  # fmt: skip
            scores["audio_wait_s"] = round(stream.latency_s, 3)
            out["live"][f"{name}@{latency}"] = scores
            print(clip.name, name, latency, json.dumps(scores), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("avatar", type=Path)
    ap.add_argument("--clip", type=Path, default=None, help="the avatar's clip (body frames; default: the one adapt recorded)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=20.0, help="speech fed in each timing run")
    ap.add_argument("--random-whisper", action="store_true", help="time a random-weight whisper of base's dimensions (no checkpoint here)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--quality", type=Path, nargs="*", default=[],
                    help="clips to score live vs exact lips on (the avatar's A2E on its own clip, the prior's on others)")
    ap.add_argument("--quality-latencies", default="0.5,1.0")
    ap.add_argument("--windows", default="cut:8,cut:4,padded:8", help="live whisper settings scored: window:context_s")
    ap.add_argument("--prior", type=Path, default=REPO / "priors" / "default")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = args.out if args.out.is_file() else RESULT  # runs on other machines add to what is there
    result = json.loads(base.read_text()) if base.is_file() else {}
    result.setdefault("commands", []).append(" ".join(["python", "bench/live_stream.py", *sys.argv[1:]]))  # every run this file holds
    clip = args.clip or Path(artifacts.read_meta(args.avatar, "avatar")["clip"]["path"])
    if not args.no_timing:
        with tempfile.TemporaryDirectory() as tmp:
            whisper = random_whisper(Path(tmp)) if args.random_whisper else None
            run = timing(args.avatar, clip, args.device, args.latency, args.size, args.seconds, whisper)
        result.setdefault("timing", {})[f"{run['device'].split(' (load')[0]}, {args.size}², --latency {args.latency}"] = run
        result.update({k: run[k] for k in ("device", "latency_s_p50", "latency_s_p95", "realtime_factor")})
        print(json.dumps(run), flush=True)
    if args.quality:
        configs = {spec: LiveConfig(whisper_window=spec.split(":")[0], context_s=float(spec.split(":")[1])) for spec in args.windows.split(",")}
        latencies = [float(x) for x in args.quality_latencies.split(",")]
        quality_part = result.setdefault("quality", {"whisper": "base", "clips": {}})
        quality_part["device"] = device_name("cpu")
        for q in args.quality:
            own = q.resolve() == clip.resolve()
            state = load_file(str(args.avatar / "a2e.safetensors" if own else args.prior / "a2e.safetensors"))
            entry = quality(q, state, latencies, configs)
            entry["a2e"] = "the avatar's (adapted on this clip's training frames)" if own else "the prior's (null style)"
            old = quality_part["clips"].get(q.name, {})
            entry["live"] = {**old.get("live", {}), **entry["live"]} if old.get("a2e") == entry["a2e"] else entry["live"]
            quality_part["clips"][q.name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
