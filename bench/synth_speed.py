"""End-to-end `ggtalker synth` speed on 12 s and 60 s of speech, the way a user runs it.

    python -m bench.synth_speed stage --to .devdata/c5        # here: the speech + its whisper windows
    python -m bench.synth_speed run AVATAR --clip CLIP --audio DIR -o speed.json --device cuda   # there

`stage` writes 60 s of the bench's other speech (English, German, Mandarin, cycled) as a 16 kHz mono
wav into the batch's audio folder and its whisper windows into the batch's feature cache, so a
machine without whisper weights runs the real A2E on real features (bench/gpu_batch.py carries both).
`run` starts `ggtalker synth --json` as a new process for each speech file and records its wall
time from start to exit (Python and torch start-up, model loading, whisper, A2E, head render,
inpainter, encode, mux) beside synth's own summary (`fps_achieved`: first audio chunk to the
finished mp4). The encoder is whatever this machine has: libx264 through ffmpeg when it is on
PATH, OpenCV's mp4v otherwise; the record says which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import run_all  # the bench's speech files and the feature-cache warm-up

REPO = Path(__file__).resolve().parents[1]

LONG = "speech_60s.wav"
SECONDS = 60.0


def stage(to: Path, work: Path = run_all.REPO / "out" / "bench_gpu") -> None:
    """60 s of cycled speech into to/audio and its whisper windows into to/features."""
    from safetensors.torch import load_file

    from ggtalker_cli import audio, media
    from ggtalker_cli.synthesis import read_audio

    speech = np.concatenate([read_audio(p) for p in run_all.speech_files(work)])
    samples = np.resize(speech, int(SECONDS * audio.SAMPLE_RATE))  # cycled
    (to / "audio").mkdir(parents=True, exist_ok=True)
    media.write_wav(to / "audio" / LONG, samples)
    shutil.copy2(work / "audio" / run_all.SYNTH_AUDIO, to / "audio" / run_all.SYNTH_AUDIO)
    windows = run_all.whisper_windows(load_file(str(run_all.PRIOR / "a2e.safetensors")), read_audio(to / "audio" / LONG), 25.0)
    (to / "features").mkdir(parents=True, exist_ok=True)
    for f in windows:
        shutil.copy2(f, to / "features" / f.name)
    print(f"{to}: {LONG} and {len(windows)} whisper windows")


def run(avatar: Path, clip: Path, speech: Path, out: Path, device: str) -> None:
    from ggtalker_cli import media

    rows = []
    for name in (run_all.SYNTH_AUDIO, LONG):
        target = out.parent / f".synth_speed_{name}.mp4"
        cmd = [sys.executable, "-m", "ggtalker_cli.cli", "--json", "synth", str(avatar), "--audio", str(speech / name),
               "-o", str(target), "--clip", str(clip), "--device", device, "--force"]
        tic = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - tic
        if done.returncode != 0:
            raise SystemExit(f"synth exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        target.unlink(missing_ok=True)
        rows.append({"audio": name, "process_wall_s": round(wall, 2), "process_fps": round(summary["frames"] / wall, 1), "synth": summary})
        print(f"{name}: {summary['frames']} frames, synth {summary['fps_achieved']} fps, process {rows[-1]['process_fps']} fps", flush=True)
    doc = {"command": " ".join(["python -m bench.synth_speed run", str(avatar), "--clip", str(clip), "--audio", str(speech), "--device", device]),
           "encoder": media.video_encoder(), "cpu_cores": os.cpu_count(), "rows": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="here: the 60-s speech and its whisper windows into a batch folder")
    st.add_argument("--to", type=Path, required=True)
    rn = sub.add_parser("run", help="time `ggtalker synth` on 12 s and 60 s of speech")
    rn.add_argument("avatar", type=Path)
    rn.add_argument("--clip", type=Path, required=True)
    rn.add_argument("--audio", type=Path, required=True, help="folder with the staged speech")
    rn.add_argument("-o", "--out", type=Path, required=True)
    rn.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.cmd == "stage":
        stage(args.to)
    else:
        run(args.avatar, args.clip, args.audio, args.out, args.device)


if __name__ == "__main__":
    main()
