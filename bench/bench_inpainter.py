"""Inpainter speed: ms per frame at 512² in fp16 on CUDA (batch 1 and 8), CPU fps at 128²/512².

    python bench/bench_inpainter.py --out out/bench/inpainter.json            # CUDA
    python bench/bench_inpainter.py --cpu --out out/bench/inpainter_cpu.json  # CPU

Times one synthesis step: blank mask (dilation) + U-Net + blend, random inputs (the cost does
not depend on the content). CUDA timings use events around `iters` calls after a warm-up;
`--compile` adds rows for torch.compile (CUDA graphs at batch 1 remove launch overhead).
Prints a markdown table naming the device and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from ggtalker_cli.models.inpainter import Inpainter, blank_mask


def count_flops(model: Inpainter, size: int) -> float:
    """FLOPs (2 × multiply-adds) of the convolutions for one size² frame."""
    macs = 0

    def hook(mod: nn.Conv2d, inp, out) -> None:
        nonlocal macs
        macs += out[0].numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(*inputs(1, size, torch.float32, torch.device("cpu")))
    for h in handles:
        h.remove()
    return 2.0 * macs


def inputs(batch: int, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(head rgb, alpha, frame, blank, plate) with a head-sized disc, BHWC."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((xx - size / 2) ** 2 + (yy - size * 0.4) ** 2) < (size * 0.2) ** 2).float()[None, ..., None].expand(batch, -1, -1, -1)
    alpha = disc.to(device, dtype)
    head = torch.rand(batch, size, size, 3, device=device, dtype=dtype) * alpha
    frame = torch.rand(batch, size, size, 3, device=device, dtype=dtype)
    plate = torch.rand(1, size, size, 3, device=device, dtype=dtype)
    return head, alpha, frame, blank_mask(alpha, alpha, round(0.03 * size)).to(dtype), plate


def step(model: nn.Module, head, alpha, frame, plate, radius: int) -> torch.Tensor:
    return model(head, alpha, frame, blank_mask(alpha, alpha, radius).to(head.dtype), plate)


def bench_cuda(model: Inpainter, size: int, batches: list[int], iters: int, compile_: bool) -> list[dict]:
    device = torch.device("cuda")
    model = model.to(device).half().to(memory_format=torch.channels_last).eval()
    variants = [("eager", model)]
    if compile_:
        variants.append(("compiled", torch.compile(model, mode="reduce-overhead")))
    rows = []
    for name, net in variants:
        for batch in batches:
            head, alpha, frame, _, plate = inputs(batch, size, torch.float16, device)
            radius = round(0.03 * size)
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                for _ in range(20):
                    step(net, head, alpha, frame, plate, radius)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    step(net, head, alpha, frame, plate, radius)
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / iters
            rows.append({"mode": f"cuda fp16 {name}", "size": size, "batch": batch, "ms_per_batch": round(ms, 4),
                         "ms_per_frame": round(ms / batch, 4), "fps": round(1000 * batch / ms, 1),
                         "peak_vram_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
    return rows


def bench_cpu(model: Inpainter, sizes: list[int], iters: int) -> list[dict]:
    model = model.eval().to(memory_format=torch.channels_last)
    rows = []
    for size in sizes:
        head, alpha, frame, _, plate = inputs(1, size, torch.float32, torch.device("cpu"))
        radius = round(0.03 * size)
        with torch.inference_mode():
            step(model, head, alpha, frame, plate, radius)
            t = time.perf_counter()
            for _ in range(iters):
                step(model, head, alpha, frame, plate, radius)
            ms = 1000 * (time.perf_counter() - t) / iters
        rows.append({"mode": f"cpu fp32 ({torch.get_num_threads()} threads)", "size": size, "batch": 1, "ms_per_batch": round(ms, 2),
                     "ms_per_frame": round(ms, 2), "fps": round(1000 / ms, 2)})
    return rows


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--cpu", action="store_true", help="benchmark on the CPU at 128² and 512²")
    ap.add_argument("--channels", default="16,32,64,128")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(mode='reduce-overhead')")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    channels = tuple(int(c) for c in args.channels.split(","))
    model = Inpainter(channels)
    gflops = count_flops(model, args.size) / 1e9
    if args.cpu:
        device_name = cpu_name()
        rows = bench_cpu(model, [128, 512], max(1, args.iters // 20))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: pass --cpu for the CPU benchmark")
        device_name = torch.cuda.get_device_name()
        rows = bench_cuda(model, args.size, [1, 8], args.iters, args.compile)

    result = {"bench": "inpainter", "date": date.today().isoformat(), "device": device_name, "torch": torch.__version__,
              "channels": list(channels), "params": sum(p.numel() for p in model.parameters()),
              f"gflops_per_frame_{args.size}": round(gflops, 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"Inpainter {'-'.join(map(str, channels))}, {result['params']:,} params, {gflops:.1f} GFLOP/frame at {args.size}², "
          f"on {device_name} (torch {torch.__version__}, {result['date']})\n")
    print("| mode | size | batch | ms/batch | ms/frame | fps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['size']}² | {r['batch']} | {r['ms_per_batch']} | {r['ms_per_frame']} | {r['fps']} |")


if __name__ == "__main__":
    main()
