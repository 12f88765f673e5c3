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
import torch  # noqa: E402

from tests.parity.cases import OPT_CASES as _ALL_CASES  # noqa: E402
from tests.torch_ref import (  # noqa: E402
    make_grads,
    make_params_for,
    run_funcopt,
    run_torch,
    trainable_leaves,
)

TABLE = {
    c.name: c for c in _ALL_CASES if c.torch_cls.__module__.startswith("torch.optim")
}
# lr=0 moves params anyway: Rprop seeds step_size with lr, then clamps it to
# step_sizes[0] > 0 (torch does the same). Every other optimizer of the table
# leaves them unchanged, as torch does, except those whose reference refuses
# lr=0 at construction (SparseAdam too: lr > 0). Checked against torch by
# test_zero_lr_moves_exactly_where_torch_does; listed in docs/reliability.md.
ZERO_LR_MOVES = {"rprop"}
ZERO_LR_REFUSED = {
    "lion",
    "lion-decoupled",
    "prodigy",
    "prodigy-coupled-biascorr",
    "prodigy-growth-slice",
}


@pytest.mark.parametrize("case", _ALL_CASES, ids=[c.name for c in _ALL_CASES])
def test_zero_lr_moves_exactly_where_torch_does(case):
    kwargs = {**case.combos()[-1], "lr": 0.0}
    if case.name in ZERO_LR_REFUSED:
        with pytest.raises(Exception) as theirs:
            case.torch_cls([torch.zeros(2, requires_grad=True)], **kwargs)
        with pytest.raises(type(theirs.value)):
            case.factory(**kwargs)
        return
    rng = np.random.default_rng(0)
    params = make_params_for(case, rng, np.float32)
    grads = make_grads(rng, params, 1, with_none=False)
    before = trainable_leaves(params)
    theirs, _ = run_torch(case, kwargs, params, grads)
    torch_moved = any(not np.array_equal(a, b) for a, b in zip(theirs, before))
    assert torch_moved == (case.name in ZERO_LR_MOVES)
    if case.name in TABLE:
        return  # funcopt's side: test_every_optimizer_properties, on random trees
    ours = trainable_leaves(run_funcopt(case, kwargs, params, grads, jit=False)[0])
    assert any(not np.array_equal(a, b) for a, b in zip(ours, before)) == torch_moved


def test_zero_lr_lbfgs_and_sparse_adam_as_torch():
    p = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    topt = torch.optim.LBFGS([p], lr=0.0)

    def closure():
        topt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    topt.step(closure)
    assert p.tolist() == [1.0, -2.0, 3.0]
    opt = fo.lbfgs(lr=0.0)
    x = {"x": jnp.asarray([1.0, -2.0, 3.0])}
    new, _, _ = opt.step(
        x, opt.init(x), jax.value_and_grad(lambda q: (q["x"] ** 2).sum())
    )
    np.testing.assert_array_equal(new["x"], x["x"])
    with pytest.raises(ValueError, match="Invalid learning rate: 0.0"):
        torch.optim.SparseAdam([p], lr=0.0)
    with pytest.raises(ValueError, match="Invalid learning rate: 0.0"):
        fo.sparse_adam(lr=0.0)


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
    # state: arrays only, round trip through a funcopt checkpoint
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(s))
    path = tmp_path_factory.mktemp("ckpt") / "state.npz"
    fo.checkpoint.save(path, s)
    loaded = fo.checkpoint.restore(path, like=opt.init(params))
    assert jax.tree.structure(loaded) == jax.tree.structure(s)  # the treedef

    # per leaf: a packed bucket's padding holds whatever the rule computed
    # there (never read back), and a restored state's is zeros
    def per_leaf(result):
        p, s = result
        return p, s.unpacked() if isinstance(s, fo.OptState) else s

    jax.tree.map(
        np.testing.assert_array_equal,
        per_leaf(step(p, grads, loaded)),
        per_leaf(step(p, grads, s)),
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
