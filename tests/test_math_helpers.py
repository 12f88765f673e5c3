"""funcopt._math's bit helpers, which move float bits by integer ops so that
no compiler can drop a rounding: the exact values of a convert (or of one
fused multiply-add), under `jit`, `vmap` (an operand batched or not) and
`jvp`, and (the one-operand ones) one equation each in a traced program.

Those two are traced once per operand type, at lowering, not at every call
(`_math._unary_primitive`): as `jax.custom_jvp` functions they cost 5 ms of
tracing a call, 40% of the trace time of NAdam's and RAdam's x64 parity
rows. The structural check below keeps them primitives."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcopt import _math


def _float32_specials(rng: np.random.Generator) -> np.ndarray:
    """Normal values of every magnitude, subnormals, signed zeros, inf, NaN."""
    normal = rng.normal(size=64) * 2.0 ** rng.integers(-126, 127, size=64)
    tiny = rng.integers(1, 2**23, size=16) * 2.0**-149 * rng.choice([-1, 1], 16)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**-126, 2.0**-149]
    return np.concatenate([normal, tiny, special]).astype(np.float32)


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({8: np.uint64, 4: np.uint32, 2: np.uint16}[x.dtype.itemsize])


def test_wide32_is_the_exact_float64_value(x64):
    x = _float32_specials(np.random.default_rng(0))
    want = _bits(x.astype(np.float64))
    for f in (_math._wide32, jax.jit(_math._wide32)):
        np.testing.assert_array_equal(_bits(f(jnp.asarray(x))), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_upcast_opaque_is_the_exact_float32_value(dtype):
    rng = np.random.default_rng(1)
    h = jnp.asarray(_float32_specials(rng)).astype(dtype)
    want = _bits(np.asarray(h).astype(np.float32))
    for f in (_math._upcast_opaque, jax.jit(_math._upcast_opaque)):
        np.testing.assert_array_equal(_bits(f(h)), want)


def _fma_operands(rng: np.random.Generator, n: int):
    """float32 values held in float64, products near the addend (so that the
    fused result differs from the product rounded first)."""
    a = rng.normal(size=n).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    c = (-(a.astype(np.float64) * b)).astype(np.float32) * np.float32(1 + 1e-3)
    return [jnp.asarray(v.astype(np.float64)) for v in (a, b, c)]


def test_fma32_exact_is_one_rounding(x64):
    a, b, c = _fma_operands(np.random.default_rng(2), 200)
    got = np.asarray(jax.jit(_math._fma32_exact)(a, b, c))
    # a*b (48 bits) is exact in float64, and so is a*b + c: |c| is within
    # 0.1% of |a*b|, so the sum has no more bits; one rounding to float32
    exact = np.asarray(a) * np.asarray(b) + np.asarray(c)
    assert all(
        Fraction(x) * Fraction(y) + Fraction(z) == Fraction(e)
        for x, y, z, e in zip(*map(np.asarray, (a, b, c)), exact)
    )
    np.testing.assert_array_equal(_bits(got), _bits(exact.astype(np.float32)))
    # the product rounded first differs somewhere: the test can tell them apart
    unfused = (np.asarray(a) * np.asarray(b)).astype(np.float32) + np.asarray(c)
    assert np.any(unfused.astype(np.float32) != exact.astype(np.float32))
    # and eagerly, op by op, the same bits
    np.testing.assert_array_equal(_bits(_math._fma32_exact(a, b, c)), _bits(got))


def test_helpers_batch_with_operands_batched_or_not(x64):
    a, b, c = _fma_operands(np.random.default_rng(3), 12)
    a, b = a.reshape(3, 4), b.reshape(3, 4)
    row_c = c[:4]
    batched = jax.jit(jax.vmap(_math._fma32_exact, in_axes=(0, 1, None)))
    got = batched(a, b.reshape(4, 3), row_c)
    for i in range(3):
        want = _math._fma32_exact(a[i], b.reshape(4, 3)[:, i], row_c)
        np.testing.assert_array_equal(_bits(got[i]), _bits(want))
    x = jnp.asarray(_float32_specials(np.random.default_rng(4))[:60].reshape(6, 10))
    np.testing.assert_array_equal(
        _bits(jax.vmap(_math._wide32, in_axes=1, out_axes=1)(x)),
        _bits(np.asarray(x).astype(np.float64)),
    )


def test_helpers_differentiate_as_converts(x64):
    x = jnp.asarray(np.float32([1.5, -2.0, 3.25]))
    t = jnp.asarray(np.float32([1.0, 0.5, -2.0]))
    _, tangent = jax.jvp(_math._wide32, (x,), (t,))
    np.testing.assert_array_equal(tangent, t.astype(jnp.float64))
    grad = jax.grad(lambda v: jnp.sum(_math._wide32(v) * 3.0))(x)
    np.testing.assert_array_equal(grad, np.full(3, 3.0, np.float32))
    a, b, c = (jnp.asarray(np.float64(v)) for v in (2.0, 3.0, -1.0))
    da, db, dc = jax.grad(
        lambda a, b, c: _math._fma32_exact(a, b, c).astype(jnp.float64),
        argnums=(0, 1, 2),
    )(a, b, c)
    assert (float(da), float(db), float(dc)) == (3.0, 2.0, 1.0)
    h = jnp.asarray([1.0, 2.0], jnp.bfloat16)
    _, tangent = jax.jvp(_math._upcast_opaque, (h,), (h,))
    np.testing.assert_array_equal(tangent, np.float32([1.0, 2.0]))


def test_each_helper_is_one_equation_under_transformations(x64):
    """A one-operand helper is one primitive in the traced program, under
    `jvp` and `vmap` too, not its integer ops inlined (nor a
    `custom_jvp_call`, whose body is traced again at every call)."""
    x = jnp.ones((2, 3), jnp.float32)
    wide = jnp.ones((2, 3), jnp.float64)

    def program(x, wide):
        up = _math._upcast_opaque(x.astype(jnp.bfloat16))
        return _math._wide32(x) + up.astype(jnp.float64) + wide

    def over(f):
        return lambda x, w: jax.jvp(jax.vmap(f), (x, w), (x, w))

    names = [
        eqn.primitive.name for eqn in jax.make_jaxpr(over(program))(x, wide).jaxpr.eqns
    ]
    for helper in ("funcopt_wide32", "funcopt_upcast_opaque"):
        assert names.count(helper) == 1, (helper, names)
    assert not any("custom_jvp" in n for n in names), names


def test_fma32_exact_broadcasts_its_operands(x64):
    """Callers pass a 0-d addend or factor (`_math`'s scalar `alpha`)."""
    a, b, c = _fma_operands(np.random.default_rng(5), 8)
    got = jax.jit(_math._fma32_exact)(a, b[0], c[:1].reshape(()))
    want = _math._fma32_exact(a, jnp.full(8, b[0]), jnp.full(8, c[0]))
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_fma32_exact_tangent_with_some_operands_constant(x64):
    """A tangent for one operand only (the others are symbolic zeros)."""
    a, b, c = (jnp.asarray(np.float64(v)) for v in (2.0, 3.0, -1.0))
    for i, want in enumerate((3.0, 2.0, 1.0)):
        args = [a, b, c]

        def f(x, i=i, args=args):
            return _math._fma32_exact(*args[:i], x, *args[i + 1 :])

        _, tangent = jax.jvp(f, (args[i],), (jnp.asarray(1.0, jnp.float64),))
        assert float(tangent) == want


def test_impl_is_traced_once_per_operand_type():
    """The helpers' integer ops are traced when lowered, once per operand
    type, however many calls a program makes (a `custom_jvp` function's body
    was traced at each)."""
    traced = []

    def impl(x):
        traced.append(x)
        return x * 2

    double = _math._unary_primitive(
        "test_double", impl, lambda dtype: dtype, lambda x, t: t * 2
    )
    x = jnp.arange(4.0, dtype=jnp.float32)

    def five_calls(x):
        for _ in range(5):
            x = double(x)
        return x

    traced_before = jax.jit(five_calls).trace(x)
    assert traced == []  # tracing the program binds, it does not trace `impl`
    np.testing.assert_array_equal(traced_before.lower().compile()(x), x * 32)
    assert len(traced) == 1
    np.testing.assert_array_equal(jax.jit(lambda x: double(double(x)))(x), x * 4)
    assert len(traced) == 1
    jax.jit(double)(jnp.arange(3.0, dtype=jnp.float32))  # another shape
    assert len(traced) == 2


def test_wide32_lowered_outside_the_x64_it_was_traced_in():
    """A program traced with x64 on and lowered after leaving it keeps its
    64-bit ops (and does not leave a narrowed program cached behind). A
    shape no other test lowers: lowerings are cached per operand type."""
    x = _float32_specials(np.random.default_rng(6)).reshape(3, 29)
    with jax.enable_x64(True):
        traced = jax.jit(_math._wide32).trace(jnp.asarray(x))
    compiled = traced.lower().compile()
    with jax.enable_x64(True):
        want = _bits(x.astype(np.float64))
        np.testing.assert_array_equal(_bits(compiled(jnp.asarray(x))), want)
        again = jax.jit(lambda v: _math._wide32(v) * 1.0)(jnp.asarray(x))
        np.testing.assert_array_equal(_bits(again), want)


def test_helpers_inside_shard_map_vary_with_their_operands(x64):
    """Inside `shard_map` the result varies over the mesh axes an operand
    varies over: a step differentiates there (bfloat16 Adam reads its
    moments through `_upcast_opaque`), and an unreplicated result cannot be
    returned as replicated."""
    import funcopt as fo

    mesh = jax.make_mesh((1,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("i")
    opt = fo.adam(lr=1e-2)
    p = jnp.linspace(-1, 1, 8).astype(jnp.bfloat16)
    g = jnp.linspace(0.5, -0.3, 8).astype(jnp.bfloat16)

    def grad_of_step(p, g):
        state = opt.init(p)
        loss = lambda q: opt.step(q, g, state)[0].astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss)(p)

    want = jax.jit(grad_of_step)(p, g)
    sharded = jax.shard_map(grad_of_step, mesh=mesh, in_specs=spec, out_specs=spec)
    np.testing.assert_array_equal(jax.jit(sharded)(p, g), want)
    x = jnp.arange(8, dtype=jnp.float32)
    replicated = jax.shard_map(
        _math._wide32, mesh=mesh, in_specs=spec, out_specs=jax.sharding.PartitionSpec()
    )
    with pytest.raises(ValueError, match="replicat"):
        jax.jit(replicated)(x)
