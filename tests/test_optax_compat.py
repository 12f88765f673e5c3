"""funcopt optimizers inside the optax ecosystem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcopt as fo

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -0.5])}
GRADS = {"w": jnp.full((2, 3), 3.0), "b": jnp.array([-4.0, 2.0])}


def test_is_an_optax_gradient_transformation():
    opt = fo.adam()
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    assert isinstance(opt, optax.GradientTransformation)


def test_update_then_apply_updates_equals_step():
    opt = fo.adamw(lr=0.1)
    state = opt.init(PARAMS)
    updates, _ = opt.update(GRADS, state, PARAMS)
    via_optax = optax.apply_updates(PARAMS, updates)
    via_step, _ = opt.step(PARAMS, GRADS, state)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        via_optax,
        via_step,
    )


def test_chain_with_global_norm_clipping():
    chained = optax.chain(optax.clip_by_global_norm(1.0), fo.adam(lr=0.1))
    state = chained.init(PARAMS)
    updates, state = chained.update(GRADS, state, PARAMS)
    via_chain = optax.apply_updates(PARAMS, updates)

    clipped, _ = optax.clip_by_global_norm(1.0).update(GRADS, None)
    opt = fo.adam(lr=0.1)
    expected, _ = opt.step(PARAMS, clipped, opt.init(PARAMS))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        via_chain,
        expected,
    )
    # hyperparameters are reachable inside the chain's state
    assert float(fo.get_lr(state)[0]) == pytest.approx(0.1)
    state = fo.set_lr(state, 0.01)
    assert float(fo.get_lr(state)[0]) == pytest.approx(0.01)


def test_multisteps_accumulation_runs():
    opt = optax.MultiSteps(fo.sgd(lr=0.1), every_k_schedule=2)
    params = PARAMS
    # optax's MultiSteps mixes int and float internally: not strict-promotion clean
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(PARAMS)
        for _ in range(2):
            updates, state = opt.update(GRADS, state, params)
            params = optax.apply_updates(params, updates)
    expected, _ = fo.sgd(lr=0.1).step(PARAMS, GRADS, fo.sgd(lr=0.1).init(PARAMS))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, expected
    )


def test_changing_lr_never_recompiles():
    opt = fo.adam(lr=1e-3)
    traces = []

    @jax.jit
    def step(params, grads, state):
        traces.append(None)
        return opt.step(params, grads, state)

    params, state = PARAMS, opt.init(PARAMS)
    for lr in [1e-3, 1e-2, 0.5]:
        state = fo.set_lr(state, lr)
        params, state = step(params, GRADS, state)
    state = fo.set_hparam(state, "betas", (0.8, 0.9))
    params, state = step(params, GRADS, state)
    assert len(traces) == 1


def test_update_needs_params():
    opt = fo.sgd()
    with pytest.raises(ValueError, match="needs params"):
        opt.update(GRADS, opt.init(PARAMS))


def test_partition_of_two_optimizers_acts_like_groups():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    labels = {"w": "muon", "b": "adamw"}
    opt = optax.partition(
        {"muon": fo.muon(lr=0.02), "adamw": fo.adamw(lr=1e-3)}, labels
    )
    state = opt.init(params)
    # groups of both optimizers, in the state's flattening order (adamw, muon)
    assert [float(x) for x in fo.get_lr(state)] == pytest.approx([1e-3, 0.02])
    state = fo.set_lr(state, [1e-2, 0.5])
    assert [float(x) for x in fo.get_lr(state)] == pytest.approx([1e-2, 0.5])
    sched = fo.lr_scheduler.step_lr(step_size=1, gamma=0.5)
    state, sched_state = sched.init(state)
    state, sched_state = jax.jit(sched.step)(state, sched_state)
    assert [float(x) for x in fo.get_lr(state)] == pytest.approx([5e-3, 0.25])
    updates, state = jax.jit(opt.update)(
        jax.tree.map(jnp.ones_like, params), state, params
    )
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
