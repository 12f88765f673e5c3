"""funcopt.torch_interop against live torch: runs moved between the libraries.

For every optimizer of the parity table (its all-flags-on row, with ``None``
gradients so that torch's lazy state matters) and every scheduler: torch runs
K steps, its ``state_dict()`` is imported and funcopt runs K more; funcopt runs
K steps, its export is loaded by a fresh torch optimizer that runs K more.
Both must equal torch's uninterrupted 2K steps (float64, 1e-10 relative),
parameters and the full state dict (keys, dtypes of what we export, values).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as TS
from torch.optim import swa_utils

import funcopt as fo
import funcopt.torch_interop as fti
from funcopt import lr_scheduler as S
from funcopt._tree import is_trainable
from tests.parity import test_sparse_adam as sparse_case
from tests.parity.cases import OPT_CASES
from tests.torch_ref import make_grads, make_params_for

K = 3
RTOL, ATOL = 1e-10, 1e-13
WORST: dict[str, float] = {}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _record(what, actual, expected):
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=what)
    if a.size:
        rel = np.max(np.abs(a - e) / np.maximum(np.abs(e), 1e-300))
        WORST[what.split(":")[0]] = max(WORST.get(what.split(":")[0], 0.0), rel)


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return np.asarray(x)


def _assert_value(what, ours, theirs, dtypes):
    if isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), what
        for j, (a, b) in enumerate(zip(ours, theirs)):
            _assert_value(f"{what}[{j}]", a, b, dtypes)
        return
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{what}: {type(ours)} is no tensor"
        if dtypes:
            assert ours.dtype == theirs.dtype, f"{what}: {ours.dtype} != {theirs.dtype}"
        assert tuple(ours.shape) == tuple(theirs.shape), what
        _record(what, _np(ours), _np(theirs))
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        _record(what, ours, theirs)
    else:
        assert ours == theirs, f"{what}: {ours!r} != {theirs!r}"


def assert_state_dicts_equal(name, ours, theirs, dtypes=True):
    """Same groups (every key, every value), same state entries and tensors.

    funcopt's export names its parameters (`param_names`, as torch writes
    for an optimizer built from `named_parameters()`); a torch optimizer
    built from bare tensors has none, so that key is compared only when
    both have it (its values are checked by the registration-order tests).
    """
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for g, (a, b) in enumerate(zip(ours["param_groups"], theirs["param_groups"])):
        if "param_names" not in b and "param_names" in a:
            assert len(a["param_names"]) == len(a["params"]), name
            a = {k: v for k, v in a.items() if k != "param_names"}
        assert set(a) == set(b), f"group {g}: {sorted(set(a) ^ set(b))}"
        for k in b:
            _assert_value(f"{name}: group {g} {k}", a[k], b[k], dtypes)
    assert set(ours["state"]) == set(theirs["state"]), (
        f"{name}: state ids {sorted(ours['state'])} != {sorted(theirs['state'])}"
    )
    for pid, entry in theirs["state"].items():
        assert set(ours["state"][pid]) - {"al"} == set(entry) - {"al"}, (pid, entry)
        for k, v in entry.items():
            if k != "al":
                _assert_value(
                    f"{name}: state {pid} {k}", ours["state"][pid][k], v, dtypes
                )


def _trainable(params):
    return [p for p in jax.tree.leaves(params) if is_trainable(p)]


def _with_values(params, values):
    """``params`` with its trainable leaves replaced by ``values`` (in order)."""
    leaves, treedef = jax.tree.flatten(params)
    it = iter(values)
    return treedef.unflatten(
        [jnp.asarray(_np(next(it))) if is_trainable(p) else p for p in leaves]
    )


def _torch_params(params):
    return [torch.tensor(np.array(p), requires_grad=True) for p in _trainable(params)]


def _torch_run(topt, tparams, params, grads_seq):
    treedef = jax.tree.structure(params)
    for grads in grads_seq:
        flat = treedef.flatten_up_to(grads)
        tgrads = [g for g, p in zip(flat, jax.tree.leaves(params)) if is_trainable(p)]
        for tp, g in zip(tparams, tgrads):
            tp.grad = None if g is None else torch.tensor(np.array(g))
        topt.step()


_JITTED = {}


def _fo_run(opt, params, state, grads_seq):
    step = _JITTED.setdefault(id(opt), jax.jit(opt.step))
    for grads in grads_seq:
        params, state = step(params, jax.tree.map(jnp.asarray, grads), state)
    return params, state


# --------------------------------------------------------------------------
# every optimizer of the parity table
# --------------------------------------------------------------------------

# torch.optim's optimizers; the ecosystem rows (funcopt.contrib, references
# from other packages) keep their own state layouts and are not covered here
ROWS = [
    pytest.param(c, c.combos()[-1], id=c.name)
    for c in OPT_CASES
    if c.torch_cls.__module__.startswith("torch.optim")
]


@pytest.mark.parametrize("case,kwargs", ROWS)
def test_optimizer_round_trip(case, kwargs, x64):
    rng = np.random.default_rng(0)
    params = jax.tree.map(jnp.asarray, make_params_for(case, rng, np.float64))
    grads = make_grads(rng, params, 2 * K, with_none=False)
    # leaf 0's first gradient comes late (torch's lazy state); two structures
    # only, so two compilations
    for t in range(2):
        flat, treedef = jax.tree.flatten(grads[t], is_leaf=lambda x: x is None)
        first = next(
            i for i, p in enumerate(jax.tree.leaves(params)) if is_trainable(p)
        )
        flat[first] = None
        grads[t] = treedef.unflatten(flat)
    opt = case.factory(**kwargs)

    full_p = _torch_params(params)
    full = case.torch_cls(full_p, **kwargs)
    _torch_run(full, full_p, params, grads)
    expected = full.state_dict()

    # torch K -> funcopt K
    tp = _torch_params(params)
    topt = case.torch_cls(tp, **kwargs)
    _torch_run(topt, tp, params, grads[:K])
    mid = _with_values(params, tp)
    state = fti.load_state_dict(opt, mid, topt.state_dict())
    ours, state = _fo_run(opt, mid, state, grads[K:])
    for i, (a, b) in enumerate(zip(_trainable(ours), full_p)):
        _record(f"{case.name} torch->funcopt: param {i}", a, _np(b))
    exported = fti.state_dict(opt, state, ours)
    assert_state_dicts_equal(f"{case.name} torch->funcopt", exported, expected)

    # torch resuming from its own state dict: its load_state_dict casts the
    # float32 scalar state (NAdam's mu_product, ASGD's eta and mu) to the
    # param dtype, so from there on torch no longer rounds them to float32
    # (~1e-10 from the uninterrupted run). That is the reference for
    # "torch continues"; the gap to the uninterrupted run is recorded too.
    own_p = _torch_params(params)
    own = case.torch_cls(own_p, **kwargs)
    _torch_run(own, own_p, params, grads[:K])
    resumed_p = [p.detach().clone().requires_grad_(True) for p in own_p]
    resumed = case.torch_cls(resumed_p, **kwargs)
    resumed.load_state_dict(own.state_dict())
    _torch_run(resumed, resumed_p, params, grads[K:])

    # funcopt K -> torch K
    mid, state = _fo_run(opt, params, opt.init(params), grads[:K])
    sd = fti.state_dict(opt, state, mid)
    tp = _torch_params(mid)
    topt = case.torch_cls(tp, **kwargs)
    topt.load_state_dict(sd)
    _torch_run(topt, tp, params, grads[K:])
    for i, (a, b, c) in enumerate(zip(tp, resumed_p, full_p)):
        _record(f"{case.name} funcopt->torch: param {i}", _np(a), _np(b))
        rel = np.max(np.abs(_np(a) - _np(c)) / np.maximum(np.abs(_np(c)), 1e-300))
        key = f"{case.name} funcopt->torch vs uninterrupted"
        WORST[key] = max(WORST.get(key, 0.0), float(rel))
    assert_state_dicts_equal(
        f"{case.name} funcopt->torch", topt.state_dict(), resumed.state_dict()
    )


def test_sparse_adam_round_trip(x64):
    rng = np.random.default_rng(0)
    raw = sparse_case._params(rng, np.float64)
    seq = sparse_case._gradients(rng, raw, np.float64, pad=True)[: 2 * K]
    params = jax.tree.map(jnp.asarray, raw)
    names = ["bias", "emb", "mat", "scalar"]
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    opt = fo.sparse_adam(**kwargs)

    def torch_run(tparams, topt, part):
        for torch_grads, _ in part:
            for k, p in zip(names, tparams):
                p.grad = torch_grads[k]
            topt.step()

    step = jax.jit(opt.step)

    def fo_run(p, s, part):
        for _, g in part:
            p, s = step(p, g, s)
        return p, s

    full_p = _torch_params(params)
    full = torch.optim.SparseAdam(full_p, **kwargs)
    torch_run(full_p, full, seq)
    expected = full.state_dict()

    tp = _torch_params(params)
    topt = torch.optim.SparseAdam(tp, **kwargs)
    torch_run(tp, topt, seq[:K])
    mid = _with_values(params, tp)
    state = fti.load_state_dict(opt, mid, topt.state_dict())
    ours, state = fo_run(mid, state, seq[K:])
    for i, (a, b) in enumerate(zip(_trainable(ours), full_p)):
        _record(f"sparse_adam torch->funcopt: param {i}", a, _np(b))
    assert_state_dicts_equal("sparse_adam", fti.state_dict(opt, state, ours), expected)
    assert isinstance(fti.state_dict(opt, state, ours)["state"][0]["step"], int)

    mid, state = fo_run(params, opt.init(params), seq[:K])
    tp = _torch_params(mid)
    topt = torch.optim.SparseAdam(tp, **kwargs)
    topt.load_state_dict(fti.state_dict(opt, state, mid))
    torch_run(tp, topt, seq[K:])
    for i, (a, b) in enumerate(zip(tp, full_p)):
        _record(f"sparse_adam funcopt->torch: param {i}", _np(a), _np(b))
    assert_state_dicts_equal("sparse_adam funcopt->torch", topt.state_dict(), expected)


# --------------------------------------------------------------------------
# LBFGS
# --------------------------------------------------------------------------

_A = np.random.default_rng(3).normal(size=(20, 5))
_Y = _A @ np.array([1.0, -2.0, 0.5, 3.0, -1.0]) + 0.3


def _lbfgs_loss_jax(p):
    r = jnp.asarray(_A) @ p["w"] + p["b"] - jnp.asarray(_Y)
    return jnp.mean(r**2) + 0.1 * jnp.sum(jnp.sin(p["w"]) ** 2)


def _lbfgs_loss_torch(ps):
    b, w = ps
    r = torch.tensor(_A) @ w + b - torch.tensor(_Y)
    return torch.mean(r**2) + 0.1 * torch.sum(torch.sin(w) ** 2)


def test_lbfgs_round_trip(x64):
    kwargs = dict(lr=0.5, max_iter=4, history_size=3, line_search_fn="strong_wolfe")
    params = {
        "b": jnp.asarray(0.1),
        "frozen": jnp.arange(2, dtype=jnp.int32),
        "w": jnp.linspace(-1.0, 1.0, 5),
    }
    opt = fo.lbfgs(**kwargs)
    calls = 2

    def torch_run(tp, topt, n):
        def closure():
            topt.zero_grad()
            loss = _lbfgs_loss_torch(tp)
            loss.backward()
            return loss

        for _ in range(n):
            topt.step(closure)

    step = jax.jit(
        lambda p, s: opt.step(p, s, jax.value_and_grad(_lbfgs_loss_jax, allow_int=True))
    )

    def fo_run(p, s, n):
        for _ in range(n):
            p, s, _ = step(p, s)
        return p, s

    full_p = _torch_params(params)
    full = torch.optim.LBFGS(full_p, **kwargs)
    torch_run(full_p, full, 2 * calls)
    expected = full.state_dict()

    tp = _torch_params(params)
    topt = torch.optim.LBFGS(tp, **kwargs)
    torch_run(tp, topt, calls)
    mid = _with_values(params, tp)
    state = fti.load_state_dict(opt, mid, topt.state_dict())
    ours, state = fo_run(mid, state, calls)
    for i, (a, b) in enumerate(zip(_trainable(ours), full_p)):
        _record(f"lbfgs torch->funcopt: param {i}", a, _np(b))
    exported = fti.state_dict(opt, state, ours)
    # torch's H_diag is a Python int 1 until the first curvature pair, and "al"
    # is scratch space: compare the rest
    assert_state_dicts_equal("lbfgs", exported, expected, dtypes=False)

    mid, state = fo_run(params, opt.init(params), calls)
    tp = _torch_params(mid)
    topt = torch.optim.LBFGS(tp, **kwargs)
    topt.load_state_dict(fti.state_dict(opt, state, mid))
    torch_run(tp, topt, calls)
    for i, (a, b) in enumerate(zip(tp, full_p)):
        _record(f"lbfgs funcopt->torch: param {i}", _np(a), _np(b))
    assert_state_dicts_equal("lbfgs funcopt->torch", topt.state_dict(), expected, False)


# --------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------

SK = 4  # scheduler steps on each side
LRS = (0.3, 0.05)


def _sched_rows():
    def lam(e):
        return 0.9**e

    rows = {
        "lambda_lr": (TS.LambdaLR, S.lambda_lr, {"lr_lambda": lam}),
        "multiplicative_lr": (
            TS.MultiplicativeLR,
            S.multiplicative_lr,
            {"lr_lambda": lambda e: 0.95},
        ),
        "step_lr": (TS.StepLR, S.step_lr, {"step_size": 2, "gamma": 0.5}),
        "multi_step_lr": (
            TS.MultiStepLR,
            S.multi_step_lr,
            {"milestones": [2, 5, 5], "gamma": 0.5},
        ),
        "constant_lr": (
            TS.ConstantLR,
            S.constant_lr,
            {"factor": 0.5, "total_iters": 5},
        ),
        "linear_lr": (
            TS.LinearLR,
            S.linear_lr,
            {"start_factor": 0.2, "end_factor": 0.9, "total_iters": 6},
        ),
        "exponential_lr": (TS.ExponentialLR, S.exponential_lr, {"gamma": 0.9}),
        "polynomial_lr": (
            TS.PolynomialLR,
            S.polynomial_lr,
            {"total_iters": 7, "power": 1.5},
        ),
        "cosine_annealing_lr": (
            TS.CosineAnnealingLR,
            S.cosine_annealing_lr,
            {"T_max": 3, "eta_min": 1e-3},
        ),
        "cosine_annealing_warm_restarts": (
            TS.CosineAnnealingWarmRestarts,
            S.cosine_annealing_warm_restarts,
            {"T_0": 2, "T_mult": 2, "eta_min": 1e-3},
        ),
        "cyclic_lr": (
            TS.CyclicLR,
            S.cyclic_lr,
            {
                "base_lr": [0.01, 0.02],
                "max_lr": 0.2,
                "step_size_up": 3,
                "mode": "triangular2",
                "base_momentum": 0.8,
                "max_momentum": 0.95,
            },
        ),
        "one_cycle_lr": (
            TS.OneCycleLR,
            S.one_cycle_lr,
            {"max_lr": [0.5, 0.2], "total_steps": 10, "three_phase": True},
        ),
        "swalr": (swa_utils.SWALR, S.swalr, {"swa_lr": 0.01, "anneal_epochs": 5}),
    }
    return rows


def _composite_rows():
    rows = _sched_rows()

    def pair(name):
        t, f, kw = rows[name]
        return (lambda o: t(o, **kw)), (lambda: f(**kw))

    a, b, c = pair("linear_lr"), pair("cosine_annealing_lr"), pair("step_lr")
    return {
        "sequential_lr": (
            lambda o: TS.SequentialLR(o, [a[0](o), b[0](o)], [3]),
            lambda: S.sequential_lr([a[1](), b[1]()], [3]),
        ),
        "chained_scheduler": (
            lambda o: TS.ChainedScheduler([c[0](o), b[0](o)]),
            lambda: S.chained_scheduler([c[1](), b[1]()]),
        ),
    }


def _sched_builders():
    out = {}
    for name, (tcls, factory, kw) in _sched_rows().items():
        out[name] = (
            lambda o, tcls=tcls, kw=kw: tcls(o, **kw),
            lambda factory=factory, kw=kw: factory(**kw),
        )
    out.update(_composite_rows())
    return out


SCHEDULERS = _sched_builders()


def _pair_opts(kind):
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    groups = fo.param_groups({"a": "default", "b": "head"}, {"head": {"lr": LRS[1]}})
    if kind == "sgd":
        opt = fo.sgd(lr=LRS[0], momentum=0.9, param_groups=groups)
    else:
        opt = fo.adam(lr=LRS[0], param_groups=groups)

    def torch_opt():
        a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        tgroups = [{"params": [a]}, {"params": [b], "lr": LRS[1]}]
        if kind == "sgd":
            return torch.optim.SGD(tgroups, lr=LRS[0], momentum=0.9)
        return torch.optim.Adam(tgroups, lr=LRS[0])

    return params, opt, torch_opt


def _momenta(topt):
    if "betas" in topt.defaults:
        return [g["betas"][0] for g in topt.param_groups]
    return [g["momentum"] for g in topt.param_groups]


def _torch_sched_steps(topt, tsched, n, metrics=None):
    for k in range(n):
        topt.step()
        if metrics is None:
            tsched.step()
        else:
            tsched.step(metrics[k])


# the momentum-cycling schedulers also with Adam (betas[0])
SCHED_ROWS = [(n, "sgd") for n in SCHEDULERS] + [
    ("cyclic_lr", "adam"),
    ("one_cycle_lr", "adam"),
]


@pytest.mark.parametrize("name,kind", SCHED_ROWS)
def test_scheduler_round_trip(name, kind, x64):
    torch_build, fo_build = SCHEDULERS[name]
    params, opt, torch_opt = _pair_opts(kind)
    quiet = warnings.catch_warnings()
    with quiet:
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
        full_opt = torch_opt()
        full = torch_build(full_opt)
        _torch_sched_steps(full_opt, full, 2 * SK)
        expected_lr = [g["lr"] for g in full_opt.param_groups]
        expected_m = _momenta(full_opt)

        # torch SK -> funcopt SK
        topt = torch_opt()
        tsched = torch_build(topt)
        _torch_sched_steps(topt, tsched, SK)
        sched = fo_build()
        state = fti.load_state_dict(opt, params, topt.state_dict())
        sstate = fti.load_scheduler_state_dict(
            sched, state, tsched.state_dict(), topt.state_dict()
        )
        step = jax.jit(sched.step)
        for _ in range(SK):
            state, sstate = step(state, sstate)
        _record(f"{name}/{kind} torch->funcopt: lr", fo.get_lr(state), expected_lr)
        ours_m = fti.state_dict(opt, state, params)["param_groups"]
        ours_m = [g["betas"][0] if kind == "adam" else g["momentum"] for g in ours_m]
        _record(f"{name}/{kind} torch->funcopt: momentum", ours_m, expected_m)

        # funcopt SK -> torch SK
        sched = fo_build()
        state, sstate = sched.init(opt.init(params))
        for _ in range(SK):
            state, sstate = step(state, sstate)
        topt = torch_opt()
        tsched = torch_build(topt)
        topt.load_state_dict(
            fti.state_dict(opt, state, params, sched=sched, sched_state=sstate)
        )
        ssd = fti.scheduler_state_dict(sched, sstate, state)
        tsched.load_state_dict(ssd)
        _torch_sched_steps(topt, tsched, SK)
        _record(
            f"{name}/{kind} funcopt->torch: lr",
            [g["lr"] for g in topt.param_groups],
            expected_lr,
        )
        _record(f"{name}/{kind} funcopt->torch: momentum", _momenta(topt), expected_m)
        # the exported group keys are torch's, scheduler keys included (and
        # the parameter names funcopt writes, which torch keeps on loading)
        assert [
            set(g) - {"param_names"} for g in topt.state_dict()["param_groups"]
        ] == [set(g) for g in full_opt.state_dict()["param_groups"]]


def test_reduce_lr_on_plateau_round_trip(x64):
    metrics = [1.0, 0.9, 0.95, 0.96, 0.97, 0.99, 0.98, 1.0, 0.97, 0.96]
    kw = dict(patience=1, cooldown=1, factor=0.5, min_lr=[0.0, 0.02])
    params, opt, torch_opt = _pair_opts("sgd")
    full_opt = torch_opt()
    full = TS.ReduceLROnPlateau(full_opt, **kw)
    _torch_sched_steps(full_opt, full, 10, metrics)
    expected = [g["lr"] for g in full_opt.param_groups]

    topt = torch_opt()
    tsched = TS.ReduceLROnPlateau(topt, **kw)
    _torch_sched_steps(topt, tsched, 5, metrics)
    sched = S.reduce_lr_on_plateau(**kw)
    state = fti.load_state_dict(opt, params, topt.state_dict())
    sstate = fti.load_scheduler_state_dict(sched, state, tsched.state_dict())
    for m in metrics[5:]:
        state, sstate = sched.step(state, sstate, metrics=m)
    _record("reduce_lr_on_plateau torch->funcopt: lr", fo.get_lr(state), expected)

    state, sstate = sched.init(opt.init(params))
    for m in metrics[:5]:
        state, sstate = sched.step(state, sstate, metrics=m)
    topt = torch_opt()
    tsched = TS.ReduceLROnPlateau(topt, **kw)
    topt.load_state_dict(fti.state_dict(opt, state, params))
    tsched.load_state_dict(fti.scheduler_state_dict(sched, sstate, state))
    _torch_sched_steps(topt, tsched, 5, metrics[5:])
    _record(
        "reduce_lr_on_plateau funcopt->torch: lr",
        [g["lr"] for g in topt.param_groups],
        expected,
    )
    assert set(fti.scheduler_state_dict(sched, sstate, state)) <= set(full.state_dict())


def test_scheduler_state_dict_keys_are_torchs(x64):
    """Our export holds only keys torch's own state_dict has (and the
    dynamic ones all)."""
    params, opt, torch_opt = _pair_opts("sgd")
    for name, (torch_build, fo_build) in SCHEDULERS.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            theirs = torch_build(torch_opt()).state_dict()
        sched = fo_build()
        state, sstate = sched.init(opt.init(params))
        ours = fti.scheduler_state_dict(sched, sstate, state)
        assert set(ours) <= set(theirs), (name, sorted(set(ours) - set(theirs)))
        for k in ("last_epoch", "_step_count", "base_lrs", "T_cur", "T_i"):
            if k in theirs:
                assert k in ours, (name, k)


# --------------------------------------------------------------------------
# mismatches
# --------------------------------------------------------------------------


def _adam_sd(n_params=2, shapes=((3,), (2, 2)), groups=1, **kw):
    ps = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    ps = ps[:n_params]
    if groups == 2:
        opt = torch.optim.Adam([{"params": ps[:1]}, {"params": ps[1:]}], **kw)
    else:
        opt = torch.optim.Adam(ps, **kw)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


PARAMS = {"a": np.zeros(3), "b": np.zeros((2, 2))}


def test_wrong_optimizer_type(x64):
    with pytest.raises(ValueError, match=r"not a torch.optim.SGD state dict.*Adam"):
        fti.load_state_dict(fo.sgd(momentum=0.9), PARAMS, _adam_sd())


def test_wrong_number_of_params(x64):
    with pytest.raises(ValueError, match="1 parameters, params has 2 trainable"):
        fti.load_state_dict(fo.adam(), PARAMS, _adam_sd(n_params=1))


def test_wrong_shape(x64):
    sd = _adam_sd(shapes=((3,), (4,)))
    with pytest.raises(ValueError, match=r"'exp_avg' has shape \(4,\).*\(2, 2\)"):
        fti.load_state_dict(fo.adam(), PARAMS, sd)


def test_wrong_number_of_groups(x64):
    with pytest.raises(ValueError, match="2 parameter groups, the funcopt optimizer 1"):
        fti.load_state_dict(fo.adam(), PARAMS, _adam_sd(groups=2))


def test_static_option_differs(x64):
    with pytest.raises(ValueError, match=r"\['amsgrad'\] is True.*False"):
        fti.load_state_dict(fo.adam(), PARAMS, _adam_sd(amsgrad=True))


@pytest.mark.parametrize(
    "factory,torch_cls",
    [
        (fo.adamax, torch.optim.Adamax),
        (fo.radam, torch.optim.RAdam),
        (fo.nadam, torch.optim.NAdam),
        (fo.asgd, torch.optim.ASGD),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_capturable_must_match(factory, torch_cls, x64):
    """A torch state dict saved with `capturable=True` (a CUDA run) selects
    torch's capturable step, which funcopt takes with `capturable=True`
    only: loaded into a default optimizer, the mismatch is named."""
    tparams = [torch.zeros(3, dtype=torch.float64)]
    sd = torch_cls(tparams, capturable=True).state_dict()
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"\['capturable'\] is True.*False"):
        fti.load_state_dict(factory(), params, sd)
    state = fti.load_state_dict(factory(capturable=True), params, sd)
    assert int(state.step[0]) == 0


def test_missing_state_key(x64):
    sd = _adam_sd()
    del sd["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"missing \['exp_avg_sq'\]"):
        fti.load_state_dict(fo.adam(), PARAMS, sd)


def test_scheduler_mismatch(x64):
    params, opt, torch_opt = _pair_opts("sgd")
    topt = torch_opt()
    tsched = TS.StepLR(topt, step_size=3)
    state = fti.load_state_dict(opt, params, topt.state_dict())
    with pytest.raises(ValueError, match="'step_size' differs: 3.*5"):
        fti.load_scheduler_state_dict(S.step_lr(5), state, tsched.state_dict())
    with pytest.raises(ValueError, match="not a torch ExponentialLR state dict"):
        fti.load_scheduler_state_dict(S.exponential_lr(0.9), state, tsched.state_dict())
    one = S.one_cycle_lr(max_lr=0.1, total_steps=10)
    tone = TS.OneCycleLR(torch_opt(), max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match="pass torch_optimizer.state_dict"):
        fti.load_scheduler_state_dict(one, state, tone.state_dict())


def test_lbfgs_static_mismatch(x64):
    p = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    sd = torch.optim.LBFGS(p, history_size=7).state_dict()
    with pytest.raises(ValueError, match=r"\['history_size'\] is 7.*100"):
        fti.load_state_dict(fo.lbfgs(), {"x": np.zeros(3)}, sd)


# --------------------------------------------------------------------------
# module weights and import hygiene
# --------------------------------------------------------------------------


def test_module_state_dict_round_trip(x64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    ).double()
    sd = model.state_dict()
    params = fti.module_state_dict_to_params(sd)
    assert params["0"]["weight"].shape == (3, 4)  # torch's (out, in)
    assert params["1"]["num_batches_tracked"].dtype == jnp.int64
    back = fti.params_to_module_state_dict(params)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    model.load_state_dict(back)
    # the JAX forward pass with torch's layout
    x = np.random.default_rng(0).normal(size=(5, 4))
    lin = params["0"]
    np.testing.assert_allclose(
        np.asarray(x @ lin["weight"].T + lin["bias"]),
        model[0](torch.tensor(x)).detach().numpy(),
        rtol=1e-12,
    )
    names = fti.param_names(
        fti.module_state_dict_to_params(dict(model.named_parameters()))
    )
    assert names == [n for n, _ in model.named_parameters()]  # registration order
    with pytest.raises(ValueError, match="both a tensor and a module prefix"):
        fti.module_state_dict_to_params({"a": torch.zeros(1), "a.b": torch.zeros(1)})


# --------------------------------------------------------------------------
# torch's parameter order: optimizers built from model.parameters()
# --------------------------------------------------------------------------


def _unsorted_module():
    """Registration order != sorted order: `conv` before `bn` before `fc`,
    `weight` before `bias`; BatchNorm's weight and bias share a shape."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.conv = torch.nn.Conv1d(2, 3, 2)
    model.bn = torch.nn.BatchNorm1d(3)
    model.fc = torch.nn.Linear(3, 2)
    return model.double()


def _grads_for(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)


def _torch_step(model, opt, grads, names):
    flat = dict(zip(names, jax.tree.leaves(grads)))
    for n, p in model.named_parameters():
        p.grad = torch.tensor(np.asarray(flat[n]))
    opt.step()


def _assert_params_equal(model, params):
    ours = dict(zip(fti.param_names(params), jax.tree.leaves(params)))
    for n, p in model.named_parameters():
        _record(f"order:{n}", ours[n], p.detach().numpy())


def test_registration_order_round_trips_with_model_parameters(x64):
    """funcopt's export loads into `torch.optim.Adam(model.parameters())` and
    continues exactly; that optimizer's state dict loads back into funcopt
    and continues exactly, with no reordering by hand."""
    model = _unsorted_module()
    names = [n for n, _ in model.named_parameters()]
    params = fti.module_state_dict_to_params(dict(model.named_parameters()))
    assert fti.param_names(params) == names
    assert names != sorted(names)
    opt = fo.adam(lr=0.1, amsgrad=True)
    state = opt.init(params)
    torch_opt = torch.optim.Adam(model.parameters(), lr=0.1, amsgrad=True)
    for k in range(2):
        grads = _grads_for(params, k)
        params, state = opt.step(params, grads, state)
        _torch_step(model, torch_opt, grads, names)
    _assert_params_equal(model, params)

    # funcopt -> a torch optimizer built as real scripts build it
    model2 = _unsorted_module()
    model2.load_state_dict(fti.params_to_module_state_dict(params), strict=False)
    resumed = torch.optim.Adam(model2.parameters(), lr=0.1, amsgrad=True)
    resumed.load_state_dict(fti.state_dict(opt, state, params))
    assert resumed.state_dict()["param_groups"][0]["param_names"] == names
    # torch -> funcopt
    state_back = fti.load_state_dict(opt, params, torch_opt.state_dict())
    grads = _grads_for(params, 7)
    params_a, _ = opt.step(params, grads, state_back)
    _torch_step(model, torch_opt, grads, names)
    _torch_step(model2, resumed, grads, names)
    _assert_params_equal(model, params_a)
    _assert_params_equal(model2, params_a)


def test_plain_dict_params_take_torchs_order_from_names(x64):
    """A tree built by hand flattens in sorted key order: without `names`
    the shapes show the orders differ and the error names both; with
    `names` (or torch's saved `param_names`) the ids map by name."""
    model = _unsorted_module()
    names = [n for n, _ in model.named_parameters()]
    params = {
        m: {k: jnp.asarray(v.detach().numpy()) for k, v in mod.named_parameters()}
        for m, mod in model.named_children()
    }
    opt = fo.adam(lr=0.1)
    torch_opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _torch_step(model, torch_opt, _grads_for(params, 0), fti.param_names(params))
    sd = torch_opt.state_dict()
    with pytest.raises(ValueError, match=r"funcopt numbered the parameters \[bn"):
        fti.load_state_dict(opt, params, sd)
    state = fti.load_state_dict(opt, params, sd, names=names)
    exported = fti.state_dict(opt, state, params, names=names)
    assert exported["param_groups"][0]["param_names"] == names
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(
                exported["state"][pid][key], value, rtol=0, atol=0
            )
    # torch's names in the state dict match without `names`
    named_opt = torch.optim.Adam(model.named_parameters(), lr=0.1)
    named_opt.load_state_dict(sd)
    by_name = fti.load_state_dict(opt, params, named_opt.state_dict())
    for slot in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(
            jax.tree.leaves(by_name.slots[slot]), jax.tree.leaves(state.slots[slot])
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_parameter_names_that_differ_are_refused(x64):
    model = _unsorted_module()
    params = fti.module_state_dict_to_params(dict(model.named_parameters()))
    opt = fo.adam(lr=0.1)
    sd = fti.state_dict(opt, opt.init(params), params)
    sd["param_groups"][0]["param_names"][0] = "encoder.weight"
    with pytest.raises(
        ValueError, match="the param_names of the torch state dict must"
    ):
        fti.load_state_dict(opt, params, sd)
    with pytest.raises(ValueError, match=r"missing \[.*'fc.bias'"):
        fti.state_dict(opt, opt.init(params), params, names=["conv.weight"])
    with pytest.raises(ValueError, match="repeated"):
        fti.state_dict(
            opt, opt.init(params), params, names=[*fti.param_names(params), "fc.bias"]
        )
    lbfgs = fo.lbfgs()
    with pytest.raises(ValueError, match="LBFGS keeps flat vectors in parameter order"):
        fti.state_dict(
            lbfgs, lbfgs.init(params), params, names=sorted(fti.param_names(params))
        )


def test_train_state_exports_and_resumes(x64):
    """`state_dict(opt, train_state)` and `load_state_dict(opt, train_state,
    sd)` take a TrainState (its params and opt_state) and give one back."""
    model = _unsorted_module()
    names = [n for n, _ in model.named_parameters()]
    params = fti.module_state_dict_to_params(dict(model.named_parameters()))
    opt = fo.adam(lr=0.1)
    ts = fo.TrainState.create(params, opt)
    ts, _ = ts.backward(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))
    ts = ts.step()
    torch_opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _torch_step(model, torch_opt, jax.tree.map(lambda p: 2 * p, params), names)
    sd = fti.state_dict(opt, ts)
    assert_state_dicts_equal("TrainState export", sd, torch_opt.state_dict())
    resumed = fti.load_state_dict(opt, fo.TrainState.create(params, opt), sd)
    assert isinstance(resumed, fo.TrainState)
    for a, b in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(ts.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="needs params"):
        fti.state_dict(opt, ts.opt_state)


def test_import_funcopt_does_not_import_torch():
    code = (
        "import sys, funcopt\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'orbax' not in sys.modules, 'orbax imported'\n"
        "import funcopt.torch_interop, funcopt.checkpoint, funcopt.compare\n"
        "assert 'torch' not in sys.modules, 'torch imported by a submodule'\n"
        "assert funcopt.torch_interop.state_dict\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def teardown_module():
    if WORST:
        print("\nworst relative differences:")
        for k, v in sorted(WORST.items()):
            print(f"  {k}: {v:.2e}")


# --------------------------------------------------------------------------
# tied weights
# --------------------------------------------------------------------------


def _tied_model():
    """nanoGPT's weight tying: the output head is the token embedding."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.wte = torch.nn.Embedding(7, 4)
    model.ln = torch.nn.LayerNorm(4)
    model.lm_head = torch.nn.Linear(4, 7, bias=False)
    model.lm_head.weight = model.wte.weight
    return model.double()


def test_tied_weights_become_one_leaf(x64):
    model = _tied_model()
    sd = model.state_dict()
    assert fti.tied_names(sd) == {"lm_head.weight": "wte.weight"}
    params = fti.module_state_dict_to_params(sd)
    assert fti.param_names(params) == [n for n, _ in model.named_parameters()]
    assert "lm_head" not in params

    def loss_fn(p, tokens):
        h = p["wte"]["weight"][tokens]
        h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
        h = h * p["ln"]["weight"] + p["ln"]["bias"]
        logits = h @ p["wte"]["weight"].T  # the tied head
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(tokens)), tokens])

    opt = fo.adamw(lr=0.1)
    state = opt.init(params)
    torch_opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    tokens = np.array([1, 3, 5, 3])
    for _ in range(3):
        params, state = opt.step(params, jax.grad(loss_fn)(params, tokens), state)
        torch_opt.zero_grad()
        logits = model.lm_head(model.ln(model.wte(torch.tensor(tokens))))
        torch.nn.functional.cross_entropy(logits, torch.tensor(tokens)).backward()
        torch_opt.step()
    _assert_params_equal(model, params)
    # both names written back: a strict load into a fresh tied model
    back = fti.params_to_module_state_dict(params, tied=fti.tied_names(sd))
    fresh = _tied_model()
    fresh.load_state_dict(back)
    assert fresh.lm_head.weight is fresh.wte.weight
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="params has no leaf 'head.weight'"):
        fti.params_to_module_state_dict(params, tied={"x.weight": "head.weight"})
