"""Non-finite gradients: skip the step (opt-in) or report where they appear.

By default a funcopt optimizer does what torch does with a NaN or Inf
gradient: it applies it (the parameters and the state become non-finite).
Two opt-in wrappers change that, for any funcopt optimizer (and, through
`update`, any optax transformation):

* [`skip_nonfinite`][funcopt.skip_nonfinite] skips the whole step when any gradient is
  NaN/Inf, like `torch.amp.GradScaler` skipping `optimizer.step()`, and counts the
  skipped steps in its state;
* [`debug_nonfinite`][funcopt.debug_nonfinite] reports, from inside `jit`
  (`jax.debug.callback`), the key path of the first gradient leaf (then
  parameter, then state buffer) that is NaN/Inf.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._core import Optimizer
from ._tree import PyTree, is_trainable


class NonFiniteWarning(RuntimeWarning):
    """Issued by `debug_nonfinite` when a gradient or update is NaN/Inf."""


class SkipNonfiniteState(NamedTuple):
    """State of [`skip_nonfinite`][funcopt.skip_nonfinite].

    Attributes:
      inner: the wrapped optimizer's state (left as it was on a skipped step).
      skipped: `int32` scalar, how many steps were skipped so far.
    """

    inner: Any
    skipped: jax.Array


def _wrapper(inner, name, init, update, step_fn) -> Optimizer:
    opt = Optimizer(init, update)
    opt._step_fn = step_fn
    opt.name = f"{name}({getattr(inner, 'name', type(inner).__name__)})"
    opt.defaults = dict(getattr(inner, "defaults", {}))
    opt.param_groups = getattr(inner, "param_groups", None)
    opt.inner = inner
    return opt


def _check_inner(inner: Any, wrapper: str) -> None:
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"{wrapper}() wraps an optimizer (an optax GradientTransformation), got "
            f"{type(inner).__name__}"
        )


def _check_state(state: Any, cls: type, wrapper: str) -> None:
    if not isinstance(state, cls):
        raise TypeError(
            f"{wrapper} expects the state made by its init(), got "
            f"{type(state).__name__}"
        )


def _inner_step(inner, params, grads, state, has_grad):
    if hasattr(inner, "step") and isinstance(inner, Optimizer):
        return inner.step(params, grads, state, has_grad=has_grad)
    updates, state = inner.update(grads, state, params)
    return optax.apply_updates(params, updates), state


class _Pair:
    """A gradient and its `has_grad` flag, kept together as one leaf."""

    def __init__(self, *values):
        self.values = values


def all_finite(grads: PyTree, has_grad: PyTree | None = None) -> jax.Array:
    """`bool` scalar: every (defined) gradient is finite (`None` is finite)."""
    flat = jax.tree.leaves(
        jax.tree.map(
            lambda g, f=None: None if g is None else _Pair(g, f),
            grads,
            *([] if has_grad is None else [has_grad]),
            is_leaf=lambda x: x is None,
        ),
        is_leaf=lambda x: isinstance(x, _Pair),
    )
    checks = []
    for g, f in (pair.values for pair in flat):
        if is_trainable(g):
            ok = jnp.all(jnp.isfinite(g))
            checks.append(ok if f is None else jnp.logical_or(ok, jnp.logical_not(f)))
    if not checks:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(checks))


def _select(keep_new, new, old):
    def pick(a, b):
        if a is b or not hasattr(a, "dtype"):
            return a
        return jnp.where(keep_new, a, b)

    return jax.tree.map(pick, new, old)


def skip_nonfinite(opt: optax.GradientTransformation) -> Optimizer:
    """Skip the whole step when any gradient is NaN or Inf (opt-in).

    Like `torch.amp.GradScaler`'s `scaler.step(optimizer)`: when any
    gradient leaf holds a NaN or Inf, the parameters and the wrapped state
    (step counts included) are returned unchanged and
    `state.skipped` is incremented; otherwise the step is `opt`'s. Works
    under `jit` (the choice is a `jnp.where`, no recompilation), with
    [`funcopt.TrainState`][funcopt.TrainState] (only gradients marked defined are
    checked) and inside `optax.chain` (`update` returns zero updates on a skipped
    step). `fo.get_lr`/`fo.set_lr` see through the wrapper.
    """
    _check_inner(opt, "skip_nonfinite")

    def init(params):
        return SkipNonfiniteState(opt.init(params), jnp.zeros((), jnp.int32))

    def step_fn(params, grads, state, has_grad):
        _check_state(state, SkipNonfiniteState, "skip_nonfinite")
        finite = all_finite(grads, has_grad)
        new_params, new_inner = _inner_step(opt, params, grads, state.inner, has_grad)
        return _select(finite, new_params, params), SkipNonfiniteState(
            _select(finite, new_inner, state.inner),
            state.skipped + jnp.logical_not(finite).astype(jnp.int32),
        )

    def update(grads, state, params=None, **extra_args):
        _check_state(state, SkipNonfiniteState, "skip_nonfinite")
        finite = all_finite(grads)
        updates, new_inner = opt.update(grads, state.inner, params, **extra_args)
        updates = jax.tree.map(
            lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates
        )
        return updates, SkipNonfiniteState(
            _select(finite, new_inner, state.inner),
            state.skipped + jnp.logical_not(finite).astype(jnp.int32),
        )

    return _wrapper(opt, "skip_nonfinite", init, update, step_fn)


def first_nonfinite(tree: PyTree, prefix: str = "") -> str | None:
    """Key path of the first leaf of `tree` holding a NaN/Inf (eager only)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_trainable(leaf) and not bool(jnp.all(jnp.isfinite(leaf))):
            return prefix + jax.tree_util.keystr(path)
    return None


def _warn(message: str) -> None:
    warnings.warn(message, NonFiniteWarning, stacklevel=2)


def debug_nonfinite(
    opt: optax.GradientTransformation,
    report: Callable[[str], Any] | None = None,
) -> Optimizer:
    """Report the first NaN/Inf leaf at every step (a debug mode, opt-in).

    The step itself is `opt`'s, unchanged (combine with
    [`skip_nonfinite`][funcopt.skip_nonfinite] to also skip it). After computing it, the
    wrapper checks, in this order, the gradients, the new parameters and the new
    state buffers; for the first leaf holding a NaN or Inf it calls
    `report(message)`, where the message names the key path, e.g.
    `"non-finite gradient at grads['dense']['kernel'] (nan)"`. The
    default `report` issues a `NonFiniteWarning`. The check runs
    under `jit` through `jax.debug.callback` (an ordered host callback,
    so it costs a device-to-host transfer of one flag per leaf: a debug
    tool, not for production loops); call `jax.effects_barrier()` to wait
    for the report of an asynchronous step.
    """
    _check_inner(opt, "debug_nonfinite")
    report = _warn if report is None else report

    def flags(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        paths, nan, inf = [], [], []
        for path, leaf in flat:
            if is_trainable(leaf):
                paths.append(jax.tree_util.keystr(path))
                nan.append(jnp.any(jnp.isnan(leaf)))
                inf.append(jnp.any(jnp.isinf(leaf)))
        return paths, nan, inf

    def check(
        grads, new_params, new_state, second=("parameter after the step", "params")
    ):
        groups = [
            ("gradient", "grads", grads),
            (*second, new_params),
            ("optimizer state after the step", "state", new_state),
        ]
        described = [(what, prefix, *flags(tree)) for what, prefix, tree in groups]

        def host(values):
            for (what, prefix, paths, _, _), (nan, inf) in zip(described, values):
                for path, n, i in zip(paths, nan, inf):
                    if n or i:
                        kind = "nan" if n else "inf"
                        report(f"non-finite {what} at {prefix}{path} ({kind})")
                        return

        jax.debug.callback(host, [(d[3], d[4]) for d in described], ordered=True)

    def init(params):
        return opt.init(params)

    def step_fn(params, grads, state, has_grad):
        new_params, new_state = _inner_step(opt, params, grads, state, has_grad)
        check(grads, new_params, new_state)
        return new_params, new_state

    def update(grads, state, params=None, **extra_args):
        updates, new_state = opt.update(grads, state, params, **extra_args)
        check(grads, updates, new_state, ("update", "updates"))
        return updates, new_state

    return _wrapper(opt, "debug_nonfinite", init, update, step_fn)
