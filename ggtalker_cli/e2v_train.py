"""Training the E2V prior across identities (`fit-prior --parts e2v`).

Source→target self-supervision: the generator sees 1..`max_sources` reference frames of one
identity and predicts its UV Gaussian map; the map is driven by another frame's tracked
landmarks, rendered through that frame's camera over the clip's background plate, and compared
with the frame's head pasted on the plate (as `adapt` does): L1 + SSIM, a silhouette term and
the position/scale regularisers. Nothing of a clip's test frames (its last 10%) is ever used.

Augmentation: every identity also appears mirrored (frames flipped, landmarks mapped to their
mirror partners, the camera reflected, left/right blendshapes swapped), which is a new plausible
face; reference frames are zoomed by a random crop (the camera follows); a random colour
transform is applied to the sample's references, target and plate alike, so colours are
learned as copied from the references, not as remembered per identity.

The sample stream is a pure function of (seed, sample index): rank r of W takes the samples
(step·W + r)·batch + j (a DistributedSampler-style split of one stream), so a resumed run
continues the same stream and 1 or N GPUs train on the same data distribution. Frames are
decoded by DataLoader workers; the geometry lives on the GPU. Rank 0 validates, checkpoints and
writes.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import console, metrics, training
from .artifacts import atomic_write_bytes
from .clip import Clip
from .clip_view import Data
from .config import Config, E2VConfig
from .errors import Exit, GGError
from .face_model import HeadModel, Shell, canonical_mesh
from .head_fit import fit_head
from .losses import hinge_sq, photometric
from .models.e2v import COLOR, E2V, WEIGHTS, unwrap, with_topology

CHECKPOINT = "e2v.ckpt"
GRID = "e2v_grid.png"
GRID_ROWS = 4
# iris points (not in the canonical mesh): centre, medial, top, lateral, bottom of each eye
IRIS_MIRROR = {468: 473, 469: 476, 470: 475, 471: 474, 472: 477}
REFLECT = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # x → −x, in face space and in camera space


@lru_cache(maxsize=1)
def landmark_mirror() -> np.ndarray:
    """(478,) index of each landmark's mirror partner (the canonical mesh is exactly symmetric)."""
    verts = canonical_mesh().verts
    mirrored = verts * np.array([-1.0, 1.0, 1.0], np.float32)
    perm = np.linalg.norm(mirrored[:, None] - verts[None], axis=-1).argmin(1)
    iris = {**IRIS_MIRROR, **{b: a for a, b in IRIS_MIRROR.items()}}
    return np.concatenate([perm, [iris[i] for i in range(468, 478)]])


def blendshape_mirror(names: list[str]) -> np.ndarray:
    """(52,) index of each blendshape's mirror (eyeBlinkLeft ↔ eyeBlinkRight, others themselves)."""
    where = {n: i for i, n in enumerate(names)}

    def swap(name: str) -> str:
        return name.replace("Left", "\0").replace("Right", "Left").replace("\0", "Right")

    return np.array([where.get(swap(n), i) for i, n in enumerate(names)])


def mirror(data: Data) -> None:
    """Turn `data` into its mirror image in place (frames are flipped by the loader).

    Landmark i moves to where its partner was, reflected (x → −x): an anatomically consistent
    face. The pose becomes F·pose·F (F reflects x), which is a rotation again, and the principal
    point moves to S − cx, so every landmark projects to the flipped pixel S − u.
    """
    perm = torch.as_tensor(landmark_mirror(), device=data.device)
    reflect = REFLECT.to(data.device)
    data.verts = data.verts[:, perm] * reflect[:3, :3].diagonal()
    data.pose = reflect @ data.pose @ reflect
    names = [str(n) for n in data.clip.tracking["blendshape_names"]]
    data.blendshapes = data.blendshapes[:, torch.as_tensor(blendshape_mirror(names), device=data.device)]
    data.landmarks = data.landmarks[:, landmark_mirror()] * np.array([-1.0, 1.0]) + np.array([data.size, 0.0])
    data.K = data.K.clone()
    data.K[0, 2] = data.size - data.K[0, 2]
    data.plate = data.plate.flip(2)


@dataclass
class Identity:
    """One identity (one clip, or its mirror) at the training size on the training device."""

    name: str
    path: Path
    flip: bool
    data: Data
    head: HeadModel
    frames: np.ndarray  # the frames this identity contributes (references and targets)


def load_identities(clip_dirs: list[Path], names: list[str], frames: str, cfg: Config, template: HeadModel,
                    device: torch.device, flip: bool) -> list[Identity]:
    """Identities of the named clips. frames: "train" (all valid training frames), "fit" (their
    first 90%) or "late" (their last 10%: validation when no identity is held out).

    Each head is built as `adapt` builds it (expression basis + head shell fitted to the head
    masks), so the maps the prior learns mean the same on the heads it is applied to. A mirrored
    identity refits its basis to the mirrored landmarks and keeps the (symmetric) shell.
    """
    paths = [path for path in clip_dirs if path.resolve().name in names]
    out = []
    for path, (head, shell) in zip(paths, _fit_heads(paths, cfg)):
        clip = Clip(path)
        data = Data(clip, cfg.e2v.size, device)
        train = data.train
        cut = len(train) - max(1, round(0.1 * len(train)))
        chosen = {"train": train, "fit": train[:cut], "late": train[cut:]}[frames]
        if len(chosen) < 1:
            raise GGError(f"{path}: no tracked training frames to learn from; re-create the clip or leave it out", Exit.INPUT_INVALID)
        out.append(Identity(path.resolve().name, path, False, data, with_topology(head.to(device), template), chosen))
        if flip:
            data = Data(clip, cfg.e2v.size, device)
            mirror(data)
            idx = torch.as_tensor(train, device=device)
            fitted = HeadModel.fit(data.verts[idx].cpu().numpy(), data.blendshapes[idx].cpu().numpy(), cfg.adapt.basis_ridge)
            head = HeadModel.from_neutral(fitted.neutral.numpy(), fitted.basis.numpy(), Shell(**{f.name: shell[f.name] for f in dataclasses.fields(Shell)}))
            out.append(Identity(f"{path.resolve().name} (mirrored)", path, True, data, with_topology(head.to(device), template), chosen))
    return out


POOL_MIN = 8  # measured: 2 workers on 2 cores took 18 s for 4 clips that one process fits in 10 s


def _fit_head_of(path: Path, cfg: Config) -> tuple[HeadModel, dict[str, float]]:
    torch.set_num_threads(1)
    clip = Clip(path)
    return fit_head(clip, Data(clip, cfg.e2v.size, torch.device("cpu")), cfg.adapt)


def _fit_heads(paths: list[Path], cfg: Config) -> list[tuple[HeadModel, dict[str, float]]]:
    """Each clip's head and shell (`fit_head`), one CPU process per clip.

    The shell fit rasterises a few thousand silhouettes on the CPU, seconds per clip: done one
    after the other it held a GPU idle for minutes on a corpus of fifty clips. A spawned worker
    first spends seconds importing torch, so below POOL_MIN workers the loop stays in-process.
    """
    workers = min(len(paths), os.cpu_count() or 1)
    if workers < POOL_MIN:
        return [_fit_head_of(path, cfg) for path in paths]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_fit_head_of, paths, [cfg] * len(paths)))


class Samples(Dataset):
    """Sample g: an identity, its reference frames, a target frame and the augmentation, drawn
    from rng(seed, g). Returns CPU arrays; the geometry is looked up by frame index on the GPU."""

    def __init__(self, identities: list[Identity], cfg: E2VConfig, seed: int, augment: bool):
        self.items = [(i.path, i.flip, i.frames) for i in identities]
        self.cfg, self.seed, self.augment = cfg, seed, augment
        self.cache: dict[Path, Data] = {}

    def _load(self, path: Path, flip: bool, i: int) -> tuple[np.ndarray, np.ndarray]:
        if path not in self.cache:  # per worker: frames only, tracking stays on the CPU here
            self.cache[path] = Data(Clip(path), self.cfg.size, torch.device("cpu"))
        frame, mask = self.cache[path].load(i)
        return (np.ascontiguousarray(frame[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])) if flip else (frame, mask)

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        c, S = self.cfg, self.cfg.size
        rng = np.random.default_rng([self.seed, g])
        k = int(rng.integers(len(self.items)))
        path, flip, frames = self.items[k]
        n = int(rng.integers(1, c.max_sources + 1)) if self.augment else c.max_sources
        refs = rng.choice(frames, size=n, replace=n > len(frames))
        target = int(rng.choice(frames))
        images = np.zeros((c.max_sources, S, S, 3), np.float32)
        masks = np.zeros((c.max_sources, S, S, 1), np.float32)
        affine = np.tile(np.eye(3, dtype=np.float32), (c.max_sources, 1, 1))
        for j, i in enumerate(refs):
            image, mask = self._load(path, flip, int(i))
            if self.augment and c.zoom > 0:
                z = 1 + c.zoom * rng.random()
                o = rng.random(2) * S * (1 - 1 / z)
                affine[j, :2] = [[z, 0, -z * o[0]], [0, z, -z * o[1]]]  # pixel u → z·(u − o), centres at +½
                cv_affine = affine[j, :2] + np.array([[0, 0, 0.5 * z - 0.5], [0, 0, 0.5 * z - 0.5]], np.float32)
                image = cv2.warpAffine(image, cv_affine, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                mask = cv2.warpAffine(mask, cv_affine, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[..., None]
            images[j], masks[j] = image, mask
        t_image, t_mask = self._load(path, flip, target)
        a = c.jitter if self.augment else 0.0
        jitter = np.concatenate([1 + a * rng.uniform(-1, 1, 3), 1 + a * rng.uniform(-1, 1, 2)]).astype(np.float32)
        return {
            "identity": k, "refs": np.pad(refs, (0, c.max_sources - n)).astype(np.int64), "valid": np.arange(c.max_sources) < n,
            "ref_images": images, "ref_masks": masks, "affine": affine,
            "target": target, "target_image": t_image, "target_mask": t_mask, "jitter": jitter,
        }


class Stream(Sampler):
    """This rank's sample indices for steps [start, steps): (step·world + rank)·batch + j."""

    def __init__(self, start: int, steps: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __iter__(self):
        for step in range(self.start, self.steps):
            first = (step * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch


def _jitter(x: Tensor, j: Tensor) -> Tensor:
    """Contrast (about mid-grey), saturation, then per-channel gain; j (B, 5) broadcast over x (B, ..., 3)."""
    j = j.view(len(j), *([1] * (x.dim() - 2)), 5)
    x = (x - 0.5) * j[..., 3:4] + 0.5
    grey = x.mean(-1, keepdim=True)
    return ((grey + j[..., 4:5] * (x - grey)) * j[..., :3]).clamp(0, 1)


class Objective(nn.Module):
    """Generator + renderer + losses of one batch: the module DDP wraps, so every parameter
    (U-Net, mean map, colour MLP) is used inside its forward."""

    def __init__(self, model: E2V, cfg: E2VConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, Tensor], identities: list[Identity], keep: bool = False) -> dict[str, Tensor]:
        c, S = self.cfg, self.cfg.size
        j = batch["jitter"]
        ids = [identities[int(k)] for k in batch["identity"]]
        verts, pose, K = [], [], []
        for ident, refs, affine in zip(ids, batch["refs"], batch["affine"]):
            d = ident.data
            verts.append(ident.head.vertices(d.verts[refs]))
            pose.append(d.pose[refs])
            K.append(affine @ d.K)
        refs_rgb = _jitter(batch["ref_images"], j)
        inputs = unwrap(self.model.template, refs_rgb, batch["ref_masks"], torch.stack(verts), torch.stack(pose), torch.stack(K), batch["valid"])
        maps = self.model(inputs)
        terms: dict[str, Tensor] = {}
        renders = []
        for b, (ident, t) in enumerate(zip(ids, batch["target"])):
            d = ident.data
            plate = _jitter(d.plate, j[b : b + 1])
            head = batch["target_mask"][b : b + 1]
            target = _jitter(batch["target_image"][b : b + 1], j[b : b + 1]) * head + plate * (1 - head)
            out, s = self.model.render(maps[b], ident.head.vertices(d.verts[t]), d.pose[t], d.blendshapes[t], d.K, S, plate)
            parts = {
                "photo": photometric(out.rgb, target, c.ssim_weight),
                "alpha": c.alpha_weight * (out.alpha - head).abs().mean(),
                "offset": c.offset_weight * hinge_sq(s["offset"].norm(dim=-1), c.offset_margin),
                "scale": c.scale_weight * hinge_sq(torch.exp(s["log_scale"]), c.scale_max),
            }
            for k, v in parts.items():
                terms[k] = terms.get(k, 0) + v / len(ids)
            if keep:
                renders.append((out.rgb[0], target[0], head[0, ..., 0] > 0.5))
        terms["loss"] = sum(terms.values())
        if keep:
            terms["renders"], terms["maps"] = renders, maps  # type: ignore[assignment]
        return terms


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(objective: Objective, loader: DataLoader, identities: list[Identity], device: torch.device, grid: Path | None = None) -> tuple[float, float]:
    """Mean loss and head PSNR (inside the target's head mask) over the validation samples;
    optionally a grid PNG: reference · target · prediction · predicted UV colours, per row."""
    objective.eval()
    losses, psnrs, rows = [], [], []
    for batch in loader:
        batch = _to_device(batch, device)
        terms = objective(batch, identities, keep=True)
        losses.append(float(terms["loss"]) * len(batch["target"]))
        for b, (rgb, target, mask) in enumerate(terms["renders"]):
            psnrs.append(metrics.psnr(rgb.cpu(), target.cpu(), mask=mask.cpu()))
            if grid is not None and len(rows) < GRID_ROWS:
                uv = torch.sigmoid(terms["maps"][b : b + 1, COLOR])
                uv = torch.nn.functional.interpolate(uv, size=rgb.shape[:2], mode="nearest")[0].permute(1, 2, 0)
                rows.append(torch.cat([batch["ref_images"][b, 0], target, rgb, uv], 1).clamp(0, 1))
    objective.train()
    if grid is not None and rows:
        image = (torch.cat(rows, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        _, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        atomic_write_bytes(grid, png.tobytes())
    return sum(losses) / len(psnrs), float(np.mean(psnrs))


class _Clock:
    """Training time without validation and checkpoints: `lap` ends a stretch of steps (also
    counted in `timed`, the throughput's clock, once warm-up is over), `restart` begins one."""

    def __init__(self, total: float, device: torch.device):
        self.total, self.timed, self.device = total, 0.0, device
        self.restart()

    def restart(self) -> None:
        self.tic = time.perf_counter()

    def lap(self, timed: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.tic
        self.total += elapsed
        self.timed += elapsed * timed
        self.restart()


def _loader(samples: Samples, sampler: Sampler, cfg: E2VConfig, device: torch.device) -> DataLoader:
    workers = cfg.workers
    return DataLoader(samples, batch_size=cfg.batch, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if workers else None, persistent_workers=False)


def train_prior(clip_dirs: list[Path], holdout: list[str], work: Path, config: Config, device: str, resume: bool, rank: int = 0, world: int = 1) -> dict:
    """Train the E2V prior (settings: `config.e2v`; heads built with `config.adapt`'s, as adapt
    builds them); write `work/e2v.safetensors` and `work/e2v_grid.png`; return this part's
    summary for meta.yaml. Checkpoints go to `work/e2v.ckpt` (atomically) every
    `checkpoint_every` steps; `resume` continues from it on the same sample stream."""
    cfg = config.e2v
    dev = torch.device(device)
    names = [p.resolve().name for p in clip_dirs]
    train_names = [n for n in names if n not in holdout]
    if not train_names:
        raise GGError("every clip is held out; train the e2v prior on at least one identity", Exit.USAGE)
    torch.manual_seed(cfg.seed)
    template = HeadModel.template().to(dev)
    model = E2V(template, cfg.uv_res, cfg.feature_dim, cfg.hidden, cfg.channels, cfg.embed_dim).to(dev)
    train = load_identities(clip_dirs, train_names, "train" if holdout else "fit", config, template, dev, cfg.flip)
    val = load_identities(clip_dirs, holdout, "train", config, template, dev, False) if holdout else \
        load_identities(clip_dirs, train_names, "late", config, template, dev, False)
    objective = Objective(model, cfg)
    net = nn.parallel.DistributedDataParallel(objective, gradient_as_bucket_view=True) if world > 1 else objective  # no grad copy into buckets
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = training.warmup_cosine(opt, cfg.steps, warmup=min(200, cfg.steps // 10))
    start, curve, best, seconds = 0, [], training.Best(), 0.0
    ckpt = work / CHECKPOINT
    if resume and ckpt.is_file():
        saved = training.load(ckpt, dev)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        best.load(saved["best"])
        start, curve, seconds = saved["step"], saved["curve"], saved["seconds"]
        console.info(f"e2v: resumed at step {start}")
    val_loader = _loader(Samples(val, cfg, cfg.seed + 1, augment=False), Stream(0, math.ceil(cfg.val_samples / cfg.batch), cfg.batch), cfg, dev)
    batches = [iter(_loader(Samples(train, cfg, cfg.seed, augment=True), Stream(start, cfg.steps, cfg.batch, rank, world), cfg, dev))]
    model.train()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if rank == 0 and start == 0:  # the untrained generator: the unwrapped references on the mean head
        val_loss, val_psnr = evaluate(objective, val_loader, val, dev)
        curve.append({"step": 0, "train": None, "val": round(val_loss, 5), "val_psnr": round(val_psnr, 3)})
        best.offer(val_loss, 0, model)
    clock = _Clock(seconds, dev)
    timed_from = start + min(20, (cfg.steps - start) // 5)  # throughput leaves out worker start-up and warm-up

    def step(i: int) -> dict[str, Tensor]:
        terms = net(_to_device(next(batches[0]), dev), train)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if i + 1 == timed_from:
            clock.lap(timed=False)
        return {"loss": terms["loss"].detach()}

    def validate(done: int) -> str:
        clock.lap(timed=done > timed_from)
        val_loss, val_psnr = evaluate(objective, val_loader, val, dev)
        curve.append({"step": done, "train": round(loop.values["loss"], 5), "val": round(val_loss, 5), "val_psnr": round(val_psnr, 3)})
        best.offer(val_loss, done, model)
        clock.restart()
        return f"loss {loop.values['loss']:.4f} val {val_loss:.4f} ({val_psnr:.2f} dB)"

    def checkpoint(done: int) -> None:
        clock.lap(timed=done > timed_from)
        training.save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": done,
                             "curve": curve, "best": best.to_dict(), "seconds": clock.total})
        clock.restart()

    writer = rank == 0  # rank 0 validates and checkpoints; every rank steps (DDP averages the gradients)
    loop = training.Loop("e2v training", cfg.steps, start=start, fix="lower the preset's e2v.lr or re-run with --resume",
                         checkpoint=checkpoint if writer else None, checkpoint_every=cfg.checkpoint_every, checkpoint_last=True)
    if writer:
        loop.every(cfg.val_every, validate)
    try:
        done = loop.run(step)
    finally:
        batches.clear()  # the DataLoader's workers end with their iterator
    clock.lap(timed=done > timed_from)
    summary = {"file": WEIGHTS, "grid": GRID}
    if rank == 0:
        model.load_state_dict(best.state)
        val_loss, val_psnr = evaluate(objective, val_loader, val, dev, grid=work / GRID)
        model.save(work / WEIGHTS, {"size": cfg.size, "identities": [i.name for i in train], "held_out": sorted(holdout)})
        best_entry = min(curve, key=lambda e: e["val"])
        summary.update(best_step=best_entry["step"], best_val_loss=round(best.value, 5), best_val_psnr=best_entry["val_psnr"])
    run_steps = done - timed_from
    return {
        **summary,
        "identities": [i.name for i in train],
        "held_out": sorted(holdout),
        "validation": "training frames of held-out identities" if holdout else "last 10% of each identity's training frames",
        "size": cfg.size,
        "uv_res": cfg.uv_res,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": cfg.steps,
        "batch_per_gpu": cfg.batch,
        "world_size": world,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "train_seconds": round(clock.total, 1),
        "steps_per_second": round(run_steps / max(clock.timed, 1e-9), 3),
        "samples_per_second": round(run_steps * cfg.batch * world / max(clock.timed, 1e-9), 2),
        "curve": curve,
    }
