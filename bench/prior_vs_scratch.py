"""Adaptation from the e2v prior vs from scratch at equal steps, on an identity the prior never saw.

    python bench/prior_vs_scratch.py CLIP --prior PRIOR -o out/prior_vs_scratch \\
        [--budgets 250,500,1000,2000] [--size 512] [--preset balanced] [--device auto]

For every budget N, `adapt --steps N` runs twice with the same preset and seed, once from the
prior and once from scratch; each run gets its own full learning-rate schedule (what a user
gets by asking for N steps). Numbers are adapt's held-out metrics (the clip's last 10% of
frames, tracked landmarks and pose; protocol text in each avatar's meta.yaml), plus step 0 (the
initial map). Finished runs are reused, so an interrupted benchmark continues where it stopped.
The body inpainter that adapt also trains is cut to `--inpainter-steps` (none of these metrics
reads it; adapt's `train_seconds` never counted it).

Writes `results.json`, `table.md`, `curve.png` (held-out PSNR/SSIM vs steps) and, for the
largest budget, `novel_views.png` (prior row over scratch row, yaw −30°…+30°) and the 3D
consistency numbers: on those novel views of the test frames, mediapipe's face detection rate
and the mean distance between its landmarks and the avatar's own landmarks projected at that
view (px at the render size). The pictures show a real person: they stay under out/.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from ggtalker_cli.avatar import Avatar
from ggtalker_cli.clip import Clip
from ggtalker_cli.clip_view import Data
from ggtalker_cli.config import load_config
from ggtalker_cli.device import device_of
from ggtalker_cli.head_fit import NOVEL_YAWS, _yaw_about
from ggtalker_cli.stages import adapt

KEYS = ("psnr_head", "ssim_head", "psnr_full", "ssim_full", "psnr_face", "ssim_face")
CONSISTENCY_FRAMES = 10


def run_one(clip: Path, folder: Path, steps: int, prior: Path | None, args) -> dict:
    if not (folder / "meta.yaml").is_file():
        overrides = {"adapt": {"steps": steps, **({"size": args.size} if args.size else {})}, "inpainter": {"steps": args.inpainter_steps}}
        adapt.run(clip, folder, load_config(args.preset, overrides), prior=prior, device=args.device, force=True)
    meta = yaml.safe_load((folder / "meta.yaml").read_text())
    return {"metrics": meta["metrics"], "initial": meta["initial_metrics"], "seconds": meta["train_seconds"], "device": meta["device"]}


@torch.no_grad()
def novel_views(avatar_dir: Path, clip: Path, device: str) -> tuple[dict[int, tuple[list[np.ndarray], np.ndarray]], np.ndarray]:
    """Test frames turned by NOVEL_YAWS: per yaw the renders and the avatar's own landmarks
    projected at that view; plus the middle test frame's views side by side."""
    dev = device_of(device)
    avatar = Avatar.load(avatar_dir, dev)
    meta = yaml.safe_load((avatar_dir / "meta.yaml").read_text())
    data = Data(Clip(clip), int(meta["size"]), dev)
    frames = data.test[np.linspace(0, len(data.test) - 1, min(CONSISTENCY_FRAMES, len(data.test))).astype(int)]
    centre = avatar.head.vertices(avatar.head.neutral).mean(0)
    views = {}
    for yaw in NOVEL_YAWS:
        images, projected = [], []
        for i in frames:
            pose = data.pose[i] @ _yaw_about(centre, yaw)
            out, _ = avatar.render(data.verts[i], pose, data.blendshapes[i], data.K, data.size, data.plate)
            images.append((out.rgb[0].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
            q = (data.verts[i] @ pose[:3, :3].T + pose[:3, 3]) @ data.K.T
            projected.append((q[:, :2] / q[:, 2:]).cpu().numpy())
        views[yaw] = (images, np.asarray(projected))
    return views, np.concatenate([views[yaw][0][len(frames) // 2] for yaw in NOVEL_YAWS], 1)


def consistency(views: dict[int, tuple[list[np.ndarray], np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per yaw: share of renders where mediapipe finds a face, and the mean distance (px) of its
    landmarks to the avatar's own projected landmarks."""
    from ggtalker_cli.metrics import detect_landmarks

    rows = {}
    for yaw, (images, projected) in views.items():
        found, _ = detect_landmarks(images)
        ok = ~np.isnan(found[:, 0, 0])
        err = np.linalg.norm(found[ok] - projected[ok], axis=-1).mean() if ok.any() else math.nan
        rows[str(yaw)] = {"detected": round(float(ok.mean()), 3), "reprojection_px": round(float(err), 2)}
    return rows


def save_views(path: Path, rendered: dict[str, tuple[dict, np.ndarray]]) -> None:
    """Each init's novel views as JPEG bytes (q95) + projected landmarks: a few MB instead of raw frames."""
    arrays = {}
    for init, (views, _) in rendered.items():
        for yaw, (images, projected) in views.items():
            for j, image in enumerate(images):
                jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
                arrays[f"{init}/{yaw}/{j}"] = np.frombuffer(jpeg, np.uint8)
            arrays[f"{init}/{yaw}/projected"] = projected.astype(np.float32)
    np.savez(path, **arrays)


def load_views(path: Path) -> dict[str, dict[int, tuple[list[np.ndarray], np.ndarray]]]:
    """Inverse of `save_views`: {init: {yaw: (RGB images, projected landmarks)}}, `consistency`'s input."""
    out: dict[str, dict[int, tuple[list[np.ndarray], np.ndarray]]] = {}
    with np.load(path) as z:
        for key in z.files:
            init, yaw, item = key.split("/")
            if item != "projected":
                continue
            n = len(z[key])
            images = [cv2.cvtColor(cv2.imdecode(z[f"{init}/{yaw}/{j}"], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for j in range(n)]
            out.setdefault(init, {})[int(yaw)] = (images, z[key])
    return out


def plot(results: dict, budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("psnr_head", "ssim_head")):
        for init, style in (("prior", "o-"), ("scratch", "s--")):
            if init not in results:
                continue
            steps = [0] + budgets
            values = [results[init]["0"][key]] + [results[init][str(n)][key] for n in budgets]
            ax.plot(steps, values, style, label=init)
        ax.set_xscale("symlog", linthresh=budgets[0])
        ax.set(xlabel="adapt steps", ylabel=f"held-out {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clip", type=Path)
    parser.add_argument("--prior", type=Path, default=None, help="the prior folder (needed for the prior arm)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--budgets", default="250,500,1000,2000")
    parser.add_argument("--inits", default="prior,scratch", help="arms to run: the scratch arm does not depend on the prior, "
                        "so it can run on another machine or call (results_<arm>.json; `merge` folds them into one)")
    parser.add_argument("--size", type=int, default=None, help="adapt render size (preset default otherwise)")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--inpainter-steps", type=int, default=1, help="adapt's body inpainter steps (no metric here uses it)")
    parser.add_argument("--no-consistency", action="store_true", help="skip the mediapipe novel-view check")
    parser.add_argument("--views", type=Path, default=None, help="also save the novel views (JPEG) and projected landmarks here (.npz), "
                        "to score their consistency on another machine (bench/priors_at_scale.py report)")
    args = parser.parse_args()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    inits = [i for i in ("prior", "scratch") if i in args.inits.split(",")]
    if "prior" in inits and args.prior is None:
        parser.error("--prior is needed for the prior arm (or pass --inits scratch)")
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict = {init: {} for init in inits}
    runs = {}
    for n in budgets:
        for init in inits:
            r = run_one(args.clip, args.out / f"{init}_{n}", n, args.prior if init == "prior" else None, args)
            runs[(init, n)] = r
            results[init][str(n)] = {**{k: r["metrics"][k] for k in KEYS}, "seconds": r["seconds"]}
            results[init]["0"] = {k: r["initial"][k] for k in KEYS}
    top = budgets[-1]
    summary = {
        "clip": str(args.clip.resolve()),
        "prior": str(args.prior.resolve()) if args.prior else None,
        "preset": args.preset,
        "size": args.size,
        "budgets": budgets,
        "device": runs[(inits[0], top)]["device"],
        "protocol": "adapt's held-out metrics: the clip's last 10% of frames (never trained on), tracked landmarks and pose; "
        "head = head over the background plate inside the GT head mask; full/face = composite over the frame with the head "
        "region replaced by the plate (no inpainter). Each budget is its own adapt run (--steps N, same preset and seed).",
        "results": results,
    }
    rendered = {init: novel_views(args.out / f"{init}_{top}", args.clip, args.device) for init in inits}
    strips = np.concatenate([rendered[init][1] for init in inits], 0)
    cv2.imwrite(str(args.out / "novel_views.png"), cv2.cvtColor(strips, cv2.COLOR_RGB2BGR))
    if args.views is not None:
        save_views(args.views, rendered)
    if not args.no_consistency:
        try:
            summary["consistency"] = {init: consistency(rendered[init][0]) for init in inits}
        except (ImportError, OSError, RuntimeError) as e:  # mediapipe absent, or without libEGL on a GPU machine
            summary["consistency"] = f"not measured: {e.__class__.__name__}: {str(e)[:200]}"
    write(summary, args.out)


def compare(summary: dict) -> dict:
    """The prior-vs-scratch verdicts, once both arms are in `summary`."""
    results, budgets = summary["results"], summary["budgets"]
    top = budgets[-1]
    target = results["scratch"][str(top)]["psnr_head"]
    reach = next((n for n in budgets if results["prior"][str(n)]["psnr_head"] >= target), None)
    at30 = next((n for n in budgets if results["prior"][str(n)]["psnr_head"] >= 30), None)
    return {
        "prior_wins_up_to_1000": all(results["prior"][str(n)]["psnr_head"] > results["scratch"][str(n)]["psnr_head"] for n in budgets if n <= 1000),
        "prior_steps_to_scratch_best": reach,
        "prior_steps_to_scratch_best_fraction": round(reach / top, 3) if reach else None,
        "prior_first_budget_head_psnr_30": at30,
        "prior_seconds_to_head_psnr_30": results["prior"][str(at30)]["seconds"] if at30 else None,
    }


def write(summary: dict, out: Path) -> None:
    """results.json, curve.png and table.md of whichever arms `summary` holds."""
    results, budgets = summary["results"], summary["budgets"]
    inits = [i for i in ("prior", "scratch") if i in results]
    if len(inits) == 2:
        summary.update(compare(summary))
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(results, budgets, out / "curve.png")
    keys = ("psnr_head", "ssim_head", "psnr_full")
    lines = ["| steps | " + " | ".join(f"{init} {k}" for k in keys for init in inits) + " |"]
    lines.append("|" + "---|" * (1 + len(keys) * len(inits)))
    for n in [0] + budgets:
        cells = [f"{results[init][str(n)][k]:.4g}" for k in keys for init in inits]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Device: {summary['device']}.")
    if len(inits) == 2:
        lines.append(f"Prior reaches scratch's {budgets[-1]}-step head PSNR at: {summary['prior_steps_to_scratch_best'] or 'not within the budgets'} steps.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
