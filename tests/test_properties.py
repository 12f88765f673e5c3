"""Property-based tests (hypothesis) over random pytrees and optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import funcopt as fo

OPTIMIZERS = {
    "sgd": lambda lr: fo.sgd(lr=lr, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adam": lambda lr: fo.adam(lr=lr, amsgrad=True, weight_decay=0.1),
    "adamw": lambda lr: fo.adamw(lr=lr),
}

SHAPES = st.sampled_from([(), (0,), (3,), (2, 3), (1, 2, 2)])


@st.composite
def trees(draw):
    """Nested dicts/lists of float32 leaves (scalars and zero-size arrays too)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def leaf():
        return rng.normal(size=draw(SHAPES)).astype(np.float32)

    n = draw(st.integers(0, 3))
    tree = {f"k{i}": leaf() for i in range(n)}
    if draw(st.booleans()):
        tree["nested"] = [leaf(), {"x": leaf()}]
    if draw(st.booleans()):
        tree["empty"] = {}
    return tree


def grads_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), tree)


common = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@common
@given(tree=trees(), seed=st.integers(0, 100))
def test_jit_equals_eager_and_inputs_unchanged(name, tree, seed):
    opt = OPTIMIZERS[name](0.1)
    params = jax.tree.map(jnp.asarray, tree)
    grads = jax.tree.map(jnp.asarray, grads_like(tree, seed))
    state = opt.init(params)
    before = jax.tree.map(np.array, (params, grads, state))
    eager = opt.step(params, grads, state)
    jitted = jax.jit(opt.step)(params, grads, state)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        eager,
        jitted,
    )
    jax.tree.map(np.testing.assert_array_equal, (params, grads, state), before)
    for leaf in jax.tree.leaves(jitted[1]):
        assert isinstance(leaf, jax.Array)  # state is arrays only


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@common
@given(tree=trees(), seed=st.integers(0, 100))
def test_steps_equal_scan(name, tree, seed):
    opt = OPTIMIZERS[name](0.05)
    params = jax.tree.map(jnp.asarray, tree)
    grad_seq = [jax.tree.map(jnp.asarray, grads_like(tree, seed + k)) for k in range(3)]
    state = opt.init(params)
    step = jax.jit(opt.step)
    p, s = params, state
    for g in grad_seq:
        p, s = step(p, g, s)

    def body(carry, g):
        return opt.step(*carry[:1], g, carry[1]), None

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grad_seq)
    scan = jax.jit(lambda c, g: jax.lax.scan(body, c, g, length=len(grad_seq)))
    (p_scan, s_scan), _ = scan((params, state), stacked)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        (p, s),
        (p_scan, s_scan),
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@common
@given(tree=trees(), seed=st.integers(0, 100))
def test_zero_lr_leaves_params_unchanged(name, tree, seed):
    opt = OPTIMIZERS[name](0.0)
    params = jax.tree.map(jnp.asarray, tree)
    grads = jax.tree.map(jnp.asarray, grads_like(tree, seed))
    new_params, _ = jax.jit(opt.step)(params, grads, opt.init(params))
    jax.tree.map(np.testing.assert_array_equal, new_params, params)


# ---- every torch.optim optimizer of the parity table (issue 8) ------------
from tests.parity.cases import OPT_CASES as _ALL_CASES  # noqa: E402

TABLE = {
    c.name: c for c in _ALL_CASES if c.torch_cls.__module__.startswith("torch.optim")
}
# lr=0 moves params anyway: Rprop seeds step_size with lr, then clamps it to
# step_sizes[0] > 0 (torch does the same)
ZERO_LR_MOVES = {"rprop"}
few = settings(
    max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def matrix_trees(draw):
    """Muon takes 2-D leaves only (zero-size ones too)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shapes = st.sampled_from([(2, 3), (4, 4), (0, 3), (1, 5)])
    tree = {
        f"k{i}": rng.normal(size=draw(shapes)).astype(np.float32)
        for i in range(draw(st.integers(0, 2)))
    }
    if draw(st.booleans()):
        tree["empty"] = {}
    return tree


@pytest.mark.parametrize("name", list(TABLE))
@few
@given(data=st.data(), seed=st.integers(0, 100))
def test_every_optimizer_properties(name, data, seed, tmp_path_factory):
    case = TABLE[name]
    tree = data.draw(matrix_trees() if name == "muon" else trees())
    kwargs = case.combos()[-1]
    opt = case.factory(**kwargs)
    params = jax.tree.map(jnp.asarray, tree)
    grads = jax.tree.map(jnp.asarray, grads_like(tree, seed))
    state = opt.init(params)
    before = jax.tree.map(np.array, (params, grads, state))
    step = jax.jit(opt.step)
    eager = opt.step(params, grads, state)
    jitted = step(params, grads, state)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, eager, jitted)
    jax.tree.map(np.testing.assert_array_equal, (params, grads, state), before)
    # k steps == lax.scan of k steps
    p, s = jitted
    p, s = step(p, grads, s)
    scan = jax.jit(
        lambda c: jax.lax.scan(
            lambda c, _: (opt.step(c[0], grads, c[1]), None), c, None, length=2
        )[0]
    )
    jax.tree.map(close, (p, s), scan((params, state)))
    # state: arrays only, round trip through a checkpoint
    leaves, treedef = jax.tree.flatten(s)
    assert all(isinstance(x, jax.Array) for x in leaves)
    path = tmp_path_factory.mktemp("ckpt") / "state.npz"
    np.savez(path, *[np.asarray(x) for x in leaves])
    with np.load(path) as f:
        loaded = treedef.unflatten(
            [jnp.asarray(f[f"arr_{i}"]) for i in range(len(leaves))]
        )
    jax.tree.map(
        np.testing.assert_array_equal, step(p, grads, loaded), step(p, grads, s)
    )
    # zero lr
    zero = case.factory(**{**kwargs, "lr": 0.0})
    new, _ = jax.jit(zero.step)(params, grads, zero.init(params))
    moved = any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params))
    )
    assert moved == (
        name in ZERO_LR_MOVES and any(np.size(x) for x in jax.tree.leaves(params))
    )
