"""`TrainState`: torch's `backward` / `step` / `zero_grad` as a pure pytree."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.tree_util import PyTreeDef

from . import _multi_tensor, _packing
from . import clip as _clip
from ._core import Optimizer, OptState
from ._math import materialized
from ._multi_tensor import FlatParams, Layout
from ._tree import PyTree, check_params, flatten_grads, is_trainable
from .optim import _fused_native


# Leaves flatten with the gradients after `opt_state`: jit pairs each donated
# input buffer with the first output of its shape in leaf order, and a jit
# drops an unused argument, so were the old gradients unused after
# `zero_grad`, gradients listed before the state would take the state's
# donated buffers and leave XLA copying (Adam, 1M params: four 4 MB copies a
# step, 5x optax's time). `zero_grad` keeps them an argument
# (`_zero_like_grad`), so the new gradients take their buffers.
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "opt_state", "stored_grads", "stored_defined"],
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
    | `p.grad = g` | `ts = ts.with_grads(grads)` |
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

    Where the optimizer keeps its small leaves' state packed in buckets
    (`funcopt.flat.set_policy`; by default on one CPU device with the
    native library), the gradients and
    flags of those leaves are kept in the same buckets (`stored_grads`,
    `stored_defined`): a jitted train step then takes and returns a few
    buffers instead of two arrays per leaf (each costs the runtime a few
    microseconds: 1,000 leaves, ~9 ms a step), and the step reads them as
    they are. `grads` and `grad_defined` show them per leaf.

    Attributes:
      params: the parameters (any pytree).
      opt_state: the optimizer's state.
      stored_grads: the gradients as kept: `grads`, or a
        [`FlatParams`][funcopt.flat.FlatParams] in the layout of the
        optimizer state's packed buffers.
      stored_defined: the flags as kept: `grad_defined`, or a `FlatParams`
        of that layout holding one flag per leaf of each bucket.
      opt: the optimizer (static).
    """

    params: PyTree
    stored_grads: Any
    stored_defined: Any
    opt_state: Any
    opt: Optimizer = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, params: PyTree, opt: Optimizer) -> TrainState:
        """A fresh state: no gradients yet (torch's `p.grad is None`).

        Python float leaves of `params` become arrays, as the optimizer
        returns them (see [`funcopt.Optimizer`][funcopt.Optimizer]).
        """
        params = check_params(params)
        opt_state = opt.init(params)
        layout = _grad_layout(opt, opt_state)
        return cls(
            params=params,
            stored_grads=_store_grads(layout, _zero_grads(params)),
            stored_defined=_store_flags(
                layout, jax.tree.map(lambda _: jnp.asarray(False), params)
            ),
            opt_state=opt_state,
            opt=opt,
        )

    @property
    def grads(self) -> PyTree:
        """Accumulated gradients (a pytree of the params' structure), zeros
        where undefined; `None` for leaves that are not trainable (not
        floating point). Views of the packed buffers where they are packed."""
        stored = self.stored_grads
        return stored.unpack() if isinstance(stored, FlatParams) else stored

    @property
    def grad_defined(self) -> PyTree:
        """One boolean per leaf: torch's `p.grad is not None`."""
        stored = self.stored_defined
        if not isinstance(stored, FlatParams):
            return stored
        flags = _multi_tensor.flag_values(stored)
        return stored.layout.treedef.unflatten([_flag(f) for f in flags])

    def with_grads(self, grads: PyTree, grad_defined: PyTree = None) -> TrainState:
        """torch's `p.grad = g` for every leaf: this state with `grads` (a
        pytree of the params' structure; a `None` leaf has no gradient) and
        `grad_defined` (one boolean per leaf; by default, defined where the
        gradient is not `None`).

        Raises `TypeError` or `ValueError` naming the leaf where `grads`
        does not match the params (structure, dtype, shape).
        """
        params, grad_leaves = flatten_grads(self.params, grads)
        treedef: PyTreeDef = jax.tree.structure(self.params)
        if grad_defined is None:
            flags = [jnp.asarray(g is not None) for g in grad_leaves]
        else:
            flags = [_flag(f) for f in treedef.flatten_up_to(grad_defined)]
        full = [
            (jnp.zeros_like(p) if g is None else g) if is_trainable(p) else None
            for p, g in zip(params, grad_leaves)
        ]
        layout = _grad_layout(self.opt, self.opt_state)
        if any(isinstance(g, jsparse.BCOO) for g in grad_leaves):
            layout = None  # sparse gradients are kept (and stepped) per leaf
        return dataclasses.replace(
            self,
            stored_grads=_store_grads(layout, treedef.unflatten(full)),
            stored_defined=_store_flags(layout, treedef.unflatten(flags)),
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
        # torch: a leaf outside the graph keeps its grad (None)
        added: list[Any] = [None] * len(leaves)
        for i, g, used in zip(trainable, new, reached):
            if used:
                added[i] = g
        new_state = dataclasses.replace(
            self,
            stored_grads=_accumulate(self.stored_grads, added, treedef),
            stored_defined=_mark_defined(self.stored_defined, added, treedef),
        )
        return new_state, result

    def step(self) -> TrainState:
        """`optimizer.step()` with the accumulated gradients."""
        grads, defined = self.stored_grads, self.stored_defined
        if isinstance(grads, FlatParams) and grads.layout != _grad_layout(
            self.opt, self.opt_state
        ):  # a state of another layout (e.g. one loaded or sharded since)
            grads, defined = self.grads, self.grad_defined
        # they stay `grads` after the step, as torch keeps `p.grad`
        with _fused_native.keeping_gradients():
            params, opt_state = self.opt.step(
                self.params, grads, self.opt_state, has_grad=defined
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
        return self._with_grad_values(grads), total

    def clip_grad_value(
        self, clip_value: float, foreach: bool | None = None
    ) -> TrainState:
        """`clip_grad_value_(params, clip_value)` on the defined `grads`."""
        grads = _clip.clip_grad_value(
            self.grads, clip_value, foreach, has_grad=self.grad_defined
        )
        return self._with_grad_values(grads)

    def zero_grad(self, set_to_none: bool = True) -> TrainState:
        """`optimizer.zero_grad(set_to_none)`.

        `set_to_none=True` (torch's default) makes every gradient undefined,
        so the next `step` skips parameters that get no new gradient;
        `set_to_none=False` keeps them defined as zeros, so weight decay and
        momentum still act on them.
        """
        defined = self.stored_defined
        if set_to_none:
            defined = _all_undefined(defined)
        stored = self.stored_grads
        if isinstance(stored, FlatParams):
            params = stored.layout.treedef.flatten_up_to(self.params)
            grads = FlatParams(
                [
                    jax.tree.map(lambda b: _zero_like_grad(b, b), b)
                    for b in stored.buffers
                ],
                [
                    _zero_like_grad(params[i], g)
                    for i, g in zip(stored.layout.outside, stored.rest)
                ],
                stored.layout,
            )
        else:
            grads = jax.tree.map(_zero_like_grad, self.params, stored)
        return dataclasses.replace(self, stored_grads=grads, stored_defined=defined)

    def _stored_layout(self) -> Layout | None:
        """The layout the gradients and flags are kept in (None: per leaf)."""
        stored = self.stored_grads
        return stored.layout if isinstance(stored, FlatParams) else None

    def _with_grad_values(self, grads: PyTree) -> TrainState:
        """This state with new values of the gradients, kept in the layout
        of the old ones (and of their flags, which stay)."""
        layout = self._stored_layout()
        return dataclasses.replace(self, stored_grads=_store_grads(layout, grads))

    def _with_per_leaf(
        self, params: PyTree, opt_state: Any, grads: PyTree, grad_defined: PyTree
    ) -> TrainState:
        """This state's optimizer and layout with these values (per leaf
        gradients and flags, as `grads` and `grad_defined` read them):
        `funcopt.checkpoint`'s restore."""
        layout = self._stored_layout()
        return dataclasses.replace(
            self,
            params=params,
            opt_state=opt_state,
            stored_grads=_store_grads(layout, grads),
            stored_defined=_store_flags(layout, grad_defined),
        )


def _grad_layout(opt: Any, opt_state: Any) -> Layout | None:
    """The layout `TrainState` keeps gradients and flags in: that of the
    optimizer state's packed buffers, where a funcopt optimizer's own step
    (which reads packed gradients, `_core._apply`) keeps its state packed;
    None (per leaf) otherwise."""
    if getattr(opt, "definition", None) is None or not isinstance(opt_state, OptState):
        return None
    return _multi_tensor.packed_layout(opt_state)


def _store_grads(layout: Layout | None, grads: PyTree) -> Any:
    """A gradient tree as `TrainState` keeps it: as it is, or packed (the
    leaves of a bucket that steps in place per leaf, as a tuple: `Layout.unpack`)."""
    if layout is None:
        return grads
    leaves = layout.treedef.flatten_up_to(grads)
    return FlatParams(
        [
            tuple(leaves[i] for i in b.leaves)
            if b.in_place
            else b.pack([leaves[i] for i in b.leaves])
            for b in layout.buckets
        ],
        [leaves[i] for i in layout.outside],
        layout,
    )


def _store_flags(layout: Layout | None, flags: PyTree) -> Any:
    """A tree of flags as `TrainState` keeps it: as it is, or one buffer
    per bucket (a constant of the trace where every flag of it is known,
    which a step then needs not read, `_packing.known_flags`)."""
    if layout is None:
        return flags
    leaves = layout.treedef.flatten_up_to(flags)
    return FlatParams(
        [
            _packing.stack_flags([leaves[i] for i in b.leaves], len(b.leaves))
            for b in layout.buckets
        ],
        [leaves[i] for i in layout.outside],
        layout,
    )


def _flag(flag: Any) -> jax.Array:
    """One `grad_defined` flag as a 0-d bool array (a Python or NumPy bool
    too, so that the pytree's types never change)."""
    flag = jnp.asarray(flag, dtype=bool)
    if flag.shape != ():
        raise ValueError(f"grad_defined: one boolean per leaf, got shape {flag.shape}")
    return flag


def _all_undefined(stored: Any) -> Any:
    """`stored_defined` with every flag false (`zero_grad(set_to_none=True)`)."""
    if not isinstance(stored, FlatParams):
        return jax.tree.map(lambda _: jnp.asarray(False), stored)
    return FlatParams(
        [jnp.asarray(np.zeros(b.shape, bool)) for b in stored.buffers],
        [jnp.asarray(False) for _ in stored.rest],
        stored.layout,
    )


def _accumulate(stored: Any, added: list, treedef: PyTreeDef) -> Any:
    """`stored_grads` plus the new gradients `added` (per leaf, None where
    the loss did not reach the leaf: its gradient is kept). Each new sum is
    computed before the step reads it (see `materialized`): a donated step
    then updates the params in place, no copy; a bucket's sum already is
    (its pack is a copy). A bucket's leaves the loss did not reach add
    `-0.0`, which keeps every value as it is (`-0.0` included, which `+0.0`
    would turn into `+0.0`)."""
    if not isinstance(stored, FlatParams):
        old = treedef.flatten_up_to(stored)
        return treedef.unflatten(
            [o if g is None else materialized(o + g) for o, g in zip(old, added)]
        )
    layout = stored.layout
    buffers: list[Any] = []
    for b, old in zip(layout.buckets, stored.buffers):
        used = np.array([added[i] is not None for i in b.leaves])
        if not used.any():
            buffers.append(old)
            continue
        if isinstance(old, tuple):  # per leaf
            buffers.append(
                tuple(
                    o if added[i] is None else materialized(o + added[i])
                    for i, o in zip(b.leaves, old)
                )
            )
            continue
        new = b.pack(
            [
                jnp.full(layout.shapes[i], -0.0, b.dtype)
                if added[i] is None
                else added[i]
                for i in b.leaves
            ]
        )
        buffers.append(old + new)
    rest = [
        o if added[i] is None else materialized(o + added[i])
        for i, o in zip(layout.outside, stored.rest)
    ]
    return FlatParams(buffers, rest, layout)


def _mark_defined(stored: Any, added: list, treedef: PyTreeDef) -> Any:
    """`stored_defined` with the leaves of `added` marked defined (constants
    of the trace where known: see `_store_flags`)."""
    if not isinstance(stored, FlatParams):
        old = treedef.flatten_up_to(stored)
        return treedef.unflatten(
            [o if g is None else jnp.asarray(True) for o, g in zip(old, added)]
        )
    layout = stored.layout
    buffers = []
    for b, old in zip(layout.buckets, stored.buffers):
        used = np.array([added[i] is not None for i in b.leaves])
        known = _packing.known_flags(old)
        if used.all() or known is not None:
            known = used if known is None else known | used
            buffers.append(jnp.asarray(known))
        else:
            buffers.append(jnp.where(used, True, old))
    rest = [
        o if added[i] is None else jnp.asarray(True)
        for i, o in zip(layout.outside, stored.rest)
    ]
    return FlatParams(buffers, rest, layout)


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
