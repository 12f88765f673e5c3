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
    data = jnp.sum(grad.data, axis=0, keepdims=True)
    return jsparse.BCOO((data, grad.indices[:1]), shape=grad.shape)


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
    x: jax.Array, grad: jsparse.BCOO, values: jax.Array, alpha=None
) -> jax.Array:
    """torch's `x.add_(sparse(grad's indices, values), alpha=alpha)`: each
    entry added in turn (duplicates one after the other, not summed first);
    padding dropped. With `alpha`, each entry is `_math.axpy` (torch's
    `axpy`), duplicates in turn: a fused multiply-add in the exact float32
    mode (`_math.fuses_axpy`), else the product added."""
    rows, index = _rows(x, grad)
    if alpha is not None and _math.fuses_axpy(rows):
        out = _axpy_in_turn(rows, index, values, alpha, grad.unique_indices)
    else:
        if alpha is not None:
            values = _math.scalar(alpha, x) * values
        out = rows.at[index].add(values, mode="drop")
    return out[0] if grad.n_sparse == 0 else out


def _axpy_in_turn(rows, index, values, alpha, unique: bool) -> jax.Array:
    """`rows[index[k]] = axpy(rows[index[k]], values[k], alpha)` for k in
    order: one gather and scatter per round, round `r` taking each index's
    `r`-th entry (a single round where the indices are unique)."""
    out_of_range = rows.shape[0]

    def one_round(r, rows, rank):
        at = (jnp.where(rank == r, index[0], out_of_range), *index[1:])
        current = rows.at[at].get(mode="fill", fill_value=0)
        return rows.at[at].set(_math.axpy(current, values, alpha), mode="drop")

    if len(index[0]) == 0:
        return rows
    if unique:
        return one_round(0, rows, jnp.zeros(len(index[0]), jnp.int32))
    rank = _rank_among_duplicates(index, rows.shape)
    rounds = jnp.max(rank, initial=-1) + 1
    return jax.lax.fori_loop(0, rounds, lambda r, x: one_round(r, x, rank), rows)


def _rank_among_duplicates(index: tuple, shape: tuple) -> jax.Array:
    """Each entry's count of earlier entries at the same index (padding,
    out of range, counted apart)."""
    inside = jnp.ones(len(index[0]), bool)
    for i, n in zip(index, shape):
        inside &= i < n
    flat = jnp.ravel_multi_index(index, shape[: len(index)], mode="clip")
    flat = jnp.where(inside, flat, -1)
    order = jnp.argsort(flat, stable=True)
    ordered = flat[order]
    position = jnp.arange(len(flat))
    starts_run = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
    run_start = jax.lax.cummax(jnp.where(starts_run, position, 0))
    return jnp.zeros_like(position).at[order].set(position - run_start)


def todense(grad: jsparse.BCOO, like: jax.Array) -> jax.Array:
    """`grad` as a dense array of `like`'s dtype, duplicates added in turn."""
    return scatter_add(jnp.zeros_like(like), grad, grad.data.astype(like.dtype))
