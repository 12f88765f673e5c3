r"""torch's float32 CPU reductions, in torch's order, for the bit-exact mode.

A float32 sum's bits depend on the order of its additions. torch's CPU
kernels have a fixed order, the same in its AVX-512, AVX2 and
`ATEN_CPU_CAPABILITY=default` builds (measured against torch 2.13 on each:
the kernels below run 8-lane float32 vectors in all three). funcopt's
bit-exact float32 mode ([`set_exact_float32`][funcopt.precision.set_exact_float32])
follows it; everywhere else a reduction is XLA's, within float32 rounding of
torch's.

* `torch.norm(x)` and `torch.norm(x, dim=-1)` (`norm_kernel_tensor_iterator_impl`,
  the contiguous last-dimension path): the squares of each block of 8
  elements go into 8 lane sums, the lanes are added in turn, then the
  `n % 8` last elements: a block of 4 with its products rounded first (the
  compiler's vectorised tail loop), the rest as fused multiply-adds (products
  rounded first in the `default` build, which has no FMA:
  [`torch_cpu_block`][funcopt.precision.torch_cpu_block] `None`). Then a
  correctly rounded square root.
* `torch.norm(x, dim=-2)` (the generic reduction over an outer dimension):
  each column's squares, rounded, added in turn; where the last dimension
  has size 1, torch drops it and `dim=-2` takes the last-dimension path.
* Where every dimension `norm` reduces has size 1 (a 0-d tensor too),
  torch returns `abs(x)` without squaring (`norm_of_single_elements`).
* `x.sum(dim)` and `x.mean(dim)` over a contiguous dimension (`cascade_sum`,
  `vectorized_inner_sum`): 8-lane vectors summed by `row_sum`, four
  interleaved partial sums, each a cascade of four levels (`multi_row_sum`);
  the elements after the last whole vector are added first, then the lanes.
  A mean is that sum divided by the element count, rounded once.

Each addition is a float32 op computed in float64 on float32 values and
rounded once through a convert (`_add`), as the elementwise helpers of
`funcopt._math` round: a partial sum below float32's normal range (2^-126)
flushes to zero there, where torch keeps it. These are torch's orders with
one intra-op thread. torch splits a long sum between its threads: with 8
threads a mean over 300,000 elements differs; with 2 (this project's CI
machine) none of the sizes measured did, up to norms of 2,000,003 elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._math import _fma32, _narrow32, _wide32, round_float32

# float32 lanes of the torch CPU kernels above (a 256-bit vector)
_LANES = 8
# `row_sum`'s interleaved partial sums and `multi_row_sum`'s cascade levels
_ILP = 4
_LEVELS = 4


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    """A float32 sum of float32 values held in float64, held in float64.

    Rounded through a convert: nothing to fuse into an add, and narrowing
    it to a float32 add (LLVM may) rounds the same.
    """
    return (a + b).astype(jnp.float32).astype(jnp.float64)


def _square(w: jax.Array) -> jax.Array:
    """A float32 square, rounded, read back through its bits: opaque, so that
    no compiler fuses it into the add it feeds."""
    return _narrow32(w * w)


def _sequential(total: jax.Array, items: jax.Array, term) -> jax.Array:
    """`total + term(items[0]) + term(items[1]) + ...`, each sum rounded."""

    def step(acc, item):
        return _add(acc, term(item)), None

    return jax.lax.scan(step, total, items)[0]


def _norm_last(w: jax.Array) -> jax.Array:
    """The sum of squares of torch's last-dimension `norm` (module docstring),
    over the last axis of `w` (float32 values held in float64)."""
    n = w.shape[-1]
    lead = w.shape[:-1]
    whole = n - n % _LANES
    total = jnp.zeros(lead, w.dtype)
    if whole:
        blocks = jnp.moveaxis(w[..., :whole].reshape(*lead, -1, _LANES), -2, 0)
        lanes = _sequential(jnp.zeros((*lead, _LANES), w.dtype), blocks, _square)
        total = lanes[..., 0]
        for k in range(1, _LANES):
            total = _add(total, lanes[..., k])
    d = whole
    if n - d >= 4:
        for k in range(d, d + 4):
            total = _add(total, _square(w[..., k]))
        d += 4
    for k in range(d, n):
        total = _wide32(_fma32(w[..., k], w[..., k], total))
    return total


def _check_axis(axis) -> None:
    if axis not in (None, -1, -2):
        raise ValueError(f"axis must be None, -1 or -2, got {axis!r}")


def norm_of_single_elements(
    x: jax.Array, axis: int | None, ord: float = 2.0
) -> jax.Array | None:
    """torch's `linalg_vector_norm` (any dtype, any `ord`) where every
    dimension it reduces has size 1, a 0-d tensor's included: `abs(x)`
    (`x != 0` for `ord=0`), nothing raised to a power (so nothing overflows
    or underflows), `keepdim=True` for an axis; `None` for any other shape."""
    _check_axis(axis)
    reduced = range(x.ndim) if axis is None else [x.ndim + axis]
    if any(x.shape[d] != 1 for d in reduced):
        return None
    single = jnp.abs(x)
    if ord == 0:
        single = (x != 0).astype(single.dtype)
    return single.reshape(()) if axis is None else single


def norm(x: jax.Array, axis: int | None = None) -> jax.Array:
    """torch's float32 `torch.norm(x)` (`axis=None`), `norm(x, dim=-1)` or
    `norm(x, dim=-2)` on CPU, bit for bit (`keepdim=True` for an axis)."""
    single = norm_of_single_elements(x, axis)
    if single is not None:
        return single
    w = _wide32(x)
    if axis is None:
        total = _norm_last(w.reshape(-1))
    elif axis == -1 or x.shape[-1] == 1:
        # torch drops a last dimension of size 1: dim -2 is then the
        # contiguous last one
        total = jnp.expand_dims(_norm_last(jnp.moveaxis(w, axis, -1)), axis)
    else:
        rows = jnp.moveaxis(w, -2, 0)
        total = _sequential(jnp.zeros(rows.shape[1:], rows.dtype), rows, _square)
        total = total[..., None, :]
    return jnp.sqrt(total).astype(jnp.float32)


def _ceil_log2(n: int) -> int:
    """c10's `CeilLog2` (1 up to 2)."""
    return 1 if n <= 2 else (n - 1).bit_length()


def _multi_row_sum(items: jax.Array) -> jax.Array:
    """torch's `multi_row_sum`: `items[i]` (a row of partial sums) added in
    turn into level 0, whose sum moves up a cascade of levels every
    `level_step` items."""
    size = items.shape[0]
    level_power = max(4, _ceil_log2(size) // _LEVELS)
    level_step = 1 << level_power
    level_mask = level_step - 1
    zero = jnp.zeros(items.shape[1:], items.dtype)
    # level 0 starts each block of `level_step` items at zero: the blocks'
    # sums are independent, one scan computes them all
    n_blocks = size // level_step
    acc = [zero] * _LEVELS
    if n_blocks:
        blocks = items[: n_blocks * level_step].reshape(
            n_blocks, level_step, *zero.shape
        )
        block_sums = _sequential(
            jnp.zeros((n_blocks, *zero.shape), items.dtype),
            jnp.moveaxis(blocks, 1, 0),
            lambda item: item,
        )
    for block in range(n_blocks):
        acc[0] = block_sums[block]
        i = (block + 1) * level_step
        for j in range(1, _LEVELS):
            acc[j] = _add(acc[j], acc[j - 1])
            acc[j - 1] = zero
            if i & (level_mask << (j * level_power)):
                break
    for k in range(n_blocks * level_step, size):
        acc[0] = _add(acc[0], items[k])
    for j in range(1, _LEVELS):
        acc[0] = _add(acc[0], acc[j])
    return acc[0]


def _row_sum(items: jax.Array) -> jax.Array:
    """torch's `row_sum` over `items[0], items[1], ...`: four interleaved
    partial sums (`_multi_row_sum`), the items left over added to the first,
    then the four added in turn."""
    size = items.shape[0]
    whole = size - size % _ILP
    grouped = items[:whole].reshape(whole // _ILP, _ILP, *items.shape[1:])
    partial = _multi_row_sum(grouped)
    total = partial[0]
    for k in range(whole, size):
        total = _add(total, items[k])
    for k in range(1, _ILP):
        total = _add(total, partial[k])
    return total


def _sum_last(w: jax.Array) -> jax.Array:
    """torch's `cascade_sum` over the last (contiguous) axis of `w`."""
    n = w.shape[-1]
    items = jnp.moveaxis(w, -1, 0)
    if n < _LANES:
        return _row_sum(items)
    whole = n - n % _LANES
    lanes = _row_sum(items[:whole].reshape(whole // _LANES, _LANES, *items.shape[1:]))
    total = jnp.zeros(items.shape[1:], w.dtype)
    for k in range(whole, n):
        total = _add(total, items[k])
    for k in range(_LANES):
        total = _add(total, lanes[k])
    return total


def mean(x: jax.Array, axis: int) -> jax.Array:
    """torch's float32 `x.mean(dim=axis, keepdim=True)` on CPU, bit for bit,
    where `axis` is contiguous in memory: every axis after it has size 1."""
    axis = axis % x.ndim
    if any(size != 1 for size in x.shape[axis + 1 :]):
        raise ValueError(f"axis {axis} of shape {x.shape} is not contiguous")
    total = _sum_last(jnp.moveaxis(_wide32(x), axis, -1))
    count = x.shape[axis]
    return jnp.expand_dims(round_float32(total / count), axis)
