"""Mixed precision: a dtype policy per state buffer, and float32 master weights.

Without either, a funcopt optimizer does what torch does with bf16/fp16
parameters: every state buffer has the parameter's dtype and the math runs in
it. Both wrappers here are opt-in and work with every optimizer built on
[`funcopt.make_optimizer`][funcopt.make_optimizer]
([`master_weights`][funcopt.master_weights] with any optimizer that has `step`):

* [`precision_policy`][funcopt.precision_policy] stores chosen buffers in chosen dtypes
  (e.g. `exp_avg` in bfloat16, `exp_avg_sq` in float32) and runs the update
  rule in `compute_dtype`;
* [`master_weights`][funcopt.master_weights] keeps a float32 copy of every
  lower-precision parameter in the state, steps that copy, and returns it rounded to the
  parameter's dtype.

16-bit steps round as torch's CPU kernels, whose vectorised loop and scalar
tail round some ops differently: [`torch_cpu_block`][funcopt.precision.torch_cpu_block]
  says which loop
funcopt mirrors (blocks of 32 elements, torch on x86 with AVX2 or AVX-512),
[`set_torch_cpu_block`][funcopt.precision.set_torch_cpu_block] changes it, and
`funcopt.torch_interop.measure_torch_cpu_block()` measures it on the torch
at hand.

float32 steps are the plain float32 program by default (torch's numbers within
float32 rounding). With x64 enabled,
[`set_exact_float32(True)`][funcopt.precision.set_exact_float32] mirrors torch's
float32 kernels op by op instead: bit for bit torch's default CPU path for the
optimizers without a square root and for Adafactor (its norms and means add
in torch's order), at several times the step time.

Adam/AdamW, SGD and Adagrad (default or `fused=True`), RMSprop, Adamax,
Adadelta, RAdam, Rprop, NAdam and ASGD run native CPU kernels where they
were built (on sharded params, the default steps on each device's piece):
one pass over memory, torch's bits in float32 without x64 (SGD's, Adamax's,
Rprop's and ASGD's default steps and every fused one bit for bit; the other
default steps but where torch's `sqrt`, MKL's, is not correctly rounded);
[`set_native_fused(False)`][funcopt.precision.set_native_fused] selects their
pure JAX rules instead, and [`native_fused`][funcopt.precision.native_fused]
says which runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._core import Optimizer, build_optimizer, updates_of_step
from ._math import exact_float32 as exact_float32
from ._math import set_exact_float32 as set_exact_float32
from ._math import set_torch_cpu_block as set_torch_cpu_block
from ._math import torch_cpu_block as torch_cpu_block
from ._tree import PyTree, check_params, is_trainable
from .optim._fused_native import native_fused as native_fused
from .optim._fused_native import set_native_fused as set_native_fused
from .reliability import _check_state, _inner_step, _wrapper


def _dtype(x: Any, what: str):
    try:
        dtype = jnp.dtype(x)
    except TypeError as e:
        raise TypeError(f"{what}: {x!r} is not a dtype") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{what}: {dtype} is not a real floating-point dtype")
    return dtype


def precision_policy(
    opt: Optimizer,
    slot_dtypes: Mapping[str, Any] | None = None,
    compute_dtype: Any = jnp.float32,
) -> Optimizer:
    """`opt` with each state buffer stored in a chosen dtype.

    Args:
      opt: an optimizer made by [`funcopt.make_optimizer`][funcopt.make_optimizer]
        (every `funcopt.<name>` except `lbfgs`).
      slot_dtypes: `{buffer name: dtype}`, e.g.
        `{"exp_avg": jnp.bfloat16, "exp_avg_sq": jnp.float32}`; buffers
        not named keep torch's dtype (the parameter's). Names are checked at
        `init` against the buffers the optimizer creates.
      compute_dtype: the dtype the update rule runs in: parameters, gradients
        and buffers are cast to it before the rule and the results cast back
        (the parameter to its own dtype, each buffer to its stored dtype).
        `None` runs the rule in the parameter's dtype.

    The result is an ordinary funcopt optimizer (same state layout, jit-able,
    `get_lr`/`set_lr`, `TrainState`). Real parameters only: a complex
    parameter raises `TypeError`.
    """
    definition = getattr(opt, "definition", None)
    if definition is None:
        raise TypeError(
            "precision_policy() needs an optimizer made by funcopt.make_optimizer, "
            f"got {type(opt).__name__}"
        )
    if slot_dtypes is not None and not isinstance(slot_dtypes, Mapping):
        raise TypeError(
            f"precision_policy(): slot_dtypes must be a mapping of buffer name to "
            f"dtype, got {type(slot_dtypes).__name__}"
        )
    policy = {
        k: _dtype(v, f"precision_policy(): slot_dtypes[{k!r}]")
        for k, v in dict(slot_dtypes or {}).items()
    }
    compute = (
        None
        if compute_dtype is None
        else _dtype(compute_dtype, "precision_policy(): compute_dtype")
    )
    inner_init, inner_rule = definition.init_slots, definition.rule

    def init_slots(param, group):
        if jnp.iscomplexobj(param):
            raise TypeError(
                f"precision_policy(): {definition.name} with a dtype policy supports "
                "real parameters only"
            )
        slots = inner_init(param, group)
        return {k: v.astype(policy[k]) if k in policy else v for k, v in slots.items()}

    def rule(param, grad, slots, step, hparams, options):
        cd = param.dtype if compute is None else compute

        def up(x):
            return x.astype(cd) if jnp.issubdtype(x.dtype, jnp.floating) else x

        new_p, new_slots = inner_rule(
            up(param),
            up(grad),
            {k: up(v) for k, v in slots.items()},
            step,
            hparams,
            options,
        )
        return new_p.astype(param.dtype), {
            k: v.astype(slots[k].dtype) if k in slots else v
            for k, v in new_slots.items()
        }

    built = build_optimizer(
        dataclasses.replace(definition, rule=rule, init_slots=init_slots),
        opt.defaults,
    )

    def init(params):
        state = built.init(params)
        unknown = sorted(set(policy) - set(state.slots))
        if unknown and jax.tree.leaves(state.slots):
            raise ValueError(
                f"precision_policy(): {definition.name} has no state buffer "
                f"{unknown[0]!r}; its buffers: {sorted(state.slots)}"
            )
        return state

    new = Optimizer(init, built.update)
    new._step_fn = built._step_fn
    for attr in ("name", "defaults", "param_groups", "definition"):
        setattr(new, attr, getattr(built, attr))
    new.policy = {"slot_dtypes": policy, "compute_dtype": compute}
    return new


class MasterWeightsState(NamedTuple):
    """State of [`master_weights`][funcopt.master_weights].

    Attributes:
      master: the float32 (`dtype`) copy of every parameter of a lower
        precision, `None` for the others (they are stepped as they are).
      inner: the wrapped optimizer's state, made for the master copy (its
        buffers are float32 too).
    """

    master: PyTree
    inner: Any


def _needs_master(leaf: Any, dtype) -> bool:
    return (
        is_trainable(leaf)
        and not jnp.iscomplexobj(leaf)
        and jnp.finfo(leaf.dtype).bits < jnp.finfo(dtype).bits
    )


def master_weights(opt: optax.GradientTransformation, dtype: Any = jnp.float32):
    """Step a float32 master copy of low-precision parameters (opt-in).

    `init(params)` stores a `dtype` copy of every parameter of a lower
    precision (bf16/fp16); `step(params, grads, state)` upcasts the
    gradients, steps the master copy with `opt` (so its buffers are
    `dtype` too) and returns it rounded to each parameter's dtype. The
    master copy is the source of truth: a parameter changed outside the
    optimizer is overwritten at the next step (re-`init` after loading new
    weights). Parameters already at least `dtype` are stepped directly.
    Works under `jit`, with `TrainState`, `get_lr`/`set_lr` and
    inside `optax.chain` (`update` returns `new_params - params` in the
    parameter's dtype).
    """
    if not isinstance(opt, optax.GradientTransformation):
        raise TypeError(
            "master_weights() wraps an optimizer (an optax GradientTransformation), "
            f"got {type(opt).__name__}"
        )
    dtype = _dtype(dtype, "master_weights(): dtype")

    def full_master(params, master):
        return jax.tree.map(
            lambda p, m: p if m is None else m,
            params,
            master,
            is_leaf=lambda x: x is None,
        )

    def init(params):
        params = check_params(params)
        master = jax.tree.map(
            lambda p: p.astype(dtype) if _needs_master(p, dtype) else None, params
        )
        return MasterWeightsState(master, opt.init(full_master(params, master)))

    def step_fn(params, grads, state, has_grad):
        _check_state(state, MasterWeightsState, "master_weights")
        params = check_params(params)
        try:
            master = full_master(params, state.master)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "this master_weights state's master copy does not match the params tree"
            ) from e
        grads32 = jax.tree.map(
            lambda g, m: (
                g.astype(m.dtype)
                if g is not None and hasattr(g, "dtype") and m is not None
                else g
            ),
            grads,
            state.master,
            is_leaf=lambda x: x is None,
        )
        new_master, new_inner = _inner_step(opt, master, grads32, state.inner, has_grad)
        new_params = jax.tree.map(
            lambda nm, p: nm.astype(p.dtype) if is_trainable(p) else p,
            new_master,
            params,
        )
        kept = jax.tree.map(
            lambda m, nm: None if m is None else nm,
            state.master,
            new_master,
            is_leaf=lambda x: x is None,
        )
        return new_params, MasterWeightsState(kept, new_inner)

    def update(grads, state, params=None, **extra_args):
        return updates_of_step("master_weights", step_fn, grads, state, params, None)

    return _wrapper(opt, "master_weights", init, update, step_fn)
