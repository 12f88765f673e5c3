"""Every scheduler against live torch: the lr sequence (and cycled momentum).

Each row of ``CASES`` draws valid arguments from a seeded rng and returns a
torch builder (``optimizer -> scheduler``) and the funcopt scheduler. Both
sides have two parameter groups with different lrs; funcopt steps eagerly and
under ``jax.jit``; the lrs must match torch's ``get_last_lr()`` to 1e-12
relative in float64.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as TS
from torch.optim import swa_utils

import funcopt as fo
from funcopt import lr_scheduler as S
from funcopt._hparams import _no_step_counts, hparams_only
from tests.torch_ref import assert_same_bits

RTOL = 1e-12
ATOL = 1e-16
STEPS = 120
SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------
# the two optimizers, side by side
# --------------------------------------------------------------------------


def torch_opt(kind: str, lrs, momentum: float = 0.9):
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    groups = [{"params": [a], "lr": lrs[0]}, {"params": [b], "lr": lrs[1]}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=momentum)
    return torch.optim.Adam(groups, lr=lrs[0], betas=(0.9, 0.999))


def fo_state(kind: str, lrs, momentum: float = 0.9):
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    groups = fo.param_groups({"a": "default", "b": "head"}, {"head": {"lr": lrs[1]}})
    if kind == "sgd":
        opt = fo.sgd(lr=lrs[0], momentum=momentum, param_groups=groups)
    else:
        opt = fo.adam(lr=lrs[0], betas=(0.9, 0.999), param_groups=groups)
    return opt.init(params)


def torch_momenta(opt) -> list[float]:
    if "betas" in opt.defaults:
        return [g["betas"][0] for g in opt.param_groups]
    return [g["momentum"] for g in opt.param_groups]


def fo_momenta(state) -> list[float]:
    try:
        return [float(b[0]) for b in fo.get_hparam(state, "betas")]
    except KeyError:
        return [float(m) for m in fo.get_hparam(state, "momentum")]


class Diff:
    """Asserts closeness and keeps the largest relative difference seen."""

    worst: dict[str, float] = {}

    def __init__(self, name):
        self.name = name

    def check(self, ours, theirs, what="lr"):
        ours = np.asarray([float(x) for x in ours])
        theirs = np.asarray([float(x) for x in theirs])
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL, err_msg=what)
        scale = np.maximum(np.abs(theirs), 1e-300)
        rel = float(np.max(np.abs(ours - theirs) / scale))
        key = f"{self.name}/{what}"
        Diff.worst[key] = max(Diff.worst.get(key, 0.0), rel)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    # rng -> (torch builder: optimizer -> scheduler, funcopt scheduler)
    build: Callable[[np.random.Generator], tuple[Callable[[Any], Any], Any]]
    kinds: tuple[str, ...] = ("sgd",)
    momentum: bool = False  # also compare momentum / betas[0]
    steps: int = STEPS


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _i(rng, lo, hi):
    return int(rng.integers(lo, hi + 1))


def _pair(torch_cls, factory, kwargs):
    return (lambda opt: torch_cls(opt, **kwargs)), factory(**kwargs)


def _lambda(rng):
    a, c, k = _u(rng, 0.9, 0.99), _u(rng, 0.01, 0.1), _i(rng, 2, 9)
    fns = [lambda e: a**e, lambda e: 1 / (1 + c * e), lambda e: 0.5 ** (e // k)]
    picked = rng.choice(3, size=2)
    if rng.random() < 0.5:
        return {"lr_lambda": [fns[picked[0]], fns[picked[1]]]}
    return {"lr_lambda": fns[picked[0]]}


def _multiplicative(rng):
    a, b = _u(rng, 0.9, 1.0), _u(rng, 0.95, 1.05)
    fns = [lambda e: a, lambda e: b ** (e % 3), lambda e: 1 - 0.001 * e]
    picked = rng.choice(3, size=2)
    if rng.random() < 0.5:
        return {"lr_lambda": [fns[picked[0]], fns[picked[1]]]}
    return {"lr_lambda": fns[picked[0]]}


def _step(rng):
    return {"step_size": _i(rng, 1, 15), "gamma": _u(rng, 0.1, 0.99)}


def _multistep(rng):
    milestones = [int(m) for m in rng.integers(0, STEPS, size=_i(rng, 1, 8))]
    milestones += milestones[:2]  # duplicates compound; unsorted is fine
    return {"milestones": milestones, "gamma": _u(rng, 0.3, 0.99)}


def _constant(rng):
    return {"factor": _u(rng, 0.01, 1.0), "total_iters": _i(rng, 0, 30)}


def _linear(rng):
    return {
        "start_factor": _u(rng, 0.01, 1.0),
        "end_factor": _u(rng, 0.0, 1.0),
        "total_iters": _i(rng, 0, 60),
    }


def _exponential(rng):
    return {"gamma": _u(rng, 0.9, 1.0)}


def _polynomial(rng):
    return {"total_iters": _i(rng, 1, 100), "power": _u(rng, 0.5, 3.0)}


def _cosine(rng):
    return {"T_max": _i(rng, 1, 40), "eta_min": _u(rng, 0.0, 1e-3)}


def _warm(rng):
    return {"T_0": _i(rng, 1, 10), "T_mult": _i(rng, 1, 3), "eta_min": _u(rng, 0, 1e-3)}


def _cyclic(rng, custom=False):
    kw = {
        "base_lr": [_u(rng, 1e-4, 1e-2), _u(rng, 1e-4, 1e-2)],
        "max_lr": _u(rng, 0.05, 0.5) if rng.random() < 0.5 else [0.1, 0.3],
        "step_size_up": _i(rng, 1, 15),
        "step_size_down": None if rng.random() < 0.3 else _i(rng, 1, 20),
        "mode": ["triangular", "triangular2", "exp_range"][_i(rng, 0, 2)],
        "gamma": _u(rng, 0.95, 1.0),
        "base_momentum": [_u(rng, 0.7, 0.85), _u(rng, 0.7, 0.85)],
        "max_momentum": _u(rng, 0.86, 0.99),
    }
    if custom:
        g = _u(rng, 0.9, 0.99)
        kw["scale_fn"] = lambda x: g**x
        kw["scale_mode"] = ["cycle", "iterations"][_i(rng, 0, 1)]
    return kw


def _one_cycle(rng):
    total = _i(rng, STEPS - 20, STEPS)
    return {
        "max_lr": [_u(rng, 0.01, 1.0), _u(rng, 0.01, 1.0)],
        "total_steps": total,
        "pct_start": _u(rng, 0.05, 0.45),
        "anneal_strategy": ["cos", "linear"][_i(rng, 0, 1)],
        "base_momentum": _u(rng, 0.8, 0.86),
        "max_momentum": [_u(rng, 0.9, 0.99), _u(rng, 0.9, 0.99)],
        "div_factor": _u(rng, 5, 50),
        "final_div_factor": _u(rng, 1e2, 1e5),
        "three_phase": bool(rng.random() < 0.5),
    }


def _swalr(rng):
    return {
        "swa_lr": [_u(rng, 1e-3, 0.05), _u(rng, 1e-3, 0.05)],
        "anneal_epochs": _i(rng, 0, 30),
        "anneal_strategy": ["cos", "linear"][_i(rng, 0, 1)],
    }


SIMPLE = {
    "lambda_lr": (TS.LambdaLR, S.lambda_lr, _lambda),
    "multiplicative_lr": (TS.MultiplicativeLR, S.multiplicative_lr, _multiplicative),
    "step_lr": (TS.StepLR, S.step_lr, _step),
    "multi_step_lr": (TS.MultiStepLR, S.multi_step_lr, _multistep),
    "constant_lr": (TS.ConstantLR, S.constant_lr, _constant),
    "linear_lr": (TS.LinearLR, S.linear_lr, _linear),
    "exponential_lr": (TS.ExponentialLR, S.exponential_lr, _exponential),
    "polynomial_lr": (TS.PolynomialLR, S.polynomial_lr, _polynomial),
    "cosine_annealing_lr": (TS.CosineAnnealingLR, S.cosine_annealing_lr, _cosine),
    "cosine_annealing_warm_restarts": (
        TS.CosineAnnealingWarmRestarts,
        S.cosine_annealing_warm_restarts,
        _warm,
    ),
    "swalr": (swa_utils.SWALR, S.swalr, _swalr),
}
# what can sit inside the composites (no momentum cycling: SGD with momentum)
COMPOSABLE = [k for k in SIMPLE]


def _simple_case(name):
    torch_cls, factory, args = SIMPLE[name]
    return Case(name, lambda rng: _pair(torch_cls, factory, args(rng)))


def _children(rng, n, allowed):
    picked = [allowed[i] for i in rng.choice(len(allowed), size=n)]
    specs = [(SIMPLE[p][0], SIMPLE[p][1], SIMPLE[p][2](rng)) for p in picked]
    return specs


def _sequential(rng):
    n = _i(rng, 2, 4)
    specs = _children(rng, n, COMPOSABLE)
    milestones = sorted(int(m) for m in rng.choice(np.arange(1, STEPS), n - 1, False))

    def torch_build(opt):
        return TS.SequentialLR(opt, [c(opt, **kw) for c, _, kw in specs], milestones)

    return torch_build, S.sequential_lr([f(**kw) for _, f, kw in specs], milestones)


def _chained(rng):
    specs = _children(rng, _i(rng, 2, 4), COMPOSABLE)

    def torch_build(opt):
        return TS.ChainedScheduler([c(opt, **kw) for c, _, kw in specs])

    return torch_build, S.chained_scheduler([f(**kw) for _, f, kw in specs])


def _nested(rng):
    """A chain inside a sequence, plus a cyclic scheduler with momentum."""
    inner = _children(rng, 2, COMPOSABLE)
    cyc = _cyclic(rng)
    milestone = _i(rng, 10, STEPS - 10)

    def torch_build(opt):
        first = TS.ChainedScheduler([c(opt, **kw) for c, _, kw in inner])
        return TS.SequentialLR(opt, [first, TS.CyclicLR(opt, **cyc)], [milestone])

    ours = S.sequential_lr(
        [S.chained_scheduler([f(**kw) for _, f, kw in inner]), S.cyclic_lr(**cyc)],
        [milestone],
    )
    return torch_build, ours


CASES = [_simple_case(name) for name in SIMPLE] + [
    Case(
        "cyclic_lr",
        lambda rng: _pair(TS.CyclicLR, S.cyclic_lr, _cyclic(rng)),
        ("sgd", "adam"),
        True,
    ),
    Case(
        "cyclic_lr_scale_fn",
        lambda rng: _pair(TS.CyclicLR, S.cyclic_lr, _cyclic(rng, custom=True)),
        ("sgd", "adam"),
        True,
    ),
    Case(
        "one_cycle_lr",
        lambda rng: _pair(TS.OneCycleLR, S.one_cycle_lr, _one_cycle(rng)),
        ("sgd", "adam"),
        True,
    ),
    Case("sequential_lr", _sequential),
    Case("chained_scheduler", _chained),
    Case("sequential_of_chained_and_cyclic", _nested, ("sgd", "adam"), True),
]


def _run(case: Case, seed: int, kind: str, use_jit: bool):
    rng = np.random.default_rng(seed)
    lrs = [_u(rng, 0.01, 1.0), _u(rng, 0.01, 1.0)]
    torch_build, sched = case.build(rng)
    steps = case.steps
    if case.name == "one_cycle_lr":
        steps = sched.total_steps  # k = T is allowed (extrapolates)
    topt = torch_opt(kind, lrs)
    with warnings.catch_warnings():
        # SequentialLR's initial step of a ChainedScheduler steps its children
        # before any optimizer.step(): torch warns about its own construction
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
        tsched = torch_build(topt)
    state = fo_state(kind, lrs)
    state, sstate = sched.init(state)
    diff = Diff(case.name)
    step = jax.jit(sched.step) if use_jit else sched.step
    for k in range(steps + 1):
        if k:
            topt.step()
            tsched.step()
            state, sstate = step(state, sstate)
        diff.check(fo.get_lr(state), tsched.get_last_lr(), f"lr at step {k}")
        assert tsched.get_last_lr() == [g["lr"] for g in topt.param_groups]
        if case.momentum:
            diff.check(fo_momenta(state), torch_momenta(topt), f"momentum at {k}")
    return state, sstate, sched, topt, tsched


# every seed (its own hyperparameter draws) jitted; un-jitted (the same math,
# compiled on the hyperparameters alone: `Scheduler.step`) the first seed
SEED_MODES = [pytest.param(seed, True, id=f"{seed}-jit") for seed in SEEDS]
SEED_MODES.insert(0, pytest.param(SEEDS[0], False, id=f"{SEEDS[0]}-eager"))


@pytest.mark.parametrize("seed,use_jit", SEED_MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lr_sequence_matches_torch(x64, case, seed, use_jit):
    for kind in case.kinds:
        _run(case, seed, kind, use_jit)


# --------------------------------------------------------------------------
# the epoch-argument (closed-form) path
# --------------------------------------------------------------------------

EPOCH_CASES = [
    "step_lr",
    "multi_step_lr",
    "constant_lr",
    "linear_lr",
    "exponential_lr",
    "polynomial_lr",
    "cosine_annealing_lr",
    "lambda_lr",
    "multiplicative_lr",
    "swalr",
]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", EPOCH_CASES)
def test_step_with_epoch_matches_torch(x64, name, use_jit):
    torch_cls, factory, args = SIMPLE[name]
    rng = np.random.default_rng(7)
    lrs = [_u(rng, 0.01, 1.0), _u(rng, 0.01, 1.0)]
    kw = args(rng)
    if name == "linear_lr":
        kw["total_iters"] = max(kw["total_iters"], 1)  # torch divides by it
    topt, state = torch_opt("sgd", lrs), fo_state("sgd", lrs)
    tsched = torch_cls(topt, **kw)
    sched = factory(**kw)
    state, sstate = sched.init(state)
    step = jax.jit(sched.step) if use_jit else sched.step
    diff = Diff(f"{name}(epoch)")
    for k in range(60):
        epoch = int(rng.integers(0, 80)) if k % 3 else None
        topt.step()
        if epoch is None:
            tsched.step()
            state, sstate = step(state, sstate)
        else:
            with pytest.warns(UserWarning, match="epoch parameter"):
                tsched.step(epoch)
            state, sstate = step(state, sstate, epoch)
        diff.check(fo.get_lr(state), tsched.get_last_lr(), f"step {k}, epoch {epoch}")
        assert int(sstate.last_epoch) == tsched.last_epoch


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("seed", SEEDS)
def test_warm_restarts_fractional_epochs(x64, seed, use_jit):
    rng = np.random.default_rng(seed)
    lrs = [_u(rng, 0.01, 1.0), _u(rng, 0.01, 1.0)]
    kw = _warm(rng)
    topt, state = torch_opt("sgd", lrs), fo_state("sgd", lrs)
    tsched = TS.CosineAnnealingWarmRestarts(topt, **kw)
    sched = S.cosine_annealing_warm_restarts(**kw)
    state, sstate = sched.init(state)
    step = jax.jit(sched.step) if use_jit else sched.step
    iters = _i(rng, 2, 7)
    diff = Diff("cosine_annealing_warm_restarts(epoch)")
    for epoch in range(25):
        for i in range(iters):
            topt.step()
            if rng.random() < 0.2:  # interleave plain steps
                tsched.step()
                state, sstate = step(state, sstate)
            else:
                x = epoch + i / iters
                tsched.step(x)
                state, sstate = step(state, sstate, x)
            diff.check(fo.get_lr(state), tsched.get_last_lr(), f"epoch {epoch}+{i}")
            assert int(sstate.last_epoch) == tsched.last_epoch
            np.testing.assert_allclose(float(sstate.T_cur), tsched.T_cur, rtol=1e-12)
            assert float(sstate.T_i) == tsched.T_i


def test_warm_restarts_negative_epoch(x64):
    state, sstate = S.cosine_annealing_warm_restarts(3).init(fo_state("sgd", [1, 2]))
    topt = torch_opt("sgd", [1.0, 2.0])
    tsched = TS.CosineAnnealingWarmRestarts(topt, 3)
    with pytest.raises(ValueError) as theirs:
        tsched.step(-1)
    with pytest.raises(ValueError) as ours:
        S.cosine_annealing_warm_restarts(3).step(state, sstate, -1)
    assert str(ours.value) == str(theirs.value)


# --------------------------------------------------------------------------
# un-jitted steps: compiled on the hyperparameters, buffers untouched
# --------------------------------------------------------------------------


def test_eager_step_compiles_once_and_leaves_the_buffers_alone():
    """Outside `jit` a step runs one compiled program (the lambda is traced
    once, not called per step), on the hyperparameters alone: the state's
    buffers and step counts come back as the very arrays passed in."""
    calls = []

    def factor(epoch):
        calls.append(epoch)
        return 0.9**epoch

    sched = S.sequential_lr(
        [S.lambda_lr(factor), S.cosine_annealing_lr(T_max=5)], milestones=[3]
    )
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    opt = fo.sgd(lr=0.1, momentum=0.9)
    state = opt.init(params)
    params, state = opt.step(params, jax.tree.map(jnp.ones_like, params), state)
    state, sstate = sched.init(state)
    jitted = (state, sstate)
    n_init = len(calls)
    for _ in range(6):
        new_state, sstate = sched.step(state, sstate)
        assert new_state.step is state.step
        new_buffers = jax.tree.leaves(new_state.slots)
        assert all(a is b for a, b in zip(new_buffers, jax.tree.leaves(state.slots)))
        state = new_state
    assert len(calls) - n_init == 1, "traced once, then the compiled program"
    assert not sched._op_by_op
    jit_step = jax.jit(sched.step)
    for _ in range(6):
        jitted = jit_step(*jitted)
    for ours, theirs in zip(jax.tree.leaves((state, sstate)), jax.tree.leaves(jitted)):
        assert_same_bits(np.asarray(ours), np.asarray(theirs), "eager vs jit", "jit")


def test_eager_step_on_an_lbfgs_state():
    """L-BFGS keeps its history in the state; a compiled step leaves it."""
    sched = S.step_lr(step_size=1, gamma=0.5)
    state = fo.lbfgs(lr=1.0).init({"w": jnp.ones(3)})
    state, sstate = sched.init(state)
    new_state, _ = sched.step(state, sstate)
    assert [float(x) for x in fo.get_lr(new_state)] == [0.5]
    old, new = (jax.tree.leaves(s._replace(hparams={})) for s in (state, new_state))
    assert all(a is b for a, b in zip(new, old))
    assert not sched._op_by_op
    # L-BFGS has no per-leaf step counts: the compiled step is handed one
    # empty array, made once (not a device computation per eager step)
    counts = [hparams_only(s)[0].step for s in (state, new_state)]
    assert counts[0] is counts[1] and counts[0].shape == (0,)


def test_lbfgs_step_counts_first_made_in_a_trace_are_concrete():
    """Made once (cached), so never a tracer: first asked for inside a
    jitted scheduler step, later eager steps still see a concrete array."""
    _no_step_counts.cache_clear()
    state = fo.lbfgs(lr=1.0).init({"w": jnp.ones(3)})
    jax.jit(lambda s: hparams_only(s)[0].hparams)(state)
    assert not isinstance(_no_step_counts(), jax.core.Tracer)


def test_eager_step_with_a_python_branch_runs_op_by_op(x64):
    """A lambda that branches on the epoch in Python cannot be traced; as
    in torch it still works un-jitted (op by op), and matches torch."""
    lam = lambda e: 1.0 if e < 3 else 0.25  # noqa: E731
    topt, state = torch_opt("sgd", [0.1, 0.2]), fo_state("sgd", [0.1, 0.2])
    tsched = TS.LambdaLR(topt, lam)
    sched = S.lambda_lr(lam)
    state, sstate = sched.init(state)
    for _ in range(6):
        topt.step()
        tsched.step()
        state, sstate = sched.step(state, sstate)
        np.testing.assert_allclose(
            [float(x) for x in fo.get_lr(state)], tsched.get_last_lr(), rtol=RTOL
        )
    assert sched._op_by_op
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(sched.step)(state, sstate)


def test_scheduler_pickles_after_stepping():
    sched = S.step_lr(step_size=2)
    state, sstate = sched.init(fo_state("sgd", [0.1, 0.2]))
    state, sstate = sched.step(state, sstate)
    again = pickle.loads(pickle.dumps(sched))
    ours = [float(x) for x in fo.get_lr(again.step(state, sstate)[0])]
    assert ours == [float(x) for x in fo.get_lr(sched.step(state, sstate)[0])]


# --------------------------------------------------------------------------
# OneCycleLR past the end
# --------------------------------------------------------------------------


def test_one_cycle_errors_past_total_steps(x64):
    kw = {"max_lr": 0.5, "total_steps": 10}
    topt, state = torch_opt("sgd", [0.1, 0.2]), fo_state("sgd", [0.1, 0.2])
    tsched = TS.OneCycleLR(topt, **kw)
    sched = S.one_cycle_lr(**kw)
    state, sstate = sched.init(state)
    for _ in range(10):  # the 10th (k = T) extrapolates
        topt.step()
        tsched.step()
        state, sstate = sched.step(state, sstate)
    np.testing.assert_allclose(
        [float(x) for x in fo.get_lr(state)], tsched.get_last_lr(), rtol=RTOL
    )
    with pytest.raises(ValueError) as theirs:
        tsched.step()
    with pytest.raises(ValueError) as ours:
        sched.step(state, sstate)
    assert str(ours.value) == str(theirs.value)
    # under jit it cannot raise: the lr becomes NaN
    state, _ = jax.jit(sched.step)(state, sstate)
    assert all(math.isnan(float(x)) for x in fo.get_lr(state))


# --------------------------------------------------------------------------
# ReduceLROnPlateau
# --------------------------------------------------------------------------


def _metrics(rng, n, mode):
    """Noisy improvement with long plateaus and a few NaNs."""
    values, v = [], 10.0
    for k in range(n):
        if (k // 15) % 2 == 0:
            v += (-1 if mode == "min" else 1) * abs(rng.normal(0.2, 0.2))
        values.append(v + rng.normal(0, 1e-4) if rng.random() < 0.9 else v)
        if rng.random() < 0.02:
            values[-1] = math.nan
    return values


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_reduce_lr_on_plateau(x64, mode, threshold_mode, seed, use_jit):
    rng = np.random.default_rng(seed)
    lrs = [_u(rng, 0.01, 1.0), _u(rng, 0.01, 1.0)]
    kw = {
        "mode": mode,
        "factor": _u(rng, 0.1, 0.9),
        "patience": _i(rng, 0, 5),
        "threshold": _u(rng, 1e-4, 1e-2),
        "threshold_mode": threshold_mode,
        "cooldown": _i(rng, 0, 4),
        "min_lr": [_u(rng, 0, 1e-3), _u(rng, 0, 1e-2)] if seed % 2 else 1e-3,
        "eps": 1e-8,
    }
    topt, state = torch_opt("sgd", lrs), fo_state("sgd", lrs)
    tsched = TS.ReduceLROnPlateau(topt, **kw)
    sched = S.reduce_lr_on_plateau(**kw)
    state, sstate = sched.init(state)
    step = jax.jit(sched.step) if use_jit else sched.step
    diff = Diff(f"reduce_lr_on_plateau({mode},{threshold_mode})")
    diff.check(fo.get_lr(state), tsched.get_last_lr(), "init")
    reductions = 0
    for k, m in enumerate(_metrics(rng, 150, mode)):
        before = tsched.get_last_lr()
        topt.step()
        tsched.step(m)
        state, sstate = step(state, sstate, metrics=m)
        reductions += tsched.get_last_lr() != before
        diff.check(fo.get_lr(state), tsched.get_last_lr(), f"step {k}")
        assert int(sstate.num_bad_epochs) == tsched.num_bad_epochs
        assert int(sstate.cooldown_counter) == tsched.cooldown_counter
        assert float(sstate.best) == tsched.best or (
            math.isnan(tsched.best) and math.isnan(float(sstate.best))
        )
        assert int(sstate.last_epoch) == tsched.last_epoch
    assert reductions > 0  # the sequence does exercise the reduction


def test_reduce_lr_on_plateau_eps_and_epoch(x64):
    kw = {"patience": 0, "min_lr": 0.0, "eps": 1e-8}
    topt, state = torch_opt("sgd", [1e-8, 0.5]), fo_state("sgd", [1e-8, 0.5])
    tsched = TS.ReduceLROnPlateau(topt, **kw)
    sched = S.reduce_lr_on_plateau(**kw)
    state, sstate = sched.init(state)
    for k, m in enumerate([1.0, 2.0, 3.0, 0.5, 4.0]):
        topt.step()
        if k == 2:
            with pytest.warns(UserWarning, match="epoch parameter"):
                tsched.step(m, 10)
            state, sstate = sched.step(state, sstate, m, 10)
        else:
            tsched.step(m)
            state, sstate = sched.step(state, sstate, metrics=m)
        assert [float(x) for x in fo.get_lr(state)] == tsched.get_last_lr()
        assert int(sstate.last_epoch) == tsched.last_epoch


# --------------------------------------------------------------------------
# construction details
# --------------------------------------------------------------------------


def test_two_schedulers_share_initial_lr(x64):
    """torch's setdefault: a later scheduler keeps the first one's initial_lr."""
    topt, state = torch_opt("sgd", [0.1, 0.2]), fo_state("sgd", [0.1, 0.2])
    TS.LinearLR(topt, 0.5, total_iters=3)
    tsched = TS.ExponentialLR(topt, 0.9)
    first = S.linear_lr(0.5, total_iters=3)
    state, s1 = first.init(state)
    state, s2 = S.exponential_lr(0.9).init(state, initial_lr=s1.base_lrs)
    assert [float(x) for x in fo.get_lr(state)] == tsched.get_last_lr()
    assert [float(x) for x in s2.base_lrs] == tsched.base_lrs


def test_resume_needs_initial_lr(x64):
    topt, state = torch_opt("sgd", [0.1, 0.2]), fo_state("sgd", [0.1, 0.2])
    with pytest.raises(KeyError) as theirs:
        TS.StepLR(topt, 3, last_epoch=4)
    with pytest.raises(KeyError) as ours:
        S.step_lr(3, last_epoch=4).init(state)
    assert str(ours.value) == str(theirs.value)
    for g in topt.param_groups:
        g["initial_lr"] = 1.0
    tsched = TS.StepLR(topt, 3, gamma=0.5, last_epoch=4)
    state, sstate = S.step_lr(3, gamma=0.5, last_epoch=4).init(
        state, initial_lr=[1.0, 1.0]
    )
    for _ in range(10):
        topt.step()
        tsched.step()
        state, sstate = S.step_lr(3, gamma=0.5, last_epoch=4).step(state, sstate)
        assert [float(x) for x in fo.get_lr(state)] == tsched.get_last_lr()


def test_cycle_momentum_needs_sgd_momentum(x64):
    state = fo_state("sgd", [0.1, 0.2], momentum=0.0)
    for sched in (S.cyclic_lr(0.01, 0.1), S.one_cycle_lr(0.1, total_steps=10)):
        with pytest.raises(ValueError, match="momentum > 0"):
            sched.init(state)
        # without cycling momentum it is fine
    S.cyclic_lr(0.01, 0.1, cycle_momentum=False).init(state)


def test_float32_runs():
    """Without x64 the lrs live in float32; every scheduler still steps."""
    state = fo_state("sgd", [0.1, 0.2])
    assert fo.get_lr(state)[0].dtype == jnp.float32
    rng = np.random.default_rng(0)
    for case in CASES:
        _, sched = case.build(rng)
        st, ss = sched.init(state)
        st, ss = jax.jit(sched.step)(st, ss)
        st, ss = sched.step(st, ss)
        assert fo.get_lr(st)[0].dtype == jnp.float32
    plateau = S.reduce_lr_on_plateau()
    st, ss = plateau.init(state)
    st, ss = jax.jit(plateau.step)(st, ss, metrics=1.0)
    assert fo.get_lr(st)[0].dtype == jnp.float32


# --------------------------------------------------------------------------
# invalid arguments: torch's type and message
# --------------------------------------------------------------------------


def _not_fn():
    return 3


ERRORS = [
    (TS.ConstantLR, S.constant_lr, {"factor": 1.5}),
    (TS.ConstantLR, S.constant_lr, {"factor": -0.1}),
    (TS.LinearLR, S.linear_lr, {"start_factor": 0.0}),
    (TS.LinearLR, S.linear_lr, {"start_factor": 1.5}),
    (TS.LinearLR, S.linear_lr, {"end_factor": 1.5}),
    (TS.LinearLR, S.linear_lr, {"end_factor": -0.5}),
    (TS.LambdaLR, S.lambda_lr, {"lr_lambda": [lambda e: 1.0]}),
    (TS.MultiplicativeLR, S.multiplicative_lr, {"lr_lambda": [lambda e: 1.0] * 3}),
    (TS.MultiplicativeLR, S.multiplicative_lr, {"lr_lambda": 3}),
    (TS.MultiplicativeLR, S.multiplicative_lr, {"lr_lambda": [lambda e: 1, 3]}),
    (TS.CosineAnnealingWarmRestarts, S.cosine_annealing_warm_restarts, {"T_0": 0}),
    (TS.CosineAnnealingWarmRestarts, S.cosine_annealing_warm_restarts, {"T_0": 2.5}),
    (
        TS.CosineAnnealingWarmRestarts,
        S.cosine_annealing_warm_restarts,
        {"T_0": 2, "T_mult": 0},
    ),
    (
        TS.CosineAnnealingWarmRestarts,
        S.cosine_annealing_warm_restarts,
        {"T_0": 2, "T_mult": 1.5},
    ),
    (
        TS.CosineAnnealingWarmRestarts,
        S.cosine_annealing_warm_restarts,
        {"T_0": 2, "eta_min": "0"},
    ),
    (
        TS.CosineAnnealingWarmRestarts,
        S.cosine_annealing_warm_restarts,
        {"T_0": 2, "eta_min": None},
    ),
    (TS.CyclicLR, S.cyclic_lr, {"base_lr": 0.1, "max_lr": 1.0, "mode": "square"}),
    (
        TS.CyclicLR,
        S.cyclic_lr,
        {"base_lr": 0.1, "max_lr": 1.0, "max_momentum": [0.9] * 3},
    ),
    (TS.CyclicLR, S.cyclic_lr, {"base_lr": [0.1] * 3, "max_lr": 1.0}),
    (TS.CyclicLR, S.cyclic_lr, {"base_lr": 0.1, "max_lr": [1.0]}),
    (
        TS.CyclicLR,
        S.cyclic_lr,
        {"base_lr": 0.1, "max_lr": 1.0, "base_momentum": [0.8] * 3},
    ),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0}),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0, "total_steps": 0}),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0, "total_steps": 10.0}),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0, "epochs": 0, "steps_per_epoch": 3}),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0, "epochs": 2, "steps_per_epoch": 0}),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0, "epochs": 2}),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0, "total_steps": 10, "pct_start": 1}),
    (
        TS.OneCycleLR,
        S.one_cycle_lr,
        {"max_lr": 1.0, "total_steps": 10, "pct_start": 1.5},
    ),
    (
        TS.OneCycleLR,
        S.one_cycle_lr,
        {"max_lr": 1.0, "total_steps": 10, "anneal_strategy": "step"},
    ),
    (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": [1.0] * 3, "total_steps": 10}),
    (
        TS.OneCycleLR,
        S.one_cycle_lr,
        {"max_lr": 1.0, "total_steps": 10, "base_momentum": [0.8] * 3},
    ),
    (
        TS.OneCycleLR,
        S.one_cycle_lr,
        {"max_lr": 1.0, "total_steps": 10, "max_momentum": [0.9] * 3},
    ),
    (TS.ReduceLROnPlateau, S.reduce_lr_on_plateau, {"factor": 2.0}),
    (TS.ReduceLROnPlateau, S.reduce_lr_on_plateau, {"factor": 1.0}),
    (TS.ReduceLROnPlateau, S.reduce_lr_on_plateau, {"mode": "mean"}),
    (TS.ReduceLROnPlateau, S.reduce_lr_on_plateau, {"threshold_mode": "pct"}),
    (TS.ReduceLROnPlateau, S.reduce_lr_on_plateau, {"min_lr": [0.0] * 3}),
    (swa_utils.SWALR, S.swalr, {"swa_lr": 0.1, "anneal_strategy": "exp"}),
    (swa_utils.SWALR, S.swalr, {"swa_lr": 0.1, "anneal_epochs": -1}),
    (swa_utils.SWALR, S.swalr, {"swa_lr": 0.1, "anneal_epochs": 2.0}),
    (swa_utils.SWALR, S.swalr, {"swa_lr": [0.1] * 3}),
]


@pytest.mark.parametrize(
    "torch_cls, factory, kwargs",
    ERRORS,
    # a stable id (no function reprs with addresses: pytest-xdist needs them equal)
    ids=[f"{t.__name__}-{i}" for i, (t, _, _) in enumerate(ERRORS)],
)
def test_bad_argument_matches_torch(x64, torch_cls, factory, kwargs):
    topt, state = torch_opt("sgd", [0.1, 0.2]), fo_state("sgd", [0.1, 0.2])
    with pytest.raises(Exception) as theirs:
        torch_cls(topt, **kwargs)
    with pytest.raises(Exception) as ours:
        factory(**kwargs).init(state)  # per-group lists are checked at init
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "torch_cls, factory, kwargs",
    [
        (TS.CyclicLR, S.cyclic_lr, {"base_lr": 0.1, "max_lr": 1.0}),
        (TS.OneCycleLR, S.one_cycle_lr, {"max_lr": 1.0, "total_steps": 10}),
    ],
    ids=["CyclicLR", "OneCycleLR"],
)
def test_cycle_momentum_needs_momentum_matches_torch(x64, torch_cls, factory, kwargs):
    """An optimizer without momentum or betas (Adagrad): torch's ValueError."""
    a, b = (torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in (2, 3))
    topt = torch.optim.Adagrad([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1)
    groups = fo.param_groups({"a": "default", "b": "head"}, {"head": {"lr": 0.2}})
    state = fo.adagrad(lr=0.1, param_groups=groups).init(
        {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    )
    with pytest.raises(Exception) as theirs:
        torch_cls(topt, **kwargs)
    with pytest.raises(Exception) as ours:
        factory(**kwargs).init(state)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def _composite_errors():
    def mk(opt):
        return TS.StepLR(opt, 3)

    def plateau(opt):
        return TS.ReduceLROnPlateau(opt)

    return [
        (lambda opt: TS.ChainedScheduler([]), lambda: S.chained_scheduler([])),
        (
            lambda opt: TS.SequentialLR(opt, [], []),
            lambda: S.sequential_lr([], []),
        ),
        (
            lambda opt: TS.ChainedScheduler([mk(opt), plateau(opt)]),
            lambda: S.chained_scheduler([S.step_lr(3), S.reduce_lr_on_plateau()]),
        ),
        (
            lambda opt: TS.SequentialLR(opt, [plateau(opt), mk(opt)], [2]),
            lambda: S.sequential_lr([S.reduce_lr_on_plateau(), S.step_lr(3)], [2]),
        ),
        (
            lambda opt: TS.SequentialLR(opt, [mk(opt), mk(opt)], [2, 3]),
            lambda: S.sequential_lr([S.step_lr(3), S.step_lr(3)], [2, 3]),
        ),
        (
            lambda opt: TS.SequentialLR(opt, [mk(opt), object()], [2]),
            lambda: S.sequential_lr([S.step_lr(3), object()], [2]),
        ),
        (
            lambda opt: TS.ChainedScheduler([mk(opt), object()]),
            lambda: S.chained_scheduler([S.step_lr(3), object()]),
        ),
    ]


@pytest.mark.parametrize("pair", _composite_errors())
def test_bad_composite_matches_torch(x64, pair):
    torch_call, ours_call = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warnings before the error
        with pytest.raises(Exception) as theirs:
            torch_call(torch_opt("sgd", [0.1, 0.2]))
    with pytest.raises(Exception) as ours:
        ours_call()
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


# --------------------------------------------------------------------------
# the optax adapter
# --------------------------------------------------------------------------

OPTAX_CASES = [
    "lambda_lr",
    "step_lr",
    "multi_step_lr",
    "constant_lr",
    "linear_lr",
    "exponential_lr",
    "polynomial_lr",
    "cosine_annealing_lr",
    "cosine_annealing_warm_restarts",
    "cyclic_lr",
    "one_cycle_lr",
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", OPTAX_CASES)
def test_optax_schedule_matches_torch(x64, name, seed):
    rng = np.random.default_rng(seed)
    base = _u(rng, 0.01, 1.0)
    if name == "cyclic_lr":
        torch_cls, factory, kw = TS.CyclicLR, S.cyclic_lr, _cyclic(rng)
    elif name == "one_cycle_lr":
        torch_cls, factory, kw = TS.OneCycleLR, S.one_cycle_lr, _one_cycle(rng)
    else:
        torch_cls, factory, args = SIMPLE[name]
        kw = args(rng)
    if name == "lambda_lr" and isinstance(kw["lr_lambda"], list):
        kw["lr_lambda"] = kw["lr_lambda"][0]
    sched = factory(**kw)
    steps = sched.total_steps if name == "one_cycle_lr" else STEPS
    for group in (0, 1):
        schedule = S.as_optax_schedule(sched, base_lr=base, group=group)
        jitted = jax.jit(schedule)
        diff = Diff(f"as_optax_schedule({name})")
        topt = torch_opt("sgd", [base, base])
        tsched = torch_cls(topt, **kw)
        for count in range(steps + 1):
            if count:
                topt.step()
                tsched.step()
            want = tsched.get_last_lr()[group]
            diff.check([schedule(count)], [want], f"count {count}")
            diff.check([jitted(jnp.int32(count))], [want], f"count {count} (jit)")


def test_optax_schedule_rejects_history_dependent(x64):
    for sched in (
        S.multiplicative_lr(lambda e: 0.9),
        S.reduce_lr_on_plateau(),
        S.swalr(0.1),
        S.chained_scheduler([S.step_lr(3)]),
    ):
        with pytest.raises(TypeError, match="closed form"):
            S.as_optax_schedule(sched, base_lr=0.1)


def test_optax_schedule_in_an_optax_optimizer(x64):
    import optax

    schedule = S.as_optax_schedule(S.step_lr(2, gamma=0.5), base_lr=0.1)
    opt = optax.sgd(schedule)
    params = jnp.ones(2)
    state = opt.init(params)
    for _ in range(5):
        _, state = opt.update(jnp.ones(2), state, params)
    assert float(schedule(4)) == pytest.approx(0.1 * 0.25, rel=1e-15)


def _shared_keys(rng):
    """Two schedulers writing the same param-group keys (swa_lr; OneCycle's
    initial_lr/max_lr/min_lr/momenta): the later one's values win, in torch."""
    a, b = _swalr(rng), _swalr(rng)
    c, d = _one_cycle(rng), _one_cycle(rng)
    d["total_steps"] = c["total_steps"] = STEPS + 5
    milestone = _i(rng, 10, STEPS - 10)

    def torch_build(opt):
        chained = TS.ChainedScheduler(
            [swa_utils.SWALR(opt, **a), TS.OneCycleLR(opt, **c)]
        )
        return TS.SequentialLR(
            opt, [chained, swa_utils.SWALR(opt, **b), TS.OneCycleLR(opt, **d)],
            [milestone, milestone + 5],
        )  # fmt: skip

    ours = S.sequential_lr(
        [
            S.chained_scheduler([S.swalr(**a), S.one_cycle_lr(**c)]),
            S.swalr(**b),
            S.one_cycle_lr(**d),
        ],
        [milestone, milestone + 5],
    )
    return torch_build, ours


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("seed", SEEDS)
def test_shared_param_group_keys(x64, seed, use_jit):
    case = Case("shared_group_keys", _shared_keys, ("sgd", "adam"), True)
    for kind in case.kinds:
        _run(case, seed, kind, use_jit)
