"""The cross-identity priors: how fit-prior trains them, and how adapt starts from one.

fit-prior: each part (`a2e`, `e2v`) has one trainer in `TRAINERS` (`parse_parts` checks
`--parts` against them); a trainer writes its weights into the partial prior folder and returns
the summary stored under `parts.<name>` in meta.yaml. Validation holds out whole identities
(`choose_holdout`: the people named, else every k-th person by name; a person, `clip.person`, is
all of their clips). `plot_curves` draws the parts'
validation curves (val_loss.png).

adapt: `choose_prior` picks the prior `adapt` starts from (the one given, the repository's default, or
none); `init_from_prior` runs the prior's E2V generator (`models/e2v.py`) on a few of the clip's
training frames and returns the avatar the head fit starts from instead of the grey scratch map.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import artifacts, console
from .avatar import Avatar
from .clip import Clip, person
from .clip_view import Data
from .config import Config
from .errors import Exit, GGError
from .face_model import HeadModel
from .gaussians import GaussianMap
from .models.color_mlp import ColorMLP
from .models.e2v import COLOR, E2V, LOG_SCALE, WEIGHTS, unwrap, with_topology

DEFAULT_PRIOR = Path(__file__).resolve().parents[1] / "priors" / "default"
PRIOR_NOTE = (  # meta.yaml's note of every prior
    "Research/non-commercial: trained on third-party footage of real people (see the clips' sources); "
    "do not redistribute it or use it to impersonate anyone."
)


def _train_a2e(clips: list[Path], holdout: list[str], work: Path, cfg: Config, device: str, resume: bool, rank: int, world: int) -> dict:
    from .a2e_train import train_prior

    return train_prior(clips, holdout, work, cfg.a2e, device, resume, rank, world)


def _train_e2v(clips: list[Path], holdout: list[str], work: Path, cfg: Config, device: str, resume: bool, rank: int, world: int) -> dict:
    from .e2v_train import train_prior

    return train_prior(clips, holdout, work, cfg, device, resume, rank, world)


# Part name -> trainer(clips, holdout, work, cfg, device, resume, rank, world) -> summary dict.
TRAINERS: dict[str, Callable[..., dict]] = {"a2e": _train_a2e, "e2v": _train_e2v}
KNOWN_PARTS = ("a2e", "e2v")


def parse_parts(text: str) -> list[str]:
    """'a2e,e2v' → ['a2e', 'e2v']: known names, no repeats, each with a trainer."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in KNOWN_PARTS]
    if not parts or unknown:
        raise GGError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KNOWN_PARTS)}", Exit.USAGE)
    missing = [p for p in parts if p not in TRAINERS]
    if missing:
        raise GGError(f"--parts {','.join(missing)}: no trainer for this part in this version of ggtalker yet; use --parts {','.join(TRAINERS)}", Exit.USAGE)
    return list(dict.fromkeys(parts))


def choose_holdout(clips: list[Path], named: list[str], fraction: float) -> list[str]:
    """The clips (folder names) held out for validation: every clip of each held-out person.

    `named` are clip or person names; without them every k-th person (by name) is held out. A
    person is held out whole, so validation is on voices and faces the prior never trained on.
    """
    names = [p.resolve().name for p in clips]
    if len(set(names)) != len(names):
        raise GGError(f"clip folders must have distinct names (they name clips): {', '.join(names)}", Exit.USAGE)
    people = [person(p) for p in clips]
    if named:
        unknown = [n for n in named if n not in names and n not in people]
        if unknown:
            raise GGError(f"--holdout {', '.join(unknown)}: not among the clips ({', '.join(names)})", Exit.USAGE)
        held = {people[names.index(n)] if n in names else n for n in named}
    else:
        distinct = sorted(set(people))
        if len(distinct) < 3:
            return []
        k = max(1, round(fraction * len(distinct)))
        held = set(distinct[len(distinct) // (2 * k) :: max(1, len(distinct) // k)][:k])
    return sorted(n for n, who in zip(names, people) if who in held)


def plot_curves(path: Path, parts: dict[str, dict]) -> None:
    """Each part's validation (and batch training) loss over its steps, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, summary in parts.items():
        curve = summary.get("curve") or []
        if curve:
            ax.plot([c["step"] for c in curve], [c["val"] for c in curve], label=f"{name} val")
            ax.plot([c["step"] for c in curve], [c["train"] for c in curve], ls=":", alpha=0.6, label=f"{name} train (batch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    artifacts.atomic_write_bytes(path, buffer.getvalue())


def choose_prior(prior: Path | None, no_prior: bool) -> Path | None:
    """The prior `adapt` starts from: the one given, else the repository's priors/default when
    this checkout has one, else none (scratch); `no_prior` forces scratch."""
    if no_prior:
        if prior is not None:
            raise GGError("--prior and --no-prior exclude each other; pass one of them", Exit.USAGE)
        return None
    if prior is None and (DEFAULT_PRIOR / artifacts.META).is_file():
        try:  # a default prior outdated by a newer head model must not stop adapt
            E2V.load(DEFAULT_PRIOR / WEIGHTS)
        except GGError as e:
            console.warn(f"{e.message}; adapting from scratch (`python -m bench.priors_at_scale gpu --fit-steps N` re-fits it)")
            return None
        console.info(f"adapt: starting from the default prior {DEFAULT_PRIOR} (--no-prior: from scratch)")
        return DEFAULT_PRIOR
    return prior


def reference_frames(pose: np.ndarray, frames: np.ndarray, n: int) -> np.ndarray:
    """n frames spread over head yaw (quantiles of the face axis' x component): more of the
    head is seen than from n neighbouring frames."""
    order = frames[np.argsort(pose[frames, 0, 2], kind="stable")]
    return np.unique(order[np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int)])


@torch.no_grad()
def init_from_prior(prior_dir: Path, clip: Clip, head: HeadModel, cfg: Config) -> Avatar:
    """The avatar adapt starts from: the prior's map predicted from the clip's training frames.

    `head` is the identity's fitted head (on the training device); the returned avatar uses the
    prior's topology and carries the prior's colour MLP. When `adapt.uv_res` is a multiple of
    the prior's resolution, the prediction is carried over to it (`_finer`); otherwise the
    prior's resolution is kept.
    """
    path = artifacts.inside(prior_dir, WEIGHTS)
    if not path.is_file():
        raise GGError(f"{prior_dir}: no {WEIGHTS}; train the prior with `ggtalker fit-prior --parts e2v`", Exit.ARTIFACT)
    device = head.neutral.device
    model, meta = E2V.load(path, device)
    model.eval()
    head = with_topology(head, model.head)
    data = Data(clip, int(meta.get("size", cfg.e2v.size)), device)
    frames = reference_frames(clip.tracking["pose"], data.train, cfg.e2v.adapt_sources)
    views = [data.load(i) for i in frames]
    idx = torch.as_tensor(frames, device=device)
    M = len(frames)
    refs = (
        torch.as_tensor(np.stack([v[0] for v in views]), device=device)[None],
        torch.as_tensor(np.stack([v[1] for v in views]), device=device)[None],
        head.vertices(data.verts[idx])[None],
        data.pose[idx][None],
        data.K.expand(1, M, 3, 3),
        torch.ones(1, M, dtype=torch.bool, device=device),
    )
    inputs = unwrap(model.template, *refs)
    uv_map = model(inputs)[0]
    res = model.arch["uv_res"]
    if cfg.adapt.uv_res > res and cfg.adapt.uv_res % res == 0:
        gmap = _finer(uv_map, inputs, GaussianMap(head, res, model.arch["feature_dim"]), GaussianMap(head, cfg.adapt.uv_res, model.arch["feature_dim"]), refs)
    else:
        if res != cfg.adapt.uv_res:
            console.info(f"adapt: using the prior's {res}² UV map (adapt.uv_res {cfg.adapt.uv_res} is not a multiple of it)")
        gmap = GaussianMap.from_state(head, {"uv_map": uv_map, "uv_alive": model.template.alive})
    gmap = gmap.to(device)
    color = ColorMLP(model.arch["feature_dim"], hidden=model.arch["hidden"]).to(device)
    color.load_state_dict(model.color.state_dict())
    console.info(f"adapt: initial {gmap.res}² map from the e2v prior {prior_dir} ({M} reference frames)")
    return Avatar(head, gmap, color)


def _finer(uv_map: Tensor, inputs: Tensor, coarse: GaussianMap, fine: GaussianMap, refs: tuple[Tensor, ...]) -> GaussianMap:
    """A map predicted at `coarse`'s resolution carried over to `fine`'s (fresh maps of the same head).

    Each fine texel takes its coarse parent's prediction, except: scales keep the fine map's own
    surface-tiling sizes plus the prediction's change over the coarse initial sizes (a child may
    bind to another triangle than its parent, and sizes are relative to the triangle), colours
    are unwrapped from the references at the fine resolution plus the prediction's correction of
    the coarse unwrap, and texels covered only at the fine resolution keep their initial values.
    """
    f = fine.res // coarse.res

    def up(x: Tensor) -> Tensor:
        return x.repeat_interleave(f, -2).repeat_interleave(f, -1)

    base = coarse.map.to(uv_map)
    parent = up(coarse.alive.to(uv_map.device))
    out = torch.where(parent, up(uv_map), fine.map.to(uv_map))
    out[LOG_SCALE] = fine.map[LOG_SCALE].to(uv_map) + torch.where(parent, up(uv_map[LOG_SCALE] - base[LOG_SCALE]), 0.0)
    correction = torch.where(parent, up(uv_map[COLOR] - torch.logit(inputs[0, :3].clamp(0.02, 0.98))), 0.0)
    out[COLOR] = torch.logit(unwrap(fine.to(uv_map.device), *refs)[0, :3].clamp(0.02, 0.98)) + correction
    return GaussianMap.from_state(fine.head, {"uv_map": out, "uv_alive": fine.alive})


