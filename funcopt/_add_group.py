"""torch's `optimizer.add_param_group(...)` as a pure function.

Adding a group changes what the optimizer is (one more group, one more
labelled set of leaves), the parameter tree (more leaves) and the state (one
more row of hyperparameters, fresh buffers for the new leaves), so all three
are returned new; nothing is mutated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import PyTreeDef

from . import _core, _groups, _multi_tensor
from ._tree import PyTree, is_trainable
from .optim.lbfgs import _NO_GROUPS, LBFGS

# torch's message when a tensor is given to two groups
_DUPLICATE = "some parameters appear in more than one parameter group"


def add_param_group(
    opt: _core.Optimizer,
    params: PyTree,
    state: _core.OptState,
    new_params: PyTree,
    /,
    *,
    name: str,
    **overrides: Any,
) -> tuple[_core.Optimizer, PyTree, _core.OptState]:
    """torch's `optimizer.add_param_group({"params": ..., **overrides})`.

    Mirrors `torch.optim.Optimizer.add_param_group` (progressive unfreezing,
    a model that grows): the leaves of `new_params` join the optimizer as a
    new parameter group, appended last, whose hyperparameters are the
    optimizer's own arguments (torch's `defaults`) overridden by
    `overrides`. As a pure function it returns the three things the call
    changes:

    ```python
    opt, params, state = fo.add_param_group(
        opt, params, state, {"head": head_params}, name="head", lr=1e-2)
    params, state = opt.step(params, grads, state)  # grads for the merged tree
    ```

    Args:
      opt: a funcopt optimizer (`fo.adam(...)`, with or without
        [`funcopt.param_groups`][funcopt.param_groups]; anything made by
        [`funcopt.make_optimizer`][funcopt.make_optimizer], including
        [`funcopt.precision_policy`][funcopt.precision_policy]).
      params: the parameters `state` belongs to: a dict-like pytree
        (`dict`, `collections.OrderedDict`, ...), a `list` or a `tuple`.
      state: `opt`'s state for `params` (an [`OptState`][funcopt.OptState]).
      new_params: the parameters to add: a dict-like pytree when `params`
        is one, merged at the top level (`params`' keys first, then
        `new_params`' keys, in a container of `params`' type), or a list
        or tuple when `params` is one, concatenated. A
        key of `new_params` that `params` already has raises `ValueError`,
        torch's "some parameters appear in more than one parameter group".
        Only the trainable (floating-point) leaves join the group, as for
        every funcopt group; an empty `new_params` adds an empty group, as
        torch's `add_param_group({"params": []})` does.
      name: the new group's label. It must be new: funcopt has one group
        per label, and torch's `add_param_group` always appends a new
        group, so an existing name (or `"default"`, the optimizer's own
        group) raises `ValueError` rather than merging into that group.
      **overrides: hyperparameters of the new group (`lr=...`,
        `weight_decay=...`, static options such as `nesterov=True`); the
        others take the optimizer's own arguments, not the current values
        of other groups (torch's `param_group.setdefault(name, default)`).

    Returns:
      `(opt, params, state)`: an ordinary funcopt optimizer (jit-able,
      with `get_lr`/`set_lr` reporting one more group and
      `torch_interop.state_dict` writing one more torch group) whose
      [`param_groups`][funcopt.param_groups] keep every old leaf in its old
      group and put the new leaves in `name`; the merged parameters; and
      the state: old leaves keep their buffers and step counts, old groups
      their current hyperparameters (including values set by schedulers or
      [`set_lr`][funcopt.set_lr]), bit for bit; new leaves start as `init`
      makes them (step 0, fresh buffers).

    Validation is the constructor's: an unknown hyperparameter raises
    `ValueError`, a bad value raises the exception and message torch's
    constructor raises for it (torch's `add_param_group` itself checks no
    values and fails, or silently misbehaves, in a later `step`).

    Torch numbers parameters group by group, so after the call the new
    leaves take the last parameter ids, as in torch. A scheduler's state
    holds one entry per group: build schedulers after adding the group (as
    a torch scheduler made before `add_param_group` does not know the new
    group either). LBFGS raises torch's `ValueError` "LBFGS doesn't support
    per-parameter options (parameter groups)" (its constructor's; torch's
    LBFGS accepts the call and then ignores the new group in `step`).
    """
    if isinstance(opt, LBFGS) or getattr(opt, "name", None) == "LBFGS":
        raise ValueError(_NO_GROUPS)
    definition = getattr(opt, "definition", None)
    if not isinstance(definition, _core._Definition):
        raise TypeError(
            "add_param_group() needs an optimizer made by funcopt.make_optimizer "
            f"(fo.adam(...), ...), got {getattr(opt, 'name', type(opt).__name__)}: "
            "add the group to the wrapped optimizer and wrap the result again"
        )
    old_groups = definition.groups
    overrides_before = dict(old_groups.overrides) if old_groups is not None else {}
    _check_name(name, overrides_before)

    merged = _merge(params, new_params)

    # the new optimizer: every old leaf keeps its label, new leaves get `name`
    old_treedef: PyTreeDef
    new_treedef: PyTreeDef
    old_leaves, old_treedef = jax.tree.flatten(params)
    new_leaves, new_treedef = jax.tree.flatten(new_params)
    if old_groups is None:
        old_labels = [_groups.DEFAULT] * len(old_leaves)
    else:
        old_labels = old_groups.leaf_labels(params)
    labels = _merge(
        old_treedef.unflatten(old_labels),
        new_treedef.unflatten([name] * len(new_leaves)),
    )
    group = {k: v for k, v in overrides.items()}
    _core.check_group_overrides(
        definition.name,
        definition.hyperparams,
        definition.options,
        definition.validate,
        name,
        group,
    )
    groups = _groups.param_groups(labels, {**overrides_before, name: group})
    _, new_groups = _core._numeric_hyperparams(dict(definition.hyperparams), groups)
    new_definition = dataclasses.replace(definition, groups=new_groups)
    _core._check_hyperparams(new_definition)
    _core._check_complex(new_definition, merged)

    new_state = _extend_state(
        definition, new_definition, name, params, state, new_params, merged
    )
    new_opt = _core.build_optimizer(new_definition, opt.defaults)
    if hasattr(opt, "policy"):  # precision_policy's description
        new_opt.policy = opt.policy
    return new_opt, merged, new_state


def _check_name(name: Any, existing: Mapping[str, Any]) -> None:
    if not isinstance(name, str):
        raise TypeError(f"parameter group names must be strings, got {name!r}")
    if name == _groups.DEFAULT or name in existing:
        groups = [_groups.DEFAULT, *(n for n in existing if n != _groups.DEFAULT)]
        raise ValueError(
            f"add_param_group(): a parameter group named {name!r} already exists "
            f"(groups: {groups}; 'default' is the optimizer's own). torch's "
            "add_param_group always appends a new group: give it a new name"
        )


def _merge(old: Any, new: Any) -> Any:
    """`old`'s entries, then `new`'s, in a container of `old`'s type."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        repeated = [k for k in new if k in old]
        if repeated:
            raise ValueError(
                f"{_DUPLICATE}: new_params repeats the keys {repeated} of params"
            )
        merged = {**old, **new}
        if type(old) is dict:
            return merged
        container: Any = type(old)
        try:
            return container(merged)
        except TypeError as e:
            raise TypeError(
                f"add_param_group(): cannot build a {type(old).__name__} from "
                "the merged entries of params and new_params"
            ) from e
    if type(old) in (list, tuple) and type(new) in (list, tuple):
        return type(old)([*old, *new])
    raise TypeError(
        "add_param_group(): params and new_params must both be dicts (merged at "
        "the top level) or both lists/tuples (concatenated), got "
        f"{type(old).__name__} and {type(new).__name__}"
    )


def _extend_state(
    definition: _core._Definition,
    new_definition: _core._Definition,
    name: str,
    params: PyTree,
    state: Any,
    new_params: PyTree,
    merged: PyTree,
) -> _core.OptState:
    """`state` for `merged`: old leaves and groups as they are, new ones as
    `init` makes them."""
    treedef: PyTreeDef
    add_treedef: PyTreeDef
    merged_treedef: PyTreeDef
    leaves, treedef = jax.tree.flatten(params)
    names, group_of = _groups.resolve(definition.groups, params)
    _core._check_state(definition, state, len(leaves), len(names), params)
    state = state.unpacked()
    slot_leaves = _core._check_slots(definition, params, leaves, names, group_of, state)

    n_old = len(leaves)
    add_leaves, add_treedef = jax.tree.flatten(new_params)
    merged_leaves, merged_treedef = jax.tree.flatten(merged)
    # where each leaf of `merged` comes from: i < n_old is params' leaf i,
    # else new_params' leaf i - n_old
    source = jax.tree.leaves(
        _merge(
            treedef.unflatten(list(range(n_old))),
            add_treedef.unflatten(list(range(n_old, n_old + len(add_leaves)))),
        )
    )
    assert len(source) == len(merged_leaves)

    new_names, _ = _groups.resolve(new_definition.groups, merged)
    values = new_definition.group_values(name)
    fresh = [
        new_definition.init_slots(p, values) if is_trainable(p) else {}
        for p in add_leaves
    ]

    slot_names = list(dict.fromkeys([*state.slots, *(k for s in fresh for k in s)]))
    slots = {}
    for k in slot_names:
        own = slot_leaves.get(k, [None] * n_old)
        slots[k] = merged_treedef.unflatten(
            [own[i] if i < n_old else fresh[i - n_old].get(k) for i in source]
        )

    step = jnp.asarray(state.step)
    step = jnp.concatenate([step, jnp.zeros(len(add_leaves), step.dtype)])[
        np.asarray(source, dtype=np.int32)
    ]

    row_of = {n: g for g, n in enumerate(names)}
    hparams = {}
    for k, old in state.hparams.items():
        old = jnp.asarray(old)
        rows = [
            old[row_of[n]]
            if n in row_of
            else jnp.asarray(
                new_definition.group_values(n)[k], dtype=old.dtype
            ).reshape(old.shape[1:])
            for n in new_names
        ]
        hparams[k] = jnp.stack(rows)
    # in the layout init makes for the merged tree
    return _multi_tensor.pack_state(
        new_definition, merged, _core.OptState(step, hparams, slots)
    )
