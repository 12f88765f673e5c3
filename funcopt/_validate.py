"""Argument checks that raise torch's exceptions with torch's messages.

Each helper mirrors one check of a torch optimizer's `__init__`; the
comparison is written the way torch writes it, because it decides how NaN is
treated (`lr < 0` lets NaN through, `not 0 <= lr` does not).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np


def is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) and not isinstance(
        x, float
    )


# numpy's and JAX's ``bool()`` of a multi-element array; torch's, of a tensor
_NUMPY_AMBIGUOUS = "The truth value of an array with more than one element is ambiguous"
TORCH_AMBIGUOUS = "Boolean value of Tensor with more than one value is ambiguous"


def _is_traced(x: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def traced_message(name: str, key: str) -> str:
    return (
        f"{name}: {key} is a traced JAX value; optimizer arguments are checked "
        "when the optimizer is made, so make it outside jax.jit and change "
        "hyperparameters in the state with fo.set_hparam / fo.set_lr, which "
        "accept traced values"
    )


def check_not_traced(name: str, values: Mapping[str, Any]) -> None:
    """`TypeError` naming the first argument that is a JAX tracer."""
    for key, value in values.items():
        if _is_traced(value):
            raise TypeError(traced_message(name, key))


@contextlib.contextmanager
def torch_semantics(name: str, values: Mapping[str, Any]) -> Iterator[None]:
    """Run torch-style checks on `values` with torch's exception types.

    torch's `if not 0.0 <= x` on a multi-element tensor raises
    `RuntimeError("Boolean value of Tensor with more than one value is
    ambiguous")`, where numpy and JAX raise `ValueError`; a JAX tracer
    cannot be compared at all (`jax.errors.TracerBoolConversionError`):
    it becomes a `TypeError` naming the argument.
    """
    check_not_traced(name, values)
    try:
        yield
    except ValueError as e:
        if str(e).startswith(_NUMPY_AMBIGUOUS):
            raise RuntimeError(TORCH_AMBIGUOUS) from e
        raise


def torch_checks(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate `validate(group)` of optimizer `name` with
    `torch_semantics`.
    """

    def decorate(validate: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(validate)
        def wrapper(group: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
            with torch_semantics(name, group):
                validate(group, *args, **kwargs)

        return wrapper

    return decorate


def _is_real_number(x: Any) -> bool:
    if isinstance(x, numbers.Real):  # bool, int, float, numpy real scalars
        return True
    if is_array(x):
        return np.asarray(x).dtype.kind in "biuf"
    return False


def check_hyperparameter(name: str, key: str, value: Any) -> None:
    """A numeric hyperparameter: a real number, a real array, or a tuple of them.

    Hyperparameters live in the state as float arrays; anything else (a
    string, `None`, a complex number) raises `TypeError` here, when the
    optimizer is made, naming the argument (torch raises at its first step).
    """
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if not _is_real_number(item):
            raise TypeError(
                f"{name}: {key} must be a real number"
                + (" or a tuple of real numbers" if isinstance(value, tuple) else "")
                + f", got {value!r}"
            )


# The hyperparameters of the built-in optimizers that are tuples, and their
# lengths; every other hyperparameter of these optimizers is a scalar.
# (torch unpacks them in ``step``: ``beta1, beta2 = group["betas"]``.)
TUPLE_HYPERPARAMETERS: dict[str, dict[str, int]] = {
    **dict.fromkeys(
        [
            "Adam",
            "AdamW",
            "Adamax",
            "NAdam",
            "RAdam",
            "SparseAdam",
            "Lion",
            "Lamb",
            "Prodigy",
            "AdamWScheduleFree",
        ],
        {"betas": 2},
    ),
    "Adan": {"betas": 3},
    "Rprop": {"etas": 2, "step_sizes": 2},
    "Adafactor": {"eps": 2},
    "Muon": {"ns_coefficients": 3},
    **dict.fromkeys(
        ["SGD", "Adagrad", "Adadelta", "RMSprop", "ASGD", "LBFGS", "SGDScheduleFree"],
        {},
    ),
}


def check_hyperparameter_shape(name: str, key: str, value: Any) -> None:
    """A built-in optimizer's hyperparameter has torch's shape: a scalar, or a
    tuple of the length torch unpacks (`TypeError` for a scalar given for a
    tuple or the other way round, `ValueError` for a wrong length).
    """
    if name not in TUPLE_HYPERPARAMETERS:
        return  # an optimizer made with funcopt.make_optimizer elsewhere
    length = TUPLE_HYPERPARAMETERS[name].get(key)
    shape = np.shape(value)
    if length is None and shape != ():
        raise TypeError(f"{name}: {key} must be a number, got {value!r}")
    if length is not None and len(shape) != 1:
        raise TypeError(
            f"{name}: {key} must be a tuple of {length} numbers, got {value!r}"
        )
    if length is not None and shape[0] != length:
        raise ValueError(
            f"{name}: {key} must be a tuple of {length} numbers, got {value!r}"
        )


def canonical_hyperparameter(value: Any) -> Any:
    """1-element arrays as 0-d (torch's 1-element tensors act as scalars)."""
    if isinstance(value, tuple | list):
        return tuple(canonical_hyperparameter(v) for v in value)
    if is_array(value) and np.size(value) == 1:
        return value.reshape(())
    return value


def check_param_groups(param_groups: Any) -> None:
    """`param_groups` must come from [`funcopt.param_groups`][funcopt.param_groups]."""
    from ._groups import ParamGroups

    if param_groups is not None and not isinstance(param_groups, ParamGroups):
        raise TypeError(
            "param_groups must be made by funcopt.param_groups(labels, "
            f"overrides), got {type(param_groups).__name__}"
        )


def check_scalar_lr(lr: Any) -> None:
    """torch: `Tensor lr must be 1-element`."""
    if is_array(lr) and np.size(lr) != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_not_negative(value: Any, what: str) -> None:
    """torch's `if value < 0.0: raise ValueError(f"Invalid {what}: {value}")`."""
    if value < 0.0:
        raise ValueError(f"Invalid {what}: {value}")


def check_at_least_zero(value: Any, what: str) -> None:
    """torch's `if not 0.0 <= value: raise ValueError(...)` (rejects NaN)."""
    if not 0.0 <= value:
        raise ValueError(f"Invalid {what}: {value}")


def check_betas(betas: Any) -> None:
    """`0 <= beta < 1` for both betas, torch's message per index."""
    for i in (0, 1):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")


def check_betas_both_floats(
    betas: Any, foreach: Any = None, capturable: Any = False
) -> None:
    """Adam/AdamW: `betas must be either both floats or both Tensors`; a
    tensor beta must have 1 element and is refused with `foreach` unless
    `capturable`.
    """
    both_float = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensor = is_array(betas[0]) and is_array(betas[1])
    if not (both_float or both_tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    if both_tensor:
        for i in (0, 1):
            if not capturable and foreach:
                raise ValueError(
                    f"betas[{i}] as a Tensor is not supported for capturable=False "
                    "and foreach=True"
                )
            if np.size(betas[i]) != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def check_fused(group: Mapping[str, Any]) -> None:
    """torch's `fused` combination checks (RuntimeError), which torch makes
    after the argument checks."""
    with torch_semantics("optimizer", group):
        if group.get("fused"):
            if group.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if group.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_positive(value: Any, what: str) -> None:
    """torch's `if not 0.0 < value: raise ValueError(...)` (rejects 0 and NaN)."""
    if not 0.0 < value:
        raise ValueError(f"Invalid {what}: {value}")


def check_adam_family(group: Mapping[str, Any]) -> None:
    """The checks Adam, AdamW, Adamax, NAdam and RAdam share, in torch's order.

    `lr`, `eps`, `betas`, `weight_decay`; each optimizer adds its own
    checks after these (Adam: both-floats betas; NAdam: momentum_decay).
    """
    check_scalar_lr(group["lr"])
    check_at_least_zero(group["lr"], "learning rate")
    check_at_least_zero(group["eps"], "epsilon value")
    check_betas(group["betas"])
    check_at_least_zero(group["weight_decay"], "weight_decay value")
