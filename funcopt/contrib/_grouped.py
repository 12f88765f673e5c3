"""Group-level state and cross-leaf reductions on top of `make_optimizer`.

Several ecosystem optimizers keep scalars in torch's `param_groups` that
change every step (schedule-free's `k`/`weight_sum`/`lr_max`, LAMB's and
Adan's group `step`, Prodigy's `d`), and some reduce over *all* parameters
before updating any (Prodigy's `d` estimate, a global gradient norm). The
per-array rule protocol cannot write group values or see other leaves, so
`with_group_state` wraps an optimizer built by `make_optimizer` in
two extra, pure steps around its `step`:

1. `leaf_stats(param, grad, slots, step, hparams, options) -> {name: scalar}`
   (optional) runs on every parameter that has a gradient, *before* any
   update, with the rule's arguments: torch's first pass.
2. `prepare(hparams, stats) -> GroupStep` runs once: `hparams` are the
   state's `{name: array[n_groups, ...]}`; `stats` is a list, in torch's
   parameter order, of `(group, active, {name: scalar})` (`active` a
   bool, traced under `has_grad`). It returns the hyperparameters the rule
   sees this step and those stored in the new state (both with the
   optimizer's hyperparameter names), optionally a scalar every gradient is
   multiplied by first (a global-norm clip, torch's `grad.mul_(scale)`) and
   a traced `skip` flag (torch returned early: the per-parameter step
   counts stay; the rule must leave what torch leaves).

The group scalars live in `OptState.hparams` next to `lr`, exactly where
torch keeps them (`get_hparam(state, "k")` is `[g["k"] for g in
param_groups]`). The result is an ordinary
[`funcopt.Optimizer`][funcopt.Optimizer] (init, update, step, jit, groups,
`get_lr`/`set_lr`, schedulers); it has no `definition`, so rule rewriters
such as [`funcopt.precision_policy`][funcopt.precision_policy], which would
drop the group step, refuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import PyTreeDef

from .. import _groups
from .._core import Optimizer, check_step, compiled_when_concrete, updates_of_step
from .._math import widest_float
from .._tree import flatten_grads


class GroupStep(NamedTuple):
    """What `prepare` returns (see the module doc)."""

    rule_hparams: dict[str, jax.Array]
    stored_hparams: dict[str, jax.Array]
    grad_scale: jax.Array | None = None
    skip: jax.Array | None = None


Prepare = Callable[[dict[str, jax.Array], list], GroupStep]


def _leaf_stats(inner: Optimizer, leaf_stats, params, grads, state, has_grad):
    definition = inner.definition
    leaves, grad_leaves = flatten_grads(params, grads)
    treedef: PyTreeDef = jax.tree.structure(params)
    names, group_of = _groups.resolve(definition.groups, params)
    values = [definition.group_values(n) for n in names]
    options = [definition.group_options(v) for v in values]
    slots = state.unpacked().slots
    slot_leaves = {k: treedef.flatten_up_to(t) for k, t in slots.items()}
    mask = None if has_grad is None else treedef.flatten_up_to(has_grad)
    out = []
    for i, (p, g, group) in enumerate(zip(leaves, grad_leaves, group_of)):
        if g is None or group is None:
            continue
        own = {k: v[i] for k, v in slot_leaves.items() if v[i] is not None}
        hparams = {k: v[group] for k, v in state.hparams.items()}
        step = (state.step[i] + 1).astype(widest_float())
        stats = leaf_stats(p, g, own, step, hparams, options[group])
        out.append((group, True if mask is None else mask[i], stats))
    return out


def with_group_state(
    inner: Optimizer,
    prepare: Prepare,
    leaf_stats: Callable[..., dict[str, jax.Array]] | None = None,
    check_hparams: Callable[[dict[str, jax.Array]], None] | None = None,
) -> Optimizer:
    """`inner` with a per-step group update (and reduction) before its rule.

    `check_hparams(state.hparams)` raises torch's errors for hyperparameter
    values; it runs on an un-jitted step (under `jit` the values are traced).
    """

    def traced_step(params, grads, state, has_grad):
        # the inner step's trace-time checks, before the group step reads state
        check_step(inner.definition, params, grads, state)
        stats = (
            []
            if leaf_stats is None
            else _leaf_stats(inner, leaf_stats, params, grads, state, has_grad)
        )
        group_step = prepare(dict(state.hparams), stats)
        if group_step.grad_scale is not None:
            scale = group_step.grad_scale
            grads = jax.tree.map(
                lambda g: None if g is None else g * scale.astype(g.dtype),
                grads,
                is_leaf=lambda x: x is None,
            )
        new_params, new_state = inner.step(
            params,
            grads,
            state._replace(hparams=group_step.rule_hparams),
            has_grad=has_grad,
        )
        new_step = new_state.step
        if group_step.skip is not None:
            new_step = jnp.where(group_step.skip, state.step, new_step)
        return new_params, new_state._replace(
            hparams=group_step.stored_hparams, step=new_step
        )

    def check(params, grads, state):
        check_step(inner.definition, params, grads, state)
        if check_hparams is not None:
            check_hparams(dict(state.hparams))

    step_fn = compiled_when_concrete(traced_step, check)

    def update(updates, state, params=None, *, has_grad=None, **extra_args):
        return updates_of_step(inner.name, step_fn, updates, state, params, has_grad)

    opt = Optimizer(inner.init, update)
    opt._step_fn = step_fn
    opt.name = inner.name
    opt.defaults = dict(inner.defaults)
    opt.param_groups = inner.param_groups
    opt.inner = inner
    return opt


def sequential_sum(terms: list[jax.Array], dtype) -> jax.Array:
    """`total = 0.0; for t in terms: total += t`: Python's order and rounding."""
    total = jnp.zeros((), dtype)
    for t in terms:
        total = total + t.astype(dtype)
    return total


def global_grad_scale(stats, max_grad_norm: float, eps: float) -> jax.Array:
    """pytorch-optimizer's `get_global_gradient_norm` clip factor.

    `clamp(max_grad_norm / (sqrt(sum(float32(norm(g))**2)) + eps), max=1)`,
    in float32 as the reference computes it (`stats` carry `"norm"`, the
    norm of each gradient in its own dtype); `1.0` when `max_grad_norm`
    is 0. The division is torch's `__rtruediv__`: a reciprocal, then a
    product.
    """
    f32 = jnp.float32
    if max_grad_norm == 0.0:
        return jnp.ones((), f32)
    squares = [
        jnp.where(active, s["norm"].astype(f32) ** 2, jnp.zeros((), f32))
        for _, active, s in stats
    ]
    total = sequential_sum(squares, f32)
    norm = jnp.sqrt(total) + jnp.asarray(eps, f32)
    return jnp.minimum((1 / norm) * jnp.asarray(max_grad_norm, f32), 1.0)
