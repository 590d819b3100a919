"""Body inpainter: blends the rendered head into the body frame without a seam (GGTalker's Body Inpainter).

A pasted head never matches the body frame at the border: the jaw moves but the frame's neck
does not ("double chins"), the hair edge flickers. The frame's head region is therefore blanked
(dilated, so the neck/jaw gap is blanked too) and a small U-Net redraws the whole frame from the
rendered head (RGB + alpha) and the blanked frame (+ the blank mask).

The network predicts, per pixel, a fill colour and a blend weight. The fill is what the blank
hides (neck, collar, background behind the hair): it goes under the head exactly where a plate
would, `head + (1-alpha)·(frame outside the blank, fill inside)`. It is predicted as a residual on
the clip's clean background plate, `sigmoid(logit(plate) + r)`, and the residual's conv starts at
zero, so an untrained model is the plate paste (up to the repaint weight's 2 % start, below):
training starts from the baseline it must beat. The weight then lets the fill repaint the head itself inside the blank (a
jaw edge that does not meet the neck); it is zero outside the blank, so body pixels are the
frame's own, and starts near zero. The plate is also an input, so the network knows what the
residual is added to (synth `--background` swaps it for another image).

Why this split: an earlier version blended one colour over the black-filled paste with a single
weight everywhere. Filling the blank then needed that weight opened by gradients that also had to
keep it shut on every body pixel; from sigmoid(-4) it often never opened (the loss sat at the
paste's on CPU, and one H200 run left a tinted ring), and opening it wider washed semi-transparent
heads towards grey. The next one predicted the fill from scratch (a flat grey at step 0); where
the hidden region is plain static backdrop the plate is already exact, and that model lost to
the paste on held-out frames (retalk2: adapt rejected it, the paste shipped).

Cost at 512², channels 16-32-64-128 (the default): every 3x3 conv of c→c channels at a level
costs the same ~0.6 GMAC (channels double as pixels quarter); 4 encoder levels of two convs, 3
decoder convs with additive skips (cheaper than concatenation) and the output conv come to
11.6 GFLOP per frame (bench/bench_inpainter.py counts them). Measured on an H200 in fp16
(eager, blank-mask dilation and the fp32 fill included): 0.82 ms at batch 1, 0.43 ms per frame at batch 8
(bench/results/bench_inpainter_cuda.json), inside the 1 ms budget. Convs this narrow run far
below the tensor cores' peak (≈35 TFLOP/s at batch 8); batch 8 halving the per-frame time says
batch 1 is partly launch-bound (`--compile` adds CUDA-graph rows to measure that).

Layout: tensors are BHWC like the rest of the pipeline; the BHWC→BCHW permute is exactly
PyTorch's channels_last memory format, so the convs run channels_last without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import ssim
from ..metrics import dilate

Tensor = torch.Tensor
IN_CHANNELS = 11  # head rgb 3 + alpha 1 + blanked frame 3 + blank mask 1 + plate 3
PLATE_EPS = 1e-3  # plate clamped into [eps, 1-eps] before the logit: a finite start for pure black/white


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


def paste(head_rgb: Tensor, alpha: Tensor, frame: Tensor, blank: Tensor, fill: Tensor | None = None) -> Tensor:
    """The plain composite: head (premultiplied, rendered over black) over the frame, its blanked
    region taken from `fill` (B,H,W,3 or broadcastable; black without one).

    With the clip's clean background plate as the fill this is the "without inpainter" baseline
    eval reports; the inpainter uses it with its own predicted fill.
    """
    hidden = frame * (1 - blank) if fill is None else frame * (1 - blank) + fill * blank
    return head_rgb + (1 - alpha) * hidden


def blank_mask(head_mask: Tensor, alpha: Tensor, radius: int | Sequence[int]) -> Tensor:
    """(B,H,W,1) region to blank: frame head mask ∪ rendered head (alpha > ½), dilated by radius.

    The union matters at synthesis, where the rendered jaw may reach below the replayed frame's
    own head. `radius` is one int or one per sample.
    """
    region = torch.maximum(head_mask.float(), (alpha > 0.5).float())[..., 0]
    if isinstance(radius, int):
        return dilate(region, radius)[..., None]
    return torch.stack([dilate(m, int(r)) for m, r in zip(region, radius)])[..., None]


def random_dilated_mask(head_mask: Tensor, alpha: Tensor, radius_range: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """blank_mask with a radius drawn per sample from [lo, hi]: so the model learns to fill neck
    and jaw gaps of every width it can meet at synthesis, not one fixed band."""
    lo, hi = radius_range
    radii = torch.randint(lo, hi + 1, (len(head_mask),), generator=generator).tolist()
    return blank_mask(head_mask, alpha, radii)


class Inpainter(nn.Module):
    """A 4-level U-Net (additive skips) predicting the blank's fill + a head-repaint weight."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        c = list(channels)
        self.levels = len(c)
        self.enc = nn.ModuleList([nn.Sequential(_conv(IN_CHANNELS, c[0]), _conv(c[0], c[0]))])
        self.enc.extend(nn.Sequential(_conv(c[i - 1], c[i], stride=2), _conv(c[i], c[i])) for i in range(1, len(c)))
        # 1x1 at the coarse level (cheap) to the finer level's width, upsample, add skip, 3x3
        self.lateral = nn.ModuleList(nn.Conv2d(c[i], c[i - 1], 1) for i in range(1, len(c)))
        self.dec = nn.ModuleList(_conv(c[i - 1], c[i - 1]) for i in range(1, len(c)))
        self.out = nn.Conv2d(c[0], 4, 3, 1, 1)
        nn.init.zeros_(self.out.weight)  # fill residual 0: the model starts as the plate paste
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.out.bias[3] = -4.0  # repaint weight sigmoid(-4) ≈ 0.02: start with the head as rendered

    def forward(self, head_rgb: Tensor, alpha: Tensor, frame: Tensor, blank: Tensor, plate: Tensor) -> Tensor:
        """BHWC in, BHWC out: head (B,H,W,3) premultiplied, alpha (B,H,W,1), frame (B,H,W,3)
        (blanked here, so the network can never see the hidden pixels), blank (B,H,W,1), plate
        (B or 1,H,W,3) the background the fill is a residual on. The logit/sigmoid run in fp32 (fp16's
        steps near 0 and 1 are coarse for a logit); the frame comes back in the inputs' dtype."""
        h, w = frame.shape[1:3]
        step = 2 ** (self.levels - 1)
        if h % step or w % step:
            raise ValueError(f"inpainter input {h}x{w}: sides must be multiples of {step}")
        plate = plate.expand_as(frame)
        x = torch.cat([head_rgb, alpha, frame * (1 - blank), blank, plate], dim=-1).permute(0, 3, 1, 2)
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
        for i in reversed(range(self.levels - 1)):
            x = F.interpolate(self.lateral[i](x), scale_factor=2, mode="bilinear", align_corners=False)
            x = self.dec[i](x + skips[i])
        y = self.out(x).permute(0, 2, 3, 1).float()
        fill = torch.sigmoid(torch.logit(plate.float(), eps=PLATE_EPS) + y[..., :3])
        weight = torch.sigmoid(y[..., 3:]) * blank
        return (weight * fill + (1 - weight) * paste(head_rgb, alpha, frame, blank, fill)).to(frame.dtype)


def inpainter_loss(pred: Tensor, target: Tensor, seam: Tensor, ssim_weight: float = 0.2, seam_weight: float = 2.0) -> Tensor:
    """L1 + ssim_weight·(1 - SSIM) + seam_weight·L1 on the seam band (BHWC, seam (B,H,W,1) bool).

    The seam band is a few percent of the pixels, so without its own term the loss is dominated
    by the body pixels that are already right; the seam is where a paste visibly fails.
    """
    pred, target = pred.float(), target.float()
    err = (pred - target).abs()
    band = seam.float()
    seam_l1 = (err * band).sum() / (band.sum() * 3).clamp(min=1.0)
    return err.mean() + ssim_weight * (1 - ssim(pred, target)) + seam_weight * seam_l1


