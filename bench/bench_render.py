"""Render speed of `kernels.render` on synthetic head-like scenes, and of the avatar path synth runs.

CUDA (gsplat):  python bench/bench_render.py --out out/bench_render_cuda.json
CPU reference:  python bench/bench_render.py --cpu --out out/bench_render_cpu.json

Scenes: N Gaussians in a 10 cm ball 50 cm in front of the camera, scales 0.05-0.5 cm, focal
1.2 · size (kernels/synthetic.py); B cameras spread over ±20° of yaw. Times are medians over
repeats after warm-up (CUDA events on GPU); "fwd+bwd" includes the backward of a loss over
rgb, alpha and depth into every Gaussian parameter. FPS counts images (B per call).

Avatar path (`--avatar`): the head of a fresh avatar at the balanced preset's size (UV 256, ~52k
Gaussians, colour MLP 16→64) rendered as `Synthesizer.frames` does it, landmarks driven from
blendshapes (`head.drive`) then `Avatar.render`, over `--frames` frames (yaws over ±20°) in
batches of B = synth.batch (`--batches` to vary it): one call per frame ("per-frame", synth
before batching) against one call per batch ("batched", synth now). Reports ms per frame of each.
The template head's expression basis is zero, so driven landmarks are the neutral face: the
timing does not depend on the expression, and the frames differ by pose and colour condition.

CUDA:           python bench/bench_render.py --avatar --out bench/results/bench_avatar_cuda.json
CPU (quick):    python bench/bench_render.py --avatar --cpu --sizes 128 --frames 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ggtalker_cli.avatar import Avatar
from ggtalker_cli.config import AdaptConfig, SynthConfig
from ggtalker_cli.face_model import N_BLENDSHAPES, HeadModel
from kernels import render
from kernels.synthetic import front_cameras, head_scene


def time_call(fn, device: str, warmup: int, repeats: int) -> dict:
    """Wall time of fn() in ms: median and min; on CPU also the median process CPU time.

    CPU time (all threads) is the number to trust on a shared machine, where wall time also
    counts other people's work.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            wall.append(start.elapsed_time(end))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    out = {"ms": statistics.median(wall), "ms_min": min(wall)}
    return out | ({"cpu_ms": statistics.median(cpu)} if cpu else {})


def bench_case(n: int, size: int, batch: int, device: str, backend: str, warmup: int, repeats: int) -> dict:
    g = head_scene(n, seed=0, device=device)
    params = [g.means, g.quats, g.scales, g.opacities, g.colors]
    for p in params:
        p.requires_grad_()
    yaws = torch.linspace(-20, 20, batch).tolist() if batch > 1 else [0.0]
    cam = front_cameras(size, yaws_deg=yaws, device=device)

    def forward():
        with torch.no_grad():
            return render(g, cam, backend=backend)

    def forward_backward():
        out = render(g, cam, backend=backend)
        loss = out.rgb.sum() + out.alpha.sum() + 0.01 * out.depth.sum()
        torch.autograd.grad(loss, params)

    out = forward()
    row = {"gaussians": n, "size": size, "batch": batch, "backend": backend}
    for name, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        timing = time_call(fn, device, warmup, repeats)
        row |= {f"{name}_{k}": v for k, v in timing.items()}
        row[f"{name}_fps"] = 1e3 * batch / timing["ms"]
    row["coverage"] = out.alpha.mean().item()  # sanity: the head fills part of the frame
    row["visible"] = (out.aux["radii"][..., 0] > 0).float().mean().item()
    return row


@torch.no_grad()
def bench_avatar(size: int, frames: int, batch: int, uv_res: int, device: str, backend: str, warmup: int, repeats: int) -> dict:
    """ms per frame of drive + Avatar.render over `frames` frames: one call per frame vs per batch."""
    cfg = AdaptConfig()
    head = HeadModel.template().to(device)
    avatar = Avatar.create(head, uv_res, cfg.feature_dim, cfg.hidden, seed=0).to(device)
    cam = front_cameras(size, yaws_deg=torch.linspace(-20, 20, frames).tolist(), device=device)
    poses, K = cam.viewmat, cam.K
    exprs = torch.rand(frames, N_BLENDSHAPES, generator=torch.Generator().manual_seed(0)).to(device) * 0.5
    chunks = [(a, min(a + batch, frames)) for a in range(0, frames, batch)]

    def per_frame() -> list[torch.Tensor]:
        return [
            torch.cat([avatar.render(head.drive(exprs[k]), poses[k], exprs[k], K, size, backend=backend)[0].rgb for k in range(a, b)])
            for a, b in chunks
        ]

    def batched() -> list[torch.Tensor]:
        return [avatar.render(head.drive(exprs[a:b]), poses[a:b], exprs[a:b], K, size, backend=backend)[0].rgb for a, b in chunks]

    row = {"gaussians": len(avatar.gmap), "uv_res": uv_res, "size": size, "frames": frames, "batch": batch, "backend": backend}
    row["max_abs_diff"] = (torch.cat(per_frame()) - torch.cat(batched())).abs().max().item()  # same images either way
    for name, fn in (("per_frame", per_frame), ("batched", batched)):
        timing = time_call(fn, device, warmup, repeats)
        row |= {f"{name}_{k}_per_frame": v / frames for k, v in timing.items()}
        row[f"{name}_fps"] = 1e3 * frames / timing["ms"]
    row["speedup"] = row["per_frame_ms_per_frame"] / row["batched_ms_per_frame"]
    return row


def scene_rows(args: argparse.Namespace, device: str, backend: str, warmup: int, repeats: int) -> list[dict]:
    cpu = device == "cpu"
    counts = args.counts or ([10_000, 30_000] if cpu else [10_000, 50_000, 100_000])
    sizes = args.sizes or ([128, 256] if cpu else [512])
    batches = args.batches or ([1] if cpu else [1, 8])
    rows = []
    for size in sizes:
        for n in counts:
            for batch in batches:
                rows.append(bench_case(n, size, batch, device, backend, warmup, repeats))
                r = rows[-1]
                print(f"  {n} Gaussians {size}² x{batch}: fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fwd_bwd_ms']:.2f} ms", flush=True)
    return rows


Column = tuple[str, Callable[[dict], str]]
SCENE_COLUMNS: list[Column] = [
    ("Gaussians", lambda r: f"{r['gaussians']:,}"), ("size", lambda r: f"{r['size']}²"), ("batch", lambda r: str(r["batch"])),
    ("fwd ms", lambda r: f"{r['fwd_ms']:.2f}"), ("fwd FPS", lambda r: f"{r['fwd_fps']:.1f}"),
    ("fwd+bwd ms", lambda r: f"{r['fwd_bwd_ms']:.2f}"), ("fwd+bwd FPS", lambda r: f"{r['fwd_bwd_fps']:.1f}"),
]
SCENE_CPU_COLUMNS: list[Column] = [("CPU ms fwd", lambda r: f"{r['fwd_cpu_ms']:.1f}"), ("CPU ms fwd+bwd", lambda r: f"{r['fwd_bwd_cpu_ms']:.1f}")]
AVATAR_COLUMNS: list[Column] = [
    ("Gaussians", lambda r: f"{r['gaussians']:,}"), ("size", lambda r: f"{r['size']}²"), ("B", lambda r: str(r["batch"])),
    ("ms/frame per-frame", lambda r: f"{r['per_frame_ms_per_frame']:.3f}"), ("ms/frame batched", lambda r: f"{r['batched_ms_per_frame']:.3f}"),
    ("speedup", lambda r: f"{r['speedup']:.2f}×"), ("batched FPS", lambda r: f"{r['batched_fps']:.1f}"),
]
AVATAR_CPU_COLUMNS: list[Column] = [
    ("CPU ms/frame per-frame", lambda r: f"{r['per_frame_cpu_ms_per_frame']:.1f}"),
    ("CPU ms/frame batched", lambda r: f"{r['batched_cpu_ms_per_frame']:.1f}"),
]


def print_table(rows: list[dict], columns: list[Column]) -> None:
    """A right-aligned markdown table, one row per result."""
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---:|" * len(columns))
    for r in rows:
        print("| " + " | ".join(cell(r) for _, cell in columns) + " |")


def avatar_rows(args: argparse.Namespace, device: str, backend: str, warmup: int, repeats: int) -> list[dict]:
    cpu = device == "cpu"
    frames = args.frames or (8 if cpu else 64)
    rows = []
    for size in args.sizes or ([128] if cpu else [512]):
        for batch in args.batches or [SynthConfig.batch]:
            rows.append(bench_avatar(size, frames, batch, args.uv_res, device, backend, warmup, repeats))
            r = rows[-1]
            print(f"  avatar {r['gaussians']} Gaussians {size}² B={batch}: per-frame {r['per_frame_ms_per_frame']:.2f} ms/frame, "
                  f"batched {r['batched_ms_per_frame']:.2f} ms/frame", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="time the pure-PyTorch reference on CPU")
    ap.add_argument("--avatar", action="store_true", help="time the avatar path synth runs, per frame vs batched")
    ap.add_argument("--counts", type=int, nargs="+", help="Gaussian counts (default 10k 50k 100k; CPU 10k 30k)")
    ap.add_argument("--sizes", type=int, nargs="+", help="image sizes (default 512; CPU 128 256, --avatar 128)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help=f"cameras per call (default 1 8; CPU 1; --avatar {SynthConfig.batch})")
    ap.add_argument("--frames", type=int, default=None, help="--avatar: frames per timed run (default 64; CPU 8)")
    ap.add_argument("--uv-res", type=int, default=AdaptConfig.uv_res, help="--avatar: UV map resolution (default %(default)s)")
    ap.add_argument("--backend", default=None, help="kernels backend (default gsplat on CUDA, torch on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20 CUDA, 5 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the reference backend")
    cpu = device == "cpu"
    backend = args.backend or ("torch" if cpu else "gsplat")
    repeats = args.repeats or (5 if cpu else 20)
    warmup = 1 if cpu else 5

    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    else:
        device_name = torch.cuda.get_device_name()
    try:
        import gsplat

        gsplat_version = gsplat.__version__
    except ImportError:
        gsplat_version = None
    env = {"device": device_name, "torch": torch.__version__, "gsplat": gsplat_version, "backend": backend}

    rows = (avatar_rows if args.avatar else scene_rows)(args, device, backend, warmup, repeats)
    print(f"\n{env['device']} · torch {env['torch']} · gsplat {env['gsplat']} · backend {backend} · median of {repeats}\n")
    columns = (AVATAR_COLUMNS + AVATAR_CPU_COLUMNS * cpu) if args.avatar else (SCENE_COLUMNS + SCENE_CPU_COLUMNS * cpu)
    print_table(rows, columns)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        mode = "avatar" if args.avatar else "scenes"
        args.out.write_text(json.dumps({"env": env, "mode": mode, "repeats": repeats, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
