"""Argument checks that raise torch's exceptions with torch's messages.

Each helper mirrors one check of a torch optimizer's ``__init__``; the
comparison is written the way torch writes it, because it decides how NaN is
treated (``lr < 0`` lets NaN through, ``not 0 <= lr`` does not).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) and not isinstance(
        x, float
    )


def check_scalar_lr(lr: Any) -> None:
    """torch: ``Tensor lr must be 1-element``."""
    if _is_array(lr) and np.size(lr) != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_not_negative(value: Any, what: str) -> None:
    """torch's ``if value < 0.0: raise ValueError(f"Invalid {what}: {value}")``."""
    if value < 0.0:
        raise ValueError(f"Invalid {what}: {value}")


def check_at_least_zero(value: Any, what: str) -> None:
    """torch's ``if not 0.0 <= value: raise ValueError(...)`` (rejects NaN)."""
    if not 0.0 <= value:
        raise ValueError(f"Invalid {what}: {value}")


def check_betas(betas: Any) -> None:
    """``0 <= beta < 1`` for both betas, torch's message per index."""
    for i in (0, 1):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")


def check_betas_both_floats(betas: Any) -> None:
    """Adam/AdamW: ``betas must be either both floats or both Tensors``."""
    both_float = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensor = _is_array(betas[0]) and _is_array(betas[1])
    if not (both_float or both_tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    if both_tensor:
        for i in (0, 1):
            if np.size(betas[i]) != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def check_fused(group: Mapping[str, Any]) -> None:
    """torch's ``fused`` combination checks (RuntimeError)."""
    if group.get("fused"):
        if group.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_positive(value: Any, what: str) -> None:
    """torch's ``if not 0.0 < value: raise ValueError(...)`` (rejects 0 and NaN)."""
    if not 0.0 < value:
        raise ValueError(f"Invalid {what}: {value}")


def check_adam_family(group: Mapping[str, Any]) -> None:
    """The checks Adam, AdamW, Adamax, NAdam and RAdam share, in torch's order.

    ``lr``, ``eps``, ``betas``, ``weight_decay``; each optimizer adds its own
    checks after these (Adam: both-floats betas; NAdam: momentum_decay).
    """
    check_scalar_lr(group["lr"])
    check_at_least_zero(group["lr"], "learning rate")
    check_at_least_zero(group["eps"], "epsilon value")
    check_betas(group["betas"])
    check_at_least_zero(group["weight_decay"], "weight_decay value")
