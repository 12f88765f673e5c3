"""Numerics shared by the update rules, in torch's rounding.

torch does its per-step scalar math (bias corrections, step sizes, ``1 - beta``)
in Python floats, i.e. float64, and casts the result to the tensor's dtype only
where it meets a tensor. funcopt mirrors that: hyperparameters live in the
state in the widest enabled float (float64 under ``jax_enable_x64``), scalar
math stays there, and :func:`scalar` casts at the tensor boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def widest_float() -> jnp.dtype:
    """float64 when x64 is enabled, else float32: torch's Python-float scalar math."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def scalar(x: jax.Array, like: jax.Array) -> jax.Array:
    """Cast a widest-float scalar to ``like``'s dtype, as torch does for ``alpha=``."""
    return jnp.asarray(x, dtype=like.dtype)


def lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    """``torch.lerp(start, end, weight)`` with torch's two-branch rounding.

    ``start + w*(end - start)`` for ``|w| < 0.5``, else
    ``end - (end - start)*(1 - w)``; ``weight`` is cast to the tensors' dtype
    first, as torch's CPU kernel does.
    """
    w = scalar(weight, start)
    diff = end - start
    return jnp.where(jnp.abs(w) < 0.5, start + w * diff, end - diff * (1 - w))


def addcmul(x: jax.Array, t1: jax.Array, t2: jax.Array, value) -> jax.Array:
    """``x.addcmul(t1, t2, value=value)``: ``x + value*t1*t2``."""
    return x + scalar(value, x) * t1 * t2


def addcdiv(x: jax.Array, t1: jax.Array, t2: jax.Array, value) -> jax.Array:
    """``x.addcdiv(t1, t2, value=value)``: ``x + value*(t1/t2)``."""
    return x + scalar(value, x) * (t1 / t2)


def add(x: jax.Array, other: jax.Array, alpha) -> jax.Array:
    """``x.add(other, alpha=alpha)``: ``x + alpha*other``."""
    return x + scalar(alpha, x) * other


def sqrt_nonnegative(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x`` that is >= 0 by construction (a sum of squares).

    The same value as ``jnp.sqrt`` (NaN stays NaN, ``sqrt(+-0) = +-0``), but a
    zero gradient at 0 instead of ``inf * 0 = NaN``, so differentiating
    through a step (e.g. w.r.t. the learning rate) stays finite when some
    gradient entries are exactly zero.
    """
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), x * 0)
