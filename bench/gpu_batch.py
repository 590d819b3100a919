"""One batch of clips through `make bench` on a device-tool GPU machine (64 MiB carried per call).

Here, once (ffmpeg, whisper and mediapipe are here):

    export GGTALKER_FEATURE_CACHE=$PWD/.devdata/bench/features
    python -m bench.run_all --steps preprocess,features --work out/bench_gpu

per batch, here: `python -m bench.gpu_batch stage A,B` assembles .devdata/call (the clips packed
by bench/staging.py, the whisper-cache files their eval and synth read, the bench's speech);
then through the device tool, carry [".whl", ".devdata/assets", ".devdata/call"]:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1 python3 -m bench.gpu_batch run

which unpacks, runs adapt, synth, eval (scoring deferred) and speed on cuda, and writes
bench.tgz.* (state, reports, avatar metadata; no weights) to $OUT. Back here:

    cat FILES/bench.tgz.* | tar xzf - -C out/bench_gpu
    python -m bench.run_all --steps score,summary --work out/bench_gpu
    python -m bench.gpu_batch table      # adapt quality + speed per clip: bench/results/adapt_all.{md,json}

A clip's folder recorded by adapt on the GPU machine is out/clips/NAME there as here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALL = REPO / ".devdata" / "call"  # default batch folder
PACKED = REPO / ".devdata" / "packed"
LOCAL_WORK = REPO / "out" / "bench_gpu"


def stage(names: list[str], cache: Path, call: Path = CALL) -> None:
    """Fill `call` with what `run` needs for these clips, and nothing else."""
    shutil.rmtree(call, ignore_errors=True)
    (call / "features").mkdir(parents=True)
    for name in names:
        shutil.copytree(PACKED / name, call / "clips" / name)
        state = json.loads((LOCAL_WORK / "state" / f"{name}.json").read_text())
        for f in state["features"]["cache_files"]:
            shutil.copy2(cache / f, call / "features" / f)
    shutil.copytree(LOCAL_WORK / "audio", call / "audio", ignore=shutil.ignore_patterns(".*"))
    size = sum(p.stat().st_size for p in call.rglob("*") if p.is_file())
    print(f"{call}: {size / 2**20:.1f} MiB for {', '.join(names)}")


def run(call: Path = CALL, steps: str = "adapt,synth,eval,speed", deadline: float | None = None) -> None:
    """On the GPU machine: unpack, bench, pack this batch's results into $OUT.

    Clips run one at a time so that a `deadline` (seconds from now, inside the device call's own
    limit) still leaves the finished clips packed: a clip is not started when the time left is
    under the longest clip so far, and one that overruns is stopped (its finished steps are kept).
    """
    from bench import staging

    start = time.monotonic()

    names = sorted(p.name for p in (call / "clips").iterdir())
    for name in names:
        staging.unpack(call / "clips" / name, REPO / "out" / "clips" / name)
    work = REPO / "out" / "bench"
    shutil.copytree(call / "audio", work / "audio", dirs_exist_ok=True)
    env = {**os.environ, "GGTALKER_FEATURE_CACHE": str(call / "features")}
    landmarker = REPO / ".devdata" / "assets" / "face_landmarker.task"  # carried or not: scoring is done here
    if landmarker.is_file():
        env["GGTALKER_FACE_LANDMARKER"] = str(landmarker)
    longest = 0.0
    for name in names:
        left = None if deadline is None else deadline - (time.monotonic() - start)
        if left is not None and left < longest:
            print(f"deadline: {name} not started ({left:.0f} s left, a clip took {longest:.0f} s)", flush=True)
            continue
        began = time.monotonic()
        try:
            subprocess.run([sys.executable, "-m", "bench.run_all", "--steps", steps, "--device", "cuda",
                            "--work", str(work), "--clips", name], env=env, timeout=left, cwd=REPO)
        except subprocess.TimeoutExpired:
            print(f"deadline: {name} stopped after {time.monotonic() - began:.0f} s", flush=True)
        longest = max(longest, time.monotonic() - began)
    keep = [f"{d}/{n}{x}" for n in names
            for d, x in (("state", ".json"), ("logs", ".log"), ("eval", ""), ("avatars", "/meta.yaml"), ("avatars", "/train_log.jsonl"))
            if (work / d / f"{n}{x}").exists()]
    out = Path(os.environ["OUT"])
    tar = subprocess.Popen(["tar", "czf", "-", "-C", str(work), *keep], stdout=subprocess.PIPE)
    subprocess.run(["split", "-b", "15M", "-", str(out / "bench.tgz.")], stdin=tar.stdout, check=True)
    tar.wait()


def table(work: Path = LOCAL_WORK, out: Path = REPO / "bench" / "results") -> None:
    """Per clip: adapt's held-out metrics (its own protocol, no inpainter) and speed, from `work`."""
    import yaml

    rows, protocol, made = [], None, 0.0
    for path in sorted((work / "state").glob("*.json")):
        state, name = json.loads(path.read_text()), path.stem
        meta_path = work / "avatars" / name / "meta.yaml"
        if "adapt" not in state or not meta_path.is_file():
            continue
        meta = yaml.safe_load(meta_path.read_text())
        m, protocol, made = meta["metrics"], meta["eval"]["protocol"], max(made, meta_path.stat().st_mtime)  # tar keeps the GPU run's times
        rows.append({"clip": name, "test_frames": len(meta["eval"]["frames"]),
                     **{k: round(m[k], 3) for k in ("psnr_head", "ssim_head", "psnr_head_inner", "psnr_full", "ssim_full", "psnr_face", "ssim_face")},
                     "initial_psnr_head": round(meta["initial_metrics"]["psnr_head"], 2), "gaussians": meta.get("gaussians"),
                     "train_s": meta.get("train_seconds"), "adapt_s": round(sum((meta.get("timings_s") or {}).values()), 1),
                     "device": meta.get("device"), "speed": state.get("speed"),
                     "adapted": datetime.datetime.fromtimestamp(meta_path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")})
    doc = {"command": "bench/gpu_batch.py (module docstring), then `python -m bench.gpu_batch table`",
           "date": datetime.date.fromtimestamp(made).isoformat(), "protocol": protocol, "rows": rows}
    (out / "adapt_all.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["| clip | test frames | head PSNR / SSIM | head inner PSNR | full PSNR / SSIM | face PSNR / SSIM | "
             "initial head PSNR | train s | adapt s | render+inpaint+encode fps | adapted (UTC) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r["speed"] or {}
        lines.append(f"| {r['clip']} | {r['test_frames']} | {r['psnr_head']:.2f} / {r['ssim_head']:.3f} | {r['psnr_head_inner']:.2f} "
                     f"| {r['psnr_full']:.2f} / {r['ssim_full']:.3f} "
                     f"| {r['psnr_face']:.2f} / {r['ssim_face']:.3f} | {r['initial_psnr_head']:.2f} "
                     f"| {r['train_s']} | {r['adapt_s']} | {sp.get('fps', '–')} | {r['adapted']} |")
    devices = sorted({r["device"] for r in rows})
    (out / "adapt_all.md").write_text(f"# adapt on every real clip — {doc['date']}, {', '.join(devices)}\n\n{doc['command']}\n\n"
                                      f"Protocol: {doc['protocol']}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="here: assemble .devdata/call for these clips")
    st.add_argument("clips", help="comma-separated clip names")
    st.add_argument("--to", type=Path, default=CALL, help="batch folder to fill (carry it)")
    st.add_argument("--cache", type=Path, default=Path(os.environ.get("GGTALKER_FEATURE_CACHE", REPO / ".devdata" / "bench" / "features")))
    rn = sub.add_parser("run", help="there: the GPU part of the bench for the staged clips")
    rn.add_argument("call", type=Path, nargs="?", default=CALL, help="batch folder staged here")
    rn.add_argument("--steps", default="adapt,synth,eval,speed", help="run_all steps (a batch re-run for one missing step)")
    rn.add_argument("--deadline", type=float, default=None, help="seconds: start no clip that would not finish by then")
    sub.add_parser("table", help="here: bench/results/adapt_all.{md,json} from out/bench_gpu")
    args = ap.parse_args()
    if args.cmd == "stage":
        stage(args.clips.split(","), args.cache, args.to)
    elif args.cmd == "run":
        run(args.call, args.steps, args.deadline)
    else:
        table()


if __name__ == "__main__":
    main()
