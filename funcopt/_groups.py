"""Parameter groups: torch's `[{"params": ..., "lr": ...}, ...]` for pytrees.

A group is a label per leaf plus per-label overrides of any hyperparameter.
Leaves labelled `"default"` use the optimizer's own arguments. Group order is
`"default"` first (when any trainable leaf uses it, or when there are no
other groups), then the overrides in dict order: the order of `get_lr` and
of torch's `optimizer.param_groups`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.tree_util import PyTreeDef

from ._tree import PyTree, is_trainable, leaf_paths

DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Which leaf belongs to which group, and each group's overrides.

    Build it with [`param_groups`][funcopt.param_groups].
    """

    labels: Callable[[PyTree], PyTree] | PyTree
    overrides: Mapping[str, Mapping[str, Any]]

    def __hash__(self) -> int:  # overrides holds dicts; identity is what matters
        return id(self)

    def leaf_labels(self, params: PyTree) -> list[str]:
        """One group label per leaf of `params`, in flattening order."""
        labels = self.labels(params) if callable(self.labels) else self.labels
        treedef: PyTreeDef = jax.tree.structure(params)
        try:
            flat = treedef.flatten_up_to(labels)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "param_groups labels must have the structure of params "
                f"({treedef}), got {jax.tree.structure(labels)}"
            ) from e
        known = {DEFAULT, *self.overrides}
        for path, label in zip(leaf_paths(params), flat):
            if label not in known:
                raise ValueError(
                    f"params{path}: unknown parameter group label {label!r}; "
                    f"known groups: {sorted(known)}"
                )
        return list(flat)


def param_groups(
    labels: Callable[[PyTree], PyTree] | PyTree,
    overrides: Mapping[str, Mapping[str, Any]],
) -> ParamGroups:
    """Torch-style parameter groups for a pytree of parameters.

    Args:
      labels: a pytree of group names with the structure of the params, or a
        function `label_fn(params)` returning one. (A callable is always
        treated as a label function: wrap a callable pytree, such as an
        equinox module, as `lambda params: labels`.)
      overrides: `{group_name: {hyperparameter: value}}`. Any hyperparameter
        of the optimizer may differ per group.

    For example:

    ```python
    def label_fn(params):
        return jax.tree.map(lambda p: "no_decay" if p.ndim <= 1 else "default",
                            params)
    opt = fo.adamw(lr=1e-3, param_groups=fo.param_groups(
        label_fn, {"no_decay": {"weight_decay": 0.0}}))
    ```

    mirrors `torch.optim.AdamW([{"params": decay}, {"params": no_decay,
    "weight_decay": 0.0}], lr=1e-3)`.
    """
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"param_groups overrides must be a dict of dicts, got {type(overrides)}"
        )
    for name, values in overrides.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter group names must be strings, got {name!r}")
        if not isinstance(values, Mapping):
            raise TypeError(
                f"param group {name!r} overrides must be a dict, got {type(values)}"
            )
    return ParamGroups(labels, dict(overrides))


def resolve(
    groups: ParamGroups | None, params: PyTree
) -> tuple[list[str], list[int | None]]:
    """Return `(group_names, group_of_leaf)`; non-trainable leaves map to None."""
    leaves = jax.tree.leaves(params)
    if groups is None:
        return [DEFAULT], [0 if is_trainable(p) else None for p in leaves]
    labels = groups.leaf_labels(params)
    used_default = any(
        label == DEFAULT and is_trainable(p) for p, label in zip(leaves, labels)
    )
    names = [DEFAULT] if used_default or not groups.overrides else []
    names += [n for n in groups.overrides if n != DEFAULT]
    index = {n: i for i, n in enumerate(names)}
    return names, [
        index[label] if is_trainable(p) else None for p, label in zip(leaves, labels)
    ]
