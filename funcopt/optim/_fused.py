r"""torch's `fused=True` CPU kernels (`torch._fused_adam_`, `_fused_sgd_`, ...):
their arithmetic, shared by the rules that mirror them.

A fused kernel reads each element once and computes its whole update in
registers: every op is rounded once in the kernel's compute type (the
param's dtype; float32 "opmath" for bfloat16 and float16, rounded to 16 bits
only where a buffer is stored), the Python-float hyperparameters go through
C++ `double` math first and are cast to the compute type once, and the
multiply-adds the x86 AVX2/AVX-512 builds contract into one FMA round once.
Its vector square root is the hardware instruction (correctly rounded).
[`FusedMath`][funcopt.optim._fused.FusedMath] holds those ops for one
param dtype:

* float64 params, float32 ones outside the bit-exact mode, and 16-bit ones
  without x64 (in float32): plain `jax.numpy` ops in the compute type (XLA
  decides which products it contracts);
* with x64, float32 params in the bit-exact mode
  ([`set_exact_float32`][funcopt.precision.set_exact_float32]) and 16-bit
  params always: each float32 op runs in float64 on float32 values and is
  rounded once to float32, a multiply-add through `_fma32` (rounded once,
  or twice where [`torch_cpu_block`][funcopt.precision.torch_cpu_block] is
  `None`: torch's `ATEN_CPU_CAPABILITY=default` build has no FMA); these
  give torch's bits whatever XLA fuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._math import (
    _f32,
    _fma32,
    _narrow32,
    _sqrt_zero_safe,
    _wide32,
    exact_float32,
    is_reduced,
    opmath,
    packed_layout,
    true_divide,
    widest_float,
)
from .._tree import is_trainable

# torch 2.13's `_get_fused_kernels_supported_devices()`, as its message prints it
_FUSED_DEVICES = "['mps', 'cuda', 'xpu', 'hpu', 'cpu', 'mtia', 'privateuseone']"

# torch's fused CPU kernels (`_fused_sgd_`, `_fused_adagrad_`) loop over
# `Vectorized` registers of this many bytes (8 float32, 4 float64, 16 bfloat16
# or float16 elements; measured, torch 2.13 x86, AVX2 and AVX-512 dispatch
# alike), in chunks of whole 64-byte cache lines per thread: the scalar loop
# after the vectorised one runs over a leaf's last `size % width` elements
# only, whatever torch's thread count
_FUSED_VECTOR_BYTES = 32


class FusedMath:
    """A fused kernel's ops for params like `like` (decided at trace time).

    Values in the kernel's compute type are what `load` returns; every op
    returns one rounded result (`fma`: rounded once), `store` rounds to a
    buffer's dtype.
    """

    def __init__(self, like: jax.Array):
        self.dtype = jnp.dtype(like.dtype)
        x64 = widest_float() == jnp.float64
        reduced = is_reduced(like)
        float32 = self.dtype == jnp.float32
        # float32 ops through float64 (see the module docstring)
        self.exact = x64 and (reduced or (float32 and exact_float32()))
        self.opmath = jnp.dtype(jnp.float32) if reduced else self.dtype

    def load(self, x: jax.Array) -> jax.Array:
        """A buffer's elements in the compute type."""
        if not is_reduced(x):
            return _wide32(x) if self.exact else x
        return _wide32(opmath(x)) if self.exact else opmath(x)

    def scalar(self, s: Any) -> jax.Array:
        """A C++ `double` cast to the compute type (`opmath_t(s)`)."""
        if self.exact:
            return _f32(s).astype(jnp.float64)
        return jnp.asarray(s).astype(self.opmath)

    def _round(self, y: jax.Array) -> jax.Array:
        return _narrow32(y) if self.exact else y

    def add(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self._round(a + b)

    def sub(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self._round(a - b)

    def mul(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self._round(a * b)

    def div(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """`a / b`, a division (see `funcopt._math.true_divide`)."""
        return self._round(true_divide(a, b))

    def fma(self, a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
        """`a*b + c` as `vec::fmadd` (or a contracted `a*b + c`)."""
        if self.exact:
            shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
            bcast = (jnp.broadcast_to(x, shape) for x in (a, b, c))
            return _wide32(_fma32(*bcast))
        return a * b + c

    def sqrt(self, a: jax.Array) -> jax.Array:
        """The hardware square root (correctly rounded); its derivative is 0
        at 0 (see `funcopt._math.sqrt_nonnegative`)."""
        return self._round(_sqrt_zero_safe(a))

    def store(self, y: jax.Array, like: jax.Array) -> jax.Array:
        """`y` stored into a buffer of `like`'s dtype (one rounding)."""
        if self.exact:
            y = y.astype(jnp.float32)
        return y.astype(like.dtype)


def check_fused_params(name: str) -> Callable[[Any, Callable[[int], Any]], None]:
    """A `check_params` hook raising torch's `_device_dtype_check_for_fused`
    error for the first (in torch's order) complex parameter."""

    def check(params, torch_index):
        leaves = jax.tree.leaves(params)
        bad = [
            i
            for i, leaf in enumerate(leaves)
            if is_trainable(leaf) and jnp.iscomplexobj(leaf)
        ]
        if not bad:
            return
        first = min(bad, key=torch_index)
        dtype = jnp.result_type(leaves[first]).name
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {_FUSED_DEVICES} but torch.{dtype} and cpu"
        )

    check.__doc__ = f"{name} with `fused=True`: real floating-point params only."
    return check


def fused_scalar_tail(like: jax.Array) -> bool | jax.Array:
    """Where torch's fused CPU kernel runs its scalar loop over `like`'s
    elements: `False` (nowhere), `True` (everywhere) or a boolean mask of
    `like`'s shape (the last `size % width` elements of each leaf, also of
    leaves packed into one buffer, see `funcopt._multi_tensor`)."""
    width = _FUSED_VECTOR_BYTES // jnp.dtype(like.dtype).itemsize
    shape = tuple(jnp.shape(like))
    packed = packed_layout()
    sizes = packed[1] if packed is not None and packed[0] == shape else [like.size]
    tails = [size % width for size in sizes]
    if not any(tails):
        return False
    if tails == list(sizes):
        return True
    if packed is not None and packed[0] == shape:
        return packed[2](lambda size: size % width)
    index = jax.lax.broadcasted_iota(jnp.int32, (like.size,), 0).reshape(shape)
    return index >= like.size - tails[0]


def by_fused_loop(body, tail, where: bool | jax.Array):
    """`body()` or `tail()` (tuples of arrays) per element, as `where`
    (`fused_scalar_tail`) says."""
    if isinstance(where, bool):
        return tail() if where else body()
    return tuple(jnp.where(where, t, b) for t, b in zip(tail(), body()))


def kernel_value(value: jax.Array, dtype: str | None) -> jax.Array:
    """A hyperparameter as the kernel reads it: a tensor's (`dtype`, None
    for a Python float) by its value (`.item()`, a C++ `double`), i.e.
    rounded to its dtype, held in the widest float."""
    if dtype is None:
        return value
    return value.astype(jax.dtypes.canonicalize_dtype(dtype)).astype(value.dtype)
