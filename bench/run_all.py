"""`make bench`: preprocess → adapt → synth → eval over every real clip, one summary table.

    python -m bench.run_all                                          # everything, on this machine
    python -m bench.run_all --steps preprocess,features              # CPU part before a GPU run
    python -m bench.run_all --steps adapt,eval,speed --device cuda --clips A,B   # the GPU part (device tool)
    python -m bench.run_all --steps score,summary                    # finish where mediapipe is

Every step reuses what an earlier run left in `--work` (default out/bench; clips in out/clips),
so a run can be split across machines. The device tool's GPU machines have no ffmpeg, whisper
weights or mediapipe and carry 64 MiB, hence: `features` (here) converts the bench's other speech
to 16 kHz mono wav in work/audio and fills the whisper feature cache (GGTALKER_FEATURE_CACHE) with
every window eval and synth will encode, so the GPU needs no whisper; eval there writes its videos
with OpenCV and leaves the landmark scoring pending; `score` (here) finishes it. `bench/gpu_batch.py`
does one batch of packed clips through the device tool (its docstring has the recipe).

Steps: preprocess (each video → clip), features (as above), adapt (from --prior: head, inpainter,
the prior's A2E fine-tuned into the avatar), synth (other speech → mp4 through the CLI), eval
(report per avatar, OOD audio included), score (finish reports whose landmark scoring was
deferred), speed (render + inpainter + encode at the avatar's size), summary
(bench/results/summary.{md,json}: quality, lip-sync, speed, the no-audio baseline, devices,
date). One clip failing is recorded and the others go on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
STEPS = ("preprocess", "features", "adapt", "synth", "eval", "score", "speed", "summary")
OOD = ("de_german_9s.wav", "zh_chinese_news_8s.wav", "multilingual_53s.wav")  # eval's out-of-distribution speech (other languages)
# Made here by concatenation: 8-9 s of speech is the least av_sync_lag measures, and there a cycle
# slip to the neighbouring syllable (±5-7 frames) is common; 53 s of seven languages is not.
JOINED = {"multilingual_53s.wav": ("de_german_9s.wav", "es_spanish1_5s.wav", "fr_french_7s.wav", "it_italian1_9s.wav",
                                   "ja_japanese_9s.wav", "ru_russian_6s.wav", "zh_chinese_news_8s.wav")}
SYNTH_AUDIO = "en_hallo2_12s.wav"
PRIOR = REPO / "priors" / "default"


def ggtalker(*args: str, log: Path) -> dict:
    """Run one CLI verb with --json; its stderr goes to `log`; a failure raises with the last line."""
    with open(log, "a") as err:
        err.write(f"\n$ ggtalker {' '.join(args)}\n")
        err.flush()
        done = subprocess.run([sys.executable, "-m", "ggtalker_cli.cli", "--json", *args], stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise RuntimeError(f"ggtalker {args[0]} exited {done.returncode}: {lines[-1] if lines else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def speech_files(work: Path) -> list[Path]:
    """The bench's other speech as 16 kHz mono 16-bit wav in work/audio: what a machine without
    ffmpeg (the GPU ones) can read, and the same samples on every machine."""
    import numpy as np

    out = []
    for name in (*OOD, SYNTH_AUDIO):
        wav = work / "audio" / name
        if not wav.is_file():
            from ggtalker_cli import audio, media

            wav.parent.mkdir(parents=True, exist_ok=True)
            media.write_wav(wav, np.concatenate([audio.load_audio(REAL / "audio" / part) for part in JOINED.get(name, (name,))]))
        out.append(wav)
    return out


def whisper_windows(state: dict, samples, fps: float) -> list[Path]:
    """The feature-cache files (GGTALKER_FEATURE_CACHE) of the whisper windows synth/eval encode for
    `samples`, made here if missing: what a machine without whisper weights needs to be carried."""
    from ggtalker_cli.stream import Expressions

    expressions = Expressions(state, fps, device="cpu")
    expressions.push(samples)
    expressions.finish()
    return list(expressions.whisper.encoder.used)


def warm_features(prior: Path, clip_dir: Path, work: Path) -> dict:
    """Whisper features of every audio eval and synth will see for this clip, into the feature
    cache (GGTALKER_FEATURE_CACHE): its held-out speech and the bench's other speech. A machine with
    the cache needs no whisper weights (stream.Expressions computes the same windows whatever the
    chunking, and the prior's A2E fixes the model rate and whisper model the avatar's keeps)."""
    from safetensors.torch import load_file

    from ggtalker_cli.clip import Clip
    from ggtalker_cli.synthesis import held_out_audio, read_audio

    if not os.environ.get("GGTALKER_FEATURE_CACHE"):
        raise RuntimeError("set GGTALKER_FEATURE_CACHE to the folder to fill")
    clip, state = Clip(clip_dir), load_file(str(prior / "a2e.safetensors"))
    test = held_out_audio(clip, clip.test_indices, work / "audio" / f".test_{clip_dir.name}.wav")
    seconds, files = 0.0, []
    for samples in (test, *(read_audio(p) for p in speech_files(work))):
        seconds += len(samples) / 16000
        files += [p.name for p in whisper_windows(state, samples, clip.fps)]
    return {"seconds": round(seconds, 2), "cache_files": sorted(set(files))}


def speed(avatar: Path, clip: Path, device: str, frames: int = 250) -> dict:
    """Render + composite + encode of `frames` frames at the avatar's size, expressions from its
    own track (synthesis minus whisper/A2E); ms per frame and FPS, timed after a warm-up."""
    import numpy as np

    from ggtalker_cli import media
    from ggtalker_cli.device import device_of
    from ggtalker_cli.synthesis import Synthesizer

    dev = device_of(device)
    synth = Synthesizer(avatar, dev, clip=clip)  # the clip folder here (adapt may have run elsewhere)
    try:
        idx = np.arange(frames)
        bodies = synth.bodies(idx, synth.clip.fps)
        poses = synth.poses(idx, bodies, synth.clip.fps)
        exprs = synth.track["blendshapes"][bodies]
        for _ in synth.frames(exprs[:16], poses[:16], bodies[:16]):  # warm-up (kernels, caches)
            pass
        timings: dict[str, float] = {}
        out = REPO / "out" / "bench" / f".speed_{avatar.name}.mp4"
        tic = time.perf_counter()
        with media.open_writer(out, synth.clip.fps, synth.size, synth.size) as writer:
            for image in synth.frames(exprs, poses, bodies, timings=timings):
                writer.write(image)
        wall = time.perf_counter() - tic
        out.unlink(missing_ok=True)
    finally:
        synth.close()
    return {"frames": frames, "size": synth.size, "fps": round(frames / wall, 1), "body": synth.body.kind,
            "encoder": media.video_encoder(),
            **{f"{k}_ms": round(1000 * v / frames, 3) for k, v in timings.items()}}


def value(report: dict, variant: str, key: str):
    return report["variants"][variant]["metrics"].get(key, {}).get("value")


def summary(work: Path, names: list[str], out: Path, device: str) -> None:
    rows = []
    for name in names:
        state = json.loads((work / "state" / f"{name}.json").read_text()) if (work / "state" / f"{name}.json").is_file() else {}
        rep_path = work / "eval" / name / "report.json"
        rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
        row = {"clip": name, "errors": state.get("errors", {})}
        if rep:
            row.update(
                test_frames=rep["protocol"]["frames"], size=rep["protocol"]["size"],
                **{f"{v}_{k}": value(rep, v, k) for v in ("audio", "tracked", "no_audio")
                   for k in ("psnr", "ssim", "lmd", "mouth_open_r", "mouth_lag", "av_sync_lag")},
                clip_av_sync_lag=(rep["clip"].get("av_sync_lag") or {}).get("value"), lmd_floor=value(rep, "detector_floor", "lmd"),
                retrieval_psnr=value(rep, "retrieval_landmarks", "psnr"), retrieval_lmd=value(rep, "retrieval_landmarks", "lmd"),
                seam_inpainter=value(rep, "tracked", "psnr_seam"), seam_paste=value(rep, "tracked_paste", "psnr_seam"),
                eval_device=rep["speed"]["device"], pending=bool(rep["pending"]),
                ood=[{"audio": Path(e["audio"]).name, **{k: (e["metrics"].get(k) or {}).get("value") for k in ("av_sync_lag", "av_sync_lag_rel", "render_lag")}}
                     for e in rep["ood"]],
            )
        meta_path = work / "avatars" / name / "meta.yaml"
        meta = yaml.safe_load(meta_path.read_text()) if meta_path.is_file() else {}
        adapt_s = (meta.get("train_seconds") or 0) + ((meta.get("inpainter") or {}).get("train_seconds") or 0)
        row.update(adapt_s=adapt_s or None, adapt_device=meta.get("device"), inpainter_rejected=bool((meta.get("inpainter") or {}).get("rejected")),
                   synth_fps=state.get("synth", {}).get("fps_achieved"), synth_device=state.get("synth", {}).get("device"),
                   render_fps=state.get("speed", {}).get("fps"), speed=state.get("speed"))
        rows.append(row)
    result = {"bench": "run_all", "date": datetime.date.today().isoformat(), "scored_on": device_name(device), "protocol": "docs/evaluation.md",
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")

    def f(x, spec=".2f"):
        return "–" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)

    lines = [
        f"# ggtalker bench — {result['date']}; landmarks scored on {result['scored_on']}, other devices below",
        "",
        ("Self-reenactment on each clip's held-out last 10% (docs/evaluation.md): the full system (expressions from the held-out "
         "audio) and the no-audio baseline (mean expression), both composited onto the test frames' own bodies. LMD in px at 512² "
         "(mediapipe lips, centred). Lags in frames, > 0: mouth after the reference. OOD: the other-language speech the "
         "avatar was driven with (German, Mandarin, and the seven languages joined: 53 s), "
         "av_sync_lag of the written video (not measured under 8 s), beside the "
         "training clip's own whole-length av_sync_lag; render lag: written video's mouth vs the mouth A2E drove."),
        "",
        "| clip | frames | PSNR | SSIM | LMD | mouth r | mouth lag vs GT | OOD av-sync lag (clip's own) | OOD render lag | "
        "no-audio PSNR | no-audio LMD | no-audio mouth r | LMD floor | seam PSNR inpainter / paste | adapt s | synth fps | render+inpaint+encode fps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "audio_psnr" not in r:
            lines.append(f"| {r['clip']} | failed: {'; '.join(f'{k}: {v}' for k, v in r['errors'].items()) or 'not run'} |" + " |" * 15)
            continue
        lines.append(
            f"| {r['clip']} | {r['test_frames']} | {f(r['audio_psnr'])} | {f(r['audio_ssim'], '.3f')} | {f(r['audio_lmd'])} "
            f"| {f(r['audio_mouth_open_r'], '.3f')} "
            f"| {f(r['audio_mouth_lag'], '+.0f')} | {' / '.join(f(o['av_sync_lag'], '+.1f') for o in r['ood'])} ({f(r['clip_av_sync_lag'], '+.1f')}) "
            f"| {' / '.join(f(o['render_lag'], '+.0f') for o in r['ood'])} | {f(r['no_audio_psnr'])} "
            f"| {f(r['no_audio_lmd'])} | {f(r['no_audio_mouth_open_r'], '.3f')} "
            f"| {f(r['lmd_floor'])} | {'rejected by adapt' if r['inpainter_rejected'] else f(r['seam_inpainter'])} / {f(r['seam_paste'])} "
            f"| {f(r['adapt_s'], '.0f')} | {f(r['synth_fps'], '.1f')} | {f(r['render_fps'], '.1f')} |"
        )
    devices = sorted({f"{k}: {r[k]}" for r in rows for k in ("adapt_device", "synth_device", "eval_device") if r.get(k)})
    lines += ["", "Devices: " + "; ".join(devices) if devices else "", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


def finished(step: str, name: str, state: dict, args: argparse.Namespace, device: str) -> bool:
    """Whether an earlier run (maybe on another machine) already did this step for this clip."""
    avatar, report = args.work / "avatars" / name, args.work / "eval" / name / "report.json"
    if step == "adapt":
        return (avatar / "meta.yaml").is_file()
    if step == "eval":
        return report.is_file()
    if step == "score":
        return not report.is_file() or not json.loads(report.read_text())["pending"]
    if step == "speed":
        return state.get("speed", {}).get("device") == device_name(device)
    return step in state


def run_step(step: str, name: str, args: argparse.Namespace, prior: Path, device: str) -> dict:
    clip, avatar, log = args.clip_dir / name, args.work / "avatars" / name, args.work / "logs" / f"{name}.log"
    report = args.work / "eval" / name
    if step == "adapt":  # in-process: the GPU machines run it, and they need not have the CLI's typer
        from ggtalker_cli.config import load_config
        from ggtalker_cli.stages import adapt

        return adapt.run(clip, avatar, load_config(args.preset), prior=prior, device=device)
    if step == "features":
        return warm_features(prior, clip, args.work)
    if step == "synth":
        return ggtalker("synth", str(avatar), "--audio", str(args.work / "audio" / SYNTH_AUDIO), "-o", str(args.work / "synth" / f"{name}.mp4"),
                        "--clip", str(clip), "--device", device, "--force", log=log)
    if step == "eval":
        ood = [x for a in OOD if (args.work / "audio" / a).is_file() for x in ("--audio", str(args.work / "audio" / a))]  # a batch may leave one out (64 MiB)
        size = ["--size", str(args.eval_size)] if args.eval_size else []
        return ggtalker("eval", str(avatar), str(clip), "-o", str(report), "--device", device, "--force", *ood, *size, log=log)
    if step == "score":
        return ggtalker("eval", "--score-only", "-o", str(report), log=log)
    return speed(avatar, clip, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=Path, default=REAL / "videos")
    ap.add_argument("--clips", default=None, help="comma-separated clip names (default: every video)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "bench")
    ap.add_argument("--clip-dir", type=Path, default=REPO / "out" / "clips")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--prior", type=Path, default=PRIOR, help="the prior adapt starts from (its a2e part too)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-size", type=int, default=None, help="render/score eval at this side (default: the clip's)")
    args = ap.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; choose from {STEPS}")
    videos = sorted(args.videos.glob("*.mp4"))
    names = [v.stem for v in videos] if args.clips is None else args.clips.split(",")
    for sub in ("avatars", "eval", "synth", "state", "logs", "audio"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    prior = args.prior
    device = args.device

    def state_of(name: str) -> dict:
        path = args.work / "state" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {"errors": {}}

    def save(name: str, state: dict) -> None:
        (args.work / "state" / f"{name}.json").write_text(json.dumps(state, indent=1))

    if "preprocess" in steps:
        for name in names:
            if not (args.clip_dir / name / "meta.yaml").is_file():
                ggtalker("preprocess", str(args.videos / f"{name}.mp4"), "-o", str(args.clip_dir / name), log=args.work / "logs" / f"{name}.log")
    clips = [n for n in names if (args.clip_dir / n / "meta.yaml").is_file()]
    for name in clips:
        state = state_of(name)
        for step in STEPS[1:-1]:
            if step not in steps or (step not in ("adapt", "features") and not (args.work / "avatars" / name / "meta.yaml").is_file()):
                continue
            if finished(step, name, state, args, device):
                continue
            print(f"[{name}] {step}", flush=True)
            try:
                result = run_step(step, name, args, prior, device)
                state[step] = {**result, "device": device_name(device)} if step == "speed" else result
                state.setdefault("errors", {}).pop(step, None)
            except Exception as e:  # noqa: BLE001  (one clip's failure must not stop the table)
                state.setdefault("errors", {})[step] = str(e)[:300]
                print(f"[{name}] {step} failed: {e}", flush=True)
            save(name, state)
    if "summary" in steps:
        summary(args.work, names, args.out, device)


if __name__ == "__main__":
    main()
