r"""funcopt.lbfgs against live torch.optim.LBFGS, float64 and float32, several
``step`` calls.

Each case runs the same problem through ``torch.optim.LBFGS.step(closure)`` and
``fo.lbfgs(...).step(params, state, value_and_grad_fn)`` (jitted unless said
otherwise) and compares, after every call: the parameters, the returned (first)
loss, ``func_evals``/``n_iter``, and the stored state (``d``, ``t``, ``H_diag``,
``prev_flat_grad``, ``prev_loss`` and the history in torch's list order).
Each quantity $x$ must satisfy
$|x - x_\text{torch}| \le \max(r s, 16 f) + r\,|x_\text{torch}|$, $s$ its scale
($\max(1, \max|x_\text{torch}|)$), $r$ = ``RTOL`` of the run's dtype and $f$
its noise floor (``tests/parity/noise_floor.py``: ``ro = 1 / y·s`` after
cancellation is what needs it), which must stay below
``MAX_RELATIVE_FLOOR`` of the dtype; discrete outcomes (``func_evals``,
``n_iter``, history length) must be the same in torch's nudged runs (else the
case is ill-posed) and in funcopt.

float32 runs with x64 off, as users run JAX: funcopt's losses, ``t`` and line
search scalars are then float32 where torch's are Python floats (float64), and
XLA and torch sum dot products in different orders. Measured on the float32
cases here and optim_db's float32 rows (Intel Xeon, AVX-512 and restricted to
AVX2 as in ``noise_floor.py``, 10 nudged runs): where the fixed tolerance
decides, funcopt differs from torch by at most $4.3\cdot10^{-7}$ of the scale
(~7 float32 ulps), so $r = 10^{-5}$ leaves a 23x margin; where the floor
decides, $|x - x_\text{torch}| \le 1.3 f$ (float64: $3.9 f$), well under
``NOISE_MULTIPLE`` = 16; floors stay $\le 5.4\cdot10^{-6}$ of the scale, 18x
below float32's guard ($10^{-4}$, ~$1.7\cdot10^3$ ulps). A case whose last
bits are amplified more proves nothing in float32 and is left out (see
``F32_CASES``). A planted bug of $10^{-5}$ relative in ``H_diag`` fails 3 of
the 7 float32 cases; of $10^{-4}$, all of them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt._tree import is_trainable
from tests.parity.noise_floor import assert_close, nudge, nudge_array, nudged_rngs

RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}


@dataclasses.dataclass(frozen=True)
class Problem:
    """A loss written twice: on a JAX params tree and on torch's param list."""

    name: str
    make_params: Callable[[], Any]  # numpy pytree
    jax_loss: Callable[[Any], jax.Array]
    torch_loss: Callable[[list[torch.Tensor]], torch.Tensor]


def _rosenbrock(dim: int, start=None) -> Problem:
    def rosen(x, lib):
        return lib.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)

    def make():
        if start is not None:
            return {"x": np.full(dim, start, np.float64)}
        return {"x": np.linspace(-1.2, 1.0, dim) + 0.1 * np.sin(np.arange(dim))}

    return Problem(
        f"rosenbrock{dim}" + ("" if start is None else f"@{start}"),
        make,
        lambda p: rosen(p["x"], jnp),
        lambda ps: rosen(ps[0], torch),
    )


_RNG = np.random.default_rng(0)
_A = _RNG.normal(size=(20, 5))
_Y = _A @ np.array([1.0, -2.0, 0.5, 3.0, -1.0]) + 0.3 + 0.1 * _RNG.normal(size=20)
_X = _RNG.normal(size=(40, 3))
_LABELS = (_X @ np.array([1.5, -1.0, 0.5]) + 0.2 * _RNG.normal(size=40) > 0).astype(
    np.float64
)


def _least_squares() -> Problem:
    """A (frozen int leaf, bias, weights) tree: flat order is b, then w."""

    def make():
        return {
            "b": np.asarray(0.0),
            "frozen": np.arange(3, dtype=np.int32),
            "w": np.zeros(5),
        }

    def jl(p):
        a, y = (jnp.asarray(v, p["w"].dtype) for v in (_A, _Y))
        return jnp.mean((a @ p["w"] + p["b"] - y) ** 2)

    def tl(ps):
        b, w = ps
        a, y = (torch.tensor(v, dtype=w.dtype) for v in (_A, _Y))
        return torch.mean((a @ w + b - y) ** 2)

    return Problem("least_squares", make, jl, tl)


def _logistic() -> Problem:
    """Logistic regression with a small L2 term; a 2-D weight and a bias."""

    def make():
        return {"w": np.full((3, 1), 0.1), "b": np.zeros(1)}

    def jl(p):
        z = (jnp.asarray(_X, p["w"].dtype) @ p["w"])[:, 0] + p["b"][0]
        y = jnp.asarray(_LABELS, p["w"].dtype)
        return jnp.mean(jax.nn.softplus(z) - y * z) + 1e-3 * jnp.sum(p["w"] ** 2)

    def tl(ps):
        b, w = ps  # jax.tree.leaves order: "b" before "w"
        z = (torch.tensor(_X, dtype=w.dtype) @ w)[:, 0] + b[0]
        y = torch.tensor(_LABELS, dtype=w.dtype)
        return torch.mean(torch.nn.functional.softplus(z) - y * z) + 1e-3 * torch.sum(
            w**2
        )

    return Problem("logistic", make, jl, tl)


def _value_and_grad(problem: Problem):
    # allow_int: the frozen int leaf gets a float0 gradient, i.e. none
    return jax.value_and_grad(problem.jax_loss, allow_int=True)


def _torch_params(params) -> list[torch.Tensor]:
    return [
        torch.tensor(np.array(p), requires_grad=True)
        for p in jax.tree.leaves(params)
        if is_trainable(p)
    ]


def _ordered_history(state) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ring buffers in torch's list order (oldest first)."""
    count, start = int(state.history_count), int(state.history_start)
    size = state.old_dirs.shape[0]
    rows = [(start + i) % size for i in range(count)]
    return (
        np.asarray(state.old_dirs)[rows],
        np.asarray(state.old_stps)[rows],
        np.asarray(state.ro)[rows],
    )


def _cast(params, dtype):
    """The float leaves of a numpy params tree in ``dtype`` (complex leaves in
    its complex counterpart); int leaves as they are."""

    def cast(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.complexfloating):
            return x.astype(np.result_type(dtype, np.complex64))
        return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x

    return jax.tree.map(cast, params)


def _close(actual, expected, what, rtol=None, nudged=()):
    """Within ``rtol`` (default: ``RTOL`` of funcopt's dtype) of the
    quantity's scale, or of its noise floor, guarded as that dtype."""
    dtype = np.asarray(actual).dtype
    if np.issubdtype(dtype, np.complexfloating):
        dtype = np.finfo(dtype).dtype
    rtol = RTOL[dtype] if rtol is None else rtol
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    assert_close(
        np.asarray(actual, np.float64),
        expected,
        rtol,
        rtol * scale,
        what,
        nudged,
        dtype=dtype,
    )


def _snapshot(tstate) -> dict:
    """torch's LBFGS state after a call, copied (torch updates it in place)."""
    out = {"func_evals": tstate["func_evals"], "n_iter": tstate["n_iter"]}
    if "d" not in tstate:  # torch returned at once every time: nothing stored
        return out
    history = {
        "old_dirs": [v.numpy().copy() for v in tstate["old_dirs"]],
        "old_stps": [v.numpy().copy() for v in tstate["old_stps"]],
        "ro": [float(r) for r in tstate["ro"]],
    }
    return {
        **out,
        **history,
        "d": tstate["d"].numpy().copy(),
        "t": float(tstate["t"]),
        "H_diag": float(tstate["H_diag"]),
        "prev_flat_grad": tstate["prev_flat_grad"].numpy().copy(),
        "prev_loss": float(tstate["prev_loss"]),
    }


DISCRETE = ("func_evals", "n_iter")
CONTINUOUS = ("d", "t", "H_diag", "prev_flat_grad", "prev_loss")
HISTORY = ("old_dirs", "old_stps", "ro")


def _compare_state(state, expected: dict, call, nudged: Sequence[dict] = ()):
    """funcopt's state against a torch :func:`_snapshot`; ``nudged``: the same
    call in torch's nudged runs, which must agree on every discrete outcome."""
    ill_posed = "the case sits on a branch's edge (ill-posed)"
    for other in nudged:
        assert [other[k] for k in DISCRETE] == [expected[k] for k in DISCRETE], (
            f"call {call}: torch's func_evals/n_iter change when its inputs move "
            f"by one ulp: {ill_posed}"
        )
        assert len(other.get("ro", ())) == len(expected.get("ro", ())), (
            f"call {call}: torch's history length changes when its inputs move "
            f"by one ulp: {ill_posed}"
        )
    assert int(state.func_evals) == expected["func_evals"], f"func_evals, call {call}"
    assert int(state.n_iter) == expected["n_iter"], f"n_iter, call {call}"
    if "d" not in expected:
        assert int(state.history_count) == 0
        return
    ours = dict(zip(HISTORY, _ordered_history(state)))
    ours.update((k, getattr(state, k)) for k in CONTINUOUS)
    assert len(ours["ro"]) == len(expected["ro"]), f"history length, call {call}"
    for key in CONTINUOUS + HISTORY:
        if key in HISTORY and not len(expected[key]):
            continue
        floor_runs = [np.asarray(other[key]) for other in nudged]
        _close(
            ours[key],
            np.asarray(expected[key]),
            f"{key}, call {call}",
            nudged=floor_runs,
        )


@dataclasses.dataclass(frozen=True)
class TorchCall:
    """What torch holds after one ``step(closure)``."""

    params: list[np.ndarray]
    loss: float
    state: dict


def _torch_calls(problem: Problem, kwargs: dict, calls: int, params0, rng=None):
    """torch's LBFGS for ``calls`` steps; with ``rng``, a nudged run: the start
    and every loss and gradient the closure returns moved by one ulp."""
    if rng is not None:
        params0 = nudge(params0, rng)
    tparams = _torch_params(params0)
    topt = torch.optim.LBFGS(tparams, **kwargs)

    def closure():
        topt.zero_grad()
        loss = problem.torch_loss(tparams)
        loss.backward()
        if rng is None:
            return loss
        for p in tparams:
            p.grad = torch.from_numpy(nudge_array(p.grad.numpy(), rng))
        return torch.from_numpy(nudge_array(loss.detach().numpy(), rng))

    out = []
    for _ in range(calls):
        loss = topt.step(closure)
        out.append(
            TorchCall(
                [p.detach().numpy().copy() for p in tparams],
                loss.item(),
                _snapshot(topt.state[tparams[0]]),
            )
        )
    return out


# hyperparameters funcopt's LBFGS keeps in its state (traced, as `set_lr`
# relies on): configurations differing only in them share one compiled step
_TRACED = ("lr", "tolerance_grad", "tolerance_change")
_STEPS: dict = {}


def _jitted_step(problem: Problem, kwargs: dict):
    """``jax.jit`` of ``fo.lbfgs(**kwargs).step`` on ``problem``, compiled once
    per loss (a problem's name up to ``@start``) and static configuration;
    the state made by ``fo.lbfgs(**kwargs).init`` carries the traced rest."""
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in _TRACED))
    key = (problem.name.split("@")[0], static)
    if key not in _STEPS:
        opt, vg = fo.lbfgs(**kwargs), _value_and_grad(problem)
        _STEPS[key] = jax.jit(lambda p, s: opt.step(p, s, vg))
    return _STEPS[key]


def _run_both(
    problem: Problem, kwargs: dict, calls: int, jit: bool = True, dtype=np.float64
):
    """Run ``calls`` steps in torch and funcopt; compare after each call.

    Tolerances: ``RTOL``, or the noise floor of nudged torch runs where that
    is larger (``tests/parity/noise_floor.py``). Returns
    funcopt's params and state and torch's calls.
    """
    params0 = _cast(problem.make_params(), dtype)
    expected = _torch_calls(problem, kwargs, calls, params0)
    nudged_runs = [
        _torch_calls(problem, kwargs, calls, params0, rng) for rng in nudged_rngs()
    ]
    opt = fo.lbfgs(**kwargs)
    params = jax.tree.map(jnp.asarray, params0)
    state = opt.init(params)
    if jit:
        step = _jitted_step(problem, kwargs)
    else:

        def step(p, s):
            return opt.step(p, s, _value_and_grad(problem))

    frozen0 = [p for p in jax.tree.leaves(params0) if not is_trainable(p)]
    for call, torch_call in enumerate(expected):
        nudged = [run[call] for run in nudged_runs]
        params, state, loss = step(params, state)
        ours = [p for p in jax.tree.leaves(params) if is_trainable(p)]
        for i, (p, tp) in enumerate(zip(ours, torch_call.params)):
            floor_runs = [other.params[i] for other in nudged]
            _close(p, tp, f"param {i}, call {call}", nudged=floor_runs)
        floor_runs = [other.loss for other in nudged]
        _close(loss, torch_call.loss, f"loss, call {call}", nudged=floor_runs)
        _compare_state(state, torch_call.state, call, [o.state for o in nudged])
        frozen = [p for p in jax.tree.leaves(params) if not is_trainable(p)]
        for p, p0 in zip(frozen, frozen0):
            np.testing.assert_array_equal(p, p0)
    return params, state, expected


CASES = [
    # (problem, kwargs, calls)
    (_rosenbrock(2), dict(max_iter=4), 5),
    (_rosenbrock(5), dict(max_iter=4), 5),
    (_rosenbrock(10), dict(max_iter=5), 5),
    (_rosenbrock(5), dict(max_iter=4, lr=0.5), 5),
    (_rosenbrock(2), dict(max_iter=4, line_search_fn="strong_wolfe"), 5),
    (_rosenbrock(5), dict(max_iter=4, line_search_fn="strong_wolfe"), 5),
    (_rosenbrock(10), dict(max_iter=5, line_search_fn="strong_wolfe"), 5),
    # ring buffer: history_size 2/3, far more accepted pairs than that
    (_rosenbrock(5), dict(max_iter=4, history_size=2), 5),
    (
        _rosenbrock(5),
        dict(max_iter=4, history_size=3, line_search_fn="strong_wolfe"),
        5,
    ),
    (_least_squares(), dict(max_iter=4, history_size=2), 5),
    (_least_squares(), dict(max_iter=20), 5),
    (_least_squares(), dict(max_iter=20, line_search_fn="strong_wolfe"), 5),
    (_logistic(), dict(max_iter=20), 5),
    (_logistic(), dict(max_iter=20, history_size=3), 5),
    (_logistic(), dict(max_iter=20, line_search_fn="strong_wolfe"), 5),
    (_logistic(), dict(max_iter=10, history_size=2, line_search_fn="strong_wolfe"), 5),
    # max_eval shorter than max_iter (both paths), and max_ls == 0 in strong_wolfe
    (_rosenbrock(5), dict(max_iter=10, max_eval=4), 5),
    (_rosenbrock(5), dict(max_iter=10, max_eval=7, line_search_fn="strong_wolfe"), 5),
    (_rosenbrock(5), dict(max_iter=1, line_search_fn="strong_wolfe"), 5),
    (_rosenbrock(5), dict(max_iter=1), 5),
    # tolerance edge cases: large tolerances stop the inner loop early
    (_least_squares(), dict(max_iter=20, tolerance_grad=1e-2), 5),
    (_logistic(), dict(max_iter=20, tolerance_change=1e-4), 5),
    (
        _logistic(),
        dict(max_iter=20, tolerance_change=1e-4, line_search_fn="strong_wolfe"),
        5,
    ),
    (
        _least_squares(),
        dict(max_iter=20, tolerance_grad=1e-3, line_search_fn="strong_wolfe"),
        5,
    ),
    # at the minimum: max|g| <= tolerance_grad at once, every call (the
    # compiled steps of rosenbrock5 max_iter=4 above)
    (_rosenbrock(5, start=1.0), dict(max_iter=4), 3),
    (_rosenbrock(5, start=1.0), dict(max_iter=4, line_search_fn="strong_wolfe"), 3),
]


# float32 (x64 off, as users run JAX): the cases whose torch quantities keep a
# noise floor <= 5.4e-6 of their scale wherever the floor decides (10 nudged
# runs, AVX-512 and AVX2; see the module docstring), 18x below float32's
# guard. Rosenbrock floors grow with each call (a third call: up to 4.9e-5),
# hence 2 calls of <= 4 iterations, which still wrap the 2- and 3-pair
# histories. The other float64 cases are too ill-conditioned in float32:
# Rosenbrock 2 and 10, the longer least-squares and logistic runs move by
# 4.6e-5 to 3e-3 of their scale under one-ulp nudges, or end on a tolerance
# test that one ulp flips (`|loss - prev_loss| < 1e-9` is "equal losses" in
# float32; at the minimum `max|g| <= 1e-7` is chance).
F32_CASES = [
    (_rosenbrock(5), dict(max_iter=4, lr=0.5), 2),
    (_rosenbrock(5), dict(max_iter=4, line_search_fn="strong_wolfe"), 2),
    (_rosenbrock(5), dict(max_iter=4, history_size=2), 2),
    (
        _rosenbrock(5),
        dict(max_iter=4, history_size=3, line_search_fn="strong_wolfe"),
        2,
    ),
    (_rosenbrock(5), dict(max_iter=10, max_eval=4), 2),
    (_rosenbrock(5), dict(max_iter=1), 3),
    (_rosenbrock(5), dict(max_iter=1, line_search_fn="strong_wolfe"), 3),
]


def _id(case):
    problem, kwargs, calls = case
    return f"{problem.name}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_torch(x64, case):
    problem, kwargs, calls = case
    _run_both(problem, kwargs, calls)


@pytest.mark.parametrize("case", F32_CASES, ids=[_id(c) for c in F32_CASES])
def test_matches_torch_float32(case):
    assert not jax.config.jax_enable_x64
    problem, kwargs, calls = case
    _run_both(problem, kwargs, calls, dtype=np.float32)


def test_converged_runs_stop_as_torch(x64):
    """Many calls on a convex fit: later calls exit at once at the optimum."""
    _, state, calls = _run_both(_least_squares(), dict(max_iter=20), 8)
    assert calls[-1].state["n_iter"] < 8 * 20  # early exits happened


def test_early_exit_leaves_params_and_n_iter(x64):
    problem = _rosenbrock(5, start=1.0)  # compiled for CASES already
    params, state, _ = _run_both(problem, dict(max_iter=4), 2)
    np.testing.assert_array_equal(params["x"], problem.make_params()["x"])
    assert int(state.n_iter) == 0 and int(state.func_evals) == 2


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_without_jit(x64, line_search_fn):
    """Eager (~0.3 s an iteration): 8 iterations wrap the 3-pair history."""
    _run_both(
        _logistic(),
        dict(max_iter=4, history_size=3, line_search_fn=line_search_fn),
        2,
        jit=False,
    )


def test_none_grad_counts_as_zero(x64):
    """A leaf the loss does not use: torch's ``p.grad is None``, here a None leaf."""
    base = _rosenbrock(4)

    def make():
        return {"unused": np.array([0.5, -0.5]), "x": base.make_params()["x"]}

    problem = Problem(
        "with_unused",
        make,
        lambda p: base.jax_loss({"x": p["x"]}),
        lambda ps: base.torch_loss(ps[1:]),
    )

    def vg(p):
        loss, grads = jax.value_and_grad(problem.jax_loss)(p)
        return loss, {**grads, "unused": None}

    params0 = make()
    tparams = _torch_params(params0)
    topt = torch.optim.LBFGS(tparams, max_iter=4, line_search_fn="strong_wolfe")

    def closure():
        topt.zero_grad()
        loss = problem.torch_loss(tparams)
        loss.backward()
        return loss

    opt = fo.lbfgs(max_iter=4, line_search_fn="strong_wolfe")
    params = jax.tree.map(jnp.asarray, params0)
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.step(p, s, vg))
    for call in range(4):
        topt.step(closure)
        params, state, _ = step(params, state)
        assert tparams[0].grad is None
        _close(params["unused"], tparams[0].detach().numpy(), f"unused, call {call}")
        _close(params["x"], tparams[1].detach().numpy(), f"x, call {call}")
        _compare_state(state, _snapshot(topt.state[tparams[0]]), call)


def test_complex_param_as_real_pairs(x64):
    """A complex leaf is a real pair in the flat vector (torch's view_as_real)."""
    z0 = np.array([1.0 + 2.0j, -0.5 + 0.3j, 0.2 - 1.0j])
    target = np.array([0.3 - 0.1j, 1.0 + 1.0j, -2.0 + 0.5j])

    def jl(p):
        e = p["z"] - jnp.asarray(target)
        return jnp.sum(jnp.abs(e) ** 4) + jnp.sum(e.real * e.imag)

    def vg(p):
        loss, g = jax.value_and_grad(jl)(p)
        # torch's gradient of a real loss is dL/dRe + i dL/dIm: JAX's conjugate
        return loss, jax.tree.map(jnp.conj, g)

    tz = torch.tensor(z0, requires_grad=True)
    topt = torch.optim.LBFGS(
        [tz], max_iter=4, history_size=3, line_search_fn="strong_wolfe"
    )

    def closure():
        topt.zero_grad()
        e = tz - torch.tensor(target)
        loss = torch.sum(torch.abs(e) ** 4) + torch.sum(e.real * e.imag)
        loss.backward()
        return loss

    opt = fo.lbfgs(max_iter=4, history_size=3, line_search_fn="strong_wolfe")
    params = {"z": jnp.asarray(z0)}
    state = opt.init(params)
    assert state.d.shape == (6,)
    step = jax.jit(lambda p, s: opt.step(p, s, vg))
    for call in range(4):
        tl = topt.step(closure)
        params, state, loss = step(params, state)
        _close(
            np.asarray(params["z"]).view(np.float64),
            tz.detach().numpy().view(np.float64),
            f"z, call {call}",
        )
        _close(loss, tl.item(), f"loss, call {call}")
        _compare_state(state, _snapshot(topt.state[tz]), call)


def test_get_and_set_lr(x64):
    """``fo.get_lr``/``fo.set_lr`` on the state, mid-run, without recompiling."""
    problem = _logistic()
    params0 = problem.make_params()
    tparams = _torch_params(params0)
    topt = torch.optim.LBFGS(tparams, lr=0.8, max_iter=5)

    def closure():
        topt.zero_grad()
        loss = problem.torch_loss(tparams)
        loss.backward()
        return loss

    opt = fo.lbfgs(lr=0.8, max_iter=5)
    params = jax.tree.map(jnp.asarray, params0)
    state = opt.init(params)
    assert [float(v) for v in fo.get_lr(state)] == [0.8]
    vg = _value_and_grad(problem)
    step = jax.jit(lambda p, s: opt.step(p, s, vg))
    for call, lr in enumerate([0.8, 0.8, 0.3, 0.3, 1.0]):
        topt.param_groups[0]["lr"] = lr
        state = fo.set_lr(state, lr)
        assert [float(v) for v in fo.get_lr(state)] == [lr]
        topt.step(closure)
        params, state, _ = step(params, state)
        _close(params["w"], tparams[1].detach().numpy(), f"w, call {call}")
        _compare_state(state, _snapshot(topt.state[tparams[0]]), call)
    assert step._cache_size() == 1


def test_update_needs_value_fn_and_matches_step(x64):
    problem = _rosenbrock(5)
    kwargs = dict(max_iter=4, line_search_fn="strong_wolfe")  # as in CASES
    opt = fo.lbfgs(**kwargs)
    params = jax.tree.map(jnp.asarray, problem.make_params())
    state = opt.init(params)
    loss, grads = _value_and_grad(problem)(params)
    with pytest.raises(NotImplementedError, match="value_and_grad_fn"):
        opt.update(grads, state)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(grads, state, value_fn=problem.jax_loss)
    stepped, stepped_state, _ = _jitted_step(problem, kwargs)(params, state)
    updates, new_state = jax.jit(
        lambda g, s, p, v: opt.update(g, s, p, value=v, value_fn=problem.jax_loss)
    )(grads, state, params, loss)
    new_params = jax.tree.map(lambda p, u: p + u, params, updates)
    _close(new_params["x"], stepped["x"], "update vs step", rtol=1e-14)
    assert int(new_state.func_evals) == int(stepped_state.func_evals)
    assert int(new_state.n_iter) == int(stepped_state.n_iter)


# --------------------------------------------------------------------------
# arguments and errors
# --------------------------------------------------------------------------


def test_signature_matches_torch():
    torch_sig = inspect.signature(torch.optim.LBFGS.__init__)
    expected = [
        (p.name, p.kind, p.default)
        for p in torch_sig.parameters.values()
        if p.name not in ("self", "params")
    ]
    actual = [
        (p.name, p.kind, p.default)
        for p in inspect.signature(fo.lbfgs).parameters.values()
        if p.name != "param_groups"
    ]
    assert actual == expected


@pytest.mark.parametrize("max_iter", [1, 4, 20, 21])
def test_default_max_eval(max_iter):
    p = torch.zeros(2, requires_grad=True)
    torch_group = torch.optim.LBFGS([p], max_iter=max_iter).param_groups[0]
    assert fo.lbfgs(max_iter=max_iter).defaults["max_eval"] == torch_group["max_eval"]


def _torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"lr": -1e-3},
        {"lr": float("nan")},
        {"lr": torch.tensor([1.0, 2.0])},
    ],
    ids=str,
)
def test_bad_lr_matches_torch(kwargs):
    p = torch.zeros(2, requires_grad=True)
    expected = _torch_error(lambda: torch.optim.LBFGS([p], **kwargs))
    ours = dict(kwargs)
    if isinstance(ours["lr"], torch.Tensor):
        ours["lr"] = np.asarray(ours["lr"])
    actual = _torch_error(lambda: fo.lbfgs(**ours))
    assert type(actual) is type(expected)
    assert str(actual) == str(expected)


def test_bad_line_search_fn_matches_torch():
    """torch raises at its first step; funcopt at construction: same type/message."""
    p = torch.ones(2, requires_grad=True)
    topt = torch.optim.LBFGS([p], line_search_fn="backtracking")

    def closure():
        topt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    expected = _torch_error(lambda: topt.step(closure))
    actual = _torch_error(lambda: fo.lbfgs(line_search_fn="backtracking"))
    assert type(actual) is type(expected)
    assert str(actual) == str(expected)


def test_param_groups_match_torch():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    expected = _torch_error(
        lambda: torch.optim.LBFGS([{"params": [a]}, {"params": [b], "lr": 0.1}])
    )
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    # two groups visible from the overrides alone: raised at construction
    two = fo.param_groups({"a": "x", "b": "y"}, {"x": {"lr": 0.1}, "y": {"lr": 0.2}})
    actual = _torch_error(lambda: fo.lbfgs(param_groups=two))
    assert (type(actual), str(actual)) == (type(expected), str(expected))
    # a default group plus one override: raised by init
    opt = fo.lbfgs(
        param_groups=fo.param_groups({"a": "default", "b": "y"}, {"y": {"lr": 0.1}})
    )
    actual = _torch_error(lambda: opt.init(params))
    assert (type(actual), str(actual)) == (type(expected), str(expected))


def test_single_param_group_is_fine(x64):
    """torch accepts one group with its own lr; so does funcopt."""
    groups = fo.param_groups(
        lambda p: jax.tree.map(lambda _: "g", p), {"g": {"lr": 0.25}}
    )
    opt = fo.lbfgs(param_groups=groups)
    state = opt.init({"x": jnp.zeros(3)})
    assert [float(v) for v in fo.get_lr(state)] == [0.25]
