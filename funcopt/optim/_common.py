"""Pieces of update rules that several torch optimizers share, in torch's order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .._math import add, addcmul, mul


def apply_maximize(grad: jax.Array, options: Mapping[str, Any]) -> jax.Array:
    """``grad if not maximize else -grad``."""
    return -grad if options["maximize"] else grad


def coupled_gradient(param, grad, hparams, options) -> jax.Array:
    """torch's gradient after ``maximize`` and coupled ``weight_decay``."""
    grad = apply_maximize(grad, options)
    return coupled_weight_decay(grad, param, hparams["weight_decay"])


def write_buffers_first(new_buffers, *inputs):
    """``(new_buffers, *inputs)`` through an optimization barrier.

    Speed only, and only where the step is lowered for CPU. Values stay
    torch's; the one visible effect is where LLVM contracts a multiply and an
    add into a fused multiply-add (RMSprop centered: 1 float32 ulp in some
    elements, inside every parity tolerance, 16-bit results still bit-exact).
    XLA's CPU backend has no multi-output loop
    fusion: a rule that updates k buffers runs as k + 1 passes over memory.
    Left to itself it may fuse a buffer's update into the param's pass too,
    reading a donated buffer after another pass overwrote it (so it copies
    it first), or materialise a shared term such as the weight-decayed
    gradient in a fresh temporary (page faults on every step). After the
    barrier the buffers are written first, in place, and the param's pass
    reads them and recomputes the cheap per-element terms from ``param``
    and ``grad`` (e.g. :func:`coupled_gradient`); ``inputs`` are the arrays
    read after the barrier (typically ``param, grad``).
    """
    values = (new_buffers, *inputs)
    # GPU backends fuse the whole rule into one multi-output kernel: there a
    # barrier would only split it, so it applies to CPU lowering alone
    return jax.lax.platform_dependent(
        values, cpu=jax.lax.optimization_barrier, default=lambda v: v
    )


def coupled_weight_decay(
    grad: jax.Array, param: jax.Array, weight_decay: jax.Array
) -> jax.Array:
    """torch's ``if weight_decay != 0: grad = grad.add(param, alpha=weight_decay)``."""
    return jnp.where(weight_decay != 0, add(grad, param, weight_decay), grad)


def decoupled_weight_decay(
    param: jax.Array, lr: jax.Array, weight_decay: jax.Array
) -> jax.Array:
    """torch's ``param.mul_(1 - lr * weight_decay)`` (an exact no-op when wd == 0)."""
    return mul(param, 1 - lr * weight_decay)


def ema_of_square(avg: jax.Array, grad: jax.Array, beta: jax.Array) -> jax.Array:
    """torch's ``avg.mul_(beta).addcmul_(grad, grad, value=1 - beta)``."""
    return addcmul(mul(avg, beta), grad, grad, 1 - beta)
