"""Pytree plumbing: which leaves are trainable, and gradient-tree checks.

A leaf is *trainable* when it is a floating-point (or complex) array: the JAX
counterpart of a torch parameter with `requires_grad=True`. A Python `float`
(or `complex`) leaf is trainable too, as `jax.jit` and optax treat it: it is
an array of the default float dtype (`float32`, or `float64` under
`jax_enable_x64`), and the optimizer returns it as one. Every other leaf
(integer arrays, booleans, PRNG keys, Python ints, strings) is carried along
untouched, never gets optimizer state and must have no gradient.

torch objects (tensors, `nn.Module`s) and iterators such as
`model.parameters()` are refused where params or grads come in
(`check_params`, `flatten_grads`), with the
conversion to use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.tree_util import PyTreeDef

PyTree = Any


def is_trainable(leaf: Any) -> bool:
    """True for floating-point and complex arrays (torch's `requires_grad` leaves)
    and for Python floats and complex numbers (arrays under `jit`)."""
    if isinstance(leaf, float | complex):
        return True
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def torch_kind(x: Any) -> str | None:
    """`"torch.Tensor"`, `"torch.nn.Parameter"` or `"torch.nn.Module"` for
    such torch objects (and their subclasses), else None; torch is not imported.
    """
    return _torch_kind_of_type(type(x))


_TORCH_KINDS: dict[type, str | None] = {}  # per type: a step meets few types


def _torch_kind_of_type(cls: type) -> str | None:
    if cls not in _TORCH_KINDS:
        names = {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}
        kind = None
        if "torch.nn.modules.module.Module" in names:
            kind = "torch.nn.Module"
        if "torch.Tensor" in names:
            kind = "torch.Tensor"
        if "torch.nn.parameter.Parameter" in names:
            kind = "torch.nn.Parameter"
        _TORCH_KINDS[cls] = kind
    return _TORCH_KINDS[cls]


_CONVERT_MODEL = (
    "fo.torch_interop.module_state_dict_to_params(dict(model.named_parameters()))"
)
_CONVERT_TENSOR = "jnp.asarray(t.detach().cpu().numpy())"


def as_array(x: Any) -> Any:
    """A Python float/complex as the array `jax.jit` makes of it (default
    dtype), a weakly typed float array as a strongly typed one (so that eager
    and jitted steps return the same types); anything else as it is."""
    if isinstance(x, float | complex):
        return jnp.asarray(x, dtype=jnp.asarray(x).dtype)
    if (
        isinstance(x, jax.Array)
        and getattr(x, "weak_type", False)
        and jnp.issubdtype(x.dtype, jnp.inexact)
    ):
        return jnp.asarray(x, dtype=x.dtype)
    return x


def _check_param_leaf(leaf: Any, where: str) -> None:
    kind = torch_kind(leaf)
    if kind == "torch.nn.Module":
        raise TypeError(
            f"{where} is a torch.nn.Module, which funcopt cannot step: pass its "
            f"parameters as JAX arrays, {_CONVERT_MODEL}"
        )
    if kind is not None:
        raise TypeError(
            f"{where} is a {kind}, which funcopt cannot step: pass JAX arrays, "
            f"{_CONVERT_MODEL} for a model or {_CONVERT_TENSOR} for one tensor"
        )
    if isinstance(leaf, Iterator):
        raise TypeError(
            f"{where} is a {type(leaf).__name__} (an iterator, such as "
            "model.parameters()), which funcopt cannot step: pass a pytree of "
            f"JAX arrays, e.g. {_CONVERT_MODEL}"
        )


def check_params(params: PyTree) -> PyTree:
    """`params` with every leaf checked and Python floats as arrays.

    Raises `TypeError` for a torch tensor, `nn.Module` or iterator (such as
    `model.parameters()`) anywhere in `params`, naming its key path and the
    conversion to use. A Python `float`/`complex` leaf becomes the array
    `jax.jit` would make of it (optax trains it the same way), and a weakly
    typed float array a strongly typed one: a step returns the same types
    eagerly and under `jit`.
    """
    # (an iterator is a leaf here, without JAX's warning, so that it is named)
    treedef: PyTreeDef
    leaves, treedef = jax.tree.flatten(
        params, is_leaf=lambda x: isinstance(x, Iterator)
    )
    out = [as_array(leaf) for leaf in leaves]
    if any(_torch_kind_of_type(type(x)) or isinstance(x, Iterator) for x in leaves):
        paths = [
            jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(
                params, is_leaf=lambda x: isinstance(x, Iterator)
            )[0]
        ]
        for path, leaf in zip(paths, leaves):
            _check_param_leaf(leaf, f"params{path}")
    if all(new is old for new, old in zip(out, leaves)):
        return params
    return treedef.unflatten(out)


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
    param_leaves, treedef = jax.tree.flatten(check_params(params))
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
        if torch_kind(g) is not None:
            paths = paths or leaf_paths(params)
            raise TypeError(
                f"grads{paths[i]} is a {torch_kind(g)}: funcopt takes JAX "
                "gradients, so compute them with jax.grad (or convert one with "
                f"{_CONVERT_TENSOR})"
            )
        g = as_array(g)
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
