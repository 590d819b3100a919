"""The body: how a rendered head becomes a full frame, for `adapt` (training) and `synth`/`eval`.

`adapt` trains the avatar's inpainter (models/inpainter.py) on the clip's training frames right
after the head fit, on the renders synthesis will really produce: the head driven by the frame's
blendshapes through the identity's basis (`HeadModel.drive`, what audio drives too) at the
refined pose of `synthesis/track.npz`, over the frame's own body. Trained on the tracked
landmarks instead, it would never see the jaw/neck mismatches of a driven head, which are the
seams it exists to hide.

`Body` composites at synthesis: the inpainter when the avatar has one; otherwise (an avatar
from an older adapt) the plain paste over the frame with the blanked region filled from the
clean background plate, which is also the "without inpainter" baseline eval reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import artifacts, console, metrics, training
from .clip_view import Data, Prefetch
from .config import InpainterConfig
from .errors import Exit, GGError
from .models.inpainter import Inpainter, blank_mask, inpainter_loss, paste, random_dilated_mask

if TYPE_CHECKING:
    from .avatar import Avatar

INPAINTER = "inpainter.safetensors"
DIVERGED_DB = 3.0  # held-out PSNR this far below the plate paste it starts from: training diverged
TRACK = "synthesis/track.npz"


def load_track(folder: Path) -> dict[str, np.ndarray]:
    """The avatar's synthesis track: per clip frame `pose` (N,4,4) and `blendshapes` (N,52), refined."""
    path = Path(folder) / TRACK
    try:
        with np.load(path, allow_pickle=False) as data:
            track = {k: data[k] for k in data.files}
    except artifacts.NUMPY_ERRORS as e:
        raise GGError(f"{path}: missing or unreadable synthesis track ({e.__class__.__name__}); re-run ggtalker adapt", Exit.ARTIFACT) from e
    if "pose" not in track or "blendshapes" not in track:
        raise GGError(f"{path}: no pose/blendshapes arrays; re-run ggtalker adapt", Exit.ARTIFACT)
    return track


@torch.no_grad()
def render_head(avatar: Avatar, expr: Tensor, pose: Tensor, K: Tensor, size: int, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(1,H,W,3) premultiplied head over black and (1,H,W,1) alpha; landmarks `base` default to
    the expression driven through the identity's basis."""
    base = avatar.head.drive(expr) if base is None else base
    out, _ = avatar.render(base, pose, expr, K, size)
    return out.rgb, out.alpha


def _samples(avatar: Avatar, data: Data, track: dict[str, Tensor], steps: int, seed: int) -> Iterator[tuple[Tensor, ...]]:
    """Training frames in seeded epochs: (driven head rgb, alpha, frame, head mask), frames
    decoded a few steps ahead on background threads (adapt's Prefetch)."""
    def order(step: int) -> list[int]:
        epoch, k = divmod(step, len(data.train))
        return [int(data.train[np.random.default_rng([seed, epoch]).permutation(len(data.train))[k]])]

    stream = Prefetch(data.load, order, steps)
    try:
        for step in range(steps):
            (i,) = order(step)
            frame, head, _ = data.tensors(stream.get(step)[0])
            rgb, alpha = render_head(avatar, track["blendshapes"][i], track["pose"][i], data.K, data.size)
            yield rgb, alpha, frame, (head > 0.5).float()
    finally:
        stream.close()


def _batch(x: Tensor, device: torch.device) -> Tensor:
    x = torch.as_tensor(x, device=device).float()
    return x[None] if x.dim() == 3 else x


def train_inpainter(
    samples: Iterable[tuple[Tensor, Tensor, Tensor, Tensor]], plate: Tensor, cfg: InpainterConfig, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], list[dict]]:
    """Train on (head rgb, alpha, frame, head mask) samples over the clip's background `plate`
    ((1,)H,W,3); -> (state_dict, log).

    Each sample is BHWC (or HWC): head (…,3) premultiplied, alpha (…,1), frame (…,3), head mask
    (…,1) in {0,1} (the clip mask's head label).

    Uses up to `cfg.steps` samples (pass a generator cycling over the clip's training frames;
    a shorter iterable ends training early, and the log says how many steps ran). The target is
    the frame itself: the model must reproduce it from the render and the blanked frame.
    The state dict is on the CPU, ready for safetensors.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = Inpainter(cfg.channels).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=cfg.lr * 0.1)
    amp = device.type == "cuda"
    plate = _batch(plate, device)
    log: list[dict] = []
    start = time.perf_counter()
    stream = iter(samples)
    pending = [next(stream, None)]  # one sample ahead: the loop stops after the step that used the last one
    loop = training.Loop("inpainter training", cfg.steps, fix="lower inpainter.lr", check_every=cfg.log_every)

    def step(i: int) -> dict[str, Tensor]:
        head, alpha, frame, mask = (_batch(x, device) for x in pending[0])
        side = frame.shape[2]
        radii = (round(cfg.dilate_min * side), round(cfg.dilate_max * side))
        blank = random_dilated_mask(mask, alpha, radii, generator)
        seam = metrics.seam_band(mask[..., 0], round(cfg.seam_radius * side))[..., None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(head, alpha, frame, blank, plate)
        loss = inpainter_loss(pred, frame, seam, cfg.ssim_weight, cfg.seam_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pending[0] = next(stream, None)
        if pending[0] is None:
            loop.stop()
        return {"loss": loss.detach()}

    def row(done: int) -> str:
        log.append({"step": done, "loss": round(loop.values["loss"], 5), "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 2)})
        return f"loss {log[-1]['loss']:.4f}"

    done = loop.every(cfg.log_every, row).run(step) if pending[0] is not None else 0
    if done < cfg.steps:
        log.append({"step": done, "note": f"samples ran out after {done} of {cfg.steps} steps"})
    # contiguous: channels_last conv weights are strided, and safetensors refuses strided tensors
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, log


def train_avatar_inpainter(avatar: Avatar, data: Data, folder: Path, cfg: InpainterConfig) -> dict[str, Any]:
    """Train the inpainter on the avatar's driven renders of the clip's training frames, write
    `folder/inpainter.safetensors`; return what meta.yaml records under `inpainter`."""
    if data.size % 8:
        raise GGError(f"adapt.size {data.size}: the inpainter needs a multiple of 8; change adapt.size in the preset", Exit.USAGE)
    track = {k: torch.as_tensor(v, dtype=torch.float32, device=data.device) for k, v in load_track(folder).items() if k in ("pose", "blendshapes")}
    tic = time.perf_counter()
    state, log = train_inpainter(_samples(avatar, data, track, cfg.steps, cfg.seed), data.plate, cfg, data.device)
    (Path(folder) / "inpainter_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    info = {
        "file": INPAINTER,
        "log": "inpainter_log.jsonl",
        "channels": list(cfg.channels),
        "dilate": cfg.dilate,
        "steps": cfg.steps,
        "steps_run": max((r["step"] for r in log), default=0),
        "train_seconds": round(time.perf_counter() - tic, 1),
        "final_loss": next((r["loss"] for r in reversed(log) if "loss" in r), None),
        "trained_on": "training frames; head driven by the tracked blendshapes at the refined synthesis pose",
        "check": held_out_check(state, cfg, avatar, data, track),
    }
    check = info["check"]
    if check["psnr"] < check["psnr_paste"] - DIVERGED_DB:
        # it starts as the paste (models/inpainter.py): ending far below it is an unstable run, and its
        # outputs are bounded, so the loss need not have gone to NaN on the way
        raise GGError(f"inpainter training diverged (held-out full PSNR {check['psnr']:.2f} dB, {check['psnr_paste']:.2f} for the paste "
                      "it starts as); lower inpainter.lr", Exit.DIVERGED)
    if check["psnr"] < check["psnr_paste"] or check["psnr_seam"] < check["psnr_seam_paste"]:
        # a composite worse than the plain paste is never shipped: synth falls back to the paste
        console.warn(f"the inpainter did not learn (held-out full PSNR {check['psnr']:.2f} vs paste {check['psnr_paste']:.2f} dB, "
                     f"seam {check['psnr_seam']:.2f} vs {check['psnr_seam_paste']:.2f}); the avatar composites with the plate "
                     "paste instead: raise inpainter.steps in a preset and re-run adapt")
        return {**info, "rejected": True}
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(folder) / INPAINTER))  # channels_last → packed
    return info


@torch.no_grad()
def held_out_check(state: dict[str, Tensor], cfg: InpainterConfig, avatar: Avatar, data: Data, track: dict[str, Tensor], frames: int = 8) -> dict[str, float]:
    """Full-frame and seam-band PSNR of the trained inpainter vs the plate paste on up to `frames`
    held-out test frames (driven head at the synthesis pose over the frame's own body, as synth
    composites): the inpainter's training loss cannot say whether it beats the paste it replaces."""
    model = Inpainter(cfg.channels)
    model.load_state_dict(state)
    body = Body(model, cfg.dilate, data.plate, data.device, data.size)  # exactly what synth composites with
    scores: dict[str, list[float]] = {"psnr": [], "psnr_paste": [], "psnr_seam": [], "psnr_seam_paste": []}
    for i in data.test[np.linspace(0, len(data.test) - 1, min(frames, len(data.test))).astype(int)]:
        frame, head, _ = data.tensors(data.load(int(i)))
        rgb, alpha = render_head(avatar, track["blendshapes"][i], track["pose"][i], data.K, data.size)
        mask = (head > 0.5).float()
        seam = metrics.seam_band(mask[0, ..., 0])
        for name, out in (("psnr", body(rgb, alpha, frame, mask)), ("psnr_paste", body.paste(rgb, alpha, frame, body.blank(mask, alpha)))):
            scores[name].append(metrics.psnr(out[0], frame[0]))
            scores[name.replace("psnr", "psnr_seam")].append(metrics.psnr(out[0], frame[0], mask=seam))
    return {"frames": len(scores["psnr"]), **{k: round(float(np.mean(v)), 3) for k, v in scores.items()}}


class Body:
    """Composites rendered heads onto body frames (batched, BHWC float tensors on `device`):
    with `model`, the inpainter; without, the plate paste."""

    def __init__(self, model: Inpainter | None, dilate: float, plate: Tensor, device: torch.device, trained_size: int = 0):
        self.model = None if model is None else model.to(device, memory_format=torch.channels_last).eval()
        self.dilate, self.plate = dilate, plate
        self.half = device.type == "cuda"
        self.trained_size = trained_size  # the inpainter learned fills of this scale (0: any)

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any], plate: Tensor, device: torch.device) -> Body:
        """The avatar's compositor as adapt recorded it in meta.yaml (`inpainter`)."""
        info = meta.get("inpainter") or None
        if info and info.get("rejected"):  # adapt found it worse than the paste on held-out frames
            info = None
        if not info:
            return cls(None, InpainterConfig.dilate, plate, device)
        path = artifacts.inside(folder, info["file"])  # meta.yaml is shared data: no ../ escapes
        try:
            state = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise GGError(f"{path}: missing or unreadable inpainter weights ({e.__class__.__name__}); re-run ggtalker adapt", Exit.ARTIFACT) from e
        model = Inpainter(info["channels"])
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise GGError(f"{path}: inpainter weights do not match channels {info['channels']}; re-run ggtalker adapt", Exit.ARTIFACT) from e
        return cls(model, float(info["dilate"]), plate, device, int(meta.get("size") or 0))

    @property
    def kind(self) -> str:
        return "inpainter" if self.model is not None else "plate paste (avatar has no inpainter)"

    def blank(self, head_mask: Tensor, alpha: Tensor) -> Tensor:
        """The region whose frame pixels are hidden from the composite (dilated head ∪ render)."""
        return blank_mask(head_mask, alpha, round(self.dilate * head_mask.shape[2]))

    def paste(self, head_rgb: Tensor, alpha: Tensor, frame: Tensor, blank: Tensor) -> Tensor:
        """Without the inpainter: the head over the frame, the blanked region from the plate."""
        return paste(head_rgb, alpha, frame, blank, self.plate)

    @torch.no_grad()
    def __call__(self, head_rgb: Tensor, alpha: Tensor, frame: Tensor, head_mask: Tensor) -> Tensor:
        blank = self.blank(head_mask, alpha)
        if self.model is None:
            return self.paste(head_rgb, alpha, frame, blank)
        side = frame.shape[2]
        if side == self.trained_size or not self.trained_size:
            return self._inpaint(head_rgb, alpha, frame, blank, self.plate)
        # Another output size: a U-Net's fills have the scale it was trained at, so inpaint at
        # that size and use the result only to fill the blanked background; head and body stay sharp.
        t = self.trained_size
        head_t, alpha_t, frame_t, plate_t = (_resize(x, t) for x in (head_rgb, alpha, frame, self.plate))
        fill = _resize(self._inpaint(head_t, alpha_t, frame_t, (_resize(blank, t) > 0.5).float(), plate_t), side)
        return (head_rgb + (1 - alpha) * (frame * (1 - blank) + fill * blank)).clamp(0, 1)

    def _inpaint(self, head_rgb: Tensor, alpha: Tensor, frame: Tensor, blank: Tensor, plate: Tensor) -> Tensor:
        with torch.autocast(frame.device.type, dtype=torch.float16, enabled=self.half):
            out = self.model(head_rgb, alpha, frame, blank, plate)
        return out.float().clamp(0, 1)


def _resize(x: Tensor, side: int) -> Tensor:
    """BHWC resize: area filter down (anti-aliased), bilinear up."""
    mode = "area" if side < x.shape[1] else "bilinear"
    y = F.interpolate(x.permute(0, 3, 1, 2), size=(side, side), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return y.permute(0, 2, 3, 1)
