r"""Numerics shared by the update rules, in torch's rounding.

torch does its per-step scalar math (bias corrections, step sizes, `1 - beta`)
in Python floats, i.e. float64, and casts the result to the tensor's dtype only
where it meets a tensor. funcopt mirrors that: hyperparameters live in the
state in the widest enabled float (float64 under `jax_enable_x64`), scalar
math stays there, and `scalar` casts at the tensor boundary.

**16-bit parameters** (bfloat16, float16). torch's CPU kernels compute every
op in float32 "opmath" and round the result to the 16-bit dtype once per op.
The helpers here mirror torch's ops one for one (`mul`, `div`,
`add_scalar`, `add`, `addcmul`, `addcdiv`,
`lerp`, `sqrt`, `rsqrt`, `reciprocal`, and
`tensor_op` for tensor-tensor ops): they read 16-bit operands with
`opmath`, take each Python-float scalar as torch's kernel for that op
takes it, and round once at the end. Measured against torch 2.13 on CPU
(AVX2 and AVX512 builds alike):

* `mul(s)`, `div(s)` (a true division), `addcmul(value=)`,
  `addcdiv(value=)`, `lerp(weight=)`, and a 0-dim float32 tensor
  operand: the scalar as float32 (`float(s)`);
* `add(s)` (a scalar addend, e.g. `.add_(eps)`): the scalar rounded to
  the tensor's dtype first;
* `add(other, alpha=s)`: `alpha` rounded to the tensor's dtype first;
* `addcmul` and `lerp` fuse their multiply-add (one float32 rounding),
  `addcdiv` computes `x + (value*t1)/t2`;
* `add(other, alpha=)` and `rsqrt` round differently in torch's
  vectorised loop and in its scalar tail; both are mirrored, element by
  element (`add`). Where the vectorised loop ends depends on the build
  torch ran: blocks of 32 elements on x86 with AVX2 or AVX-512, no vectorised
  loop at all under `ATEN_CPU_CAPABILITY=default`. funcopt follows
  [`torch_cpu_block`][funcopt.precision.torch_cpu_block] (32 unless set);
  `funcopt.torch_interop.measure_torch_cpu_block()` measures it.

**float32 parameters with x64 enabled, in the bit-exact mode**
([`set_exact_float32`][funcopt.precision.set_exact_float32]; off by default
for speed). torch's float32 CPU kernels round
every op once in float32, and those that multiply and add (`add(alpha=)`,
`addcmul`, `lerp`) use a fused multiply-add, in the vectorised loop and in its
scalar tail alike (x86 AVX2/AVX-512 builds; `ATEN_CPU_CAPABILITY=default`,
i.e. [`torch_cpu_block`][funcopt.precision.torch_cpu_block] `None`, rounds the
product first). XLA's CPU backend lets LLVM contract any multiply feeding an
add into an FMA, which rounds some of torch's ops once too few. So with x64
each helper computes a float32 op in float64 on operands read through their
bits (`_wide32`, which no compiler can take for a float32 value and narrow
back), and rounds once to float32: $+, -, \times, \div, \sqrt{}$ of float32
values rounded through float64 are correctly rounded (53 >= 2*24 + 2), and a
multiply-add is rounded to odd in float64 first (`_fma32`). The results are
torch's bits whatever XLA fuses, so eager and jitted steps agree too.
Without x64, or with the mode off (the default), the float32 helpers are the
plain float32 expressions (XLA's contraction decides; see
`benchmarks/results/float32_bits.md`).

For float64 (and float32 without x64) every helper is the expression funcopt
always used: the dtype checks run at trace time, so those paths compile to the
same program as before.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

_REDUCED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_layout = threading.local()
# torch's CPU elementwise loops (``cpu_kernel_vec``) run vectorised over
# blocks of this many 16-bit elements (x86 AVX2 and AVX-512 builds alike; None:
# no vectorised loop); the remaining elements go through the scalar loop,
# which for ``add(alpha=)`` and ``rsqrt`` rounds differently (see ``add``)
_torch_cpu: dict[str, int | None] = {"block": 32}


def torch_cpu_block() -> int | None:
    """Elements per vectorised block of the torch CPU loop funcopt mirrors.

    32 (the default) is torch on x86 with AVX2 or AVX-512; `None` is a
    torch without a vectorised loop (`ATEN_CPU_CAPABILITY=default`), where
    every element takes the scalar loop. 16-bit parameters see it, and
    float32 ones with x64 (`None`: torch rounds a product before adding it).
    """
    return _torch_cpu["block"]


def set_torch_cpu_block(block: int | None) -> None:
    """Mirror a torch CPU loop with `block`-element vectorised blocks
    (`None`: scalar loop only); see
    [`torch_cpu_block`][funcopt.precision.torch_cpu_block].

    Read when a step is traced: set it before the first step (a jitted step
    already compiled keeps the block it was traced with).
    """
    if block is not None and (
        isinstance(block, bool) or not isinstance(block, int) or block < 1
    ):
        raise ValueError(f"block must be a positive int or None, got {block!r}")
    _torch_cpu["block"] = block


def widest_float() -> jnp.dtype:
    """float64 when x64 is enabled, else float32: torch's Python-float scalar math."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def is_reduced(x) -> bool:
    """Whether `x` is bfloat16 or float16 (decided at trace time)."""
    return jnp.dtype(x.dtype) in _REDUCED


_exact_float32: dict[str, bool] = {"enabled": False}


def exact_float32() -> bool:
    """Whether float32 steps with x64 mirror torch's float32 ops bit for bit.

    Off by default: the float32 step is then the plain float32 program
    (torch's numbers within float32 rounding, as fast as optax's). On, each
    float32 op runs in float64 on operands rebuilt from their bits and is
    rounded as torch's CPU kernel rounds it (see the module docstring): the
    elementwise optimizers without a square root (SGD, Adamax, ASGD, Rprop;
    contrib Lion, schedule-free SGD) and Adafactor (its norms and means in
    torch's order of additions, `funcopt._reductions`) give torch's default
    CPU path's bits, and eager and jitted steps agree, at 4-15x the step time
    (measured on this project's 2-core x86 CI machine, 1 leaf of 1M and 100
    leaves of 10k). Needs x64 (without it there is no wider float to round
    through).
    """
    return _exact_float32["enabled"]


def set_exact_float32(enabled: bool) -> None:
    """Turn the bit-exact float32 mode on or off; see
    [`exact_float32`][funcopt.precision.exact_float32].

    Read when a step is traced, like
    [`set_torch_cpu_block`][funcopt.precision.set_torch_cpu_block]: set it
    before the first step (a jitted step already compiled keeps its mode).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _exact_float32["enabled"] = enabled


def trace_settings() -> tuple[int | None, bool, bool, bool, bool, bool]:
    """Everything a rule reads at trace time from funcopt's settings (part of
    the per-leaf kernel cache key and of the eager step's): this module's,
    whether the kernels are on (`funcopt.optim._fused_native.native_fused`)
    and run on the leaves stepped one by one (`kernels_now`: not under
    `update`, whose packed buckets still run them), whether they write the
    params in place (`params_in_place`) and whether they can be split over
    devices (`partitions`)."""
    from .optim import _fused_native

    native = _fused_native.native_fused()
    return (
        torch_cpu_block(),
        exact_float32(),
        native,
        _fused_native.kernels_now(),
        # (the JAX rules' programs are the same either way)
        _fused_native.params_in_place() or not native,
        _fused_native.partitions(),
    )


def _exact32(x) -> bool:
    """Whether `x` is float32 with x64 on, and either a per-parameter scalar
    or the bit-exact float32 mode is set: torch's float32 ops mirrored one by
    one through float64 (decided at trace time). Scalar float32 math is
    always mirrored: it is torch's scalar math on 0-d tensors (a tensor `lr`,
    the float32 step of `differentiable=True`, NAdam's `mu_product`), costs
    nothing, and a rounding there moves every element of the update."""
    return (
        jnp.dtype(x.dtype) == jnp.float32
        and widest_float() == jnp.float64
        and (_exact_float32["enabled"] or is_per_param_scalar(x))
    )


def is_per_param_scalar(x) -> bool:
    """Whether `x` holds one scalar per parameter: 0-d, or, in a rule traced
    on packed leaves (`packed_leaves`), a column `[n_rows, 1]` (a 0-d state
    buffer or step count, one value per row: the multi-tensor path's form of
    a 0-d tensor, so both paths round it as torch rounds a 0-d tensor)."""
    if jnp.ndim(x) == 0:
        return True
    packed = packed_layout()
    return packed is not None and jnp.shape(x) == (packed[0][0], 1)


def _unary_primitive(
    name: str, impl: Callable, out_dtype: Callable, jvp: Callable
) -> Callable:
    """`impl`, an elementwise function of one array, as one primitive.

    A `jax.custom_jvp` function is traced again at every call, and again
    under `vmap`, `jvp` and `_compile.inline`: `_wide32`'s twenty integer ops
    took 5 ms a call to trace in the x64 float32 scalar math (40% of the
    trace time of NAdam's and RAdam's parity rows). As a primitive it is one
    equation until it is lowered; there `impl` is traced once per operand
    type (that jaxpr is then evaluated into each call site, which is cheap)
    and lowered in place, as the `custom_jvp` function's body was. The ops,
    and so the bits, are the same; un-jitted, `impl` runs op by op, as the
    `custom_jvp` function did. One operand: the result's type is the
    operand's but for its dtype (its sharding and, inside `shard_map`, the
    mesh axes it varies over), where several would need lax's rules for
    joining their types (`_fma32_exact` stays a `custom_jvp` function).

    `out_dtype(dtype)` is the result's dtype; `jvp(x, t)` the tangent of
    the result for the operand's tangent `t` (instantiated).
    """
    prim = jcore.Primitive(name)
    prim.def_impl(impl)
    prim.def_abstract_eval(
        lambda aval: aval.update(dtype=out_dtype(aval.dtype), weak_type=False)
    )
    programs: dict = {}

    def lowering(ctx, *args):
        # 64-bit operands or results were traced with x64 on: `impl`'s
        # integer ops are 64-bit then, whatever the setting when lowered
        wide = any(
            jnp.dtype(a.dtype).itemsize == 8 for a in (*ctx.avals_in, *ctx.avals_out)
        )
        key = (wide, tuple(ctx.avals_in))
        with jax.enable_x64(wide):
            if key not in programs:
                programs[key] = jax.make_jaxpr(impl)(*ctx.avals_in)
            program = jcore.jaxpr_as_fun(programs[key])
            return mlir.lower_fun(program, multiple_results=True)(ctx, *args)

    def jvp_rule(primals, tangents):
        ((x,), (t,)) = primals, tangents
        return prim.bind(x), jvp(x, ad.instantiate_zeros(t))

    mlir.register_lowering(prim, lowering)
    batching.defvectorized(prim)
    ad.primitive_jvps[prim] = jvp_rule
    return prim.bind


def _wide32_impl(x: jax.Array) -> jax.Array:
    """A float32 array as float64, exactly, through integer ops.

    A `convert` would let LLVM narrow float64 arithmetic on it back to float32
    ops (exact for one op, but then free to fuse a product into the next add);
    built from the bits, the value is opaque to it.
    """
    u64 = jnp.uint64
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32).astype(u64)
    sign = (bits >> u64(31)) << u64(63)
    exp = (bits >> u64(23)) & u64(0xFF)
    mant = bits & u64(0x7FFFFF)
    # normal, inf and NaN: rebias the exponent (127 -> 1023), widen the mantissa
    wide_exp = jnp.where(exp == u64(0xFF), u64(0x7FF), exp + u64(896))
    normal = jax.lax.bitcast_convert_type(
        sign | (wide_exp << u64(52)) | (mant << u64(29)), jnp.float64
    )
    # zero and subnormal: mant * 2**-149, exact
    tiny = mant.astype(jnp.float64) * jnp.float64(2.0**-149)
    tiny = jnp.where(sign != u64(0), -tiny, tiny)
    return jnp.where(exp == u64(0), tiny, normal)


_wide32 = _unary_primitive(
    "funcopt_wide32",
    _wide32_impl,
    lambda dtype: jnp.dtype(jnp.float64),
    lambda x, t: t.astype(jnp.float64),
)


def _narrow32(y: jax.Array) -> jax.Array:
    """A float32 op's float64 result rounded once, read back as float64."""
    return _wide32(y.astype(jnp.float32))


def round_float32(y: jax.Array) -> jax.Array:
    r"""A float64 `y` rounded once to float32 (to nearest, ties to even),
    subnormal results included.

    XLA's CPU backend flushes a float32 subnormal result to zero, in a
    conversion too; torch's CPU kernels keep it. Below $2^{-126}$ the
    float32 bits are built from the integer $|y| \cdot 2^{149}$ (rounded
    to even, exact in float64), which runs on into the smallest normal
    value. (`_narrow32` rounds through XLA's conversion, which flushes
    them: exact wherever a result stays normal, as in every rule but
    NAdam's `mu_product`.)
    """
    u32 = jnp.uint32
    scaled = jnp.round(jnp.abs(y) * 2.0**149)
    bits = scaled.astype(u32) | (jnp.signbit(y).astype(u32) << u32(31))
    tiny = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(jnp.abs(y) < 2.0**-126, tiny, y.astype(jnp.float32))


@jax.custom_jvp
def _fma32_exact(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """`fmaf(a, b, c)` of float32 values held in float64: one rounding.

    `a*b` is exact in float64; the sum is rounded to odd (round to nearest,
    then to the odd neighbour where inexact, from the error of the sum), so
    that rounding it to float32 is the correctly rounded fused result.
    """
    p = a * b
    s = p + c
    # the rounding error of s = p + c, exactly (Knuth's TwoSum)
    pp = s - c
    cc = s - pp
    err = (p - pp) + (c - cc)
    bits = jax.lax.bitcast_convert_type(s, jnp.int64)
    inexact = (err != 0) & ((bits & 1) == 0) & jnp.isfinite(s)
    # one ulp towards the exact value
    toward = jnp.where((err > 0) == (s > 0), jnp.int64(1), jnp.int64(-1))
    odd = jax.lax.bitcast_convert_type(
        jnp.where(inexact, bits + toward, bits), jnp.float64
    )
    return odd.astype(jnp.float32)


@_fma32_exact.defjvp
def _fma32_exact_jvp(primals, tangents):
    (a, b, c), (ta, tb, tc) = primals, tangents
    out = _fma32_exact(a, b, c)
    return out, (ta * b + a * tb + tc).astype(jnp.float32)


def _fma32(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """torch's float32 `a*b + c` (float64 operands holding float32 values),
    as float32: fused, or with the product rounded first where torch's CPU
    loop has no vectorised path."""
    if torch_cpu_block() is None:
        return (_narrow32(a * b) + c).astype(jnp.float32)
    return _fma32_exact(a, b, c)


def _upcast_opaque_impl(h: jax.Array) -> jax.Array:
    """A 16-bit float array as float32, exactly, through integer ops.

    `h.astype(float32)` lets the compilers drop the rounding that made
    `h` (both measured on XLA CPU): the bf16 normalization pass hands a
    bf16 op's float32 result straight to a `convert` to float32 (excess
    precision), and LLVM narrows float16 `fpext(fptrunc(a * b)) + c` to
    half ops and fuses them into one multiply-add. Moving the bits by hand
    keeps the rounding. For bfloat16 it is what a convert does anyway (a
    shift); the float16 version costs more and is only used where needed.
    """
    bits = jax.lax.bitcast_convert_type(h, jnp.uint16).astype(jnp.uint32)
    if h.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(bits << 16, jnp.float32)
    sign = (bits & 0x8000) << 16
    exp = (bits >> 10) & 0x1F
    mant = bits & 0x3FF
    # normal, inf and NaN: rebias the exponent (15 -> 127), widen the mantissa
    wide_exp = jnp.where(exp == 0x1F, jnp.uint32(0xFF), exp + 112)
    normal = jax.lax.bitcast_convert_type(
        sign | (wide_exp << 23) | (mant << 13), jnp.float32
    )
    # zero and subnormal: mant * 2**-24, exact
    tiny = mant.astype(jnp.float32) * jnp.float32(2.0**-24)
    tiny = jnp.where(sign != 0, -tiny, tiny)
    return jnp.where(exp == 0, tiny, normal)


# the bits are an implementation detail: differentiated as a convert
_upcast_opaque = _unary_primitive(
    "funcopt_upcast_opaque",
    _upcast_opaque_impl,
    lambda dtype: jnp.dtype(jnp.float32),
    lambda h, t: t.astype(jnp.float32),
)


def opmath(x: jax.Array) -> jax.Array:
    """torch's CPU "opmath" operand: 16-bit floats as float32, the rest as is.

    A bfloat16 value is read through its bits (`_upcast_opaque`), so
    that XLA cannot skip the rounding that produced it; float16 (which XLA
    CPU does not normalize) is converted.
    """
    if _exact32(x):
        return _wide32(x)
    if not is_reduced(x):
        return x
    if x.dtype == jnp.bfloat16:
        return _upcast_opaque(x)
    return x.astype(jnp.float32)


def tensor_op(fn, *xs: jax.Array) -> jax.Array:
    """One torch elementwise op on tensors of one dtype (`a * b`, `a / b`).

    `fn` runs on the opmath operands and the result is rounded once. A
    reduction (`fn` changes the shape) of float32 tensors runs in float32, as
    funcopt always ran it (torch's float32 reductions accumulate in their own
    order).
    """
    if _exact32(xs[0]):
        shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in xs))
        wide = fn(*(opmath(x) for x in xs))
        if jnp.shape(wide) != shape:
            return fn(*xs)
        return _round(wide, xs[0])
    return _round(fn(*(opmath(x) for x in xs)), xs[0])


def _round(y: jax.Array, like: jax.Array) -> jax.Array:
    """An opmath result rounded once to `like`'s dtype (a no-op otherwise)."""
    return y.astype(like.dtype) if is_reduced(like) or _exact32(like) else y


def scalar(x: jax.Array, like: jax.Array) -> jax.Array:
    """Cast a widest-float scalar to `like`'s dtype, as torch does for `alpha=`.

    To a 16-bit dtype via float32, as c10's `BFloat16(float)` from a double.
    """
    if is_reduced(like):
        return jnp.asarray(x).astype(jnp.float32).astype(like.dtype)
    return jnp.asarray(x, dtype=like.dtype)


def _f32(x) -> jax.Array:
    # C++ ``static_cast<float>(double)``: one rounding
    return jnp.asarray(x).astype(jnp.float32)


def op_scalar(x, like: jax.Array) -> jax.Array:
    """A Python-float scalar as torch's kernel for `like` takes it.

    float32 for a 16-bit tensor (its opmath type), `like`'s dtype otherwise
    (for float32 with x64: the float32 value, in float64, the helpers' opmath).
    """
    if _exact32(like):
        return _f32(x).astype(jnp.float64)
    return _f32(x) if is_reduced(like) else scalar(x, like)


def _in_dtype(x, like: jax.Array) -> jax.Array:
    """A Python-float scalar rounded to `like`'s 16-bit dtype, as float32."""
    return _upcast_opaque(scalar(x, like))


def mul(x: jax.Array, s) -> jax.Array:
    """`x.mul(s)` for a Python-float (or 0-dim float32 tensor) `s`."""
    return _round(opmath(x) * op_scalar(s, x), x)


def div(x: jax.Array, s) -> jax.Array:
    """`x.div(s)` for a Python-float `s`: a division, as torch's CPU kernel
    (`true_divide`)."""
    return _round(true_divide(opmath(x), op_scalar(s, x)), x)


def divide_exactly(a, b) -> jax.Array:
    """`a / b` as a division on every backend, also by a scalar (see
    `true_divide`): the divisor passes through an optimization barrier."""
    return _divide_behind(a, b, jax.lax.optimization_barrier)


def _divide_behind(a, b, barrier: Callable) -> jax.Array:
    """`a / b` with the divisor, broadcast to the result's shape, passed
    through `barrier`: XLA's algebraic simplifier then sees no broadcast
    scalar divisor to turn into a multiplication by its reciprocal."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    return a / barrier(jnp.broadcast_to(b, shape))


def cpu_barrier(*values: jax.Array) -> tuple[jax.Array, ...]:
    """`values` through `jax.lax.optimization_barrier` where lowered for
    CPU, unchanged elsewhere.

    What `jax.lax.platform_dependent(*values, cpu=optimization_barrier,
    default=...)` computes, without its two conditionals: the platform is
    chosen when the primitive is lowered (a per-platform lowering rule), so
    the program XLA receives holds the barrier or nothing. Per leaf, the
    conditionals cost XLA's call-graph passes (they clone the branches of
    every call site before simplifying them away): Adam on 100 leaves of
    1,000 elements compiled 1.7x optax's time with two of them per leaf,
    1.4x without (jaxlib 0.10.2, 2-core x86).
    """
    return tuple(_cpu_barrier_p.bind(*values))


_cpu_barrier_p = jcore.Primitive("cpu_optimization_barrier")
_cpu_barrier_p.multiple_results = True
_cpu_barrier_p.def_impl(lambda *values: values)
_cpu_barrier_p.def_abstract_eval(lambda *avals: avals)
mlir.register_lowering(_cpu_barrier_p, lambda ctx, *values: values)
mlir.register_lowering(
    _cpu_barrier_p,
    mlir.lower_fun(
        lambda *values: jax.lax.optimization_barrier(values), multiple_results=True
    ),
    platform="cpu",
)
batching.primitive_batchers[_cpu_barrier_p] = lambda values, dims: (
    _cpu_barrier_p.bind(*values),
    dims,
)
ad.primitive_jvps[_cpu_barrier_p] = lambda primals, tangents: (
    cpu_barrier(*primals),
    cpu_barrier(*map(ad.instantiate_zeros, tangents)),
)
ad.primitive_transposes[_cpu_barrier_p] = lambda cts, *primals: cpu_barrier(
    *map(ad.instantiate_zeros, cts)
)


def materialized(x: jax.Array) -> jax.Array:
    """`x`, computed into its own buffer before anything reads it, where
    lowered for one CPU device.

    XLA fuses a cheap elementwise value into each of its readers and
    recomputes it there. When one reader updates a donated buffer in place
    and another returns the value, nothing orders the two, and XLA copies
    the donated buffer first. Here the value is written over its own first
    element (`dynamic_update_slice`, the same bits), which XLA does in
    place and cannot fuse into the readers: the value is computed once, in
    a loop of its own, before them. Identity elsewhere: the GSPMD
    partitioner turns that update of a sharded array into all-reduces.
    """
    return _materialized_p.bind(x)


def _materialized_lowering(ctx, x):
    (aval,) = ctx.avals_in
    if aval.ndim == 0 or aval.size == 0:
        return [x]
    if getattr(ctx.module_context.axis_context, "num_devices", None) != 1:
        return [x]

    def write_own_first_element(x):
        first = jax.lax.slice(x, (0,) * x.ndim, (1,) * x.ndim)
        return jax.lax.dynamic_update_slice(x, first, (0,) * x.ndim)

    return mlir.lower_fun(write_own_first_element, multiple_results=False)(ctx, x)


_materialized_p = jcore.Primitive("cpu_materialized")
_materialized_p.def_impl(lambda x: x)
_materialized_p.def_abstract_eval(lambda aval: aval)
mlir.register_lowering(_materialized_p, lambda ctx, x: [x])
mlir.register_lowering(_materialized_p, _materialized_lowering, platform="cpu")
batching.primitive_batchers[_materialized_p] = lambda values, dims: (
    _materialized_p.bind(*values),
    dims[0],
)
ad.primitive_jvps[_materialized_p] = lambda primals, tangents: (
    _materialized_p.bind(*primals),
    tangents[0],
)


def true_divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a / b`, divided (not multiplied by `1 / b`) where lowered for CPU.

    XLA's algebraic simplifier rewrites a division by a broadcast scalar
    into a multiplication by its reciprocal: off torch's division by an ulp
    in up to 44% of float32 elements (measured, jaxlib 0.10.2, four
    divisors), and a separate scalar kernel per leaf for the reciprocal.
    Behind the barrier (`cpu_barrier`, as in `divide_exactly`) the
    simplifier sees no broadcast; XLA's CPU pipeline drops the barrier
    before fusion, so the division is fused into the same single loop.
    Other backends keep `a / b`, where the barrier could materialise the
    broadcast divisor.
    """
    return _divide_behind(a, b, lambda divisor: cpu_barrier(divisor)[0])


def add_scalar(x: jax.Array, s) -> jax.Array:
    """`x.add(s)` for a Python-float `s` (e.g. `.add_(eps)`).

    The scalar meets the tensor in the tensor's dtype: rounded to 16 bits
    first for a 16-bit tensor.
    """
    if _exact32(x):
        return _round(opmath(x) + op_scalar(s, x), x)
    if not is_reduced(x):
        return x + scalar(s, x)
    return _round(opmath(x) + _in_dtype(s, x), x)


def sqrt(x: jax.Array) -> jax.Array:
    """`x.sqrt()`: in opmath, rounded once."""
    return _round(jnp.sqrt(opmath(x)), x)


def reciprocal(x: jax.Array) -> jax.Array:
    """`x.reciprocal()` (what `python_float / tensor` computes first)."""
    return _round(1 / opmath(x), x)


def lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    """`torch.lerp(start, end, weight)` with torch's two-branch rounding.

    `start + w*(end - start)` for `|w| < 0.5`, else
    `end - (end - start)*(1 - w)`; `weight` is cast to the tensors' dtype
    first, as torch's CPU kernel does (float32 for 16-bit tensors, whose
    branches run in float32 and round once).
    """
    w = op_scalar(weight, start)
    s, e = opmath(start), opmath(end)
    if _exact32(start):
        # float32 ops: the difference and `1 - w` rounded, each branch fused
        diff = _narrow32(e - s)
        small = _fma32(w, diff, s)
        large = _fma32(-diff, _narrow32(1 - w), e)
        return _round(jnp.where(jnp.abs(w) < 0.5, small, large), start)
    # `e - diff*(1 - w)` is `e + (-(1 - w))*diff` exactly: one select of the
    # base and one of the scalar factor, so the per-element work is a
    # multiply-add and the scalar part stays scalar
    small = jnp.abs(w) < 0.5
    factor = jnp.where(small, w, -(1 - w))
    return _round(jnp.where(small, s, e) + factor * (e - s), start)


def addcmul(x: jax.Array, t1: jax.Array, t2: jax.Array, value) -> jax.Array:
    """`x.addcmul(t1, t2, value=value)`: `x + value*t1*t2`."""
    v = op_scalar(value, x)
    if _exact32(x):
        # float32: `value*t1` rounded, then fused into `x + (value*t1)*t2`
        return _round(_fma32(_narrow32(v * opmath(t1)), opmath(t2), opmath(x)), x)
    return _round(opmath(x) + v * opmath(t1) * opmath(t2), x)


def addcdiv(x: jax.Array, t1: jax.Array, t2: jax.Array, value) -> jax.Array:
    """`x.addcdiv(t1, t2, value=value)`: `x + value*(t1/t2)`.

    For 16-bit tensors torch's kernel computes `x + value*t1/t2` left to
    right in float32, i.e. `(value*t1)/t2`; for float32 tensors too, each op
    rounded (no multiply-add: the last op is a sum with a quotient).
    """
    if _exact32(x):
        v = op_scalar(value, x)
        quotient = _narrow32(_narrow32(v * opmath(t1)) / opmath(t2))
        return _round(opmath(x) + quotient, x)
    if not is_reduced(x):
        return x + scalar(value, x) * (t1 / t2)
    return _round(opmath(x) + _f32(value) * opmath(t1) / opmath(t2), x)


def scalar_loop_elements(size: int) -> int:
    """How many trailing elements of a leaf torch's scalar loop runs."""
    block = torch_cpu_block()
    return size if block is None or size < block else size % block


@contextlib.contextmanager
def packed_leaves(
    shape: tuple[int, ...], sizes: Sequence[int], mask: Callable[..., jax.Array]
):
    """While a rule is traced on packed leaves: where each leaf's tail lies.

    The multi-tensor path runs a rule on one buffer of `shape` holding
    leaves of `sizes` elements; `mask()` is the (traced) boolean array of
    `shape` that marks the last `scalar_loop_elements` of every leaf,
    `mask(tail_elements)` the last `tail_elements(size)` (another loop's
    tail). Without this context `add` takes each array as one leaf.
    """
    old = getattr(_layout, "packed", None)
    _layout.packed = (tuple(shape), tuple(sizes), mask)
    try:
        yield
    finally:
        _layout.packed = old


def packed_layout() -> (
    tuple[tuple[int, ...], tuple[int, ...], Callable[..., jax.Array]] | None
):
    """While a rule is traced on packed leaves (`packed_leaves`): the buffer's
    shape, the element counts of the leaves it packs, and `mask`
    (`mask(tail_elements)`: the last `tail_elements(size)` elements of each
    leaf); None otherwise."""
    return getattr(_layout, "packed", None)


def _scalar_loop(shape: tuple[int, ...]) -> bool | jax.Array:
    """In a packed rule: where torch's CPU loop is scalar (True, False, a mask)."""
    packed_shape, sizes, mask = _layout.packed
    if packed_shape != shape:
        raise ValueError(
            f"a packed rule added arrays of shape {shape}, its buffers are "
            f"{packed_shape}"
        )
    tails = [scalar_loop_elements(n) for n in sizes]
    if not any(tails):
        return False
    if tails == list(sizes):
        return True
    return mask()


def add(x: jax.Array, other: jax.Array, alpha) -> jax.Array:
    """`x.add(other, alpha=alpha)`: `x + alpha*other`.

    For 16-bit tensors torch rounds `alpha` to the tensor's dtype, and its
    CPU loop rounds in two ways depending on where an element sits: the
    vectorised blocks ([`torch_cpu_block`][funcopt.precision.torch_cpu_block] elements)
    round `x + alpha*other` once; the scalar loop over the remaining elements rounds
    `alpha*other` to 16 bits first. Both are mirrored, element by element: a leaf is one
    contiguous loop, whose last `scalar_loop_elements` run scalar
    (torch splits a leaf of over 32768 elements between its threads, each
    chunk with its own scalar tail; funcopt models one chunk, i.e. torch
    with one thread).
    """
    if _exact32(x):
        other = jnp.broadcast_to(other, jnp.shape(x))
        return _round(_fma32(op_scalar(alpha, x), opmath(other), opmath(x)), x)
    if not is_reduced(x):
        return x + scalar(alpha, x) * other
    a = _in_dtype(alpha, x)
    return _by_loop(
        lambda x, o: _round(opmath(x) + a * opmath(o), x),
        # the rounded product read through its bits: for float16, LLVM would
        # fuse it into the sum (see _upcast_opaque)
        lambda x, o: _round(opmath(x) + _upcast_opaque(_round(a * opmath(o), x)), x),
        x,
        jnp.broadcast_to(other, jnp.shape(x)),
    )


def mirrors_float32_ops(x: jax.Array) -> bool:
    """Whether torch's float32 ops on `x` are mirrored one rounding at a
    time (x64 and the exact float32 mode, or a per-parameter scalar): then
    which torch kernel runs an op, and in what order, shows in the bits."""
    return _exact32(x)


def rsqrt(x: jax.Array) -> jax.Array:
    """`x.rsqrt()`: `1/sqrt(x)`.

    For 16-bit tensors torch's vectorised loop rounds once; its scalar loop
    (see `add`) rounds the square root to 16 bits first.
    """
    if _exact32(x):
        # float32: the square root rounded, then the quotient
        return _round(1 / _narrow32(jnp.sqrt(opmath(x))), x)
    if not is_reduced(x):
        return 1 / jnp.sqrt(x)
    return _by_loop(
        lambda x: _round(1 / jnp.sqrt(opmath(x)), x),
        lambda x: _round(1 / opmath(_round(jnp.sqrt(opmath(x)), x)), x),
        x,
    )


def _by_loop(vectorised, scalar_loop, x: jax.Array, *more: jax.Array) -> jax.Array:
    """`vectorised` or `scalar_loop` of `(x, *more)` per element, as
    torch's CPU loop (the arrays all of `x`'s shape).
    """
    shape = jnp.shape(x)
    packed = getattr(_layout, "packed", None)
    if packed is not None:
        tail = _scalar_loop(shape)
        if isinstance(tail, bool):
            return (scalar_loop if tail else vectorised)(x, *more)
        return jnp.where(tail, scalar_loop(x, *more), vectorised(x, *more))
    size = math.prod(shape)
    k = scalar_loop_elements(size)
    if k == 0:
        return vectorised(x, *more)
    if k == size:
        return scalar_loop(x, *more)
    # one leaf: its last k elements, fixed up after the vectorised pass
    flat = [a.reshape(-1) for a in (x, *more)]
    out = vectorised(*flat)
    out = out.at[size - k :].set(scalar_loop(*(a[size - k :] for a in flat)))
    return out.reshape(shape)


def sqrt_nonnegative(x: jax.Array) -> jax.Array:
    """`sqrt(x)` for `x` that is >= 0 by construction (a sum of squares).

    The value is `jnp.sqrt`'s (NaN stays NaN, `sqrt(+-0) = +-0`), but the
    derivative at 0 is 0 instead of `inf * 0 = NaN`, so differentiating
    through a step (e.g. w.r.t. the learning rate) stays finite when some
    gradient entries are exactly zero. The forward program is the square
    root alone (the rule is only a derivative rule).
    """
    return _round(_sqrt_zero_safe(opmath(x)), x)


@jax.custom_jvp
def _sqrt_zero_safe(y: jax.Array) -> jax.Array:
    return jnp.sqrt(y)


@_sqrt_zero_safe.defjvp
def _sqrt_zero_safe_jvp(primals, tangents):
    (y,), (t,) = primals, tangents
    root = _sqrt_zero_safe(y)
    positive = y > 0
    # jnp.sqrt's derivative, t * (0.5 / root), where root > 0; else 0
    slope = jnp.where(positive, 0.5 / jnp.where(positive, root, 1), 0)
    return root, t * slope.astype(t.dtype)
