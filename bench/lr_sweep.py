"""Head learning rates against the step budget: `adapt --steps N` from the prior and from scratch
with the balanced preset's learning rates scaled (bench/presets/lr_x*.yaml), on a clip no prior saw.

Adam moves each parameter by about its learning rate per step, whatever the gradient's size, so
a run of N steps can only travel ~N·lr from where it starts; a short budget with the learning
rates tuned for 4000 steps ends before the per-Gaussian geometry and colour have got there
(docs/e2v.md). This measures what scaling them buys at each budget.

Staged as bench/priors_at_scale.py stages its judge clips (.devdata/gpu/eval), then there
(device tool, nvidia-h200; carry [".whl", ".devdata/gpu"]):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
    python3 -m bench.lr_sweep gpu macron_50s_512_30fps --arms prior:1000:x2,prior:1000:x3,scratch:4000:x1

each arm INIT:STEPS:PRESET (bench/presets/lr_PRESET.yaml) → $OUT/lr_CLIP_INIT_STEPS_PRESET.json
(bench.prior_vs_scratch's results.json). Back here:

    python -m bench.lr_sweep table FILES_AT... -o bench/results/lr_budget.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "bench" / "presets"


def gpu(args: argparse.Namespace) -> None:
    from bench.priors_at_scale import _python, _return_gsplat_build, _unpack, device_setup

    out, prebuilt = device_setup(args.call)
    (clip,) = [c for c in _unpack(args.call / "eval") if c.name == args.clip]
    for arm in args.arms.split(","):
        init, steps, preset = arm.split(":")
        folder = REPO / "out" / "lr_sweep" / f"{args.clip}_{preset}"
        command = ["-m", "bench.prior_vs_scratch", str(clip), "-o", str(folder), "--budgets", steps, "--inits", init,
                   "--preset", str(PRESETS / f"lr_{preset}.yaml"), "--no-consistency",
                   *(["--prior", str(REPO / "priors" / "default")] if init == "prior" else [])]  # fmt: skip
        _python(*command)
        result = json.loads((folder / "results.json").read_text())
        result["command"] = "python3 " + " ".join(command).replace(str(REPO) + "/", "")
        (out / f"lr_{args.clip}_{init}_{steps}_{preset}.json").write_text(json.dumps(result, indent=1))
    if prebuilt is None:
        _return_gsplat_build(out)


def table(args: argparse.Namespace) -> None:
    """Merge returned arms: per clip, init, budget and preset the held-out metrics and seconds;
    judge calls of bench.priors_at_scale (pvs_*.json + views_*.npz, `gpu --judge ... --preset
    sharp`) fold in as preset "sharp" with their novel-view scores, and the
    balanced preset's judged numbers come from bench/results/priors_at_scale.json."""
    from bench.prior_vs_scratch import consistency, load_views

    rows: dict = {}

    def put(clip: str, init: str, steps: str, preset: str, entry: dict) -> None:
        rows.setdefault(clip, {}).setdefault(init, {}).setdefault(steps, {})[preset] = entry

    def measured(run: dict, doc: dict) -> dict:  # one returned adapt run (prior_vs_scratch's results.json)
        return {**{k: run[k] for k in ("psnr_head", "ssim_head", "psnr_full", "seconds")}, "device": doc["device"], "size": doc["size"] or 512}

    judged = json.loads((REPO / "bench" / "results" / "priors_at_scale.json").read_text())
    for clip, row in judged["clips"].items():
        for init in ("prior", "scratch"):
            for steps, psnr in row.get("e2v", {}).get(f"psnr_{init}", {}).items():
                if steps != "0":
                    put(clip, init, steps, "x1", {"psnr_head": psnr, "source": "bench/results/priors_at_scale.json",
                                                  **({"novel_view_reproj_px": row["e2v"]["novel_view_reproj_px"][init]} if steps == "4000" else {})})
    for folder in args.returned:
        for path in sorted(Path(folder).glob("lr_*.json")):
            clip, init, steps, preset = path.stem[3:].rsplit("_", 3)
            doc = json.loads(path.read_text())
            run = doc["results"][init][steps]
            put(clip, init, steps, preset, {**measured(run, doc), "command": doc["command"]})
        for path in sorted(Path(folder).glob("pvs_*.json")):
            doc = json.loads(path.read_text())
            clip = Path(doc["clip"]).name
            views = {init: consistency(v) for init, v in load_views(path.with_name(path.name.replace("pvs_", "views_").replace(".json", ".npz"))).items()}
            for init, budgets in doc["results"].items():
                for steps, run in budgets.items():
                    if steps != "0":
                        put(clip, init, steps, "sharp", {**measured(run, doc),
                                                         **({"novel_view_reproj_px": {y: r["reprojection_px"] for y, r in views[init].items()}}
                                                            if steps == str(max(doc["budgets"])) else {})})
    args.out.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "commands": args.commands, "clips": rows}, indent=1) + "\n")
    for clip, inits in rows.items():
        for init, budgets in inits.items():
            for steps, presets in sorted(budgets.items(), key=lambda kv: int(kv[0])):
                print(clip, init, steps, {p: r["psnr_head"] for p, r in sorted(presets.items())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    g = sub.add_parser("gpu")
    g.add_argument("clip")
    g.add_argument("--arms", required=True, help="INIT:STEPS:PRESET,... (PRESET names bench/presets/lr_PRESET.yaml)")
    g.add_argument("--call", type=Path, default=REPO / ".devdata" / "gpu")
    t = sub.add_parser("table")
    t.add_argument("returned", nargs="+", type=Path)
    t.add_argument("-o", "--out", type=Path, required=True)
    t.add_argument("--commands", nargs="*", default=[], help="the device calls' command lines, recorded in the table")
    args = parser.parse_args()
    {"gpu": gpu, "table": table}[args.verb](args)


if __name__ == "__main__":
    main()
