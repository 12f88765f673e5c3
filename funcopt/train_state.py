"""``TrainState``: torch's ``backward`` / ``step`` / ``zero_grad`` as a pure pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._core import Optimizer
from ._tree import PyTree, is_trainable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, accumulated gradients and optimizer state, as in a torch loop.

    ============================  ==================================================
    torch                         funcopt
    ============================  ==================================================
    ``loss.backward()``           ``ts, loss = ts.backward(loss_fn, *args)``
    ``optimizer.step()``          ``ts = ts.step()``
    ``optimizer.zero_grad()``     ``ts = ts.zero_grad()`` (``set_to_none=True``)
    ============================  ==================================================

    ``backward`` *adds* the new gradient to ``grads``, so two calls without a
    ``zero_grad`` accumulate, exactly as in torch. A parameter whose gradient
    is "None" (never computed, or cleared with ``set_to_none=True``) is
    skipped by ``step`` with its state, as torch skips ``p.grad is None``;
    ``step`` before any ``backward`` is a no-op, and a stale gradient is
    reused. "None" is a per-leaf boolean (``grad_defined``) next to a zero
    array, so the pytree structure never changes and a whole train step is
    one ``jax.jit``.

    Attributes:
      params: the parameters (any pytree).
      grads: accumulated gradients, zeros where undefined; ``None`` for
        leaves that are not trainable (not floating point).
      grad_defined: one boolean per leaf, torch's ``p.grad is not None``.
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
        """A fresh state: no gradients yet (torch's ``p.grad is None``)."""
        return cls(
            params=params,
            grads=_zero_grads(params),
            grad_defined=jax.tree.map(lambda _: jnp.asarray(False), params),
            opt_state=opt.init(params),
            opt=opt,
        )

    def backward(
        self, loss_fn: Callable[..., jax.Array], *args: Any, **kwargs: Any
    ) -> tuple[TrainState, jax.Array]:
        """``loss = loss_fn(params, *args, **kwargs); loss.backward()``.

        Returns ``(new_state, loss)``; the gradient of every trainable leaf is
        added to ``grads`` and marked defined.
        """
        leaves, treedef = jax.tree.flatten(self.params)
        trainable = [i for i, p in enumerate(leaves) if is_trainable(p)]

        def loss_of_trainable(train_leaves):
            full = list(leaves)
            for i, leaf in zip(trainable, train_leaves):
                full[i] = leaf
            return loss_fn(treedef.unflatten(full), *args, **kwargs)

        loss, new = jax.value_and_grad(loss_of_trainable)(
            [leaves[i] for i in trainable]
        )
        grads = treedef.flatten_up_to(self.grads)
        defined = treedef.flatten_up_to(self.grad_defined)
        for i, g in zip(trainable, new):
            grads[i] = grads[i] + g
            defined[i] = jnp.asarray(True)
        return (
            dataclasses.replace(
                self,
                grads=treedef.unflatten(grads),
                grad_defined=treedef.unflatten(defined),
            ),
            loss,
        )

    def step(self) -> TrainState:
        """``optimizer.step()`` with the accumulated gradients."""
        params, opt_state = self.opt.step(
            self.params, self.grads, self.opt_state, has_grad=self.grad_defined
        )
        return dataclasses.replace(self, params=params, opt_state=opt_state)

    def zero_grad(self, set_to_none: bool = True) -> TrainState:
        """``optimizer.zero_grad(set_to_none)``.

        ``set_to_none=True`` (torch's default) makes every gradient undefined,
        so the next ``step`` skips parameters that get no new gradient;
        ``set_to_none=False`` keeps them defined as zeros, so weight decay and
        momentum still act on them.
        """
        defined = self.grad_defined
        if set_to_none:
            defined = jax.tree.map(lambda _: jnp.asarray(False), defined)
        return dataclasses.replace(
            self, grads=_zero_grads(self.params), grad_defined=defined
        )


def _zero_grads(params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda p: jnp.zeros_like(p) if is_trainable(p) else None, params
    )
