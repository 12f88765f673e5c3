"""`TrainState`: torch's `backward` / `step` / `zero_grad` as a pure pytree."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import PyTreeDef

from . import clip as _clip
from ._core import Optimizer
from ._math import materialized
from ._tree import PyTree, check_params, is_trainable
from .optim import _fused_native


# Leaves flatten with `grads` after `opt_state`: jit pairs each donated input
# buffer with the first output of its shape in leaf order, and a jit drops an
# unused argument, so were the old gradients unused after `zero_grad`,
# gradients listed before the state would take the state's donated buffers
# and leave XLA copying (Adam, 1M params: four 4 MB copies a step, 5x
# optax's time). `zero_grad` keeps them an argument (`_zero_like_grad`), so
# the new gradients take their buffers.
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "opt_state", "grads", "grad_defined"],
    meta_fields=["opt"],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, accumulated gradients and optimizer state, as in a torch loop.

    | torch | funcopt |
    |---|---|
    | `loss.backward()` | `ts, loss = ts.backward(loss_fn, *args)` |
    | `optimizer.step()` | `ts = ts.step()` |
    | `optimizer.zero_grad()` | `ts = ts.zero_grad()` (`set_to_none=True`) |
    | `clip_grad_norm_(ps, m)` | `ts, total = ts.clip_grad_norm(m)` |
    | `clip_grad_value_(ps, c)` | `ts = ts.clip_grad_value(c)` |

    `backward` *adds* the new gradient to `grads`, so two calls without a
    `zero_grad` accumulate, exactly as in torch. A parameter whose gradient
    is "None" (never computed, or cleared with `set_to_none=True`) is
    skipped by `step` with its state, as torch skips `p.grad is None`;
    `step` before any `backward` is a no-op, and a stale gradient is
    reused. "None" is a per-leaf boolean (`grad_defined`) next to a zero
    array, so the pytree structure never changes and a whole train step is
    one `jax.jit`.

    Attributes:
      params: the parameters (any pytree).
      grads: accumulated gradients, zeros where undefined; `None` for
        leaves that are not trainable (not floating point).
      grad_defined: one boolean per leaf, torch's `p.grad is not None`.
      opt_state: the optimizer's state.
      opt: the optimizer (static).
    """

    params: PyTree
    grads: PyTree
    grad_defined: PyTree
    opt_state: Any
    opt: Optimizer = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, params: PyTree, opt: Optimizer) -> TrainState:
        """A fresh state: no gradients yet (torch's `p.grad is None`).

        Python float leaves of `params` become arrays, as the optimizer
        returns them (see [`funcopt.Optimizer`][funcopt.Optimizer]).
        """
        params = check_params(params)
        return cls(
            params=params,
            grads=_zero_grads(params),
            grad_defined=jax.tree.map(lambda _: jnp.asarray(False), params),
            opt_state=opt.init(params),
            opt=opt,
        )

    def backward(
        self,
        loss_fn: Callable[..., Any],
        *args: Any,
        has_aux: bool = False,
        **kwargs: Any,
    ) -> tuple[TrainState, Any]:
        """`loss = loss_fn(params, *args, **kwargs); loss.backward()`.

        Returns `(new_state, loss)`; the gradient of every trainable leaf
        the loss depends on is added to `grads` and marked defined. Leaves
        the loss does not use keep their gradient, as in torch (where they
        stay `None`; `jax.grad` alone would report zeros).

        `has_aux=True` (as in `jax.value_and_grad`): `loss_fn` returns
        `(loss, aux)` and `backward` returns `(new_state, (loss, aux))`.
        This is how a model with state runs: torch's forward updates
        BatchNorm's running statistics in place; here the loss function
        takes the buffers as an argument and returns the updated ones as
        `aux`, which the training loop threads to the next call:

        ```python
        def loss_fn(params, buffers, x, y):
            out, new_buffers = model_apply(params, buffers, x, train=True)
            return jnp.mean((out - y) ** 2), new_buffers

        ts, (loss, buffers) = ts.backward(loss_fn, buffers, x, y, has_aux=True)
        ts = ts.step()
        ```

        Buffers are not parameters (torch's `named_buffers`): keep them out
        of `ts.params`, whose floating-point leaves the optimizer trains.
        """
        treedef: PyTreeDef
        leaves, treedef = jax.tree.flatten(self.params)
        trainable = [i for i, p in enumerate(leaves) if is_trainable(p)]

        def loss_of_trainable(train_leaves):
            full = list(leaves)
            for i, leaf in zip(trainable, train_leaves):
                full[i] = leaf
            return loss_fn(treedef.unflatten(full), *args, **kwargs)

        def loss_only(train_leaves):
            out = loss_of_trainable(train_leaves)
            return out[0] if has_aux else out

        primals = [leaves[i] for i in trainable]
        result, new = jax.value_and_grad(loss_of_trainable, has_aux=has_aux)(primals)
        reached = _inputs_reaching_output(loss_only, primals)
        grads = treedef.flatten_up_to(self.grads)
        defined = treedef.flatten_up_to(self.grad_defined)
        for i, g, used in zip(trainable, new, reached):
            if used:  # torch: a leaf outside the graph keeps its grad (None)
                # computed before the step reads it (see `materialized`): a
                # donated step then updates the params in place, no copy
                grads[i] = materialized(grads[i] + g)
                defined[i] = jnp.asarray(True)
        new_state = dataclasses.replace(
            self,
            grads=treedef.unflatten(grads),
            grad_defined=treedef.unflatten(defined),
        )
        return new_state, result

    def step(self) -> TrainState:
        """`optimizer.step()` with the accumulated gradients."""
        # they stay `grads` after the step, as torch keeps `p.grad`
        with _fused_native.keeping_gradients():
            params, opt_state = self.opt.step(
                self.params, self.grads, self.opt_state, has_grad=self.grad_defined
            )
        return dataclasses.replace(self, params=params, opt_state=opt_state)

    def clip_grad_norm(
        self,
        max_norm: float | jax.Array,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> tuple[TrainState, jax.Array]:
        """`total = clip_grad_norm_(params, max_norm, norm_type)` on `grads`.

        Returns `(new_state, total_norm)`. Only defined gradients count in
        the norm and are scaled, as torch skips `p.grad is None`. The total
        is in the promoted dtype of all trainable leaves (torch promotes only
        over the defined ones). See [`funcopt.clip_grad_norm`][funcopt.clip_grad_norm].
        """
        grads, total = _clip.clip_grad_norm(
            self.grads,
            max_norm,
            norm_type,
            error_if_nonfinite,
            foreach,
            has_grad=self.grad_defined,
        )
        return dataclasses.replace(self, grads=grads), total

    def clip_grad_value(
        self, clip_value: float, foreach: bool | None = None
    ) -> TrainState:
        """`clip_grad_value_(params, clip_value)` on the defined `grads`."""
        grads = _clip.clip_grad_value(
            self.grads, clip_value, foreach, has_grad=self.grad_defined
        )
        return dataclasses.replace(self, grads=grads)

    def zero_grad(self, set_to_none: bool = True) -> TrainState:
        """`optimizer.zero_grad(set_to_none)`.

        `set_to_none=True` (torch's default) makes every gradient undefined,
        so the next `step` skips parameters that get no new gradient;
        `set_to_none=False` keeps them defined as zeros, so weight decay and
        momentum still act on them.
        """
        defined = self.grad_defined
        if set_to_none:
            defined = jax.tree.map(lambda _: jnp.asarray(False), defined)
        grads = jax.tree.map(_zero_like_grad, self.params, self.grads)
        return dataclasses.replace(self, grads=grads, grad_defined=defined)


def _inputs_reaching_output(fn: Callable, args: list) -> list[bool]:
    """Which of `fn`'s inputs the output depends on (torch's autograd graph).

    torch leaves `p.grad` as None for a parameter the loss never used;
    `jax.grad` returns zeros for it. Dead-code elimination of the traced
    loss tells them apart. It follows data flow, so an input used only
    through `stop_gradient` counts as used (torch's `detach` would give
    None). If JAX's internal DCE is unavailable, every input counts as used.
    """
    try:
        from jax._src.interpreters import partial_eval as pe

        closed = jax.make_jaxpr(lambda *a: fn(list(a)))(*args)
        _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        return list(used)
    except Exception:  # pragma: no cover - depends on JAX internals
        return [True] * len(args)


def _zero_like_grad(param: Any, grad: Any) -> jax.Array | None:
    """`zero_grad`'s zeros for one leaf, reading the old gradient under a trace.

    `jnp.where(False, grad, 0)` is the zeros (XLA folds the select), but the
    traced program then still takes the old gradient as an argument. Under
    a donated `jit` its buffer then takes the new gradient in place; unused,
    jit drops the argument and the new gradient gets a fresh buffer every
    step (Adam, 1M params: about 1.5 ms of page faults a step).
    """
    if not is_trainable(param):
        return None
    zeros = jnp.zeros_like(param)
    if (
        isinstance(grad, jax.core.Tracer)
        and grad.shape == zeros.shape
        and grad.dtype == zeros.dtype
    ):
        return jnp.where(False, grad, zeros)
    return zeros


def _zero_grads(params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda p: jnp.zeros_like(p) if is_trainable(p) else None, params
    )
