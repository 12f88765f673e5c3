"""pytorch-optimizer's argument checks, with its exception types and messages."""

from __future__ import annotations

from typing import Any


class NegativeLRError(Exception):
    """pytorch-optimizer's `NegativeLRError` (used when it is not installed)."""

    def __init__(self, lr: float, lr_type: str = ""):
        self.note = lr_type if lr_type else "learning rate"
        self.message = f"{self.note} must be positive. ({lr} > 0)"
        super().__init__(self.message)


def _negative_lr_error(lr: Any) -> Exception:
    # The reference's own class when it is installed, so ``except`` clauses
    # written against pytorch-optimizer keep working; else a twin.
    try:
        from pytorch_optimizer.base.exception import NegativeLRError as reference
    except ImportError:
        return NegativeLRError(lr)
    return reference(lr)


def validate_lr(lr: Any) -> None:
    if lr is not None and lr < 0.0:
        raise _negative_lr_error(lr)


def validate_range(x: float, name: str, low: float, high: float, kind: str) -> None:
    if kind == "[)" and not low <= x < high:
        raise ValueError(f"{name} must be in the range [{low}, {high})")
    if kind == "[]" and not low <= x <= high:
        raise ValueError(f"{name} must be in the range [{low}, {high}]")


def validate_betas(betas: Any) -> None:
    if betas[0] is not None:
        validate_range(betas[0], "beta1", 0.0, 1.0, "[)")
    validate_range(betas[1], "beta2", 0.0, 1.0, "[)")
    if len(betas) < 3:
        return
    if betas[2] is not None:
        validate_range(betas[2], "beta3", 0.0, 1.0, "[]")


def validate_non_negative(x: Any, name: str) -> None:
    if x is not None and x < 0.0:
        raise ValueError(f"{name} must be non-negative")
