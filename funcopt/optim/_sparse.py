"""Sparse gradients: `jax.experimental.sparse.BCOO` as torch's sparse COO `p.grad`.

A BCOO gradient of a parameter of shape `S` holds `nse` entries: `indices`
`[nse, n_sparse]` into the first `n_sparse` dimensions of `S` and `data`
`[nse, *S[n_sparse:]]` (torch's `_indices().T` and `_values()`). Entries
whose index is out of range (BCOO's padding, index == shape) are dropped,
so a fixed `nse` keeps a jitted step from recompiling. With
`n_sparse == 0` (a 0-d parameter's gradient) every entry sits at the one
index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from .. import _math


def entries(grad: jsparse.BCOO) -> jsparse.BCOO:
    """`grad` with unbatched indices (`n_batch == 0`), entries as given."""
    if grad.n_batch:
        grad = jsparse.bcoo_update_layout(grad, n_batch=0)
    return grad


def coalesce(grad: jsparse.BCOO) -> jsparse.BCOO:
    """torch's `grad.coalesce()`: unique, sorted indices, duplicates summed.

    Padding stays out of range; with `n_sparse == 0` the entries are summed
    into one (none when there are none).
    """
    grad = entries(grad)
    if grad.n_sparse:
        return grad.sum_duplicates(nse=grad.nse)
    if grad.nse == 0:
        return grad
    data = sum_in_turn(grad.data)[None]
    return jsparse.BCOO(
        (data, grad.indices[:1]),
        shape=grad.shape,
        indices_sorted=True,
        unique_indices=True,
    )


def _rows(x: jax.Array, grad: jsparse.BCOO) -> tuple[jax.Array, tuple]:
    """`x` and the index tuple of `grad`'s entries into it: with
    `n_sparse == 0`, `x` gains a leading dimension of 1 that every entry
    indexes."""
    if grad.n_sparse == 0:
        return x[None], (jnp.zeros(grad.nse, jnp.int32),)
    return x, tuple(grad.indices[:, k] for k in range(grad.n_sparse))


def gather(x: jax.Array, grad: jsparse.BCOO) -> jax.Array:
    """torch's `x.sparse_mask(grad)._values()`: `x` at `grad`'s entries
    (zero at padding), shaped like `grad.data`."""
    rows, index = _rows(x, grad)
    return rows.at[index].get(mode="fill", fill_value=0)


def scatter_add(
    x: jax.Array,
    grad: jsparse.BCOO,
    values: jax.Array,
    alpha=None,
    *,
    coalesced: bool = False,
) -> jax.Array:
    """torch's `x.add_(sparse(grad's indices, values), alpha=alpha)`
    (`add_out_dense_sparse_cpu`): each entry added in turn (duplicates one
    after the other; only a 0-d `x`'s entries are summed first, in the exact
    mode's branch for it); padding dropped. `coalesced`: the
    sparse tensor's `is_coalesced()` flag (a tensor torch builds from
    indices and values has it unset, whatever its indices).

    In the exact float32 mode (`_math.mirrors_float32_ops`) an `alpha` add
    rounds as torch's branch for it does (`_exact_sparse_add`); elsewhere
    the product is rounded and the entries added in turn.
    """
    rows, index = _rows(x, grad)
    if alpha is not None and _math.mirrors_float32_ops(rows):
        out = _exact_sparse_add(rows, index, values, alpha, grad.n_sparse, coalesced)
    else:
        if alpha is not None:
            values = _math.scalar(alpha, x) * values
        out = rows.at[index].add(values, mode="drop")
    return out[0] if grad.n_sparse == 0 else out


def is_coalesced(grad: jsparse.BCOO) -> bool:
    """A gradient's torch `is_coalesced()` flag: its indices flagged unique
    and sorted (as `coalesce` leaves them)."""
    return bool(grad.unique_indices and grad.indices_sorted)


def _exact_sparse_add(rows, index, values, alpha, n_sparse, coalesced) -> jax.Array:
    """torch's three branches for `x.add_(sparse, alpha=alpha)`, float32
    rounded as they round:

    * coalesced (or one entry) without dense dimensions: `x[i] += a * v`
      in plain C++, the product rounded first;
    * with dense dimensions, or uncoalesced with sparse dimensions: BLAS
      `axpy` per entry, one fused rounding (`_math.add`), duplicates in turn;
    * no sparse dimension (a 0-d `x`), uncoalesced: the entries summed in
      turn (torch's `coalesce`), then one fused `add`.
    """
    nse = len(index[0])
    if nse == 0:
        return rows
    if n_sparse == 0 and nse > 1 and not coalesced:
        return _math.add(rows, sum_in_turn(values)[None], alpha)
    inside = _inside(index, rows.shape)
    hybrid = values.ndim > 1
    one_entry = jnp.sum(inside) == 1
    fused = jnp.logical_or(hybrid, ~(coalesced | one_entry))
    rank = jnp.zeros(nse, jnp.int32) if coalesced else _rank(index, rows.shape, inside)
    rank = jnp.where(inside, rank, -1)
    return _add_in_turn(rows, values, jnp.asarray(alpha), fused, rank, *index)


def _entry_add(current, value, alpha, fused):
    """One entry, `current + alpha * value`: fused (BLAS `axpy`,
    `_math.add`) or with the product rounded first (plain C++)."""
    unfused = _math.tensor_op(jnp.add, current, _math.mul(value, alpha))
    return jnp.where(fused, _math.add(current, value, alpha), unfused)


@jax.custom_jvp
def _add_in_turn(rows, values, alpha, fused, rank, *index) -> jax.Array:
    """`rows[index[k]] = _entry_add(rows[index[k]], values[k], ...)` for
    the entries of `rank >= 0` (-1: padding), in order: one gather and
    scatter per round, round `r` taking each index's `r`-th entry (`rank`).
    Its derivative is that of the sum of the entries' adds, which is linear
    (a loop of data-dependent length has no reverse mode)."""
    out_of_range = rows.shape[0]

    def one_round(r, rows):
        at = (jnp.where(rank == r, index[0], out_of_range), *index[1:])
        current = rows.at[at].get(mode="fill", fill_value=0)
        return rows.at[at].set(_entry_add(current, values, alpha, fused), mode="drop")

    return jax.lax.fori_loop(0, jnp.max(rank) + 1, one_round, rows)


@_add_in_turn.defjvp
def _add_in_turn_jvp(primals, tangents):
    rows, values, alpha, fused, rank, *index = primals
    rows_dot, values_dot, alpha_dot = tangents[:3]
    _, delta = jax.jvp(
        lambda v, a: _entry_add(jnp.zeros_like(v), v, a, fused),
        (values, alpha),
        (values_dot, alpha_dot),
    )
    return _add_in_turn(*primals), rows_dot.at[tuple(index)].add(delta, mode="drop")


def _inside(index: tuple, shape: tuple) -> jax.Array:
    """Which entries index inside `shape` (padding does not)."""
    inside = jnp.ones(len(index[0]), bool)
    for i, n in zip(index, shape):
        inside &= i < n
    return inside


def _rank(index: tuple, shape: tuple, inside: jax.Array) -> jax.Array:
    """Each entry's count of earlier entries at the same index (padding,
    outside `shape`, counted apart)."""
    wide = [i.astype(jnp.int64) for i in index]  # exact mode: x64 is on
    flat = jnp.ravel_multi_index(wide, shape[: len(index)], mode="clip")
    flat = jnp.where(inside, flat, -1)
    order = jnp.argsort(flat, stable=True)
    ordered = flat[order]
    position = jnp.arange(len(flat))
    starts_run = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
    run_start = jax.lax.cummax(jnp.where(starts_run, position, 0))
    return jnp.zeros_like(position).at[order].set(position - run_start)


def sum_in_turn(values: jax.Array) -> jax.Array:
    """`values[0] + values[1] + ...` along the first axis, one addition
    after the other (torch's sum of a few duplicate entries)."""
    return jax.lax.scan(lambda acc, v: (acc + v, None), values[0], values[1:])[0]


def todense(grad: jsparse.BCOO, like: jax.Array) -> jax.Array:
    """`grad` as a dense array of `like`'s dtype, duplicates added in turn."""
    return scatter_add(jnp.zeros_like(like), grad, grad.data.astype(like.dtype))
