r"""Gradient clipping, as `torch.nn.utils.clip_grad_norm_` and `clip_grad_value_`.

One piece of math, four ways in:

* `grads, total = clip_grad_norm(grads, max_norm, norm_type)`: torch's
  `total = clip_grad_norm_(params, max_norm, norm_type)`;
* `grads = clip_grad_value(grads, clip_value)`: torch's `clip_grad_value_`;
* `optax.chain(clip_grad_norm_transform(max_norm), fo.adam())` (and
  [`clip_grad_value_transform`][funcopt.clip_grad_value_transform]): the same before
  `optimizer.step()`;
* `ts, total = ts.clip_grad_norm(max_norm)` on a
  [`TrainState`][funcopt.TrainState], which counts only defined gradients.

Torch's norm is the norm of the per-tensor norms,

$$
N = \bigl\|\,(\|g_1\|_q, \dots, \|g_n\|_q)\,\bigr\|_q, \qquad
c = \min\Bigl(\frac{1}{N + 10^{-6}}\cdot m,\; 1\Bigr), \qquad
g_i \leftarrow c\, g_i ,
$$

with the coefficient applied *always* (also when $c = 1$), so the
clipped norm is $mN/(N+10^{-6})$, slightly below $m$; optax's
`clip_by_global_norm` has no $10^{-6}$ and skips the multiply when not
clipping. Like torch (`Tensor.__rtruediv__` is `reciprocal() * other`), the
coefficient is `reciprocal(N + 1e-6) * max_norm`, in the dtype of $N$.
A `None` gradient leaf (torch's `p.grad is None`) does not count and is
returned as `None`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import PyTreeDef

from ._reductions import norm_of_single_elements
from ._tree import PyTree, as_array, is_trainable

__all__ = [
    "ClipGradNormState",
    "clip_grads_with_norm",
    "clip_grad_norm",
    "clip_grad_norm_transform",
    "clip_grad_value",
    "clip_grad_value_transform",
    "get_total_norm",
]


# --------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------


def _promote(dtypes: Sequence[Any]) -> np.dtype:
    """torch's `stack` type promotion of the per-tensor norms."""
    out = dtypes[0]
    with jax.numpy_dtype_promotion("standard"):
        for d in dtypes[1:]:
            out = jnp.promote_types(out, d)
    return np.dtype(out)


def vector_norm(x: jax.Array, norm_type: float) -> jax.Array:
    r"""`torch.linalg.vector_norm(x, norm_type)` over all elements of `x`.

    $$
    \|x\|_q = \Bigl(\sum_i |x_i|^q\Bigr)^{1/q};\quad
    \|x\|_\infty = \max_i |x_i|;\quad \|x\|_{-\infty} = \min_i |x_i|;\quad
    \|x\|_0 = \#\{i : x_i \ne 0\}
    $$

    in the real dtype of `x` (half-precision inputs accumulate in float32,
    torch's opmath type, and are rounded back). As torch, the (-)inf norm of
    an empty array raises `RuntimeError`, and the norm of one element is its
    absolute value (`x != 0` for $q = 0$), nothing raised to a power.
    """
    q = float(norm_type)
    single = norm_of_single_elements(x, None, q)
    if single is not None:
        return single
    out_dtype = jnp.abs(jnp.zeros((), x.dtype)).dtype
    a = jnp.abs(x)
    if out_dtype in (jnp.float16, jnp.bfloat16):
        a = a.astype(jnp.float32)
    if math.isinf(q):
        if a.size == 0:
            raise RuntimeError(
                "_foreach_norm cannot compute the infinity norm on an empty tensor "
                "because the operation does not have an identity"
            )
        n = jnp.max(a) if q > 0 else jnp.min(a)
    elif q == 0:
        n = jnp.sum(a != 0).astype(a.dtype)
    elif q == 1:
        n = jnp.sum(a)
    elif q == 2:
        n = jnp.sqrt(jnp.sum(a * a))
    else:
        n = jnp.sum(a**q) ** (1.0 / q)
    return n.astype(out_dtype)


def _total_norm(
    grads: list[jax.Array], norm_type: float, mask: list[Any] | None
) -> jax.Array:
    """The norm of the per-leaf norms, with torch's order and dtype promotion.

    torch groups the tensors by dtype (in order of first appearance) before
    computing the norms, so the stacked vector is in that order; `mask`
    (traced booleans, one per grad) drops undefined gradients by giving them
    the neutral value of the outer reduction.
    """
    if not grads:
        return jnp.zeros((), jnp.float32)  # torch.tensor(0.0)
    q = float(norm_type)
    order = sorted(range(len(grads)), key=lambda i: _first_dtype_index(grads, i))
    norms = [vector_norm(grads[i], q) for i in order]
    dtype = _promote([n.dtype for n in norms])
    stacked = jnp.stack([n.astype(dtype) for n in norms])
    if mask is not None:
        neutral = jnp.asarray(jnp.inf if q < 0 else 0.0, dtype)
        defined = jnp.stack([jnp.asarray(mask[i], bool) for i in order])
        stacked = jnp.where(defined, stacked, neutral)
    total = vector_norm(stacked, q)
    if mask is not None:
        total = jnp.where(jnp.any(defined), total, jnp.zeros((), dtype))
    return total


def _first_dtype_index(grads: list[jax.Array], i: int) -> tuple[int, int]:
    dtype = grads[i].dtype
    first = next(j for j, g in enumerate(grads) if g.dtype == dtype)
    return (first, i)


def _nonfinite_message(norm_type: float) -> str:
    return (
        f"The total norm of order {float(norm_type)} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )


def _check_finite(total: jax.Array, norm_type: float) -> None:
    """Raise torch's `RuntimeError` when `total` is NaN or inf.

    Eagerly this is a plain `RuntimeError`. Under a transformation (`jit`,
    `vmap`, ...) the check is a `jax.debug.callback` that raises on the
    host; JAX reports it as `jax.errors.JaxRuntimeError` (a subclass of
    `RuntimeError`) carrying torch's message, when the result is computed.
    """
    message = _nonfinite_message(norm_type)
    if not isinstance(total, jax.core.Tracer):
        if not bool(jnp.isfinite(total)):
            raise RuntimeError(message)
        return

    def callback(value):
        if not np.all(np.isfinite(value)):
            raise RuntimeError(message)

    jax.debug.callback(callback, total)


def _float_arg(x: Any, what: str) -> float:
    """torch's `float(x)` of a Python number or a 1-element tensor."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{what} must be a Python number: it selects the computation, so it "
            "cannot be a traced value"
        )
    if isinstance(x, jax.Array | np.ndarray):
        if np.size(x) != 1:
            raise ValueError(
                f"{what} must be a number or a 1-element array, got shape {np.shape(x)}"
            )
        x = np.asarray(x).reshape(())
    return float(x)


def _flat(grads: PyTree, has_grad: PyTree | None):
    treedef: PyTreeDef
    leaves, treedef = jax.tree.flatten(grads, is_leaf=lambda x: x is None)
    leaves = [as_array(g) for g in leaves]  # Python floats: arrays, as under jit
    idx = [i for i, g in enumerate(leaves) if g is not None and is_trainable(g)]
    mask = None
    if has_grad is not None:
        flags = treedef.flatten_up_to(has_grad)
        mask = [flags[i] for i in idx]
    return leaves, treedef, idx, mask


def get_total_norm(
    grads: PyTree,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    has_grad: PyTree | None = None,
) -> jax.Array:
    """`torch.nn.utils.get_total_norm`: the norm of the per-leaf norms.

    `None` leaves (and non-floating leaves) do not count; `has_grad`, a
    pytree of booleans shaped like `grads`, drops leaves with traced flags
    (as [`TrainState`][funcopt.TrainState] marks undefined gradients). With no
    gradient at all the result is `0.0` in float32, as torch's
    `tensor(0.)`. `foreach` is accepted and ignored.
    """
    del foreach
    norm_type = _float_arg(norm_type, "norm_type")
    leaves, _, idx, mask = _flat(grads, has_grad)
    total = _total_norm([leaves[i] for i in idx], norm_type, mask)
    if error_if_nonfinite:
        _check_finite(total, norm_type)
    return total


def clip_grads_with_norm(
    grads: PyTree,
    max_norm: float | jax.Array,
    total_norm: jax.Array,
    foreach: bool | None = None,
    *,
    has_grad: PyTree | None = None,
) -> PyTree:
    """`torch.nn.utils.clip_grads_with_norm_`: scale by a precomputed norm.

    The factor is `min(max_norm/(total_norm + 1e-6), 1)`.

    Every gradient is multiplied by the clamped coefficient (cast to its
    dtype, as torch's in-place `mul_` does), even when it is 1. Leaves that
    are `None` or flagged undefined in `has_grad` are returned unchanged.
    """
    del foreach
    # torch's ``max_norm = float(max_norm)``, first; an array (traced too)
    # is kept as an array, but must hold one value as a tensor must for float()
    if isinstance(max_norm, jax.Array | np.ndarray):
        if np.size(max_norm) != 1:
            raise ValueError(
                "clip_grads_with_norm: max_norm must be a number or a 1-element "
                f"array, got shape {np.shape(max_norm)}"
            )
    else:
        max_norm = float(max_norm)
    leaves, treedef, idx, mask = _flat(grads, has_grad)
    if not idx:
        return grads
    total_norm = jnp.asarray(total_norm)
    if not isinstance(max_norm, float):
        max_norm = jnp.asarray(max_norm, total_norm.dtype).reshape(())
    # torch: max_norm / (total_norm + 1e-6) is Tensor.__rtruediv__,
    # i.e. (total_norm + 1e-6).reciprocal() * max_norm
    coef = jnp.reciprocal(total_norm + 1e-6) * max_norm
    coef = jnp.minimum(coef, 1.0)
    out = list(leaves)
    for k, i in enumerate(idx):
        g = leaves[i]
        clipped = g * coef.astype(g.dtype)
        out[i] = clipped if mask is None else jnp.where(mask[k], clipped, g)
    return treedef.unflatten(out)


def clip_grad_norm(
    grads: PyTree,
    max_norm: float | jax.Array,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    has_grad: PyTree | None = None,
) -> tuple[PyTree, jax.Array]:
    r"""`torch.nn.utils.clip_grad_norm_` as a pure function.

    Returns `(clipped_grads, total_norm)`, where `total_norm` is the norm
    *before* clipping (what torch returns) and

    $$
    N = \bigl\|(\|g_1\|_q, \dots, \|g_n\|_q)\bigr\|_q,\qquad
    g_i \leftarrow g_i \cdot \min\bigl(\tfrac{1}{N + 10^{-6}}\,m,\ 1\bigr).
    $$

    Args:
      grads: a pytree of gradients; `None` leaves are skipped (torch's
        `p.grad is None`) and do not count in the norm.
      max_norm: $m$ (a number, or an array, e.g. a scheduled value).
      norm_type: $q$: any float, `inf`/`"inf"`, `0` (count of
        non-zero per-leaf norms) or negative, as `torch.linalg.vector_norm`.
      error_if_nonfinite: raise torch's `RuntimeError` if $N$ is NaN
        or inf. Eagerly a `RuntimeError`; under `jit` a
        `jax.debug.callback` raises it on the host and JAX surfaces it as
        `jax.errors.JaxRuntimeError` (a `RuntimeError` subclass) with
        torch's message (one host round trip per call).
      foreach: accepted and ignored (torch's kernel switch).
      has_grad: optional pytree of booleans (traced is fine): leaves whose
        flag is False count as `None` and are returned unchanged.

    The per-leaf norms are in each leaf's dtype and the total in their
    promoted dtype (mixed float32/float64 gives float64), ordered by dtype as
    torch groups them. Without the error flag, an infinite norm gives
    $c = 0$ (so `inf` entries become NaN and the rest 0) and a NaN
    norm makes everything NaN, as in torch.
    """
    total = get_total_norm(
        grads, norm_type, error_if_nonfinite, foreach, has_grad=has_grad
    )
    return clip_grads_with_norm(grads, max_norm, total, has_grad=has_grad), total


def clip_grad_value(
    grads: PyTree,
    clip_value: float,
    foreach: bool | None = None,
    *,
    has_grad: PyTree | None = None,
) -> PyTree:
    r"""`torch.nn.utils.clip_grad_value_` as a pure function.

    Each gradient is clamped to $[-c, c]$ with $c$ =
    `float(clip_value)` (NaN propagates; with $c < 0$ every entry
    becomes $c$, as torch's clamp with `min > max`). `None` leaves,
    and leaves flagged False in `has_grad`, are returned unchanged.
    `foreach` is accepted and ignored. Same as `optax.clip(clip_value)`.
    """
    del foreach
    c = _float_arg(clip_value, "clip_value")
    leaves, treedef, idx, mask = _flat(grads, has_grad)
    out = list(leaves)
    for k, i in enumerate(idx):
        g = leaves[i]
        # torch.clamp(min=-c, max=c) == min(max(g, -c), c)
        clipped = jnp.minimum(jnp.maximum(g, -c), c)
        out[i] = clipped if mask is None else jnp.where(mask[k], clipped, g)
    return treedef.unflatten(out)


# --------------------------------------------------------------------------
# optax transforms
# --------------------------------------------------------------------------


class ClipGradNormState(NamedTuple):
    """State of `clip_grad_norm_transform`: the last pre-clip total norm."""

    total_norm: jax.Array


def _norm_dtype(tree: PyTree) -> Any:
    leaves = [as_array(g) for g in jax.tree.leaves(tree) if is_trainable(g)]
    if not leaves:
        return jnp.float32
    return _promote([jnp.abs(jnp.zeros((), g.dtype)).dtype for g in leaves])


def clip_grad_norm_transform(
    max_norm: float | jax.Array,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """`clip_grad_norm` as an optax transform, for `optax.chain`.

    `optax.chain(fo.clip_grad_norm_transform(1.0), fo.adam(lr))` is torch's
    `clip_grad_norm_(params, 1.0); optimizer.step()`. It differs from
    `optax.clip_by_global_norm` by torch's `1e-6`, the always-applied
    coefficient and the norm of per-leaf norms. The state keeps the last
    pre-clip norm (`state.total_norm`) for logging; `None` updates are
    skipped, and a `has_grad` extra argument (as `Optimizer.update`
    takes) drops flagged leaves.
    """

    def init_fn(params):
        return ClipGradNormState(jnp.zeros((), _norm_dtype(params)))

    def update_fn(updates, state, params=None, *, has_grad=None, **extra_args):
        del params, extra_args
        clipped, total = clip_grad_norm(
            updates, max_norm, norm_type, error_if_nonfinite, has_grad=has_grad
        )
        return clipped, ClipGradNormState(total.astype(state.total_norm.dtype))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_grad_value_transform(
    clip_value: float,
) -> optax.GradientTransformationExtraArgs:
    """`clip_grad_value` as an optax transform, for `optax.chain`.

    Same values as `optax.clip(clip_value)`; also skips `None` updates and
    honours a `has_grad` extra argument.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, has_grad=None, **extra_args):
        del params, extra_args
        return clip_grad_value(updates, clip_value, has_grad=has_grad), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
