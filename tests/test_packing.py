"""The copies of the per-step multi-tensor path (`funcopt._packing`).

`pack`/`unpack` lower to one native `memcpy` call per buffer on one CPU
device and to XLA's concatenate and slices elsewhere; both must give the
reference's bits, differentiate (each is the other's transpose) and batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcopt as fo
from funcopt import _native, _packing
from funcopt import flat as ff
from tests.torch_ref import make_params

SHAPES = [(3,), (2, 4), (0,), (), (7,)]
SPANS = [4, 8, 2, 1, 16]  # padding after all but the second leaf


def _leaves(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in SHAPES]


def _reference_pack(leaves):
    return _packing._pack_reference(*leaves, spans=tuple(SPANS), shape=(sum(SPANS),))


def _reference_unpack(buffer):
    return _packing._unpack_reference(buffer, spans=tuple(SPANS), shapes=tuple(SHAPES))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_pack_and_unpack_copy_the_bits(dtype):
    leaves = _leaves(dtype)
    packed = jax.jit(lambda xs: _packing.pack(xs, SPANS))(leaves)
    expected = _reference_pack(leaves)
    assert packed.dtype == expected.dtype and packed.shape == (sum(SPANS),)
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(expected))
    pad = np.ones(sum(SPANS), bool)
    start = 0
    for shape, span in zip(SHAPES, SPANS):
        pad[start : start + int(np.prod(shape))] = False
        start += span
    assert not np.asarray(packed, np.float64)[pad].any(), "padding is zeros"
    # outside jit: copied on the host (one CPU device), the same bits, and
    # committed to a device only where the leaves are
    eager = _packing.pack(leaves, SPANS)
    assert isinstance(eager, jax.Array) and eager.dtype == packed.dtype
    assert eager.sharding.device_set == leaves[0].sharding.device_set
    assert (
        not eager.committed and not _packing.unpack(eager, SPANS, SHAPES)[0].committed
    )
    committed = [jax.device_put(x, jax.devices()[0]) for x in leaves]
    eager_committed = _packing.pack(committed, SPANS)
    assert eager_committed.committed
    assert _packing.unpack(eager_committed, SPANS, SHAPES)[0].committed
    bits = np.dtype(f"u{packed.dtype.itemsize}")
    np.testing.assert_array_equal(
        np.asarray(eager).view(bits), np.asarray(packed).view(bits)
    )
    back = jax.jit(lambda b: _packing.unpack(b, SPANS, SHAPES))(packed)
    eager_back = _packing.unpack(packed, SPANS, SHAPES)  # on the host
    for got, again, leaf in zip(back, eager_back, leaves, strict=True):
        for x in (got, again):
            assert isinstance(x, jax.Array)
            assert x.shape == leaf.shape and x.dtype == leaf.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(leaf))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bool_])
def test_scalars_stack_into_one_buffer_and_back(dtype):
    values = [jnp.asarray(v, dtype) for v in (1.5, 0.0, -2.25, 3.0)]
    stacked = jax.jit(_packing.stack_scalars)(values)
    assert stacked.shape == (len(values),) and stacked.dtype == values[0].dtype
    np.testing.assert_array_equal(np.asarray(stacked), np.stack(values))
    back = jax.jit(_packing.unstack_scalars)(stacked)
    assert [v.shape for v in back] == [()] * len(values)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(values))


def test_one_cpu_device_lowers_to_the_native_copies():
    """Not a skip: the library is built wherever a compiler is (CI builds it);
    `FUNCOPT_NATIVE=0` or no library lowers to XLA's concatenate."""
    leaves = _leaves(jnp.float32)
    text = jax.jit(lambda xs: _packing.pack(xs, SPANS)).lower(leaves).as_text()
    text += (
        jax.jit(lambda b: _packing.unpack(b, SPANS, SHAPES))
        .lower(_reference_pack(leaves))
        .as_text()
    )
    native = _native.usable()
    assert ("@funcopt_pack" in text) == native
    assert ("@funcopt_unpack" in text) == native
    assert ("stablehlo.concatenate" in text) != native


def test_gradients_and_tangents_are_the_reference_ones():
    leaves = _leaves(jnp.float64 if jax.config.x64_enabled else jnp.float32)
    weights = jnp.arange(sum(SPANS), dtype=leaves[0].dtype)

    def loss(pack):
        return lambda xs: jnp.sum(pack(xs) ** 2 * weights)

    ours = jax.jit(jax.grad(loss(lambda xs: _packing.pack(xs, SPANS))))(leaves)
    ref = jax.grad(loss(_reference_pack))(leaves)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    buffer = _reference_pack(leaves)

    def unpack_loss(unpack):
        return lambda b: sum(jnp.sum(x**3) for x in unpack(b))

    ours = jax.jit(jax.grad(unpack_loss(lambda b: _packing.unpack(b, SPANS, SHAPES))))
    np.testing.assert_array_equal(
        np.asarray(ours(buffer)),
        np.asarray(jax.grad(unpack_loss(_reference_unpack))(buffer)),
    )
    tangent = jnp.ones_like(buffer)
    _, t_ours = jax.jvp(
        lambda b: _packing.unpack(b, SPANS, SHAPES), (buffer,), (tangent,)
    )
    _, t_ref = jax.jvp(_reference_unpack, (buffer,), (tangent,))
    for a, b in zip(t_ours, t_ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, t_ours = jax.jvp(lambda xs: _packing.pack(xs, SPANS), (leaves,), (leaves,))
    np.testing.assert_array_equal(
        np.asarray(t_ours), np.asarray(_reference_pack(leaves))
    )


def test_vmap_batches_any_leaf():
    leaves = _leaves(jnp.float32)
    batched = [jnp.stack([x, x + 1, x * 2]) for x in leaves]
    in_axes = ([0, None, 0, None, 0],)
    args = [b if a == 0 else x for b, x, a in zip(batched, leaves, in_axes[0])]
    got = jax.jit(jax.vmap(lambda xs: _packing.pack(xs, SPANS), in_axes=in_axes))(args)
    want = jax.vmap(_reference_pack, in_axes=in_axes)(args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    back = jax.jit(jax.vmap(lambda b: _packing.unpack(b, SPANS, SHAPES)))(want)
    for got, x in zip(back, jax.vmap(_reference_unpack)(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(x))


def test_packs_in_a_given_shape_and_unpacks_any_shape():
    """`pack(..., shape)` writes the buffer in its reader's shape (a bucket's
    `[rows, width]`: a reshape after it was a copy before an in-place call);
    `unpack` reads a buffer of any shape row-major. Values, gradients
    (each the other's transpose) and vmap as the 1-D reference's."""
    leaves = [jnp.arange(3.0), jnp.arange(8.0).reshape(2, 4) + 10]
    spans, shapes, shape = [4, 8], [(3,), (2, 4)], (3, 4)
    want = _packing._pack_reference(*leaves, spans=(4, 8), shape=(12,))
    packed = jax.jit(lambda xs: _packing.pack(xs, spans, shape))(leaves)
    assert packed.shape == shape
    np.testing.assert_array_equal(np.asarray(packed).ravel(), np.asarray(want))
    for got, leaf in zip(
        jax.jit(lambda b: _packing.unpack(b, spans, shapes))(packed), leaves
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
    weights = jnp.arange(12.0).reshape(shape)
    grads = jax.jit(
        jax.grad(lambda xs: jnp.sum(_packing.pack(xs, spans, shape) * weights))
    )(leaves)
    for g, w in zip(grads, _packing.unpack(weights, spans, shapes)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    cotangent = jax.grad(
        lambda b: sum(jnp.sum(x) for x in _packing.unpack(b, spans, shapes))
    )(packed)
    assert cotangent.shape == shape
    batched = jax.vmap(lambda xs: _packing.pack(xs, spans, shape))(
        [x[None] for x in leaves]
    )
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(packed))
    with pytest.raises(ValueError, match=r"a buffer of shape \(5, 2\) for spans"):
        _packing.pack(leaves, spans, (5, 2))


def test_bad_packs_raise():
    with pytest.raises(TypeError, match="one dtype"):
        _packing.pack([jnp.ones(2), jnp.ones(2, jnp.int32)], [2, 2])
    with pytest.raises(ValueError, match="a leaf of 3 elements in a span of 2"):
        _packing.pack([jnp.ones(3)], [2])
    with pytest.raises(ValueError, match="2 leaves for 1 spans"):
        _packing.pack([jnp.ones(1), jnp.ones(1)], [2])
    with pytest.raises(ValueError, match="a buffer of shape"):
        _packing.unpack(jnp.ones(5), [2, 2], [(2,), (2,)])


# --------------------------------------------------------------------------
# the default path: many small leaves packed per step
# --------------------------------------------------------------------------


def _small_tree(n=12):
    rng = np.random.default_rng(3)
    tree = {
        f"b{i:02d}": jnp.asarray(rng.standard_normal(17 + i), jnp.float32)
        for i in range(n)
    }
    tree["big"] = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    return tree


def test_default_step_packs_the_small_leaves_on_one_cpu_device():
    """`opt.step` on a tree of many small leaves: one copy in for params
    and one for grads, one out for params (the 2 moments live packed in the
    state `init` made), the large leaf on its own; a per-leaf state packs
    its moments too; the per-leaf path where native copies are off."""
    params = _small_tree()
    grads = jax.tree.map(lambda p: p * 0.1, params)
    opt = fo.adam(lr=1e-2)
    text = jax.jit(opt.step).lower(params, grads, opt.init(params)).as_text()
    with ff.policy("never"):
        per_leaf = opt.init(params)
    per_leaf_text = jax.jit(opt.step).lower(params, grads, per_leaf).as_text()
    if _native.usable():
        assert text.count("stablehlo.custom_call @funcopt_pack(") == 2
        assert text.count("stablehlo.custom_call @funcopt_unpack(") == 1
        assert per_leaf_text.count("stablehlo.custom_call @funcopt_pack(") == 4
        assert per_leaf_text.count("stablehlo.custom_call @funcopt_unpack(") == 3
    else:
        assert "funcopt_pack" not in text and "concatenate" not in text


def _packed_operands(text: str) -> list[str]:
    """The operand types of each `funcopt_pack` call of a lowered step."""
    calls = [line for line in text.splitlines() if "@funcopt_pack(" in line]
    return [line.rsplit(" : (", 1)[1].split(") -> ")[0] for line in calls]


def test_default_step_packs_two_small_leaves_not_a_0d_or_a_large_one():
    """The parity harness's tree (`tests/torch_ref.make_params`) runs both
    paths in one step: its two small leaves with dimensions share a buffer
    (two leaves are enough), its 0-d leaf and its leaf above the size limit
    run per leaf (every leaf, where native copies are off). A lone small
    leaf is not packed."""
    params = jax.tree.map(
        jnp.asarray, make_params(np.random.default_rng(0), np.float32)
    )
    grads = jax.tree.map(lambda p: p * 0.1 if p.dtype == jnp.float32 else None, params)
    opt = fo.adam(lr=1e-2)
    text = jax.jit(opt.step).lower(params, grads, opt.init(params)).as_text()
    # params and grads: "b" (3,) and "k" (2, 2, 2); exp_avg, exp_avg_sq live
    # packed in the state
    packed = ["tensor<3xf32>, tensor<2x2x2xf32>"] * 2 if _native.usable() else []
    assert _packed_operands(text) == packed
    lone = {"b": params["b"], "w": params["w"]}
    grads = jax.tree.map(jnp.cos, lone)
    text = jax.jit(opt.step).lower(lone, grads, opt.init(lone)).as_text()
    assert "funcopt_pack" not in text


def test_default_step_gives_the_per_leaf_paths_bits(x64, exact_float32):
    """The packed default and the per-leaf path agree bit for bit where
    funcopt is bit-exact with torch (here the exact float32 mode; 16-bit in
    tests/parity/test_multi_tensor.py)."""
    params = _small_tree()
    grads = jax.tree.map(jnp.cos, params)
    results = []
    for path in ("auto", "never"):
        opt = fo.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True)
        with ff.policy(path):
            step = jax.jit(opt.step)
            p, s = params, opt.init(params)
            for _ in range(3):
                p, s = step(p, grads, s)
        results.append(jax.tree.leaves((p, s.unpacked())))
    for a, b in zip(*results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradients_flow_through_the_packed_step():
    params = _small_tree()
    grads = jax.tree.map(jnp.cos, params)

    def loss(params, path):
        opt = fo.sgd(lr=0.1, momentum=0.9)
        with ff.policy(path):
            p, s = opt.step(params, grads, opt.init(params))
            p, s = opt.step(p, grads, s)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    packed = jax.jit(jax.grad(loss), static_argnums=1)(params, "auto")
    per_leaf = jax.jit(jax.grad(loss), static_argnums=1)(params, "never")
    for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(per_leaf)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
