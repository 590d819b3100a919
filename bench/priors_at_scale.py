"""Issue 19's judgement: priors fitted on the corpus, scored on real people they never saw.

The corpus (priors/corpus.md) holds none of the identities of ../shared/data/real, so one prior
fitted on it alone is, for every real clip, a prior that excluded that person: the k-fold by
identity that the judgement asks for, with k = the number of judged clips, at the cost of one fit.

Here (CPU), pack what one device call carries (64 MiB in all):

    python -m bench.staging shrink .devdata/corpus/clips/* -o .devdata/gpu/corpus --size 256 --max-frames 200 --drop-audio
    python -m bench.staging shrink out/clips512/macron_50s_512_30fps -o .devdata/gpu/eval --size 512 --max-frames 0 --drop-audio

    python -m bench.priors_at_scale compact .devdata/gpu/corpus      # float16 landmarks/verts: ~half the carry

There (device tool, nvidia-h200; carry [".whl", ".devdata/gpu"]), one call per step, on one warm machine:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
    python3 -m bench.priors_at_scale gpu --fit-steps 6000            # the E2V prior → $OUT/prior/
    ... python3 -m bench.priors_at_scale gpu --judge macron_50s_512_30fps   # prior vs scratch → $OUT/

`gpu --judge` runs bench.prior_vs_scratch (adapt --steps N from the prior and from scratch, N
in --budgets) and returns its results.json, the novel views (JPEG) and the 4000-step avatars'
small files (for the A2E's rendered lip metrics, scored here). Back here:

    python -m bench.priors_at_scale report FILES_AT...    # → bench/results/priors_at_scale.json

`report` scores the novel views with mediapipe (detection rate and landmark reprojection error
against the avatar's own projected mesh, per yaw) and merges the A2E numbers of
bench/results/a2e_generative.json when present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CALL = REPO / ".devdata" / "gpu"
WORK = REPO / "out" / "priors_at_scale"
PRIOR = WORK / "prior"
RESULT = REPO / "bench" / "results" / "priors_at_scale.json"
AVATAR_FILES = ("meta.yaml", "weights.safetensors", "inpainter.safetensors", "a2e.safetensors", "synthesis/track.npz")


def _python(*args: str, seconds: float = 0) -> bool:
    """Run `python3 ARGS` from the checkout, its command shown; after `seconds` (0: never) send
    it SIGTERM, on which ggtalker's training loop finishes its step, checkpoints and exits 130.
    -> whether it ran to the end (a failure raises CalledProcessError)."""
    print("$ python3 " + " ".join(args), flush=True)
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO)
    try:
        code = proc.wait(timeout=seconds or None)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
        if code == 130:
            return False
    if code != 0:
        raise subprocess.CalledProcessError(code, list(args))
    return True


def _unpack(packed: Path) -> list[Path]:
    """Every packed clip below `packed` decoded into out/gpu_clips (once per machine).

    In this process, on a thread pool (OpenCV's decode and JPEG write release the GIL): one Python
    start per clip cost a fresh device machine minutes of its 10-minute call.
    """
    from concurrent.futures import ThreadPoolExecutor

    from bench.staging import unpack

    todo, clips = [], []
    for d in sorted(p for p in packed.iterdir() if (p / "meta.yaml").is_file()):
        dest = REPO / "out" / "gpu_clips" / d.name
        done = dest / "meta.yaml"
        if not done.is_file() or done.read_bytes() != (d / "meta.yaml").read_bytes():  # absent, or another part of the clip
            shutil.rmtree(dest, ignore_errors=True)
            todo.append((d, dest))
        clips.append(dest)
    tic = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: unpack(*job), todo))
    print(f"unpacked {len(todo)} of {len(clips)} clips in {time.perf_counter() - tic:.1f} s", flush=True)
    return clips


def compact(packed: Path) -> None:
    """Store each packed clip's landmarks and 3D landmarks as float16 (0.1 mm, 1/8 px at 256²).

    They are most of a short clip's pack (5 floats × 478 points a frame), and the prior's
    renders and losses do not see the difference; poses stay float32.
    """
    for path in sorted(packed.glob("*/tracking.npz")):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k].astype(np.float16) if k in ("landmarks", "verts") else z[k] for k in z.files}
        np.savez_compressed(path, **arrays)
    total = sum(f.stat().st_size for f in packed.rglob("*") if f.is_file())
    print(f"{packed}: {total / 2**20:.1f} MiB")


GSPLAT_SHIM = """\"\"\"gsplat's CUDA extension, built on an earlier machine of the same image (bench/priors_at_scale.py).\"\"\"
import importlib.util

_spec = importlib.util.spec_from_file_location("gsplat_cuda", {so!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
globals().update({{k: v for k, v in vars(_module).items() if not k.startswith("__")}})
"""


def _gsplat_prebuilt(call: Path, out: Path) -> Path | None:
    """Use a carried gsplat_cuda.so (one JIT build less: ~90 s of a 10-minute call), else say where the build will be.

    gsplat imports `gsplat.csrc` before it JIT-builds; a small module there that loads the
    carried library (built by this same image, torch and CUDA) is all it takes.
    """
    import importlib.util

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_extensions")
    so = call / "gsplat_cuda.so"
    package = importlib.util.find_spec("gsplat")
    if not so.is_file() or package is None:
        return None
    shim = Path(package.submodule_search_locations[0]) / "csrc.py"
    shim.write_text(GSPLAT_SHIM.format(so=str(so.resolve())))
    print(f"gsplat: using the carried {so}", flush=True)
    return so


def _return_gsplat_build(out: Path) -> None:
    """The JIT-built extension back in $OUT (≤ 16 MiB), to carry into the next call."""
    built = sorted(Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/gsplat_cuda.so"))
    if built and built[0].stat().st_size < 16 * 2**20:
        shutil.copy2(built[0], out / "gsplat_cuda.so")


def device_setup(call: Path) -> tuple[Path, Path | None]:
    """What every device call here starts with -> ($OUT, the carried gsplat build or None).

    gsplat builds for the H200 (sm 90) only; the head model reads mediapipe's canonical mesh
    from the face_landmarker.task carried beside the clips (the GPU image has none)."""
    out = Path(os.environ.get("OUT", WORK / "returned"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", "16")
    for folder in (call / "corpus", call / "eval"):
        task = folder / "face_landmarker.task"
        if task.is_file():
            os.environ.setdefault("GGTALKER_FACE_LANDMARKER", str(task.resolve()))
    return out, _gsplat_prebuilt(call, out)


def gpu(args: argparse.Namespace) -> None:
    call = args.call
    out, prebuilt = device_setup(call)
    if args.fit_steps:
        clips = _unpack(call / "corpus")
        holdout = args.holdout or clips[0].name
        command = ["-m", "ggtalker_cli.cli", "fit-prior", *map(str, clips), "-o", str(PRIOR), "--parts", "e2v",
                   "--holdout", holdout, "--steps", str(args.fit_steps), "--force"]  # fmt: skip
        work = WORK / ".prior.partial"  # fit-prior's resumable work folder (artifacts.work_dir_for)
        carried = call / "fit_state" / "e2v.ckpt"
        if carried.is_file() and not (work / "e2v.ckpt").is_file():  # the previous call's state
            work.mkdir(parents=True, exist_ok=True)
            shutil.copy2(carried, work / "e2v.ckpt")
        if work.exists():
            command.append("--resume")
        tic = time.perf_counter()
        if not _python(*command, seconds=args.fit_seconds):  # stopped cleanly: the state goes back for the next call
            (out / "fit_state").mkdir(exist_ok=True)
            shutil.copy2(work / "e2v.ckpt", out / "fit_state" / "e2v.ckpt")
            print(f"fit stopped after {args.fit_seconds} s: carry {out / 'fit_state'} as {call / 'fit_state'} into the next call", flush=True)
            return
        (out / "prior").mkdir(exist_ok=True)
        for name in ("e2v.safetensors", "meta.yaml", "val_loss.png"):
            shutil.copy2(PRIOR / name, out / "prior" / name)
        (out / "prior" / "command.txt").write_text("python3 " + " ".join(command) + f"\n# wall {time.perf_counter() - tic:.0f} s\n")
    for name in args.judge:
        (clip,) = [c for c in _unpack(call / "eval") if c.name == name]
        prior = PRIOR if (PRIOR / "e2v.safetensors").is_file() else call / "prior"
        folder = WORK / "pvs" / name
        arms = args.inits.replace(",", "_")
        _python("-m", "bench.prior_vs_scratch", str(clip), *(["--prior", str(prior)] if "prior" in args.inits else []), "-o", str(folder),
                "--budgets", args.budgets, "--inits", args.inits, "--no-consistency", "--views", str(out / f"views_{name}_{arms}.npz"),
                *(["--size", str(args.size)] if args.size else []), "--preset", args.preset)  # fmt: skip
        shutil.copy2(folder / "results.json", out / f"pvs_{name}_{arms}.json")
        top = max(int(b) for b in args.budgets.split(","))
        with tarfile.open(out / f"avatars_{name}_{arms}.tgz", "w:gz") as tar:
            for init in args.inits.split(","):
                for f in AVATAR_FILES:
                    path = folder / f"{init}_{top}" / f
                    if path.is_file():
                        tar.add(path, arcname=f"{name}/{init}_{top}/{f}")
    if args.live:
        _live(args, call, out)
    if prebuilt is None:
        _return_gsplat_build(out)


def _live(args: argparse.Namespace, call: Path, out: Path) -> None:
    """Issue 18's GPU timing: a short adaptation of the live clip from the shipped prior (its
    A2E drives the mouth; the timing does not depend on how long the head trained), then
    `synth --stream --latency 0.5` timed at each size by bench.live_stream."""
    (clip,) = [c for c in _unpack(call / "eval") if c.name == args.live_clip]
    avatar = WORK / "live_avatar"
    if not (avatar / "meta.yaml").is_file():
        _python("-m", "ggtalker_cli.cli", "adapt", str(clip), "-o", str(avatar), "--prior", str(REPO / "priors" / "default"),
                "--steps", str(args.live_steps), "--force")  # fmt: skip
    for size in [int(s) for s in args.live.split(",") if s]:
        _python("-m", "bench.live_stream", str(avatar), "--clip", str(clip), "--device", "cuda", "--random-whisper",
                "--size", str(size), "--latency", "0.5", "--seconds", "15", "--out", str(out / "live_stream.json"))  # fmt: skip


A2E_RESULT = REPO / "bench" / "results" / "a2e_adapt_lr.json"  # bench/a2e_generative.py on priors/default's a2e part, default adaptation first


def _a2e_run(doc: dict) -> tuple[dict, str]:
    """The judged run of an A2E bench result and its name: a fit's generative model, or the
    first variant of a `--prior` run (a run of the shipped prior judges its own settings)."""
    if "generative" in doc:
        return doc["generative"], "generative"
    (name, run), *_ = doc["variants"].items()
    return run, name


def _a2e_rows(run: dict) -> dict[str, dict]:
    """Issue 19's A2E fields per judged clip, from the A2E bench's run of the shipped prior with
    the default settings (the adapted model: what `adapt` gives a new person). Lip distances are that bench's face-space lip error
    (mm, 40 lip points, against the tracked lips), so the tracked mouth's own is 0 by construction."""
    rows = {}
    for name, clip in run["clips"].items():
        got = clip["adapted"]
        timed = clip.get("adapted_in_source_timing", {})
        rows[name] = {"spread_ratio": got["spread_ratio"], "lmd_audio": got["lip_mm"], "lmd_no_audio": clip["lip_mm_no_audio"],
                      "lmd_tracked": 0.0, "mouth_r": got["mouth_r"], "prior_null_style": clip["prior"],
                      "lmd_audio_in_source_timing": timed.get("lip_mm"), "mouth_r_in_source_timing": timed.get("mouth_r")}  # fmt: skip
    return rows


def _all_of(count: str) -> bool:
    """'15/20' -> False: the target is every OOD file within ±1 frame."""
    hit, total = count.split("/")
    return hit == total


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4)


def report(args: argparse.Namespace) -> None:
    """bench/results/priors_at_scale.json in the issue's schema: per held-out clip, overall, targets."""
    from bench import corpus
    from bench.prior_vs_scratch import consistency, load_views

    result = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    manifest = corpus.load()
    totals = corpus.totals(manifest)
    if totals["clips"] or "corpus" not in result:  # without the preprocessed corpus here, the last counted totals stand
        result.update(identities=totals["identities"], speech_minutes=totals["speech_minutes"], corpus=totals)
    else:
        print(f"no preprocessed corpus under {corpus.DATA / 'clips'}: keeping the recorded totals ({result['corpus']})", flush=True)
    shipped = yaml.safe_load((REPO / "priors" / "default" / "meta.yaml").read_text())["parts"]
    person = {c["id"]: c["person"] for c in manifest}
    e2v_people = {person.get(n, n) for n in (n.removesuffix(" (mirrored)") for n in shipped["e2v"]["identities"])}
    result["judged_priors_trained_on"] = {  # the corpus grows ahead of the priors fitted on it
        "e2v": {"identities": len(e2v_people), "held_out": shipped["e2v"].get("held_out")},
        "a2e": {"identities": len(shipped["a2e"]["identities"]), "held_out": len(shipped["a2e"]["held_out"])},
    }
    clips = result.setdefault("clips", {})
    for folder in args.returned:
        for path in sorted(folder.glob("pvs_*.json")):
            stem = path.stem[len("pvs_"):]
            name = next(stem[: -len(s)] for s in ("_prior_scratch", "_prior", "_scratch", "") if stem.endswith(s))
            pvs = json.loads(path.read_text())
            scored = {init: consistency(v) for init, v in load_views(folder / f"views_{stem}.npz").items()}
            row = clips.setdefault(name, {}).setdefault("e2v", {})
            for init, res in pvs["results"].items():  # arms from several calls fold into one row
                row.setdefault(f"psnr_{init}", {}).update({n: res[n]["psnr_head"] for n in sorted(res, key=int)})
                row.setdefault("novel_views", {})[init] = scored[init]
                row.setdefault("novel_view_reproj_px", {})[init] = {yaw: r["reprojection_px"] for yaw, r in scored[init].items()}
            row.update(device=pvs["device"], preset=pvs["preset"], size=pvs["size"] or 512)
    if A2E_RESULT.is_file():
        a2e = json.loads(A2E_RESULT.read_text())
        run, variant = _a2e_run(a2e)
        for name, row in _a2e_rows(run).items():
            clips.setdefault(name, {})["a2e"] = row
        result["a2e_source"] = {"file": str(A2E_RESULT.relative_to(REPO)), "variant": variant, "settings": run.get("a2e", "defaults"),
                                "command": a2e["command"],
                                "device": a2e["device"], "ood_within_1_frame": run["ood_within_1_frame"],
                                "identities": a2e.get("identities"), "speech_minutes": a2e.get("speech_minutes")}  # fmt: skip
    a2es = [c["a2e"] for c in clips.values() if "a2e" in c]
    e2vs = [c["e2v"] for c in clips.values() if "psnr_prior" in c.get("e2v", {}) and "psnr_scratch" in c["e2v"]]
    overall: dict = {}
    if a2es:
        overall["a2e"] = {k: _mean([r[k] for r in a2es]) for k in ("spread_ratio", "lmd_audio", "lmd_no_audio", "lmd_tracked", "mouth_r")}
        if all(r.get("mouth_r_in_source_timing") is not None for r in a2es):  # scored against test frames in the source's own A/V timing
            overall["a2e"].update({k: _mean([r[k] for r in a2es]) for k in ("lmd_audio_in_source_timing", "mouth_r_in_source_timing")})
    if e2vs:
        overall["e2v"] = {
            "clips": len(e2vs),
            **{f"psnr_{init}": {n: _mean([r[f"psnr_{init}"][n] for r in e2vs]) for n in ("250", "1000", "4000")} for init in ("prior", "scratch")},
            "novel_view_reproj_px_30": {init: _mean([(r["novel_view_reproj_px"][init]["-30"] + r["novel_view_reproj_px"][init]["30"]) / 2 for r in e2vs])
                                        for init in ("prior", "scratch")},  # fmt: skip
        }
    result["overall"] = overall
    targets = {"identities_ge_60": result["identities"] >= 60, "speech_minutes_ge_30": result["speech_minutes"] >= 30}
    if a2es:
        a = overall["a2e"]
        targets.update(spread_ratio_ge_0_8=a["spread_ratio"] >= 0.8, lmd_audio_le_0_75_no_audio=a["lmd_audio"] <= 0.75 * a["lmd_no_audio"],
                       mouth_r_ge_0_8=a["mouth_r"] >= 0.8, ood_lag_within_1_frame=_all_of(result["a2e_source"]["ood_within_1_frame"]))  # fmt: skip
        if "mouth_r_in_source_timing" in a:
            targets.update(mouth_r_ge_0_8_in_source_timing=a["mouth_r_in_source_timing"] >= 0.8,
                           lmd_audio_le_0_75_no_audio_in_source_timing=a["lmd_audio_in_source_timing"] <= 0.75 * a["lmd_no_audio"])  # fmt: skip
    if e2vs:
        e = overall["e2v"]
        targets.update(prior_1000_ge_scratch_4000=e["psnr_prior"]["1000"] >= e["psnr_scratch"]["4000"],
                       prior_reproj_below_scratch_at_30=e["novel_view_reproj_px_30"]["prior"] < e["novel_view_reproj_px_30"]["scratch"])  # fmt: skip
    result["targets"] = targets
    result["protocol"] = __doc__.split("\n\n")[1].replace("\n", " ")
    result["commands"] = _commands(args.returned, result.get("commands", []))
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("identities", "speech_minutes", "overall", "targets")}, indent=1))


def _behind_the_numbers(line: str) -> bool:
    return line.startswith(("$ python3", "python3")) and ("fit-prior" in line or "prior_vs_scratch" in line)


def _commands(returned: list[Path], earlier: list[str]) -> list[str]:
    """The commands behind the numbers: the fit and the judgements each device call ran (its logs'
    `$ ` lines and the prior's command.txt, paths relative to the checkout) and this report,
    folded with earlier ones."""
    ran = set(earlier) | {"python -m bench.priors_at_scale report " + " ".join(map(str, returned))}
    for folder in returned:
        for log in [*folder.glob("*.log"), *folder.glob("prior/command.txt")]:
            lines = log.read_text().splitlines()
            ran |= {line.removeprefix("$ ").replace(f"{REPO}/", "") for line in lines if _behind_the_numbers(line)}
    return sorted(ran)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    g = sub.add_parser("gpu", help="on the device: fit the E2V prior and/or judge clips")
    g.add_argument("--call", type=Path, default=CALL, help="the carried folder (corpus/, eval/, optionally prior/)")
    g.add_argument("--fit-steps", type=int, default=0)
    g.add_argument("--fit-seconds", type=float, default=0, help="stop the fit cleanly after this long and return its state "
                   "($OUT/fit_state/, carried back as CALL/fit_state/ with the next part of the corpus: `staging shrink --part`)")
    g.add_argument("--holdout", default=None, help="corpus identity held out for validation (default: the first)")
    g.add_argument("--judge", nargs="*", default=[], help="packed eval clip names to run prior vs scratch on")
    g.add_argument("--budgets", default="250,1000,4000")
    g.add_argument("--inits", default="prior,scratch", help="prior_vs_scratch arms (the scratch arm needs no prior: run it in another call)")
    g.add_argument("--live", default="", help="render sizes to time `synth --stream --latency 0.5` at (issue 18)")
    g.add_argument("--live-clip", default="macron_50s_512_30fps", help="packed eval clip the live avatar is adapted on")
    g.add_argument("--live-steps", type=int, default=500)
    g.add_argument("--size", type=int, default=None)
    g.add_argument("--preset", default="balanced", help="the adapt preset both arms use (bench/results/lr_budget.json judged sharp)")
    c = sub.add_parser("compact", help="here: float16 tracking in a packed folder (before carrying it)")
    c.add_argument("packed", type=Path)
    r = sub.add_parser("report", help="here: score the returned views, write bench/results/priors_at_scale.json")
    r.add_argument("returned", type=Path, nargs="*")
    args = parser.parse_args()
    {"gpu": lambda: gpu(args), "compact": lambda: compact(args.packed), "report": lambda: report(args)}[args.verb]()


if __name__ == "__main__":
    main()
