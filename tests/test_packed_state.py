"""A plain tree's optimizer state, packed: what `init` lays out and why.

By default `opt.init(params)` keeps the buffers of a tree's small leaves in
one array per (group, dtype) bucket (`funcopt.flat.FlatParams` under
`state.slots[name]`), so a jitted step passes a few state arrays instead of
two or three per leaf. These tests pin what that layout is, that it never
changes a number (whatever layout meets whatever execution path), that two
`init` calls agree on it, that everything that builds or reads a state
(checkpoints, `unpacked`) crosses layouts, and that a state that does not
fit the params is refused with a message. Parity with torch on the packed
state is the whole parity table (its tree has small and large leaves).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import funcopt as fo
import funcopt.flat as ff
from funcopt import _packing

pytestmark = pytest.mark.skipif(
    not _packing.native_available(),
    reason="no native library: the default layout is per leaf (tested elsewhere)",
)


def _tree(rng, n_small=6):
    """Small leaves of two shapes, a 0-d leaf, a large leaf and an int leaf."""
    tree = {
        f"s{i}": rng.normal(size=(3, 4) if i % 2 else (5,)).astype(np.float32)
        for i in range(n_small)
    }
    tree["scalar"] = np.float32(0.5)
    tree["big"] = rng.normal(size=(64, 40)).astype(np.float32)
    tree["step_count"] = np.arange(2, dtype=np.int32)
    return {k: v if k == "step_count" else jnp.asarray(v) for k, v in tree.items()}


def _grads(rng, params, none=()):
    return {
        k: None
        if k in none or k == "step_count"
        else jnp.asarray(rng.normal(size=np.shape(v)).astype(np.float32))
        for k, v in params.items()
    }


def _is_packed(state) -> bool:
    kinds = {type(v) for v in state.slots.values()}
    assert len(kinds) == 1, kinds
    return kinds == {ff.FlatParams}


def _assert_same_bits(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        bits = [np.atleast_1d(v).view(np.uint8) for v in (x, y)]
        np.testing.assert_array_equal(*bits)


def test_init_packs_the_small_leaves_of_each_bucket():
    """The small leaves with dimensions: one buffer per bucket, the other
    leaves' own. Large leaves too where their bucket steps in place (Adam:
    its kernel reads the params where they are), in buckets of their own."""
    params = _tree(np.random.default_rng(0))
    names = sorted(params)  # dict leaves flatten in sorted key order
    small = {f"s{i}" for i in range(6)}
    for make, packed, outside in (
        (fo.rmsprop, small, {"big", "scalar", "step_count"}),
        (fo.adam, small, {"big", "scalar", "step_count"}),  # one large leaf
    ):
        state = make(lr=0.1).init(params)
        assert _is_packed(state)
        name = next(iter(state.slots))
        flat = state.slots[name]
        layout = flat.layout
        assert {names[i] for b in layout.buckets for i in b.leaves} == packed
        assert {names[i] for i in layout.outside} == outside
        # one buffer per bucket (one group, one dtype) and the others' own:
        # Adam's step passes 2 + 2 state arrays instead of 2 x 8
        assert len(flat.buffers) == 1
        per_slot = 1 + sum(
            jnp.issubdtype(params[k].dtype, jnp.floating) for k in outside
        )
        assert len(jax.tree.leaves(state.slots)) == len(state.slots) * per_slot
        with ff.policy("never"):
            assert not _is_packed(make(lr=0.1).init(params))
    # one leaf per bucket does not pay: per leaf
    lone = {"a": jnp.ones(3), "b": jnp.ones((50, 50))}
    assert not _is_packed(fo.rmsprop().init(lone))
    assert not _is_packed(fo.adam().init(lone))
    # large leaves: per leaf by default (where `update`'s JAX rules fuse
    # with `apply_updates`); under "always", Adam's (and RMSprop's) in a
    # bucket stepped in place, Adadelta's (no kernel for many leaves) in
    # a bucket whose params and gradients are packed per step
    large = {"a": jnp.ones((40, 40)), "b": jnp.ones((50, 50))}
    assert not _is_packed(fo.rmsprop().init(large))
    assert not _is_packed(fo.adam().init(large))
    with ff.policy("always"):
        (bucket,) = fo.adam().init(large).slots["exp_avg"].layout.buckets
        (rms,) = fo.rmsprop().init(large).slots["square_avg"].layout.buckets
        (ada,) = fo.adadelta().init(large).slots["square_avg"].layout.buckets
    assert bucket.in_place and bucket.leaves == (0, 1)
    assert rms.in_place and not ada.in_place


def test_unpacked_is_the_per_leaf_state():
    params = _tree(np.random.default_rng(1))
    opt = fo.rmsprop(lr=0.01, momentum=0.9, centered=True)
    with ff.policy("never"):
        per_leaf = opt.init(params)
    state = opt.init(params)
    assert _is_packed(state) and not _is_packed(per_leaf)
    _assert_same_bits(state.unpacked(), per_leaf)
    assert per_leaf.unpacked() is per_leaf
    assert jax.tree.structure(state.unpacked()) == jax.tree.structure(per_leaf)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fo.adam(lr=0.1, amsgrad=True, weight_decay=0.1),
        lambda: fo.sgd(lr=0.1, momentum=0.9, nesterov=True),
        lambda: fo.nadam(lr=0.1),  # a 0-d buffer per leaf (mu_product)
        lambda: fo.asgd(lr=0.1),  # 0-d float32 buffers (eta, mu)
        lambda: fo.adagrad(lr=0.1, initial_accumulator_value=0.3),
    ],
    ids=["adam", "sgd", "nadam", "asgd", "adagrad"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_every_layout_on_every_path_gives_the_same_bits(make, jit):
    """A packed and a per-leaf state, each stepped one kernel per bucket
    (`"always"`) and leaf by leaf (`"never"`), with a leaf missing its
    gradient on some steps: the same bits, the layout kept."""
    rng = np.random.default_rng(2)
    params = _tree(rng)
    seq = [_grads(rng, params, none=("s1",) if t == 1 else ()) for t in range(3)]
    results = {}
    for layout in ("auto", "never"):
        with ff.policy(layout):
            state0 = make().init(params)
        for path in ("always", "never"):
            opt = make()  # a step of its own: one trace per path
            step = jax.jit(opt.step) if jit else opt.step
            p, s = params, state0
            with ff.policy(path):
                for g in seq:
                    p, s = step(p, g, s)
            assert _is_packed(s) == (layout == "auto")
            results[layout, path] = (p, s.unpacked())
    first = results["never", "never"]
    for result in results.values():
        _assert_same_bits(result, first)
    # the leaf without a gradient kept its count
    steps = dict(zip(sorted(params), np.asarray(first[1].step)))
    assert steps["s1"] == 2 and steps["s0"] == 3 and steps["step_count"] == 0


def test_a_leaf_without_gradient_keeps_its_buffers_in_the_bucket():
    rng = np.random.default_rng(3)
    params = _tree(rng)
    opt = fo.adam(lr=0.1)
    state = opt.init(params)
    p1, s1 = jax.jit(opt.step)(params, _grads(rng, params, none=("s2",)), state)
    np.testing.assert_array_equal(p1["s2"], params["s2"])
    assert not np.any(np.asarray(s1.unpacked().slots["exp_avg"]["s2"]))
    assert np.all(np.asarray(s1.unpacked().slots["exp_avg"]["s0"]) != 0)
    # every gradient of the bucket missing: the buffers pass through
    none = (*(f"s{i}" for i in range(6)), "big")
    _, s2 = jax.jit(opt.step)(p1, _grads(rng, params, none=none), s1)
    _assert_same_bits(s2.slots["exp_avg"].buffers, s1.slots["exp_avg"].buffers)


def test_a_sparse_gradient_in_a_bucket_steps_leaf_by_leaf():
    """Adagrad's BCOO gradient on a packed leaf: its bucket is unpacked,
    stepped per leaf and packed again, the numbers of the per-leaf state."""
    rng = np.random.default_rng(4)
    params = {
        f"e{i}": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for i in range(3)
    }
    dense = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32).at[1:4].set(0.0)
    grads = {"e0": jsparse.BCOO.fromdense(dense), "e1": dense, "e2": dense * 2}
    opt = fo.adagrad(lr=0.1)
    with ff.policy("never"):
        per_leaf = opt.init(params)
    packed = opt.init(params)
    assert _is_packed(packed)
    out = {}
    for name, state in (("packed", packed), ("per_leaf", per_leaf)):
        p, s = params, state
        for _ in range(2):
            p, s = opt.step(p, grads, s)
        assert _is_packed(s) == (name == "packed")
        out[name] = (p, s.unpacked())
    _assert_same_bits(out["packed"], out["per_leaf"])


def test_two_inits_have_one_structure():
    """Equal layouts compare and hash alike: one jit trace, a scan carry."""
    params = _tree(np.random.default_rng(5))
    opt = fo.adamw(lr=0.01)
    a, b = opt.init(params), opt.init(params)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert hash(jax.tree.structure(a)) == hash(jax.tree.structure(b))
    traces = []

    def step(p, g, s):
        traces.append(1)
        return opt.step(p, g, s)

    jitted = jax.jit(step)
    grads = _grads(np.random.default_rng(6), params)
    jitted(params, grads, a)
    jitted(params, grads, b)
    assert len(traces) == 1

    def body(carry, g):
        p, s = carry
        return opt.step(p, g, s), None

    stacked = jax.tree.map(lambda *x: jnp.stack(x), grads, grads)
    (_, s), _ = jax.lax.scan(body, (params, a), stacked)
    assert jax.tree.structure(s) == jax.tree.structure(a)


@pytest.mark.parametrize("saved_in", ["auto", "never"])
def test_a_checkpoint_crosses_layouts(tmp_path, saved_in):
    """Saved per leaf whatever the layout, restored in `like`'s."""
    rng = np.random.default_rng(7)
    params = _tree(rng)
    opt = fo.adam(lr=0.1)
    with ff.policy(saved_in):
        state = opt.init(params)
        _, state = opt.step(params, _grads(rng, params), state)
    fo.checkpoint.save(tmp_path / "ckpt.npz", state)
    for like_in in ("auto", "never"):
        with ff.policy(like_in):
            like = opt.init(params)
        restored = fo.checkpoint.restore(tmp_path / "ckpt.npz", like)
        assert jax.tree.structure(restored) == jax.tree.structure(like)
        _assert_same_bits(restored.unpacked(), state.unpacked())


def test_a_state_of_other_shapes_is_refused():
    params = _tree(np.random.default_rng(8))
    opt = fo.adam()
    state = opt.init(params)
    other = dict(params, s0=jnp.ones(6))
    grads = jax.tree.map(lambda p: p if p.dtype == jnp.float32 else None, other)
    # named per leaf, as a per-leaf state is
    message = r"^params\['s0'\]: state buffer 'exp_avg' is float32\[5\]"
    with pytest.raises(ValueError, match=message):
        opt.step(other, grads, state)
    renamed = {("t" + k[1:] if k.startswith("s") else k): v for k, v in params.items()}
    grads = jax.tree.map(lambda p: p if p.dtype == jnp.float32 else None, renamed)
    with pytest.raises(ValueError, match=r"its buffer 'exp_avg' does not have"):
        opt.step(renamed, grads, state)


def test_a_mixed_or_mistyped_packed_state_is_refused():
    params = _tree(np.random.default_rng(9))
    grads = _grads(np.random.default_rng(10), params)
    opt = fo.adam()
    state = opt.init(params)
    mixed = state._replace(
        slots={**state.slots, "exp_avg": state.unpacked().slots["exp_avg"]}
    )
    with pytest.raises(ValueError, match=r"mixes packed buffers"):
        opt.step(params, grads, mixed)
    flat = state.slots["exp_avg"]
    wrong = ff.FlatParams(
        [b.astype(jnp.float16) for b in flat.buffers], flat.rest, flat.layout
    )
    bad = state._replace(slots={**state.slots, "exp_avg": wrong})
    with pytest.raises(ValueError, match=r"state buffer 'exp_avg' is float16\[5\]"):
        opt.step(params, grads, bad)
    message = r"^params\['big'\]: this state holds buffers \['exp_avg', 'exp_avg_sq'\]"
    with pytest.raises(ValueError, match=message):
        fo.adam(amsgrad=True).step(params, grads, state)
    # buffers of other sizes than the layout's: refused whole
    cut = ff.FlatParams([b[:, :2] for b in flat.buffers], flat.rest, flat.layout)
    bad = state._replace(slots={**state.slots, "exp_avg": cut})
    with pytest.raises(ValueError, match=r"its packed buffers do not fit"):
        opt.step(params, grads, bad)


@pytest.mark.parametrize("make", [fo.nadam, fo.asgd], ids=["nadam", "asgd"])
def test_a_0d_leaf_leading_a_bucket(make, tmp_path):
    """`"always"` packs 0-d leaves too: a bucket led by one keeps its moments
    as `[rows, width]` and its 0-dim buffers per parameter (NAdam's
    `mu_product`, ASGD's `eta` and `mu`) as `[rows]`. `init`, `step`, a
    checkpoint and `add_param_group` (which packs a per-leaf state) agree
    with the per-leaf state, bit for bit."""
    params = {
        "a": jnp.asarray(0.5, jnp.float32),
        "w": jnp.linspace(-1, 1, 5, dtype=jnp.float32),
    }
    grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
    added = {"v": jnp.ones(3, jnp.float32)}
    runs = {}
    for layout in ("always", "never"):
        with ff.policy(layout):
            opt = make(lr=0.1)
            p, s = params, opt.init(params)
            assert _is_packed(s) == (layout == "always")
            for _ in range(3):
                p, s = opt.step(p, grads, s)
            fo.checkpoint.save(tmp_path / f"{layout}.npz", s)
            s = fo.checkpoint.restore(tmp_path / f"{layout}.npz", like=opt.init(params))
            p, s = opt.step(p, grads, s)
            opt2, p2, s2 = fo.add_param_group(opt, p, s, added, name="added")
            assert _is_packed(s2) == (layout == "always")
            g2 = jax.tree.map(lambda x: jnp.cos(x) * 0.1, p2)
            p2, s2 = opt2.step(p2, g2, s2)
        runs[layout] = (p2, s2.unpacked())
    _assert_same_bits(runs["always"], runs["never"])


def test_complex_leaves_keep_per_leaf_state():
    """`init_slots` checks each complex leaf (a precision policy refuses
    them), so complex leaves are never bucketed: the refusal stands."""
    params = {"a": jnp.ones(4), "b": jnp.ones(4, jnp.complex64), "c": jnp.ones(4)}
    state = fo.adam().init(params)
    flat = state.slots["exp_avg"]
    assert _is_packed(state)
    names = sorted(params)
    assert [names[i] for b in flat.layout.buckets for i in b.leaves] == ["a", "c"]
    policy = fo.precision_policy(fo.adam(), slot_dtypes={"exp_avg": jnp.bfloat16})
    with pytest.raises(TypeError, match=r"supports real parameters only"):
        policy.init(params)
