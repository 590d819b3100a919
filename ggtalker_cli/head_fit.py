"""The head fit: one person's Gaussian head avatar fitted to a preprocessed clip (`ggtalker adapt`).

Setup, from training frames only: the identity's neutral landmarks and expression basis (least
squares, `HeadModel.fit`), the head shell fitted to the head-mask silhouettes (hair makes heads
bigger than skulls), and each Gaussian's starting colour painted from 8 frames.

Each step renders the head Gaussians of one training frame (its tracked landmarks and pose) over
the clip's background plate and compares it with the frame's head pasted on that plate
(`frame·head + plate·(1 − head)`), so the head learns its own silhouette and nothing of the
torso. Loss: L1 + SSIM, a silhouette term (alpha vs the head mask), and regularisers that keep
Gaussians near their triangles (offset norm, scale). After a warm-up, small per-frame
corrections of pose and expression are trained too (monocular tracking jitters), with an L2
pull towards zero. Test frames (the clip's last 10%) are never seen and keep their raw tracking.

Frames stream from disk a few steps ahead on background threads: RAM stays flat with clip
length. The steps run on the shared loop (`training.Loop`): checkpoints (`head.ckpt`: weights,
corrections, Adam state, progress) land atomically in the partial output folder; `--resume`
continues bit-exactly because the frame order is a pure function of (seed, step). Ctrl-C /
SIGTERM finish the current step, checkpoint and exit with code 130.

Evaluation (the protocol is stored in meta.yaml next to the numbers): held-out frames rendered
from their tracked landmarks and pose. `head` metrics compare the head over the plate with the
target inside the ground-truth head mask (SSIM on the mask's bounding box); `full` metrics
compare the full frame, where the rendered head is composited over the frame with its head
region replaced by the background plate (the body inpainter of a later stage will replace this
plain paste); `face` metrics use DESIGN.md's landmark face box on that composite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from . import metrics, training
from .avatar import WEIGHTS, Avatar
from .clip import Clip
from .clip_view import Data, Prefetch, intrinsics
from .config import AdaptConfig
from .errors import Exit, GGError
from .face_model import HeadModel, fit_shell
from .gaussians import write_ply
from .losses import hinge_sq, photometric

CHECKPOINT = "head.ckpt"  # the head fit's training state while it trains (training.save)
LOG = "train_log.jsonl"
PREVIEWS = 4  # held-out frames shown in previews/
NOVEL_YAWS = (-30, -15, 0, 15, 30)
SHELL_FRAMES = 8  # training frames the head shell is fitted to and the colours are painted from
SHELL_SIZE = 128  # silhouette resolution of the shell fit (a silhouette needs no more)


def _se3(delta: Tensor) -> Tensor:
    """(..., 6) axis-angle rotation (rad) + translation (cm) -> (..., 4, 4), differentiable at 0."""
    w, t = delta[..., :3], delta[..., 3:]
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]
    zero = torch.zeros_like(w[..., 0])
    Wx = torch.stack([zero, -w[..., 2], w[..., 1], w[..., 2], zero, -w[..., 0], -w[..., 1], w[..., 0], zero], -1)
    Wx = Wx.reshape(w.shape[:-1] + (3, 3))
    theta = theta2.clamp(min=1e-12).sqrt()
    small = theta2 < 1e-8  # Taylor expansions keep the gradient finite at zero
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp(min=1e-12))
    R = torch.eye(3, dtype=delta.dtype, device=delta.device) + a * Wx + b * (Wx @ Wx)
    top = torch.cat([R, t[..., None]], -1)
    bottom = torch.zeros(delta.shape[:-1] + (1, 4), dtype=delta.dtype, device=delta.device)
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], -2)


def _yaw_about(centre: Tensor, degrees: float) -> Tensor:
    """4×4 face-space turn of the head about its vertical axis through `centre`."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    M = torch.eye(4, dtype=centre.dtype, device=centre.device)
    M[:3, :3] = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=centre.dtype, device=centre.device)
    M[:3, 3] = centre - M[:3, :3] @ centre
    return M


def fit_head(clip: Clip, data: Data, cfg: AdaptConfig) -> tuple[HeadModel, dict[str, float]]:
    """The identity's neutral + expression basis, and a head shell fitted to its head masks."""
    trk = clip.tracking
    fitted = HeadModel.fit(trk["verts"][data.train], trk["blendshapes"][data.train], cfg.basis_ridge)
    size = min(clip.size, SHELL_SIZE)
    K = intrinsics(clip, size)
    frames = []
    for i in data.train[np.linspace(0, len(data.train) - 1, SHELL_FRAMES).astype(int)]:
        mask = cv2.resize((clip.mask(int(i)) == 2).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        frames.append((trk["verts"][i], trk["pose"][i].astype(np.float64), mask.astype(bool)))
    head, shell, iou = fit_shell(fitted.neutral.numpy(), fitted.basis.numpy(), frames, K, size)
    return head, {**dataclasses.asdict(shell), "silhouette_iou": round(iou, 4)}


@torch.no_grad()
def paint(avatar: Avatar, data: Data, frames: np.ndarray) -> None:
    """Start each Gaussian at the mean colour of the pixels it lands on in a few training frames.

    Only where its surface faces the camera (within 60°) and the pixel is head; the rest start at
    the head's mean colour. Starting from the picture instead of grey saves hundreds of steps.
    """
    gmap = avatar.gmap
    total = torch.zeros(len(gmap), 3, device=data.device)
    count = torch.zeros(len(gmap), device=data.device)
    head_sum, head_px = torch.zeros(3, device=data.device), 0.0
    for i in frames:
        frame, head, _ = data.tensors(data.load(i))
        s = gmap.splats(avatar.head.vertices(data.verts[i]))
        R, t = data.pose[i, :3, :3], data.pose[i, :3, 3]
        cam = s["means"] @ R.T + t
        facing = -(s["normals"] @ R.T * torch.nn.functional.normalize(cam, dim=-1)).sum(-1)
        uv = cam @ data.K.T
        px = (uv[:, :2] / uv[:, 2:].clamp(min=1e-6)).long()
        inside = (px >= 0).all(-1) & (px < data.size).all(-1) & (cam[:, 2] > 0)
        x, y = px[:, 0].clamp(0, data.size - 1), px[:, 1].clamp(0, data.size - 1)
        use = inside & (facing > 0.5) & (head[0, y, x, 0] > 0.5)
        total += frame[0, y, x] * use[:, None]
        count += use
        head_sum += (frame[0] * head[0]).sum((0, 1))
        head_px += float(head.sum())
    mean = head_sum / max(head_px, 1.0)
    rgb = torch.where(count[:, None] > 0, total / count.clamp(min=1)[:, None], mean).clamp(0.02, 0.98)
    texel, _, _ = gmap.bound()
    gmap.groups["color"].data.view(3, -1)[:, texel] = torch.log(rgb / (1 - rgb)).T


def budget_scale(cfg: AdaptConfig) -> float:
    """The factor on the head's learning rates for a run of cfg.steps (config: lr_steps and after)."""
    return min((cfg.lr_steps / max(cfg.steps, 1)) ** cfg.lr_budget_power, cfg.lr_budget_max)


class Trainer:
    """The avatar, the per-frame corrections, the optimiser, and one training step."""

    def __init__(self, data: Data, cfg: AdaptConfig, avatar: Avatar):
        self.data, self.cfg, self.avatar = data, cfg, avatar
        n, dev = data.clip.n_frames, data.device
        self.pose_delta = torch.nn.Parameter(torch.zeros(n, 6, device=dev))
        self.expr_delta = torch.nn.Parameter(torch.zeros(n, 52, device=dev))
        self.refine_from = int(cfg.refine_after * cfg.steps)
        self.upsample_step = int(cfg.upsample_at * cfg.steps) if cfg.upsample_at > 0 else -1
        self.optimizer = self._optimizer()

    def _optimizer(self) -> torch.optim.Adam:
        c, groups = self.cfg, self.avatar.gmap.groups
        budget = budget_scale(c)
        head = {"offset": ([groups["offset"]], c.lr_position), "quat": ([groups["quat"]], c.lr_rotation),
                "log_scale": ([groups["log_scale"]], c.lr_scale), "opacity": ([groups["opacity"]], c.lr_opacity),
                "color": ([groups["color"]], c.lr_color), "feature": ([groups["feature"]], c.lr_feature),
                "mlp": (list(self.avatar.color.parameters()), c.lr_mlp)}
        params = [{"params": tensors, "lr": lr * budget, "base_lr": lr * budget, "name": k} for k, (tensors, lr) in head.items()]
        params.append({"params": [self.pose_delta, self.expr_delta], "lr": c.lr_refine, "base_lr": c.lr_refine, "name": "refine"})
        return torch.optim.Adam(params, eps=1e-15)

    def order(self, step: int) -> list[int]:
        """Training frames of a step: a fresh permutation per epoch, a pure function of (seed, step)."""
        train, b = self.data.train, self.cfg.batch
        n_per_epoch = max(len(train) // b, 1)
        epoch, k = divmod(step, n_per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(train))
        return [int(train[perm[(k * b + j) % len(train)]]) for j in range(b)]

    def _schedule(self, step: int) -> None:
        decay = self.cfg.lr_final ** (step / max(self.cfg.steps, 1))
        for group in self.optimizer.param_groups:
            on = group["name"] != "refine" or step >= self.refine_from
            group["lr"] = group["base_lr"] * decay * on

    def frame_inputs(self, i: int, refine: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Landmarks, pose and blendshapes of clip frame i, with its learned corrections if `refine`."""
        d = self.data
        base, pose, expr = d.verts[i], d.pose[i], d.blendshapes[i]
        if refine:
            expr = expr + self.expr_delta[i]
            # multiply-and-sum, not einsum: BLAS's matrix-vector product rounds differently with the
            # memory alignment of its operands, which would break bit-exact --resume
            base = base + (self.expr_delta[i][:, None, None] * self.avatar.head.basis).sum(0)
            pose = pose @ _se3(self.pose_delta[i])
        return base, pose, expr

    def step(self, step: int, batch: list[tuple[np.ndarray, np.ndarray]], frames: list[int]) -> dict[str, Tensor]:
        c, d = self.cfg, self.data
        if step == self.upsample_step:
            self.upsample()
        self._schedule(step)
        refine = step >= self.refine_from
        terms: dict[str, Tensor] = {}
        for i, sample in zip(frames, batch):
            _, head, target = d.tensors(sample)
            base, pose, expr = self.frame_inputs(i, refine)
            out, s = self.avatar.render(base, pose, expr, d.K, d.size, background=d.plate)
            free = self.edge_band(head)
            parts = {
                "photo": photometric(out.rgb, torch.where(free, out.rgb.detach(), target), c.ssim_weight),
                "mse_head": ((out.rgb - target).square() * head).sum().detach() / (3 * head.sum()).clamp(min=1),
                "alpha": c.alpha_weight * ((out.alpha - head).abs() * ~free).mean(),
                "offset": c.offset_weight * hinge_sq(s["offset"].norm(dim=-1), c.offset_margin),
                "scale": c.scale_weight * hinge_sq(torch.exp(s["log_scale"]), c.scale_max),
            }
            if refine:
                w, t = self.pose_delta[i, :3], self.pose_delta[i, 3:]
                parts["refine"] = c.refine_weight * (
                    (w / c.refine_rot).square().sum() + (t / c.refine_trans).square().sum() + (self.expr_delta[i] / c.refine_expr).square().sum()
                )
            for k, v in parts.items():
                terms[k] = terms.get(k, 0) + v / len(frames)
        loss = sum(v for k, v in terms.items() if k != "mse_head")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if c.prune_every > 0 and step > 0 and step % c.prune_every == 0 and step < 0.9 * c.steps:
            self.avatar.gmap.prune(c.prune_opacity)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def edge_band(self, head: Tensor) -> Tensor:
        """(1, H, W, 1) bool: the cfg.edge_ignore band just outside the head mask, loss-free."""
        r = round(self.cfg.edge_ignore * self.data.size)
        return (metrics.dilate(head[..., 0], r)[..., None] > 0.5) & (head < 0.5)

    def upsample(self) -> None:
        """Double the UV map; keep the Adam state of everything that did not change shape."""
        kept = {id(p): self.optimizer.state[p] for p in (*self.avatar.color.parameters(), self.pose_delta, self.expr_delta)
                if p in self.optimizer.state}
        self.avatar.gmap.upsample()
        self.optimizer = self._optimizer()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in kept:
                    self.optimizer.state[p] = kept[id(p)]

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds: the avatar's tensors, the per-frame corrections, Adam's state."""
        return {"avatar": self.avatar.state(), "refine.pose": self.pose_delta.detach().cpu(), "refine.expr": self.expr_delta.detach().cpu(),
                "optimizer": self.optimizer.state_dict()}

    @classmethod
    def resume(cls, path: Path, data: Data, cfg: AdaptConfig) -> tuple[Trainer, int, float]:
        """The trainer of checkpoint `path` -> (trainer, steps done, training seconds so far)."""
        saved = training.load(path, data.device)  # a foreign pickle is refused here, before it runs
        try:
            trainer = cls(data, cfg, Avatar.from_state(saved["avatar"], data.device))
            with torch.no_grad():
                trainer.pose_delta.copy_(saved["refine.pose"])
                trainer.expr_delta.copy_(saved["refine.expr"])
            trainer.optimizer.load_state_dict(saved["optimizer"])
            return trainer, int(saved["step"]), float(saved["seconds"])
        except (TypeError, KeyError, ValueError, RuntimeError) as e:
            raise GGError(f"{path}: unusable checkpoint ({e.__class__.__name__}: {e}); rerun without --resume to start over", Exit.ARTIFACT) from e


def train(trainer: Trainer, folder: Path, start: int, seconds: float) -> float:
    """Run steps [start, cfg.steps) on the shared loop; returns the wall-clock seconds of training so far."""
    cfg, data = trainer.cfg, trainer.data
    log_path = folder / LOG
    kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() else []) if json.loads(line)["step"] < start]
    log_path.write_text("".join(line + "\n" for line in kept))
    tic = time.perf_counter() - seconds

    def checkpoint(done: int) -> None:
        training.save(folder / CHECKPOINT, {**trainer.state(), "step": done, "seconds": time.perf_counter() - tic})

    loop = training.Loop("adapt", cfg.steps, start=start, fix="lower the learning rates in the preset", check_every=cfg.log_every,
                         checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every)
    stream = Prefetch(data.load, trainer.order, cfg.steps)
    with log_path.open("a") as log:

        def row(done: int) -> str:
            values = loop.values
            entry = {"step": done - 1, **values, "psnr_head": -10 * math.log10(max(values["mse_head"], 1e-12)),
                     "gaussians": len(trainer.avatar.gmap), "seconds": round(time.perf_counter() - tic, 2)}
            log.write(json.dumps(entry) + "\n")
            log.flush()  # followable with tail -f while training
            return f"loss {entry['loss']:.4f}  head psnr {entry['psnr_head']:.2f}  n {entry['gaussians']}"

        loop.every(cfg.log_every, row, phase=1)  # steps 0, log_every, 2·log_every, ... and the last
        try:
            loop.run(lambda step: trainer.step(step, stream.get(step), trainer.order(step)))
        finally:
            stream.close()
    return time.perf_counter() - tic


def _to_image(x: Tensor) -> np.ndarray:
    return (x.detach().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@torch.no_grad()
def evaluate(avatar: Avatar, data: Data, frames: np.ndarray, preview_dir: Path | None = None) -> dict[str, float]:
    """Held-out metrics (see the module docstring), mean over `frames`; optional preview strips."""
    rows: list[dict[str, float]] = []
    shown = set(frames[np.linspace(0, len(frames) - 1, min(PREVIEWS, len(frames))).astype(int)].tolist())
    for i in frames:
        frame, head, target = data.tensors(data.load(i))
        out, _ = avatar.render(data.verts[i], data.pose[i], data.blendshapes[i], data.K, data.size)
        rgb, alpha = out.rgb, out.alpha
        over_plate = rgb + (1 - alpha) * data.plate
        composite = rgb + (1 - alpha) * (frame * (1 - head) + data.plate * head)
        driven, _ = avatar.render(avatar.head.drive(data.blendshapes[i]), data.pose[i], data.blendshapes[i], data.K, data.size, data.plate)
        hm = head[0, ..., 0] > 0.5
        ys, xs = torch.nonzero(hm, as_tuple=True)
        hbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        fbox = metrics.face_box(data.landmarks[i], data.size)
        a, t, comp, f, dr = (x[0] for x in (over_plate, target, composite, frame, driven.rgb))  # metrics run on the device
        rows.append({
            "psnr_head": metrics.psnr(a, t, mask=hm),
            "ssim_head": metrics.ssim(a, t, box=hbox) if min(hbox[2] - hbox[0], hbox[3] - hbox[1]) >= 11 else math.nan,
            "psnr_full": metrics.psnr(comp, f),
            "ssim_full": metrics.ssim(comp, f),
            "psnr_face": metrics.psnr(comp, f, box=fbox),
            "ssim_face": metrics.ssim(comp, f, box=fbox),
            "psnr_head_driven": metrics.psnr(dr, t, mask=hm),
            # diagnostic: the head without its border band (metrics.seam_band), where segmentation
            # jitter of the ground-truth mask dominates the error
            "psnr_head_inner": metrics.psnr(a, t, mask=hm & ~metrics.seam_band(hm)),
        })
        if preview_dir is not None and int(i) in shown:
            strip = torch.cat([f, comp, a], 1)
            save_png(preview_dir / f"test_{int(i):06d}.png", _to_image(strip))
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


@torch.no_grad()
def novel_views(avatar: Avatar, data: Data, i: int) -> np.ndarray:
    """Test frame i turned by NOVEL_YAWS about the head's vertical axis, side by side."""
    base = data.verts[i]
    centre = avatar.head.vertices(avatar.head.neutral).mean(0)
    views = []
    for yaw in NOVEL_YAWS:
        pose = data.pose[i] @ _yaw_about(centre, yaw)
        out, _ = avatar.render(base, pose, data.blendshapes[i], data.K, data.size, data.plate)
        views.append(out.rgb[0])
    return _to_image(torch.cat(views, 1))


def loss_plot(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.semilogy(steps, [r["loss"] for r in rows], lw=0.8)
    a.set(xlabel="step", ylabel="training loss")
    b.plot(steps, [r["psnr_head"] for r in rows], lw=0.8)
    b.set(xlabel="step", ylabel="training head PSNR (dB)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


@torch.no_grad()
def export(trainer: Trainer, folder: Path) -> dict[str, Any]:
    """Write weights, PLY, synthesis track; return what meta.yaml records about them."""
    avatar, data = trainer.avatar, trainer.data
    avatar.save(folder / WEIGHTS)
    # the neutral head, coloured as at the mean training pose with a neutral expression
    pose = data.pose[torch.as_tensor(data.train, device=data.device)].mean(0)
    g, _ = avatar.gaussians(avatar.head.neutral, pose, torch.zeros(52, device=data.device))
    write_ply(folder / "head.ply", g.means, g.quats, g.scales, g.opacities, g.colors)
    n = data.clip.n_frames
    refined = np.zeros(n, bool)
    refined[data.train] = trainer.refine_from < trainer.cfg.steps
    frames = torch.arange(n, device=data.device)
    mask = torch.as_tensor(refined, device=data.device)[:, None]
    poses = torch.where(mask[..., None], data.pose @ _se3(trainer.pose_delta.detach()), data.pose)
    exprs = data.blendshapes + trainer.expr_delta.detach() * mask
    (folder / "synthesis").mkdir(exist_ok=True)
    np.savez(
        folder / "synthesis" / "track.npz",
        frame=frames.cpu().numpy(),
        pose=poses.cpu().numpy().astype(np.float32),
        blendshapes=exprs.cpu().numpy().astype(np.float32),
        refined=refined,
    )
    return {"gaussians": len(avatar.gmap), "uv_res": avatar.gmap.res}


