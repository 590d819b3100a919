"""The generative (flow-matching) A2E against the deterministic one, on people neither prior heard
(issue 19, part 4's A2E numbers, CPU).

    python bench/a2e_generative.py --train out/clips .devdata/corpus/clips --judge out/clips/cnn_anchor_71s_512_25fps \\
        out/clips/tedlieu_60s_256_25fps out/clips/macron_50s_512_30fps out/clips/obama_20s_450_25fps \\
        --baseline e6ec715 --work out/a2e_generative -o bench/results/a2e_generative.json

`--train` takes clip folders or folders of clip folders; every judged identity is removed from it,
so each judged clip is scored by a prior that never heard that person. For each code tree (this
checkout, and `--baseline`, a commit of the deterministic A2E unpacked with `git archive`) the
same steps run in a fresh process with that tree on PYTHONPATH: `fit-prior --parts a2e` on the
training clips (default settings, default validation hold-out), then `adapt_a2e` (balanced
preset) on each judged clip, then predictions of the prior and of the adapted model on each
judged clip's own audio, and their mouth on the OOD speech files (streamed, as synth drives it).
Scores are computed here, with this checkout's data loader, on each judged clip's test frames
(its last 10%, never used by training, validation or early stopping):

- spread_ratio: std of the driven inner-lip gap / std of the tracked one (valid test frames);
- mouth_r: Pearson r of the two;
- adapted_in_source_timing: the adapted model's scores with its mouth moved by the clip's
  measured lag (`realigned_frames`, which adaptation removed) onto the test frames' own timing;
  the plain adapted scores count a source's audio-video offset as the model's error;
- lip_mm: mean Euclidean error (mm) of the 40 lip landmarks in face space, offsets from the
  identity's mean training shape; lip_mm_no_audio: the same for that mean shape itself;
- ood: metrics.av_sync (lag in frames at 25 fps, + = mouth after sound, and r) of the predicted
  mouth opening against the speech envelope of each ≥ 8-s non-English file.

A generative model's numbers are averaged over `--seeds` sampling seeds (the deterministic one
has none). Work is kept in `--work` and reused on a re-run. `--ship PRIOR_DIR` then puts the
generative prior's a2e part into an existing prior folder (priors/default): weights, its
`parts.a2e` and `config.a2e` in meta.yaml, its curve plot as a2e_val_loss.png.

`--prior FILE` judges an existing prior's A2E instead (no fit-prior, no baseline), once per
`--variant NAME:key=value,...` of A2EConfig settings: the sampling ones (sample_steps,
sample_temperature, guidance) are written into a copy of its state, the others go to the
adaptation; work in `--work`/variant_NAME. With `--ship` (the prior's own folder) and
`--ship-variant NAME` the prior keeps that variant's sampling settings (bench/results/a2e_sampling.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ggtalker_cli import a2e, audio, metrics
from ggtalker_cli.config import A2EConfig
from ggtalker_cli.models.a2e import to_state

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO.parent / "shared" / "data" / "real" / "audio"
OOD = ("de_german_9s.wav", "ja_japanese_9s.wav", "it_italian1_9s.wav", "zh_chinese_news_8s.wav")
FPS = 25.0
SAMPLING = ("sample_steps", "sample_temperature", "guidance")  # A2E settings a state carries; a variant's others are adaptation's

# Runs inside one code tree (argv: work folder, seeds, judged clips, speech files, comma-separated):
# only the API both A2E versions share, so the deterministic one can be measured by its own code.
PREDICT = r"""
import inspect, json, sys
from pathlib import Path
import numpy as np, torch
from safetensors.torch import load_file
torch.set_num_threads(1)
try:
    from ggtalker_cli import a2e as lib
except ImportError:
    from ggtalker_cli.models import a2e as lib
from ggtalker_cli import audio
from ggtalker_cli.a2e_train import adapt_a2e
from ggtalker_cli.config import load_config
from ggtalker_cli.models.a2e import from_state
from ggtalker_cli.stream import Expressions

work, seeds = Path(sys.argv[1]), int(sys.argv[2])
judge, speech = sys.argv[3].split(","), sys.argv[4].split(",")
adapt_cfg = load_config("balanced", {"a2e": json.loads(sys.argv[5])} if len(sys.argv) > 5 else None).a2e
seeded = "seed" in inspect.signature(lib.run).parameters
seeds = range(seeds if seeded else 1)
prior = load_file(str(work / "prior" / "a2e.safetensors"))
samples = {Path(f).name: audio.load_audio(f) for f in speech}
out, logs = {}, {}

def mouth_track(state, x):
    e = Expressions(state, 25.0, device="cpu")
    return np.concatenate([g.mouth_open for g in (e.push(x), e.finish()) if len(g)])

for f, x in samples.items():
    out[f"ood/prior/{f}"] = mouth_track(prior, x)
for clip in judge:
    name = Path(clip).name
    d = lib.load_clip(clip, 25.0)
    state, logs[name] = adapt_a2e(prior, clip, adapt_cfg, device="cpu")
    for kind, s in (("prior", prior), ("adapted", state)):
        for seed in seeds:
            model = from_state(s)
            out[f"{name}/{kind}/{seed}"] = (lib.run(model, d.features, seed=seed) if seeded else lib.run(model, d.features))[1]
    for f, x in samples.items():
        out[f"ood/{name}/{f}"] = mouth_track(state, x)
    print(name, json.dumps({k: v for k, v in logs[name].items() if k != "curve"}), flush=True)
np.savez(work / "predictions.partial.npz", **out)
(work / "predictions.npz").unlink(missing_ok=True)
(work / "predictions.partial.npz").rename(work / "predictions.npz")
(work / "adapt_logs.json").write_text(json.dumps(logs, indent=1, default=str))
"""


def clip_dirs(paths: list[Path]) -> list[Path]:
    """Clip folders, expanding folders of clip folders (a corpus), sorted by name."""
    out = []
    for p in paths:
        out += [p] if (p / "meta.yaml").is_file() else sorted(c for c in p.iterdir() if (c / "meta.yaml").is_file())
    return out


def tree(commit: str | None, work: Path) -> Path:
    """This checkout, or `commit` unpacked into work/src_<commit>."""
    if commit is None:
        return REPO
    src = work / f"src_{commit}"
    if not (src / "ggtalker_cli").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def produce(src: Path, work: Path, train: list[Path], judge: list[Path], speech: list[Path], seeds: int, steps: int | None, adapt: dict | None = None,
            fit: tuple[str, ...] = ()) -> float:  # fmt: skip
    """fit-prior (with the extra arguments `fit`) and the predictions in the tree `src` (skipped
    where `work` has them; `adapt`: A2EConfig overrides of the adaptation); seconds."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}  # run in `src`: `-m`/`-c` put the working folder first on sys.path
    start = time.time()
    if not (work / "prior" / "a2e.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "ggtalker_cli.cli", "-q", "fit-prior", *map(str, train), "-o", str(work / "prior"),
                        "--parts", "a2e", "--device", "cpu", "--force", *(["--steps", str(steps)] if steps else []), *fit], env=env, cwd=src, check=True)  # fmt: skip
    if not (work / "predictions.npz").is_file():
        extra = [json.dumps(adapt)] if adapt else []
        subprocess.run([sys.executable, "-c", PREDICT, str(work), str(seeds), ",".join(map(str, judge)), ",".join(map(str, speech)), *extra],
                       env=env, cwd=src, check=True)  # fmt: skip
    return time.time() - start


def scores(mouth: np.ndarray, d: a2e.ClipData) -> dict[str, float]:
    """The test-frame scores of one prediction (offsets from the clip's mean shape)."""
    test = slice(d.n_train, None)
    ok = d.valid[test]
    driven, tracked = a2e.mouth_gap(mouth[test] + d.neutral)[ok], a2e.mouth_gap(d.mouth[test] + d.neutral)[ok]
    lips = slice(0, a2e.N_LIPS)
    error = 10 * np.linalg.norm(mouth[test][ok][:, lips] - d.mouth[test][ok][:, lips], axis=-1).mean()
    return {"spread_ratio": float(driven.std() / tracked.std()), "mouth_r": float(metrics.pearson(driven, tracked)), "lip_mm": float(error)}


def in_sync(mouth: np.ndarray, d: a2e.ClipData, shift: int) -> tuple[np.ndarray, a2e.ClipData]:
    """An adapted model's mouth moved onto the source's own timing: adaptation trained it on
    features shifted by the clip's measured audio-mouth lag (`a2e.realign`), so it speaks in sync
    with the sound, while the clip's test frames keep the source's offset (frame t shows the sound
    of t - shift). Frames whose shifted partner falls outside the clip are not scored; shift 0
    leaves both as they are."""
    n = len(mouth)
    src = np.arange(n) - shift
    inside = (src >= 0) & (src < n)
    return mouth[np.clip(src, 0, n - 1)], dataclasses.replace(d, valid=d.valid & inside)


def judge_model(work: Path, judge: list[Path], speech: list[Path]) -> dict:
    """Per judged clip and overall: scores of the prior and the adapted model, OOD lags."""
    pred = np.load(work / "predictions.npz")
    logs = json.loads((work / "adapt_logs.json").read_text())
    waves = {p.name: audio.load_audio(p) for p in speech}

    def ood(name: str) -> dict:
        rows = {}
        for f, x in waves.items():
            lag, r = metrics.av_sync(x, audio.SAMPLE_RATE, FPS, pred[f"ood/{name}/{f}"])
            rows[f] = {"lag": metrics.jsonable(round(float(lag), 2)), "r": metrics.jsonable(round(float(r), 3))}
        return rows

    clips, out = {}, {"prior_ood": ood("prior")}
    for clip in judge:
        d = a2e.load_clip(clip, FPS)
        no_audio = scores(np.zeros_like(d.mouth), d)["lip_mm"]
        row = {"test_frames": int(d.valid[d.n_train :].sum()), "lip_mm_no_audio": round(no_audio, 4)}
        shift = int(logs[clip.name].get("realigned_frames") or 0)
        for kind, model, lag in (("prior", "prior", 0), ("adapted", "adapted", 0), ("adapted_in_source_timing", "adapted", shift)):
            runs = [scores(*in_sync(pred[k], d, lag)) for k in pred.files if k.startswith(f"{clip.name}/{model}/")]
            row[kind] = {m: round(float(np.mean([r[m] for r in runs])), 4) for m in runs[0]}
            row[kind]["lip_vs_no_audio"] = round(row[kind]["lip_mm"] / no_audio, 4)
            row[kind]["seeds"] = len(runs)
        row["adapted_in_source_timing"]["shift"] = shift
        row["adapted"]["ood"] = ood(clip.name)
        row["adapt_log"] = {k: v for k, v in logs[clip.name].items() if k != "curve"}
        clips[clip.name] = row
    out["clips"] = clips
    out["mean"] = {kind: {m: round(float(np.mean([c[kind][m] for c in clips.values()])), 4) for m in ("spread_ratio", "mouth_r", "lip_mm", "lip_vs_no_audio")}
                   for kind in ("prior", "adapted", "adapted_in_source_timing")}  # fmt: skip
    out["mean"]["lip_mm_no_audio"] = round(float(np.mean([c["lip_mm_no_audio"] for c in clips.values()])), 4)
    lags = [v["lag"] for v in out["prior_ood"].values()] + [v["lag"] for c in clips.values() for v in c["adapted"]["ood"].values()]
    out["ood_within_1_frame"] = f"{sum(lag is not None and abs(lag) <= 1 for lag in lags)}/{len(lags)}"
    return out


def ship(prior: Path, into: Path) -> None:
    """Replace the a2e part of the prior folder `into` by the one fit-prior wrote at `prior`."""
    new, meta = yaml.safe_load((prior / "meta.yaml").read_text()), yaml.safe_load((into / "meta.yaml").read_text())
    meta["parts"]["a2e"] = {**new["parts"]["a2e"], "clips": [c["name"] for c in new["clips"]]}
    meta["config"]["a2e"] = new["config"]["a2e"]
    shutil.copy(prior / "a2e.safetensors", into / "a2e.safetensors")
    shutil.copy(prior / "val_loss.png", into / "a2e_val_loss.png")
    (into / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))


def variant(text: str) -> tuple[str, dict]:
    """`NAME:key=value,...` → (NAME, A2EConfig overrides, values read as YAML)."""
    name, _, pairs = text.partition(":")
    overrides = {k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in pairs.split(",") if pair)}
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(A2EConfig)})
    if not name or unknown:
        raise argparse.ArgumentTypeError(f"{text}: want NAME:key=value,... with A2EConfig keys (unknown: {unknown})")
    return name, overrides


def place_prior(prior: Path, work: Path, sampling: dict, judged: set[str]) -> list[str]:
    """The prior's A2E into work/prior/ with `sampling` written into its state (weights as they
    are); its training identities, which must not include a judged one."""
    model = a2e.from_state(load_file(str(prior)), str(prior))
    heard = sorted(judged & set(model.meta["identities"]))
    if heard:
        raise SystemExit(f"{prior}: trained on the judged {heard}; judge identities it never heard")
    model.meta.update(sampling)
    (work / "prior").mkdir(parents=True, exist_ok=True)
    save_file(to_state(model), str(work / "prior" / "a2e.safetensors"))
    return model.meta["identities"]


def judge_variants(args: argparse.Namespace, doc: dict, speech: list[Path]) -> None:
    """`--prior` mode: the given prior, adapted and sampled under each `--variant`'s settings."""
    judged = {p.name for p in args.judge}
    doc["variants"] = {}
    for name, overrides in args.variant or [("as_shipped", {})]:
        work = args.work / f"variant_{name}"
        sampling = {k: v for k, v in overrides.items() if k in SAMPLING}
        doc["train_clips"] = place_prior(args.prior, work, sampling, judged)
        doc["identities"] = len(doc["train_clips"])
        seconds = produce(REPO, work, [], args.judge, speech, args.seeds, None, {k: v for k, v in overrides.items() if k not in SAMPLING})
        doc["variants"][name] = {"a2e": overrides, "seconds": round(seconds), **judge_model(work, args.judge, speech)}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v["mean"] for k, v in doc["variants"].items()}, indent=1))
    if args.ship:
        into = args.ship.resolve()
        meta = yaml.safe_load((into / "meta.yaml").read_text())
        if into / "a2e.safetensors" != args.prior.resolve() or args.ship_variant not in doc["variants"]:
            raise SystemExit("--ship with --prior: the prior's own folder and --ship-variant NAME, one of the variants")
        meta["config"]["a2e"].update(doc["variants"][args.ship_variant]["a2e"])
        shutil.copy(args.work / f"variant_{args.ship_variant}" / "prior" / "a2e.safetensors", into / "a2e.safetensors")
        (into / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", nargs="+", type=Path, default=[], help="clip folders or folders of clip folders")
    ap.add_argument("--judge", nargs="+", type=Path, required=True, help="judged clip folders (removed from --train)")
    ap.add_argument("--baseline", default=None, help="commit of the deterministic A2E to compare with")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="generative prior steps (default: a2e.steps); the baseline keeps its own")
    ap.add_argument("--speech", type=Path, default=SPEECH)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--preset", type=Path, default=None, help="preset YAML for the generative fit-prior (e.g. a larger a2e)")
    ap.add_argument("--holdout", default=None, help="people (or clips) the generative fit-prior validates on (default: its own choice)")
    ap.add_argument("--only", choices=("generative", "deterministic"), default=None, help="run one model's steps (to run both in parallel)")
    ap.add_argument("--ship", type=Path, default=None, help="prior folder whose a2e part becomes the generative prior")
    ap.add_argument("--prior", type=Path, default=None, help="judge this a2e.safetensors (no fit-prior, no baseline) under each --variant")
    ap.add_argument("--variant", type=variant, action="append", help="NAME:key=value,... A2EConfig settings (sampling ones into the state) [--prior]")
    ap.add_argument("--ship-variant", default=None, help="with --prior and --ship: the variant whose sampling settings the prior keeps")
    args = ap.parse_args()
    args.judge, args.work = [p.resolve() for p in args.judge], args.work.resolve()  # the steps run in another folder
    judged = {p.name for p in args.judge}
    speech = [args.speech / f for f in OOD]
    doc = {
        "command": "python bench/a2e_generative.py " + " ".join(sys.argv[1:]),
        "device": f"cpu ({platform.machine()}, 1 torch thread per process, torch {torch.__version__})",
        "judged": sorted(judged),
        "protocol": __doc__.split("\n\n", 2)[2].strip(),
    }
    if args.prior:
        return judge_variants(args, doc, speech)
    if not args.train:
        ap.error("--train is needed unless --prior is given")
    train = [p.resolve() for p in clip_dirs(args.train) if p.resolve().name not in judged]
    data = [a2e.load_clip(p, FPS) for p in train]
    minutes = sum(d.n_train for d in data) / FPS / 60
    doc.update(identities=len({d.person for d in data}), speech_minutes=round(minutes, 1), train_clips=[p.resolve().name for p in train])
    fit = (*(["--preset", str(args.preset.resolve())] if args.preset else []), *(["--holdout", args.holdout] if args.holdout else []))
    for tag, commit in (("generative", None), ("deterministic", args.baseline)):
        if (tag == "deterministic" and commit is None) or args.only not in (None, tag):
            continue
        work = args.work / tag
        work.mkdir(parents=True, exist_ok=True)
        seconds = produce(tree(commit, args.work), work, train, args.judge, speech, args.seeds, args.steps if commit is None else None,
                          fit=fit if commit is None else ())  # fmt: skip
        doc[tag] = {"code": commit or "this checkout", "seconds": round(seconds), **judge_model(work, args.judge, speech)}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k]["mean"] for k in ("generative", "deterministic") if k in doc}, indent=1))
    if args.ship:
        ship(args.work / "generative" / "prior", args.ship)


if __name__ == "__main__":
    main()
