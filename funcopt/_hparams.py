"""Reading and changing hyperparameters held in the state.

Like `[g["lr"] for g in optimizer.param_groups]` and `g["lr"] = x`. They
work on any pytree that contains funcopt optimizer states: the state itself,
an `optax.chain` or `optax.partition` state, a [`TrainState`][funcopt.TrainState],
...
Values keep their array shape and dtype, so a jitted step never recompiles.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._core import OptState
from ._math import widest_float
from .optim.lbfgs import LBFGSState


def _is_opt_state(x: Any) -> bool:
    return isinstance(x, OptState | LBFGSState)


def _find_all(tree: Any) -> list:
    """The funcopt optimizer states in `tree`, in flattening order."""
    found = [
        x for x in jax.tree.leaves(tree, is_leaf=_is_opt_state) if _is_opt_state(x)
    ]
    if not found:
        raise ValueError("no funcopt optimizer state in the tree")
    return found


def _hparam_arrays(states: list, name: str) -> list[jax.Array]:
    for s in states:
        if name not in s.hparams:
            raise KeyError(
                f"no hyperparameter {name!r}; this state has {sorted(s.hparams)}"
            )
    return [s.hparams[name] for s in states]


def get_hparam(state: Any, name: str) -> list[jax.Array]:
    """One value of hyperparameter `name` per parameter group, in group order.

    Where the tree holds several funcopt optimizer states (e.g. an
    `optax.partition` of Muon and AdamW), their groups are concatenated in
    the tree's flattening order, like the groups of one torch optimizer.
    """
    return [v for arr in _hparam_arrays(_find_all(state), name) for v in arr]


def set_hparam(state: Any, name: str, value: Any) -> Any:
    """Return `state` with hyperparameter `name` set (a new state).

    `value` is one value for every group (a scalar, or a tuple such as
    `betas=(0.9, 0.99)`), or a Python `list` with one value per group (in
    [`get_hparam`][funcopt.get_hparam] order). Works under `jit`; the state's array
    shapes and dtypes are kept (the widest enabled float, as `init` makes
    them), so a jitted step never recompiles.

    Setting the array directly (`optax.tree_utils.tree_set(state, lr=0.05)`)
    replaces one value per group by a scalar: the next step raises, naming
    the hyperparameter and this function.
    """
    current = _hparam_arrays(_find_all(state), name)
    n_groups = sum(arr.shape[0] for arr in current)
    if not isinstance(value, list | tuple) and np.shape(value) == (
        n_groups,
        *current[0].shape[1:],
    ):
        value = list(jnp.asarray(value))  # an array with one row per group
    if isinstance(value, list) and len(value) != n_groups:
        raise ValueError(
            f"set_hparam({name!r}): got {len(value)} values for {n_groups} "
            "parameter groups"
        )
    new_arrays, offset = [], 0
    for arr in current:
        n = arr.shape[0]
        part = value[offset : offset + n] if isinstance(value, list) else value
        new_arrays.append(_as_hparam(name, part, arr))
        offset += n
    replacements = iter(new_arrays)

    def replace(x):
        if _is_opt_state(x):
            return x._replace(hparams={**x.hparams, name: next(replacements)})
        return x

    return jax.tree.map(replace, state, is_leaf=_is_opt_state)


def hparams_only(state: Any) -> list[OptState]:
    """The funcopt optimizer states in `state`, each reduced to an
    `OptState` of its hyperparameters (what `get_hparam` and `set_hparam`
    read and write) and step counts (one int a leaf; none for L-BFGS),
    without buffers: small enough to pass through a compiled program
    without copying the optimizer's memory."""
    return [_hparams_only(s) for s in _find_all(state)]


def _hparams_only(state: OptState | LBFGSState) -> OptState:
    if isinstance(state, OptState):
        return state._replace(slots={})
    return OptState(step=_no_step_counts(), hparams=state.hparams, slots={})


@functools.cache
def _no_step_counts() -> jax.Array:
    """L-BFGS's (absent) per-leaf step counts: an empty array made once, not
    a device computation at every eager scheduler step (a concrete array
    even when first asked for inside a trace: never a cached tracer)."""
    with jax.ensure_compile_time_eval():
        return jnp.zeros((0,), jnp.int32)


def with_hparams(state: Any, reduced: list[OptState]) -> Any:
    """`state` with the hyperparameters of `reduced` (from `hparams_only`),
    in the same order; every other array is the one `state` holds."""
    replacements = iter(reduced)

    def replace(x):
        if _is_opt_state(x):
            return x._replace(hparams=next(replacements).hparams)
        return x

    return jax.tree.map(replace, state, is_leaf=_is_opt_state)


def _as_hparam(name: str, value: Any, current: jax.Array) -> jax.Array:
    """`value` (per-group list, or one value for all) shaped like `current`,
    in the widest enabled float (the dtype `init` gives hyperparameters)."""
    value_shape = current.shape[1:]
    dtype = widest_float()
    if isinstance(value, list):
        new = jnp.stack([jnp.asarray(v, dtype) for v in value])
    else:
        new = jnp.asarray(value, dtype)
    if new.shape != current.shape:
        if new.shape != value_shape:
            raise ValueError(
                f"set_hparam({name!r}): value of shape {new.shape} fits neither one "
                f"group {value_shape} nor all groups {current.shape}"
            )
        new = jnp.broadcast_to(new, current.shape)
    return new


def get_lr(state: Any) -> list[jax.Array]:
    """The learning rate of each parameter group (torch's `get_last_lr()`)."""
    return get_hparam(state, "lr")


def set_lr(state: Any, lr: Any) -> Any:
    """Return `state` with new learning rate(s): a scalar or a list per group."""
    return set_hparam(state, "lr", lr)
