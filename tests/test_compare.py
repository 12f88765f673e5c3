"""funcopt.compare: the harness finds an injected divergence and its step."""

from __future__ import annotations

import optax
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
