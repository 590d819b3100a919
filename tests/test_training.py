"""The shared training loop: divergence, hooks, early stop, interruption and exact resume."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from ggtalker_cli import training
from ggtalker_cli.errors import Exit, GGError


def _toy(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int):
    """One step whose data and dropout come from (seed, step) only."""

    def step(i: int) -> dict[str, torch.Tensor]:
        training.seed_torch(seed, i)
        x = torch.as_tensor(training.generator(seed, i).normal(size=(16, 4)), dtype=torch.float32)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    return step


def test_divergence_names_trainer_step_and_fix():
    loop = training.Loop("toy prior", 10, fix="lower toy.lr")
    with pytest.raises(GGError) as e:
        loop.run(lambda i: {"loss": float("nan") if i == 3 else 1.0})
    assert e.value.code == Exit.DIVERGED
    assert str(e.value) == "toy prior diverged at step 3 (loss nan); lower toy.lr"


def test_sparse_checks_still_check_the_last_step():
    seen = []
    loop = training.Loop("toy", 7, check_every=5)
    with pytest.raises(GGError, match="at step 6"):
        loop.run(lambda i: seen.append(i) or {"loss": float("inf") if i == 6 else 1.0})
    assert seen == list(range(7))


def test_hooks_run_on_their_period_and_after_the_last_step():
    calls = []
    loop = training.Loop("toy", 10).every(4, lambda done: calls.append(("val", done)) or "status")
    loop.every(5, lambda done: calls.append(("log", done)))
    assert loop.run(lambda i: {"loss": float(i)}) == 10
    assert calls == [("val", 4), ("log", 5), ("val", 8), ("val", 10), ("log", 10)]
    assert loop.values == {"loss": 9.0}  # hooks see the step they follow


def test_stop_ends_after_the_current_step_and_runs_hooks():
    calls = []
    loop = training.Loop("toy", 100)
    loop.every(50, calls.append)
    best = training.Best(patience=2)
    values = [3.0, 2.0, 2.5, 2.6, 1.0]

    def step(i: int) -> dict[str, float]:
        if not best.offer(values[i], i, torch.nn.Linear(1, 1)) and best.exhausted:
            loop.stop()
        return {"loss": values[i]}

    assert loop.run(step) == 4
    assert calls == [4] and best.value == 2.0 and best.step == 1


def test_signal_checkpoints_then_interrupts():
    saved = []

    def step(i: int) -> dict[str, float]:
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
        return {"loss": 1.0}

    loop = training.Loop("toy", 10, checkpoint=saved.append, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        loop.run(step)
    assert saved == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_periodic_and_final_checkpoints():
    saved = []
    training.Loop("toy", 10, checkpoint=saved.append, checkpoint_every=4).run(lambda i: {"loss": 1.0})
    assert saved == [4, 8]
    saved.clear()
    training.Loop("toy", 10, checkpoint=saved.append, checkpoint_every=4, checkpoint_last=True).run(lambda i: {"loss": 1.0})
    assert saved == [4, 8, 10]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    """Checkpoint at step 6, reload into fresh objects, continue: weights bit-identical."""
    model, opt = _toy()
    training.Loop("toy", 12).run(_step(model, opt, seed=5))
    reference = [p.detach().clone() for p in model.parameters()]

    ckpt = tmp_path / "toy.ckpt"
    model, opt = _toy()

    def checkpoint(done: int) -> None:
        training.save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": done})

    training.Loop("toy", 6, checkpoint=checkpoint, checkpoint_last=True).run(_step(model, opt, seed=5))
    model, opt = _toy(seed=99)  # a fresh process: other initial weights, other global RNG state
    saved = training.load(ckpt)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    training.Loop("toy", 12, start=saved["step"]).run(_step(model, opt, seed=5))
    for a, b in zip(reference, model.parameters()):
        assert torch.equal(a, b)
    assert training.load(tmp_path / "absent.ckpt") is None


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = training.warmup_cosine(opt, steps=100, warmup=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(lrs[9], rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_phase_one_hooks_start_after_the_first_step():
    """A log at phase 1 records the untrained loss (step 0) and then every period, as adapt's does."""
    calls = []
    training.Loop("toy", 10).every(4, calls.append, phase=1).run(lambda i: {"loss": 1.0})
    assert calls == [1, 5, 9, 10]


def test_ema_averages_and_swaps_back():
    """The average follows the weights at rate 1 - decay; inside `applied` the weights are the
    average (what validation scores and Best keeps), after it their own values again."""
    w = torch.nn.Parameter(torch.zeros(3))
    ema = training.EMA([w], decay=0.9)
    for _ in range(10):
        with torch.no_grad():
            w.add_(1.0)
        ema.update()
    expected = sum(0.1 * 0.9**k * (10 - k) for k in range(10))  # Σ (1 - d) d^k w_(10-k), started at 0
    assert torch.allclose(ema.shadow[0], torch.full((3,), expected))
    with ema.applied():
        assert torch.allclose(w, torch.full((3,), expected))
        kept = w.detach().clone()
    assert torch.equal(w.detach(), torch.full((3,), 10.0)) and not torch.equal(kept, w.detach())
