"""Non-finite gradients: torch's default, opt-in skipping, and the debug report."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import funcopt as fo

PARAMS = {
    "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
    "n": jnp.arange(2),
}


def grads(bad=None):
    g = {"dense": {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.ones(3)}, "n": None}
    if bad is not None:
        g["dense"]["bias"] = g["dense"]["bias"].at[1].set(bad)
    return g


def test_default_applies_nan_like_torch():
    p = torch.ones(3, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    new, _ = fo.adam(lr=0.1).step(PARAMS, grads(jnp.nan), fo.adam(lr=0.1).init(PARAMS))
    np.testing.assert_array_equal(
        np.isnan(new["dense"]["bias"]), np.isnan(p.detach().numpy())
    )


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_skip_nonfinite_skips_whole_step_under_jit(bad):
    opt = fo.skip_nonfinite(fo.adam(lr=0.1))
    state = opt.init(PARAMS)
    step = jax.jit(opt.step)
    p1, s1 = step(PARAMS, grads(), state)
    p2, s2 = step(p1, grads(bad), s1)  # skipped: nothing changes
    jax.tree.map(np.testing.assert_array_equal, (p2, s2.inner), (p1, s1.inner))
    assert int(s1.skipped) == 0 and int(s2.skipped) == 1
    p3, s3 = step(p2, grads(), s2)
    ref_p, ref_s = jax.jit(fo.adam(lr=0.1).step)(p1, grads(), s1.inner)
    jax.tree.map(np.testing.assert_array_equal, (p3, s3.inner), (ref_p, ref_s))
    assert int(s3.skipped) == 1
    assert [int(x) for x in s3.inner.step] == [2, 2, 0]


def test_skip_nonfinite_with_train_state_and_set_lr():
    opt = fo.skip_nonfinite(fo.sgd(lr=0.1, momentum=0.9))
    ts = fo.TrainState.create(PARAMS, opt)
    ts = dataclasses.replace(ts, opt_state=fo.set_lr(ts.opt_state, 0.5))
    assert np.allclose(fo.get_lr(ts.opt_state), [0.5])

    def loss(p, scale):
        return jnp.sum(p["dense"]["kernel"] * scale) + jnp.sum(p["dense"]["bias"])

    @jax.jit
    def train(ts, scale):
        ts, _ = ts.backward(loss, scale)
        return ts.step().zero_grad()

    ts1 = train(ts, 1.0)
    ts2 = train(ts1, jnp.inf)
    jax.tree.map(np.testing.assert_array_equal, ts2.params, ts1.params)
    assert int(ts2.opt_state.skipped) == 1


def test_skip_nonfinite_inside_optax_chain():
    opt = optax.chain(optax.scale(1.0), fo.skip_nonfinite(fo.adam(lr=0.1)))
    state = opt.init(PARAMS)
    upd, state = jax.jit(opt.update)(grads(jnp.nan), state, PARAMS)
    for u in jax.tree.leaves(upd):
        assert not np.any(np.asarray(u))
    assert int(state[1].skipped) == 1
    upd, state = jax.jit(opt.update)(grads(), state, PARAMS)
    assert np.all(np.isfinite(upd["dense"]["bias"])) and np.any(upd["dense"]["bias"])
    assert int(state[1].skipped) == 1


def test_skip_nonfinite_bad_state():
    opt = fo.skip_nonfinite(fo.adam())
    with pytest.raises(TypeError, match="skip_nonfinite expects the state made by"):
        opt.step(PARAMS, grads(), fo.adam().init(PARAMS))


@pytest.mark.parametrize("jit", [False, True])
def test_debug_nonfinite_reports_first_leaf(jit):
    reports = []
    opt = fo.debug_nonfinite(fo.adam(lr=0.1), report=reports.append)
    step = jax.jit(opt.step) if jit else opt.step
    state = opt.init(PARAMS)
    params, state = step(PARAMS, grads(), state)
    jax.effects_barrier()
    assert reports == []
    step(params, grads(jnp.inf), state)
    jax.effects_barrier()
    assert reports == ["non-finite gradient at grads['dense']['bias'] (inf)"]


def test_debug_nonfinite_reports_params_going_nan():
    """Finite gradients, but the update overflows: the parameter is named."""
    reports = []
    opt = fo.debug_nonfinite(fo.sgd(lr=1e38), report=reports.append)
    p = {"a": jnp.ones(2), "b": jnp.full(2, 3e38)}
    jax.jit(opt.step)(p, {"a": jnp.ones(2), "b": jnp.full(2, -3.0)}, opt.init(p))
    jax.effects_barrier()
    assert reports == ["non-finite parameter after the step at params['b'] (inf)"]


def test_debug_nonfinite_default_warns():
    opt = fo.debug_nonfinite(fo.sgd(lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(PARAMS, grads(jnp.nan), opt.init(PARAMS))
        jax.effects_barrier()
    assert [str(w.message) for w in caught] == [
        "non-finite gradient at grads['dense']['bias'] (nan)"
    ]
    assert caught[0].category is fo.NonFiniteWarning


def test_debug_and_skip_compose():
    reports = []
    opt = fo.skip_nonfinite(fo.debug_nonfinite(fo.adam(), report=reports.append))
    state = opt.init(PARAMS)
    new, state = jax.jit(opt.step)(PARAMS, grads(jnp.nan), state)
    jax.effects_barrier()
    jax.tree.map(np.testing.assert_array_equal, new, PARAMS)
    assert len(reports) == 1 and int(state.skipped) == 1
