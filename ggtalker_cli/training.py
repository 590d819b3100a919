"""One training loop for every trainer (head, inpainter, A2E prior and adaptation, E2V prior).

Each trainer owns its model, data and loss and hands this module one function, `step(i)`, that
runs training step `i` and returns its loss terms. `Loop` does everything else the same way
everywhere, so a fix to interruption, resume or divergence handling lands in all five at once:

- steps `[start, steps)` under a rich progress bar with ETA (`console.progress`);
- a divergence check: the step's `loss` must be finite on every `check_every`-th step (a
  `.item()` is a device sync, so fast GPU loops check less often) and a non-finite loss raises
  one DIVERGED line naming the trainer, the step and the setting to lower;
- periodic hooks (validation, log rows, early stopping) whose return value becomes the bar's
  status text;
- a checkpoint callback every `checkpoint_every` steps and when SIGINT/SIGTERM arrives: the
  signal sets a flag, the step in flight finishes, the state is saved and `KeyboardInterrupt`
  reaches the CLI, which exits 130 ("re-run with --resume"); a second signal while saving falls
  through to the default handler.

Randomness is drawn from `(seed, step)` (`generator`, `seed_torch`), never from a stream that
runs across steps, so a run resumed at step k draws exactly what an uninterrupted one draws
from step k on: CPU resume is bit-exact (tests/test_reliability.py).

`save`/`load` are the atomic torch checkpoint used by trainers whose state is one dict;
`warmup_cosine`, `Best` and `EMA` are the schedule, best-weights bookkeeping and weight average
the priors share.
"""

from __future__ import annotations

import contextlib
import io
import math
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import console
from .artifacts import atomic_write_bytes, load_checkpoint
from .errors import Exit, GGError

Terms = dict[str, Tensor | float]
Hook = Callable[[int], "str | None"]


def generator(seed: int, *keys: int) -> np.random.Generator:
    """numpy randomness of one step (or epoch, rank...): a pure function of (seed, *keys)."""
    return np.random.default_rng([seed, *keys])


def seed_torch(seed: int, *keys: int) -> None:
    """Seed torch's global generator for one step (dropout, noise) from (seed, *keys)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> 1))


class _Signals:
    """SIGINT/SIGTERM set a flag instead of killing the process mid-step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Loop:
    """Run `step(i)` for i in [start, steps) with checks, hooks, checkpoints and a progress bar.

    `fix` completes the divergence message ("lower inpainter.lr"); `checkpoint(done)` saves the
    state after `done` steps; with `checkpoint_last` it is also called after the final step
    (trainers that export separately leave it off).
    """

    def __init__(
        self,
        name: str,
        steps: int,
        *,
        start: int = 0,
        fix: str = "lower the learning rate in the preset",
        check_every: int = 1,
        checkpoint: Callable[[int], None] | None = None,
        checkpoint_every: int = 0,
        checkpoint_last: bool = False,
    ) -> None:
        self.name, self.steps, self.start, self.fix = name, steps, start, fix
        self.check_every = max(1, check_every)
        self.checkpoint, self.checkpoint_every, self.checkpoint_last = checkpoint, checkpoint_every, checkpoint_last
        self.hooks: list[tuple[int, int, Hook]] = []
        self.values: dict[str, float] = {}  # the last checked step's terms, as floats
        self.done = start
        self._stop = False

    def every(self, period: int, hook: Hook, phase: int = 0) -> Loop:
        """Call `hook(done)` after each step where done % period == phase and after the last one.

        phase 1 also runs it after the first step: a training log that starts at the untrained loss.
        """
        period = max(1, period)
        self.hooks.append((period, phase % period, hook))
        return self

    def stop(self) -> None:
        """End after the current step (early stopping, a data stream that ran out)."""
        self._stop = True

    def _check(self, i: int, terms: Terms) -> None:
        self.values = {k: float(v) for k, v in terms.items()}
        loss = self.values.get("loss", 0.0)
        if not math.isfinite(loss):
            raise GGError(f"{self.name} diverged at step {i} (loss {loss}); {self.fix}", Exit.DIVERGED)

    def run(self, step: Callable[[int], Terms]) -> int:
        """Train; returns the number of steps done (less than `steps` when stopped early)."""
        with _Signals() as signals, console.progress() as bar:
            task = bar.add_task(self.name, total=self.steps, completed=self.start)
            for i in range(self.start, self.steps):
                terms = step(i)
                self.done = i + 1
                last = self.done == self.steps
                due = [hook for period, phase, hook in self.hooks if self.done % period == phase or last or self._stop]
                if due or last or self.done % self.check_every == 0:  # hooks read `values`: check them first
                    self._check(i, terms)
                for hook in due:
                    status = hook(self.done)
                    if status:
                        bar.update(task, status=status)
                bar.update(task, completed=self.done)
                periodic = self.checkpoint_every > 0 and self.done % self.checkpoint_every == 0 and not last
                if self.checkpoint is not None and (signals.received is not None or periodic or (last and self.checkpoint_last)):
                    self.checkpoint(self.done)
                if signals.received is not None:
                    raise KeyboardInterrupt
                if self._stop:
                    break
        return self.done


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then a cosine decay to 0 at `steps`."""

    def factor(s: int) -> float:
        return min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Best:
    """The best validation value so far and a CPU-free copy of the weights that reached it.

    `patience` counts validations without improvement (early stopping); 0 never exhausts.
    """

    def __init__(self, patience: int = 0) -> None:
        self.value, self.step, self.state, self.patience, self.bad = math.inf, 0, None, patience, 0

    def offer(self, value: float, step: int, model: nn.Module) -> bool:
        """Record `value` at `step`; keep `model`'s weights when it is the best so far."""
        if value < self.value:
            self.value, self.step, self.bad = value, step, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step, "state": self.state, "bad": self.bad}

    def load(self, saved: dict[str, Any]) -> None:
        self.value, self.step, self.state, self.bad = saved["value"], saved["step"], saved["state"], saved["bad"]


class EMA:
    """An exponential moving average of some tensors (weights), swapped in by `applied()` to
    validate or keep them: the average of the last ~1 / (1 - decay) steps is a smoother estimate
    than the weights of whichever step a validation lands on."""

    def __init__(self, tensors: list[Tensor], decay: float) -> None:
        self.tensors, self.decay = tensors, decay
        self.shadow = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def update(self) -> None:
        for s, t in zip(self.shadow, self.tensors):
            s.lerp_(t.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The tensors hold the average inside the block and their own values again after it."""
        own = [t.detach().clone() for t in self.tensors]
        with torch.no_grad():
            for s, t in zip(self.shadow, self.tensors):
                t.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for o, t in zip(own, self.tensors):
                    t.copy_(o)


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write a torch checkpoint atomically: a crash mid-write leaves the previous one intact."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load(path: Path, device: Any = "cpu") -> dict[str, Any] | None:
    """The checkpoint at `path` (tensors and containers only), or None when there is none."""
    return load_checkpoint(Path(path), device) if Path(path).is_file() else None
