"""Pytree plumbing: which leaves are trainable, and gradient-tree checks.

A leaf is *trainable* when it is a floating-point (or complex) array: the JAX
counterpart of a torch parameter with `requires_grad=True`. Every other leaf
(integer arrays, booleans, PRNG keys, Python scalars) is carried along untouched,
never gets optimizer state and must have no gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.tree_util import PyTreeDef

PyTree = Any


def is_trainable(leaf: Any) -> bool:
    """True for floating-point and complex arrays (torch's `requires_grad` leaves)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _is_float0(x: Any) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


def leaf_paths(tree: PyTree) -> list[str]:
    """`jax.tree_util.keystr` of every leaf, in flattening order."""
    return [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _is_leaf_like(x: Any) -> bool:
    # None (no gradient / no buffer) and sparse gradients count as leaves
    return x is None or isinstance(x, jsparse.BCOO)


def describe_structure_mismatch(params: PyTree, other: PyTree, name: str) -> str:
    """Which key paths `other` lacks or adds compared to `params`."""
    param_paths = leaf_paths(params)
    other_paths = [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(
            other, is_leaf=_is_leaf_like
        )[0]
    ]
    missing = [p for p in param_paths if p not in set(other_paths)]
    extra = [p for p in other_paths if p not in set(param_paths)]
    parts = []
    if missing:
        parts.append(f"missing from {name}: {', '.join(missing[:5])}")
    if extra:
        parts.append(f"not in params: {', '.join(extra[:5])}")
    if not parts:
        parts.append(
            f"params structure {jax.tree.structure(params)} != "
            f"{name} structure {jax.tree.structure(other, is_leaf=_is_leaf_like)}"
        )
    return "; ".join(parts)


def _describe_structure_mismatch(params: PyTree, grads: PyTree) -> str:
    detail = describe_structure_mismatch(params, grads, "grads")
    return f"grads do not have the structure of params ({detail})"


def flatten_grads(params: PyTree, grads: PyTree) -> tuple[list, list]:
    """Flatten `params` and `grads` leaf by leaf and check that they match.

    Returns `(param_leaves, grad_leaves)`; a grad leaf is `None` where the
    parameter has no gradient (torch's `p.grad is None`) or is not trainable.
    Raises `TypeError` on a structure or dtype mismatch and `ValueError` on a
    shape mismatch, naming the key path of the offending leaf.
    """
    treedef: PyTreeDef
    param_leaves, treedef = jax.tree.flatten(params)
    try:
        grad_leaves = treedef.flatten_up_to(grads)
    except (ValueError, TypeError) as e:
        raise TypeError(_describe_structure_mismatch(params, grads)) from e
    paths = None
    checked: list[Any] = []
    for i, (p, g) in enumerate(zip(param_leaves, grad_leaves)):
        if g is None or _is_float0(g):
            checked.append(None)
            continue
        if not hasattr(g, "shape") or not hasattr(g, "dtype"):
            paths = paths or leaf_paths(params)
            # a subtree where a leaf should be, or a non-array gradient
            if jax.tree.leaves(g) and not np.isscalar(g):
                raise TypeError(_describe_structure_mismatch(params, grads))
            raise TypeError(
                f"params{paths[i]}: gradient must be an array or None, got "
                f"{type(g).__name__}"
            )
        if not is_trainable(p):
            paths = paths or leaf_paths(params)
            raise TypeError(
                f"params{paths[i]}: leaf of dtype "
                f"{getattr(p, 'dtype', type(p).__name__)} is not trainable "
                "(not floating point), so its gradient must be None"
            )
        if tuple(g.shape) != tuple(p.shape):
            paths = paths or leaf_paths(params)
            raise ValueError(
                f"params{paths[i]}: grad shape {tuple(g.shape)} != param shape "
                f"{tuple(p.shape)}"
            )
        if g.dtype != p.dtype:
            paths = paths or leaf_paths(params)
            raise TypeError(
                f"params{paths[i]}: grad dtype {g.dtype} != param dtype {p.dtype}"
            )
        checked.append(g)
    return param_leaves, checked
