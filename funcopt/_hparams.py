"""Reading and changing hyperparameters held in the state.

Like ``[g["lr"] for g in optimizer.param_groups]`` and ``g["lr"] = x``. They
work on any pytree that contains one funcopt :class:`~funcopt.OptState`: the
state itself, an ``optax.chain`` state, a :class:`~funcopt.TrainState`, ...
Values keep their array shape and dtype, so a jitted step never recompiles.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._core import OptState
from .optim.lbfgs import LBFGSState


def _is_opt_state(x: Any) -> bool:
    return isinstance(x, OptState | LBFGSState)


def _find(tree: Any) -> OptState:
    found = [
        x for x in jax.tree.leaves(tree, is_leaf=_is_opt_state) if _is_opt_state(x)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one funcopt optimizer state in the tree, found "
            f"{len(found)}"
        )
    return found[0]


def get_hparam(state: Any, name: str) -> list[jax.Array]:
    """One value of hyperparameter ``name`` per parameter group, in group order."""
    hparams = _find(state).hparams
    if name not in hparams:
        raise KeyError(f"no hyperparameter {name!r}; this state has {sorted(hparams)}")
    return list(hparams[name])


def set_hparam(state: Any, name: str, value: Any) -> Any:
    """Return ``state`` with hyperparameter ``name`` set (a new state).

    ``value`` is one value for every group (a scalar, or a tuple such as
    ``betas=(0.9, 0.99)``), or a Python ``list`` with one value per group.
    Works under ``jit``; the state's array shapes and dtypes are kept.
    """
    old = _find(state).hparams
    if name not in old:
        raise KeyError(f"no hyperparameter {name!r}; this state has {sorted(old)}")
    current = old[name]
    n_groups, value_shape = current.shape[0], current.shape[1:]
    if isinstance(value, list):
        if len(value) != n_groups:
            raise ValueError(
                f"set_hparam({name!r}): got {len(value)} values for {n_groups} "
                "parameter groups"
            )
        new = jnp.stack([jnp.asarray(v, current.dtype) for v in value])
    else:
        new = jnp.asarray(value, current.dtype)
    if new.shape != current.shape:
        if new.shape != value_shape:
            raise ValueError(
                f"set_hparam({name!r}): value of shape {new.shape} fits neither one "
                f"group {value_shape} nor all groups {current.shape}"
            )
        new = jnp.broadcast_to(new, current.shape)

    def replace(x):
        if _is_opt_state(x):
            return x._replace(hparams={**x.hparams, name: new})
        return x

    return jax.tree.map(replace, state, is_leaf=_is_opt_state)


def get_lr(state: Any) -> list[jax.Array]:
    """The learning rate of each parameter group (torch's ``get_last_lr()``)."""
    return get_hparam(state, "lr")


def set_lr(state: Any, lr: Any) -> Any:
    """Return ``state`` with new learning rate(s): a scalar or a list per group."""
    return set_hparam(state, "lr", lr)
