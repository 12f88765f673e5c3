"""``step`` is differentiable w.r.t. params, grads and hyperparameters.

Checked against central finite differences in float64, along a random
direction, through two steps (so the state carries the derivative too), for
every torch.optim row of OPT_CASES (LBFGS has its own closure API; SparseAdam
takes BCOO gradients and is not in OPT_CASES). Muon's Newton-Schulz runs in
bfloat16, as torch's: finite differences of a bf16 round trip are meaningless,
so for Muon the direction leaves the gradients fixed (params and lr only).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcopt as fo
from tests.parity.cases import OPT_CASES as ALL_CASES
from tests.torch_ref import make_grads, make_params_for

OPT_CASES = [c for c in ALL_CASES if c.torch_cls.__module__.startswith("torch.optim")]
NO_GRAD_DIRECTION = {"muon"}
# ASGD stores eta in float32 (as torch): a 1e-6 step would see its rounding
STEP = {"asgd": 1e-3}


@pytest.mark.parametrize("case", OPT_CASES, ids=lambda c: c.name)
def test_step_matches_finite_differences(case, x64):
    kwargs = case.combos()[-1]
    rng = np.random.default_rng(0)
    params = jax.tree.map(jnp.asarray, make_params_for(case, rng, np.float64))
    g1, g2 = [jax.tree.map(jnp.asarray, g) for g in make_grads(rng, params, 2, False)]
    opt = case.factory(**kwargs)
    state0 = opt.init(params)
    lr0 = float(fo.get_lr(state0)[0])
    weights = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)

    def loss(x):
        p, g, lr = x
        state = fo.set_lr(state0, lr)
        p, state = opt.step(p, g, state)
        p, state = opt.step(p, g2, state)
        out = sum(
            jnp.sum(w * q)
            for w, q in zip(jax.tree.leaves(weights), jax.tree.leaves(p))
            if jnp.issubdtype(q.dtype, jnp.floating)
        )
        return out + sum(
            jnp.sum(s)
            for s in jax.tree.leaves(state.unpacked().slots)
            if s.dtype == jnp.float64
        )

    float_only = lambda t: jax.tree.map(  # noqa: E731
        lambda p: p if jnp.issubdtype(p.dtype, jnp.floating) else None, t
    )
    x = (float_only(params), float_only(g1), jnp.asarray(lr0))
    full = lambda x: loss(  # noqa: E731
        (
            jax.tree.map(
                lambda a, b: b if a is None else a,
                x[0],
                params,
                is_leaf=lambda v: v is None,
            ),
            x[1],
            x[2],
        )
    )
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), x)
    if case.name in NO_GRAD_DIRECTION:
        direction = (
            direction[0],
            jax.tree.map(jnp.zeros_like, direction[1]),
            direction[2],
        )
    # one compiled program each for the gradient and the loss (eagerly every
    # op of two steps and their VJP dispatches on its own)
    grad = jax.jit(jax.grad(full))(x)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(grad))
    analytic = sum(
        float(jnp.vdot(a, d))
        for a, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    h = STEP.get(case.name, 1e-6)
    shift = lambda s: jax.tree.map(lambda a, d: a + s * d, x, direction)  # noqa: E731
    full = jax.jit(full)
    numeric = (float(full(shift(h))) - float(full(shift(-h)))) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
def test_radam_gradient_through_its_unrectified_steps(capturable, x64):
    """RAdam's rectification term is the root of a negative number while
    2 < rho_t < 4 (steps 3 and 4 with the default betas), where the step
    takes its unrectified branch: the gradient through six steps (with
    respect to lr) is finite and central finite differences' (the branch
    not taken passed its root's NaN derivative on as 0 * NaN)."""
    opt = fo.radam(capturable=capturable)
    params = {"w": jnp.linspace(-1.0, 1.0, 7)}

    def loss(lr):
        p, state = params, fo.set_lr(opt.init(params), lr)
        for _ in range(6):
            p, state = opt.step(p, jax.tree.map(lambda x: jnp.sin(3 * x), p), state)
        return jnp.sum(p["w"] ** 2)

    got = jax.grad(loss)(0.05)
    h = 1e-6
    want = (loss(0.05 + h) - loss(0.05 - h)) / (2 * h)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-6)
