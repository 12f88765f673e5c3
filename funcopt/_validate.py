"""Argument checks that raise torch's exceptions with torch's messages.

Each helper mirrors one check of a torch optimizer's `__init__`; the
comparison is written the way torch writes it, because it decides how NaN is
treated (`lr < 0` lets NaN through, `not 0 <= lr` does not).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ParamSpec, TypeVar

import jax
import numpy as np

from ._math import widest_float
from ._tree import torch_kind


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


def fused_requested(fused: Any) -> bool:
    """Whether `fused` asks for torch's fused kernel, to pick the rule before
    the checks run: a value without a truth value (a multi-element array)
    counts as not fused here, and `check_fused` then raises torch's error
    for it, after the argument checks, where torch raises it."""
    try:
        return bool(fused)
    except (ValueError, TypeError):
        return False


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


# --------------------------------------------------------------------------
# hyperparameters held in a state
# --------------------------------------------------------------------------


def _is_array_like(x: Any) -> bool:
    return isinstance(x, bool | int | float | complex) or hasattr(x, "shape")


def _describe(value: Any) -> str:
    """A hyperparameter value for a message: its value when it is known."""
    if isinstance(value, tuple | list) and _is_traced(value):
        return f"a {type(value).__name__} of {len(value)} traced values"
    if isinstance(value, bool | int | float | complex):
        return f"{value!r} (a Python {type(value).__name__})"
    if isinstance(value, jax.core.Tracer):
        return f"a traced {value.dtype}{list(value.shape)} array"
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        shown = f" {np.asarray(value).tolist()}" if np.size(value) <= 4 else ""
        article = "an" if str(value.dtype)[0] in "aeiou" else "a"
        return f"{article} {value.dtype}{list(np.shape(value))} array{shown}"
    return f"{value!r} (a {type(value).__name__})"


def _example(value: Any) -> str:
    """`value` as it would be written in a `fo.set_hparam` call."""
    if isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, tuple) and all(isinstance(v, int | float) for v in value):
        return repr(value)
    if isinstance(value, jax.Array | np.ndarray | np.generic) and not isinstance(
        value, jax.core.Tracer
    ):
        if np.size(value) == 1:
            return repr(np.asarray(value).reshape(()).item())
    return "value"


def check_state_hparams(
    name: str, hparams: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Every hyperparameter in a state is an array of the shape and dtype that
    `init` made: `expected[key]` is `(n_groups, *shape of one value)`, the
    dtype the widest enabled float.

    Runs at trace time (free under `jit`), so a state changed by hand
    (`optax.tree_utils.tree_set(state, lr=0.05)` puts a scalar where one
    value per parameter group belongs) raises the same error eagerly and
    under `jit`, naming the hyperparameter, what it is, what it must be and
    `fo.set_hparam`, which keeps shapes and dtypes: `ValueError` for a
    shape (a Python number counts as a 0-d array, as under `jit`),
    `TypeError` for a dtype or a value that is no array (a tuple, `None`).
    A state whose every hyperparameter has
    another number of groups is a state for another grouping of the params.
    """
    if not isinstance(hparams, Mapping) or set(hparams) != set(expected):
        held = sorted(hparams) if isinstance(hparams, Mapping) else None
        raise ValueError(
            f"this state was made by another optimizer: it holds hyperparameters "
            f"{held}, {name} has {sorted(expected)}"
        )
    # a Python number is a 0-d array under jit: its shape is checked, as there
    shapes = {
        k: tuple(np.shape(v)) if _is_array_like(v) else None for k, v in hparams.items()
    }
    n_groups = {shape[0] for shape in expected.values()}
    leading = {shape[0] if shape else None for shape in shapes.values()}
    tails = {k: None if s is None else s[1:] for k, s in shapes.items()}
    if (
        len(leading) == 1
        and None not in leading
        and leading != n_groups
        and all(tails[k] == expected[k][1:] for k in expected)
    ):
        raise ValueError(
            f"this state has {leading.pop()} parameter groups; params resolve "
            f"to {n_groups.pop()}"
        )
    dtype = widest_float()
    for key, shape in expected.items():
        value = hparams[key]
        dtype_ok = getattr(value, "dtype", None) == dtype
        if shapes[key] == shape and dtype_ok:
            continue
        per_group = (
            "one value per parameter group"
            if len(shape) == 1
            else f"one value of shape {shape[1:]} per parameter group"
        )
        lr_too = " (or fo.set_lr)" if key == "lr" else ""
        message = (
            f"{name} state: hyperparameter {key!r} is {_describe(value)}, but this "
            f"state needs a {dtype}{list(shape)} array, {per_group}: set it with "
            f"fo.set_hparam(state, {key!r}, {_example(value)}){lr_too}, which keeps "
            "that shape and dtype"
        )
        if shapes[key] is None:  # a tuple, None, a string: no array at all
            raise TypeError(message)
        if shapes[key] != shape:
            raise ValueError(message)
        raise TypeError(message)


# --------------------------------------------------------------------------
# the optimizer factories: torch's constructor habits
# --------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")

# other libraries' names for torch's arguments: {their name: torch's name}
_TORCH_NAMES = {"learning_rate": "lr", "b1": "betas", "b2": "betas"}

INJECT_HYPERPARAMS = (
    "optax.inject_hyperparams(fo.{factory}) would silently ignore changed "
    "hyperparameters, because funcopt keeps them in its own state: build "
    "opt = fo.{factory}(...) directly and change them with fo.set_lr(state, lr) "
    "or fo.set_hparam(state, name, value) (schedules: fo.lr_scheduler)"
)


def _called_by_inject_hyperparams(frame: Any) -> bool:
    """Whether `frame` or a frame below it runs optax's `inject_hyperparams`
    (its `init` and `update` call the factory it wraps: a funcopt factory, or
    a function that builds one, e.g. `lambda lr: optax.chain(clip,
    fo.adam(lr=lr))`)."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("optax.") and module.rsplit(".", 1)[-1] == "_inject":
            return True
        frame = frame.f_back
    return False


def _looks_like_params(x: Any) -> bool:
    """What torch users pass first (`torch.optim.Adam(model.parameters())`):
    a pytree of params, a list of groups, an iterator, a torch model or
    parameter; never a learning rate."""
    if isinstance(x, Mapping | list | tuple | set | Iterator):
        return True
    kind = torch_kind(x)
    return kind == "torch.nn.Module" or kind == "torch.nn.Parameter"


def optimizer_factory(factory: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a funcopt optimizer factory (`fo.adam`, ...) so that the
    mistakes torch and optax users make first raise one clear `TypeError`.

    * `fo.adam(params)` / `fo.adam(params, lr=1e-3)` (torch's constructor
      takes the parameters first): funcopt optimizers are built from
      hyperparameters alone and `opt.init(params)` makes the state;
    * `fo.adam(learning_rate=1e-3)` (optax's names): torch's (`lr=`);
    * `optax.inject_hyperparams(fo.adam)` (or of a function that builds a
      funcopt optimizer): funcopt's hyperparameters live in its state, so
      the optimizer optax rebuilds with a new value would be ignored; the
      error, at `init` and `update` (eagerly and under `jit`), points to
      `fo.set_lr` / `fo.set_hparam`.

    The signature and docstring are the factory's (`functools.wraps`).
    """
    signature = inspect.signature(factory)
    name = factory.__name__
    first = next(iter(signature.parameters), None)

    @functools.wraps(factory)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if _called_by_inject_hyperparams(sys._getframe(1)):
            raise TypeError(INJECT_HYPERPARAMS.format(factory=name))
        if args and _looks_like_params(args[0]):
            raise TypeError(
                f"fo.{name}() got a {type(args[0]).__name__} as its first argument "
                f"({first}): funcopt optimizers do not take the parameters, so "
                f"build opt = fo.{name}({first}=...) and make the state with "
                "opt.init(params)"
            )
        for key in kwargs:
            torch_name = _TORCH_NAMES.get(key)
            if key not in signature.parameters and torch_name in signature.parameters:
                raise TypeError(
                    f"fo.{name}() got {key}={kwargs[key]!r}, optax's name: funcopt "
                    f"keeps torch's argument names, so pass {torch_name}="
                    + (f"{kwargs[key]!r}" if torch_name != "betas" else "(b1, b2)")
                )
        return factory(*args, **kwargs)

    return wrapper
