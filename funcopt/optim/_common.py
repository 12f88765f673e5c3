"""Pieces of update rules that several torch optimizers share, in torch's order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .._math import add, scalar


def apply_maximize(grad: jax.Array, options: Mapping[str, Any]) -> jax.Array:
    """``grad if not maximize else -grad``."""
    return -grad if options["maximize"] else grad


def coupled_weight_decay(
    grad: jax.Array, param: jax.Array, weight_decay: jax.Array
) -> jax.Array:
    """torch's ``if weight_decay != 0: grad = grad.add(param, alpha=weight_decay)``."""
    return jnp.where(weight_decay != 0, add(grad, param, weight_decay), grad)


def decoupled_weight_decay(
    param: jax.Array, lr: jax.Array, weight_decay: jax.Array
) -> jax.Array:
    """torch's ``param.mul_(1 - lr * weight_decay)`` (an exact no-op when wd == 0)."""
    return param * scalar(1 - lr * weight_decay, param)


def ema_of_square(avg: jax.Array, grad: jax.Array, beta: jax.Array) -> jax.Array:
    """torch's ``avg.mul_(beta).addcmul_(grad, grad, value=1 - beta)``."""
    return avg * scalar(beta, avg) + scalar(1 - beta, avg) * grad * grad
