"""Gradient clipping against live torch: clip_grad_norm_ / clip_grad_value_."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import funcopt as fo

NORM_TYPES = [1.0, 2.0, 3.0, math.inf, 0.5, 0.0, -math.inf]
NONFINITE_MSG = (
    "The total norm of order {} for gradients from `parameters` is non-finite, "
    "so it cannot be clipped. To disable this error and scale the gradients by "
    "the non-finite norm anyway, set `error_if_nonfinite=False`"
)


def make_grads(rng, dtypes, scale=1.0, with_none=True):
    """A nested gradient tree; dtypes cycle over the array leaves."""
    shapes = {"a": (3,), "b": {"c": (2, 4), "d": ()}, "e": (5, 1), "f": (4,)}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    flat = []
    for i, shape in enumerate(leaves):
        if with_none and i == 2:
            flat.append(None)  # torch: p.grad is None
            continue
        dtype = dtypes[i % len(dtypes)]
        flat.append((scale * rng.normal(size=shape)).astype(dtype))
    return treedef.unflatten(flat)


def leaves_with_none(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


def torch_params_with_grads(grads):
    """torch params whose ``.grad`` are the leaves of ``grads`` (None stays None)."""
    params = []
    for g in leaves_with_none(grads):
        if g is None:
            params.append(torch.zeros(1))
            continue
        p = torch.zeros_like(torch.tensor(np.array(g)))
        p.grad = torch.tensor(np.array(g))
        params.append(p)
    return params


def torch_clip_norm(grads, max_norm, norm_type, error_if_nonfinite=False):
    """torch.nn.utils.clip_grad_norm_ on params whose .grad are ``grads``."""
    params = torch_params_with_grads(grads)
    total = torch.nn.utils.clip_grad_norm_(
        params, max_norm, norm_type, error_if_nonfinite
    )
    return [None if p.grad is None else p.grad.numpy() for p in params], total


def check(ours, total, expected, expected_total, rtol):
    total = np.asarray(total)
    assert total.dtype == np.dtype(str(expected_total.dtype).split(".")[-1])
    np.testing.assert_allclose(total, expected_total.numpy(), rtol=rtol, atol=0)
    for a, e in zip(leaves_with_none(ours), expected):
        if e is None:
            assert a is None
            continue
        a = np.asarray(a)
        assert a.dtype == e.dtype
        tol = rtol if a.dtype == np.float64 else max(rtol, 2e-6)
        np.testing.assert_allclose(a, e, rtol=tol, atol=0, equal_nan=True)


def run_ours(grads, max_norm, norm_type, jit, error_if_nonfinite=False):
    grads = jax.tree.map(jnp.asarray, grads)
    fn = lambda g: fo.clip_grad_norm(g, max_norm, norm_type, error_if_nonfinite)  # noqa: E731
    return (jax.jit(fn) if jit else fn)(grads)


@pytest.mark.parametrize("norm_type", [*NORM_TYPES, -1.0, -2.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_norm_of_one_element_is_its_absolute_value(norm_type, dtype):
    """torch's `vector_norm` of one element (0-d or of shape (1,)) is
    `abs(x)` (`x != 0` for order 0): 3e19 keeps its value where its square
    overflows float32, 1e-30 where it underflows; bit for bit, and through
    `clip_grad_norm`'s total (the norm of one stacked norm)."""
    from funcopt.clip import vector_norm
    from tests.torch_ref import assert_same_bits, from_torch

    for value in (3e19, -1e-30, 0.0, -2.5):
        for shape in ((), (1,)):
            t = torch.full(shape, value, dtype=getattr(torch, dtype))
            x = jnp.asarray(from_torch(t))
            expected = torch.linalg.vector_norm(t, norm_type)
            what = f"{value} {shape}"
            assert_same_bits(vector_norm(x, norm_type), from_torch(expected), what)
            _, total = fo.clip_grad_norm({"g": x}, 1.0, norm_type)
            expected_total = torch.nn.utils.get_total_norm([t], norm_type)
            assert_same_bits(total, from_torch(expected_total), what)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("regime", ["clipped", "unclipped"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_float64(norm_type, regime, jit, x64):
    rng = np.random.default_rng(0)
    grads = make_grads(rng, [np.float64])
    _, total = torch_clip_norm(grads, 1e30, norm_type)
    max_norm = float(total) * (0.3 if regime == "clipped" else 3.0)
    expected, expected_total = torch_clip_norm(grads, max_norm, norm_type)
    ours, ours_total = run_ours(grads, max_norm, norm_type, jit)
    check(ours, ours_total, expected, expected_total, rtol=1e-13)
    if regime == "unclipped":  # the coefficient is applied (and is 1)
        for a, g in zip(jax.tree.leaves(ours), jax.tree.leaves(grads)):
            np.testing.assert_array_equal(a, g)


@pytest.mark.parametrize("regime", ["clipped", "unclipped"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_mixed_dtypes(norm_type, regime, x64):
    """float32 and float64 leaves: per-leaf norms in each dtype, total in float64."""
    rng = np.random.default_rng(1)
    grads = make_grads(rng, [np.float32, np.float64, np.float64])
    _, total = torch_clip_norm(grads, 1e30, norm_type)
    assert total.dtype == torch.float64
    max_norm = float(total) * (0.3 if regime == "clipped" else 3.0)
    expected, expected_total = torch_clip_norm(grads, max_norm, norm_type)
    ours, ours_total = run_ours(grads, max_norm, norm_type, jit=True)
    # float32 per-leaf norms: torch and XLA reduce in different orders
    check(ours, ours_total, expected, expected_total, rtol=2e-6)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_float32(norm_type):
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(2)
    grads = make_grads(rng, [np.float32], scale=5.0)
    expected, expected_total = torch_clip_norm(grads, 1.0, norm_type)
    ours, ours_total = run_ours(grads, 1.0, norm_type, jit=True)
    check(ours, ours_total, expected, expected_total, rtol=2e-6)


def test_clip_coefficient_is_torch_rounding(x64):
    """The clipped norm is max_norm*N/(N+1e-6), not max_norm (optax's)."""
    g = {"w": jnp.asarray([3.0, 4.0])}
    clipped, total = fo.clip_grad_norm(g, 1.0)
    p = torch.zeros(2, dtype=torch.float64)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    np.testing.assert_array_equal(clipped["w"], p.grad.numpy())
    assert float(jnp.linalg.norm(clipped["w"])) < 1.0


def test_no_grads():
    grads = {"a": None, "b": None}
    ours, total = fo.clip_grad_norm(grads, 1.0)
    _, expected_total = torch_clip_norm(grads, 1.0, 2.0)
    assert ours == grads
    assert np.asarray(total).dtype == np.float32
    assert float(total) == float(expected_total)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_nonfinite_without_flag(bad, norm_type, jit, x64):
    rng = np.random.default_rng(3)
    grads = make_grads(rng, [np.float64])
    grads["b"]["c"][1, 2] = bad
    expected, expected_total = torch_clip_norm(grads, 1.0, norm_type)
    ours, ours_total = run_ours(grads, 1.0, norm_type, jit)
    check(ours, ours_total, expected, expected_total, rtol=1e-13)
    assert not np.isfinite(np.asarray(ours_total))


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_error_eager(bad, norm_type, x64):
    rng = np.random.default_rng(4)
    grads = make_grads(rng, [np.float64])
    grads["a"][0] = bad
    with pytest.raises(RuntimeError) as torch_err:
        torch_clip_norm(grads, 1.0, norm_type, error_if_nonfinite=True)
    message = NONFINITE_MSG.format(float(norm_type))
    assert str(torch_err.value) == message
    with pytest.raises(RuntimeError) as ours:
        run_ours(grads, 1.0, norm_type, jit=False, error_if_nonfinite=True)
    assert str(ours.value) == message
    # finite norms pass with the flag on
    finite = make_grads(rng, [np.float64])
    run_ours(finite, 1.0, norm_type, jit=False, error_if_nonfinite=True)


def test_nonfinite_error_under_jit(x64):
    """Under jit the check is a jax.debug.callback: a RuntimeError subclass."""
    rng = np.random.default_rng(5)
    grads = jax.tree.map(jnp.asarray, make_grads(rng, [np.float64]))
    fn = jax.jit(lambda g: fo.clip_grad_norm(g, 1.0, 2.0, error_if_nonfinite=True))
    out, total = fn(grads)  # finite: fine
    jax.block_until_ready(out)
    bad = jax.tree.map(lambda x: x, grads)
    bad["e"] = bad["e"].at[0, 0].set(jnp.nan)
    with pytest.raises(RuntimeError, match=re.escape(NONFINITE_MSG.format(2.0))):
        jax.block_until_ready(fn(bad))


def test_empty_leaf_inf_norm_raises_like_torch():
    grads = {"a": np.zeros((0,), np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(RuntimeError) as torch_err:
        torch_clip_norm(grads, 1.0, math.inf)
    with pytest.raises(RuntimeError) as ours:
        run_ours(grads, 1.0, math.inf, jit=True)
    assert str(ours.value) == str(torch_err.value)
    expected, expected_total = torch_clip_norm(grads, 1.0, 2.0)
    check(*run_ours(grads, 1.0, 2.0, jit=True), expected, expected_total, 2e-6)


def torch_clip_value(grads, clip_value):
    params = torch_params_with_grads(grads)
    torch.nn.utils.clip_grad_value_(params, clip_value)
    return [None if p.grad is None else p.grad.numpy() for p in params]


@pytest.mark.parametrize("clip_value", [0.5, 2.0, -0.3, 0])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_clip_grad_value(clip_value, jit, x64):
    rng = np.random.default_rng(6)
    grads = make_grads(rng, [np.float32, np.float64])
    grads["a"][1] = math.nan
    expected = torch_clip_value(grads, clip_value)
    fn = lambda g: fo.clip_grad_value(g, clip_value)  # noqa: E731
    ours = (jax.jit(fn) if jit else fn)(jax.tree.map(jnp.asarray, grads))
    for a, e in zip(leaves_with_none(ours), expected):
        if e is None:
            assert a is None
            continue
        assert np.asarray(a).dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), e)


# --------------------------------------------------------------------------
# optax transforms
# --------------------------------------------------------------------------


def _params(rng):
    return {
        "b": rng.normal(size=(3,)),
        "w": rng.normal(size=(4, 3)),
        "s": np.asarray(rng.normal()),
    }


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_norm_transform_in_chain_with_adam(norm_type, x64):
    rng = np.random.default_rng(7)
    params = _params(rng)
    grads_seq = [
        jax.tree.map(lambda p: 3.0 * rng.normal(size=p.shape), params)
        for _ in range(15)
    ]
    # torch: clip_grad_norm_ then Adam.step
    leaves = jax.tree.leaves(params)
    tparams = [torch.tensor(np.array(p), requires_grad=True) for p in leaves]
    topt = torch.optim.Adam(tparams, lr=0.05, weight_decay=0.1)
    totals = []
    for grads in grads_seq:
        for tp, g in zip(tparams, jax.tree.leaves(grads)):
            tp.grad = torch.tensor(g)
        totals.append(float(torch.nn.utils.clip_grad_norm_(tparams, 1.5, norm_type)))
        topt.step()
    # funcopt
    tx = optax.chain(
        fo.clip_grad_norm_transform(1.5, norm_type), fo.adam(lr=0.05, weight_decay=0.1)
    )
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)

    @jax.jit
    def step(p, g, state):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for grads, total in zip(grads_seq, totals):
        p, state = step(p, jax.tree.map(jnp.asarray, grads), state)
        np.testing.assert_allclose(float(state[0].total_norm), total, rtol=1e-12)
    for a, e in zip(jax.tree.leaves(p), tparams):
        np.testing.assert_allclose(a, e.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_value_transform_in_chain_with_sgd(x64):
    rng = np.random.default_rng(8)
    params = _params(rng)
    grads_seq = [
        jax.tree.map(lambda p: 2.0 * rng.normal(size=p.shape), params)
        for _ in range(10)
    ]
    leaves = jax.tree.leaves(params)
    tparams = [torch.tensor(np.array(p), requires_grad=True) for p in leaves]
    topt = torch.optim.SGD(tparams, lr=0.1, momentum=0.9)
    for grads in grads_seq:
        for tp, g in zip(tparams, jax.tree.leaves(grads)):
            tp.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_value_(tparams, 0.7)
        topt.step()
    tx = optax.chain(fo.clip_grad_value_transform(0.7), fo.sgd(lr=0.1, momentum=0.9))
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for grads in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
        p = optax.apply_updates(p, updates)
    for a, e in zip(jax.tree.leaves(p), tparams):
        np.testing.assert_allclose(a, e.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_norm_transform_skips_none_updates(x64):
    tx = fo.clip_grad_norm_transform(0.5)
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    updates = {"a": jnp.asarray([3.0, 0.0, 4.0]), "b": None}
    out, state = tx.update(updates, state, params)
    assert out["b"] is None
    expected, total = fo.clip_grad_norm({"a": updates["a"]}, 0.5)
    np.testing.assert_array_equal(out["a"], expected["a"])
    assert float(state.total_norm) == float(total)


# --------------------------------------------------------------------------
# TrainState
# --------------------------------------------------------------------------


def _train_state_with_grads(rng, dtypes, defined):
    params = {
        "a": rng.normal(size=(3,)).astype(dtypes[0]),
        "b": rng.normal(size=(2, 2)).astype(dtypes[1 % len(dtypes)]),
        "c": rng.normal(size=(4,)).astype(dtypes[0]),
        "n": np.arange(3, dtype=np.int32),
    }
    params = jax.tree.map(jnp.asarray, params)
    # a state of buffers: the gradients are kept packed with them
    ts = fo.TrainState.create(params, fo.sgd(lr=0.1, momentum=0.9))
    grads = {
        k: (jnp.asarray(4.0 * rng.normal(size=v.shape), v.dtype) if k != "n" else None)
        for k, v in params.items()
    }
    flags = {k: jnp.asarray(defined.get(k, False)) for k in params}
    # undefined grads are zeros in a TrainState
    grads = {
        k: None if g is None else jnp.where(flags[k], g, jnp.zeros_like(g))
        for k, g in grads.items()
    }
    return ts.with_grads(grads, flags)


def _torch_from_ts(ts):
    out = {}
    for k, p in ts.params.items():
        if k == "n":
            continue
        tp = torch.tensor(np.array(p))
        tp.grad = torch.tensor(np.array(ts.grads[k])) if ts.grad_defined[k] else None
        out[k] = tp
    return out


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_train_state_clip_grad_norm(norm_type, x64):
    rng = np.random.default_rng(9)
    ts = _train_state_with_grads(rng, [np.float64], {"a": True, "c": True})
    tparams = _torch_from_ts(ts)
    total = torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0, norm_type)
    new_ts, ours_total = jax.jit(lambda t: t.clip_grad_norm(1.0, norm_type))(ts)
    np.testing.assert_allclose(ours_total, total.numpy(), rtol=1e-13)
    for k, tp in tparams.items():
        if tp.grad is None:  # undefined: untouched zeros, still undefined
            assert not bool(new_ts.grad_defined[k])
            np.testing.assert_array_equal(new_ts.grads[k], 0.0)
        else:
            np.testing.assert_allclose(new_ts.grads[k], tp.grad.numpy(), rtol=1e-13)
    # then step: torch skips the None grad
    torch_opt = torch.optim.SGD(list(tparams.values()), lr=0.1)
    torch_opt.step()
    new_ts = new_ts.step()
    for k, tp in tparams.items():
        np.testing.assert_allclose(new_ts.params[k], tp.numpy(), rtol=1e-13)


def test_train_state_no_defined_grads(x64):
    rng = np.random.default_rng(10)
    ts = _train_state_with_grads(rng, [np.float64], {})
    new_ts, total = jax.jit(lambda t: t.clip_grad_norm(1.0, -math.inf))(ts)
    assert float(total) == 0.0  # torch: tensor(0.) with no grads
    for k in ("a", "b", "c"):
        np.testing.assert_array_equal(new_ts.grads[k], 0.0)


def test_train_state_nonfinite(x64):
    rng = np.random.default_rng(11)
    ts = _train_state_with_grads(rng, [np.float64], {"a": True, "b": True})
    ts = ts.with_grads(
        {**ts.grads, "a": ts.grads["a"].at[0].set(jnp.inf)}, ts.grad_defined
    )
    tparams = _torch_from_ts(ts)
    torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
    new_ts, total = jax.jit(lambda t: t.clip_grad_norm(1.0))(ts)
    assert float(total) == math.inf
    for k, tp in tparams.items():
        if tp.grad is None:  # the zeros of an undefined grad do not become NaN
            np.testing.assert_array_equal(new_ts.grads[k], 0.0)
        else:
            np.testing.assert_array_equal(new_ts.grads[k], tp.grad.numpy())
    with pytest.raises(RuntimeError, match=re.escape(NONFINITE_MSG.format(2.0))):
        fn = jax.jit(lambda t: t.clip_grad_norm(1.0, error_if_nonfinite=True))
        jax.block_until_ready(fn(ts))


def test_train_state_mixed_dtypes(x64):
    rng = np.random.default_rng(12)
    ts = _train_state_with_grads(
        rng, [np.float32, np.float64], {"a": True, "b": True, "c": True}
    )
    tparams = _torch_from_ts(ts)
    total = torch.nn.utils.clip_grad_norm_(list(tparams.values()), 0.5, 3.0)
    new_ts, ours_total = jax.jit(lambda t: t.clip_grad_norm(0.5, 3.0))(ts)
    assert ours_total.dtype == jnp.float64
    np.testing.assert_allclose(ours_total, total.numpy(), rtol=2e-6)
    for k, tp in tparams.items():
        assert new_ts.grads[k].dtype == tp.grad.numpy().dtype
        np.testing.assert_allclose(new_ts.grads[k], tp.grad.numpy(), rtol=2e-6)


@pytest.mark.parametrize("clip_value", [0.5, -0.2])
def test_train_state_clip_grad_value(clip_value, x64):
    rng = np.random.default_rng(13)
    ts = _train_state_with_grads(rng, [np.float64], {"b": True, "c": True})
    tparams = _torch_from_ts(ts)
    torch.nn.utils.clip_grad_value_(list(tparams.values()), clip_value)
    new_ts = jax.jit(lambda t: t.clip_grad_value(clip_value))(ts)
    for k, tp in tparams.items():
        if tp.grad is None:  # a negative clip_value must not fill undefined grads
            np.testing.assert_array_equal(new_ts.grads[k], 0.0)
        else:
            np.testing.assert_array_equal(new_ts.grads[k], tp.grad.numpy())


def test_train_state_backward_then_clip(x64):
    """The real loop: backward, clip, step; a leaf the loss ignores stays None."""
    rng = np.random.default_rng(14)
    params = {
        "w": rng.normal(size=(3, 2)),
        "b": rng.normal(size=(2,)),
        "u": rng.normal(size=(2,)),
    }
    x = rng.normal(size=(5, 3))

    def loss_fn(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

    ts = fo.TrainState.create(jax.tree.map(jnp.asarray, params), fo.adam(lr=0.1))

    @jax.jit
    def train_step(ts, x):
        ts, loss = ts.backward(loss_fn, x)
        ts, total = ts.clip_grad_norm(0.3)
        return ts.step().zero_grad(), total

    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    topt = torch.optim.Adam(list(t.values()), lr=0.1)
    tx = torch.tensor(x)
    for _ in range(5):
        ts, total = train_step(ts, jnp.asarray(x))
        topt.zero_grad()
        torch.sum(torch.tanh(tx @ t["w"] + t["b"]) ** 2).backward()
        expected_total = torch.nn.utils.clip_grad_norm_(list(t.values()), 0.3)
        topt.step()
        np.testing.assert_allclose(total, expected_total.numpy(), rtol=1e-12)
    for k, tp in t.items():
        np.testing.assert_allclose(ts.params[k], tp.detach().numpy(), rtol=1e-10)
