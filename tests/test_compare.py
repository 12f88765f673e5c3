"""funcopt.compare: the harness finds an injected divergence and its step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import funcopt as fo
from funcopt import compare as C

LR = 0.01


def _run(opt, steps=8, **kw):
    model, torch_loss, loss, batches = C.demo_problem(steps=steps)
    topt = torch.optim.RMSprop(model.parameters(), lr=LR)
    return C.compare(
        model, torch_loss, topt, loss, opt, batches, rtol=1e-9, atol=1e-12, **kw
    )


def test_faithful_port_does_not_diverge(x64):
    report = _run(fo.rmsprop(lr=LR))
    assert report.first_divergence is None, report.summary()
    assert len(report.steps) == 8
    assert max(s.param_rel for s in report.steps) < 1e-12


def test_optax_rmsprop_diverges_at_the_first_step(x64):
    report = _run(optax.rmsprop(LR, decay=0.99, eps=1e-8))
    assert report.first_divergence == 1, report.summary()
    assert "step 1" in report.summary()


def test_divergence_injected_later_is_named(x64):
    start = 6
    opt = C.switch_at(start, fo.rmsprop(lr=LR), optax.rmsprop(LR, decay=0.99))
    report = _run(opt)
    assert report.first_divergence == start, report.summary()
    before = [s for s in report.steps if s.step < start]
    assert all(not s.diverged and s.param_rel < 1e-12 for s in before)
    assert report.steps[start - 1].param_abs > 1e-9


def test_scheduler_pairs_are_stepped(x64):
    model, torch_loss, loss, batches = C.demo_problem(steps=6)
    topt = torch.optim.RMSprop(model.parameters(), lr=LR)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
    report = C.compare(
        model, torch_loss, topt, loss, fo.rmsprop(lr=LR), batches,
        torch_scheduler=tsched, scheduler=fo.lr_scheduler.step_lr(2, 0.5),
        rtol=1e-9, atol=1e-12,
    )  # fmt: skip
    assert report.first_divergence is None, report.summary()
    # a scheduler on one side only is a divergence
    model, torch_loss, loss, batches = C.demo_problem(steps=6)
    topt = torch.optim.RMSprop(model.parameters(), lr=LR)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
    report = C.compare(
        model, torch_loss, topt, loss, fo.rmsprop(lr=LR), batches,
        torch_scheduler=tsched, rtol=1e-9, atol=1e-12,
    )  # fmt: skip
    assert report.first_divergence == 3, report.summary()


def test_cli_writes_a_png(tmp_path, capsys):
    out = tmp_path / "div.png"
    assert C.main(["--steps", "5", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "fo.rmsprop" in text and "first divergence" in text


# --------------------------------------------------------------------------
# a loop shaped like a real one: BatchNorm buffers, AdamW with nanoGPT's
# decay / no_decay groups, accumulation over 2 micro-batches, clip_grad_norm_
# 1.0, warm-up + cosine per step or StepLR per epoch
# --------------------------------------------------------------------------

ACCUM, CLIP, MAX_LR, WARMUP, TOTAL, MIN_LR = 2, 1.0, 3e-2, 3, 10, 3e-3
BN_EPS, BN_MOMENTUM = 1e-5, 0.1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 12, bias=False)  # BN follows
        self.bn = torch.nn.BatchNorm1d(12)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.fc1(x))))


def torch_loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def make_loss(momentum=BN_MOMENTUM, ddof_norm=0):
    """The JAX port: returns (loss, new_buffers), as torch's train-mode forward."""

    def loss(params, buffers, batch):
        x, y = batch
        p, bn = params, buffers["bn"]
        h = x @ p["fc1"]["weight"].T
        mean, n = jnp.mean(h, 0), h.shape[0]
        var = jnp.mean((h - mean) ** 2, 0)
        norm_var = var * n / (n - ddof_norm)
        h = (h - mean) / jnp.sqrt(norm_var + BN_EPS)
        h = h * p["bn"]["weight"] + p["bn"]["bias"]
        out = jnp.tanh(h) @ p["head"]["weight"].T + p["head"]["bias"]
        new_bn = {
            "running_mean": momentum * mean + (1 - momentum) * bn["running_mean"],
            "running_var": momentum * var * n / (n - 1)
            + (1 - momentum) * bn["running_var"],
            "num_batches_tracked": bn["num_batches_tracked"] + 1,
        }
        return jnp.mean((out - y) ** 2), {**buffers, "bn": new_bn}

    return loss


def real_batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(16, 5))
        y = np.stack([np.sin(3 * x[:, 0]), x[:, 1] * x[:, 2], np.cos(x.sum(1))], 1)
        out.append((x, 2.0 * y))
    return out


def torch_setup(model):
    """nanoGPT's configure_optimizers: decay the >= 2-dim parameters only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": 0.1},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=MAX_LR, betas=(0.9, 0.95))


def fo_adamw(no_decay=True):
    def labels(params):
        return jax.tree.map(lambda p: "default" if p.ndim >= 2 else "no_decay", params)

    overrides = {"no_decay": {"weight_decay": 0.0 if no_decay else 0.1}}
    return fo.adamw(
        lr=MAX_LR, betas=(0.9, 0.95), weight_decay=0.1,
        param_groups=fo.param_groups(labels, overrides),
    )  # fmt: skip


def nanogpt_lr(it):
    """nanoGPT's get_lr: linear warm-up, then cosine to MIN_LR."""
    if it < WARMUP:
        return MAX_LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (TOTAL - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (MAX_LR - MIN_LR)


def run_real(loss=None, opt=None, steps=TOTAL, **kw):
    torch.manual_seed(0)
    model = Net().double().train()
    topt = torch_setup(model)
    if "torch_scheduler" in kw:
        kw["torch_scheduler"] = kw["torch_scheduler"](topt)
    return C.compare(
        model, torch_loss, topt, loss or make_loss(), opt or fo_adamw(),
        real_batches(ACCUM * steps), buffers=True, accumulate=ACCUM,
        clip_grad_norm=CLIP, rtol=1e-10, atol=1e-12, **kw,
    )  # fmt: skip


def assert_agrees(report):
    assert report.first_divergence is None, report.summary()
    assert len(report.steps) == TOTAL
    assert max(s.param_rel for s in report.steps) < 1e-10, report.summary()
    assert max(s.buffer_rel for s in report.steps) < 1e-10, report.summary()
    assert max(s.loss_rel for s in report.steps) < 1e-10, report.summary()
    norms = [s.grad_norm_torch for s in report.steps]
    assert min(norms) < CLIP < max(norms), norms  # the clip both bites and not
    for s in report.steps:
        assert s.grad_norm_funcopt == pytest.approx(s.grad_norm_torch, rel=1e-10)
        np.testing.assert_allclose(s.lr_funcopt, s.lr_torch, rtol=1e-12)
    assert report.has_buffers and "buffer rel" in report.summary()


def test_real_loop_nanogpt_lr_callback(x64):
    report = run_real(lr_fn=nanogpt_lr)
    assert_agrees(report)
    lrs = [s.lr_torch[0] for s in report.steps]
    assert lrs == [nanogpt_lr(i) for i in range(TOTAL)]
    assert all(s.lr_torch[0] == s.lr_torch[1] for s in report.steps)


def warmup_cosine_torch(topt):
    S = torch.optim.lr_scheduler
    warm = S.LinearLR(topt, start_factor=0.1, total_iters=WARMUP)
    cos = S.CosineAnnealingLR(topt, T_max=TOTAL - WARMUP, eta_min=MIN_LR)
    return S.SequentialLR(topt, [warm, cos], milestones=[WARMUP])


def warmup_cosine(milestone=WARMUP):
    S = fo.lr_scheduler
    warm = S.linear_lr(start_factor=0.1, total_iters=WARMUP)
    cos = S.cosine_annealing_lr(T_max=TOTAL - WARMUP, eta_min=MIN_LR)
    return S.sequential_lr([warm, cos], milestones=[milestone])


def test_real_loop_warmup_cosine_per_step(x64):
    report = run_real(torch_scheduler=warmup_cosine_torch, scheduler=warmup_cosine())
    assert_agrees(report)
    lrs = [s.lr_torch[0] for s in report.steps]
    assert lrs[0] == pytest.approx(0.1 * MAX_LR) and max(lrs) == pytest.approx(MAX_LR)


def test_real_loop_step_lr_per_epoch(x64):
    per_epoch = 2  # optimizer steps (of 2 micro-batches) per epoch
    report = run_real(
        torch_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
        scheduler=fo.lr_scheduler.step_lr(2, gamma=0.5),
        scheduler_every=per_epoch,
    )
    assert_agrees(report)
    lrs = [s.lr_torch[0] for s in report.steps]
    # epochs of 2 steps, the lr halves every 2 epochs: it changes at steps 5, 9
    assert lrs == [MAX_LR] * 4 + [MAX_LR / 2] * 4 + [MAX_LR / 4] * 2


# -- deliberate divergences: each port has one bug, the report names it ------


def test_wrong_bn_momentum_shows_in_buffers_only(x64):
    """Train-mode BatchNorm normalises with the batch statistics, so a wrong
    running-stat momentum leaves loss, grads and params exact: only the
    buffer comparison catches it."""
    report = run_real(loss=make_loss(momentum=0.01), lr_fn=nanogpt_lr)
    assert report.first_divergence == 1, report.summary()
    assert all(s.failed == ("buffers",) for s in report.steps), report.summary()
    assert report.steps[0].worst_buffer.startswith("bn.running_")
    assert max(s.param_rel for s in report.steps) < 1e-10
    assert "diverged: buffers (bn.running_" in report.summary()


def test_decay_on_every_group_shows_in_params(x64):
    """Forgetting the no_decay group: the gradients agree, the parameters not."""
    report = run_real(opt=fo_adamw(no_decay=False), lr_fn=nanogpt_lr)
    first = report.steps[0]
    assert report.first_divergence == 1 and first.failed == ("params",), first
    assert first.grad_rel < 1e-10
    assert first.worst_param in ("bn.weight", "bn.bias", "head.bias")


def test_unbiased_normalisation_shows_in_loss_and_grads(x64):
    report = run_real(loss=make_loss(ddof_norm=1), lr_fn=nanogpt_lr)
    assert report.first_divergence == 1
    assert {"loss", "grads", "params"} <= set(report.steps[0].failed)


def test_warmup_milestone_off_by_one_is_named(x64):
    """The cosine phase starting one step late. The warm-up ends at MAX_LR
    where the cosine starts, so step WARMUP + 1 still gets the right lr; step
    WARMUP + 2 is the first with a wrong one, and the report flags it there."""
    report = run_real(
        torch_scheduler=warmup_cosine_torch, scheduler=warmup_cosine(WARMUP + 1)
    )
    first = WARMUP + 2
    assert report.first_divergence == first, report.summary()
    assert report.steps[first - 1].failed == ("params", "lr"), report.summary()
    assert report.steps[first - 1].grad_rel < 1e-10  # the lr, not the gradients
    assert all(s.param_rel < 1e-10 for s in report.steps[: first - 1])


def test_accumulation_needs_whole_steps(x64):
    torch.manual_seed(0)
    model = Net().double()
    with pytest.raises(ValueError, match="accumulate=2"):
        C.compare(
            model, torch_loss, torch_setup(model), make_loss(), fo_adamw(),
            real_batches(3), buffers=True, accumulate=2,
        )  # fmt: skip
    with pytest.raises(ValueError, match="ran out"):
        C.compare(
            model, torch_loss, torch_setup(model), make_loss(), fo_adamw(),
            iter(real_batches(3)), buffers=True, accumulate=2,
        )  # fmt: skip


def test_scheduler_every_callback(x64):
    """scheduler_every(k) decides after which steps both schedulers step."""
    model, torch_loss, loss, batches = C.demo_problem(steps=6)
    topt = torch.optim.RMSprop(model.parameters(), lr=LR)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=1, gamma=0.5)
    report = C.compare(
        model, torch_loss, topt, loss, fo.rmsprop(lr=LR), batches,
        torch_scheduler=tsched, scheduler=fo.lr_scheduler.step_lr(1, 0.5),
        scheduler_every=lambda k: k in (2, 3), rtol=1e-9, atol=1e-12,
    )  # fmt: skip
    assert report.first_divergence is None, report.summary()
    lrs = [s.lr_torch[0] for s in report.steps]
    assert lrs == [LR, LR, LR / 2, LR / 4, LR / 4, LR / 4]
    assert [s.lr_funcopt[0] for s in report.steps] == pytest.approx(lrs, rel=1e-15)
