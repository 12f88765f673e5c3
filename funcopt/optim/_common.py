"""Pieces of update rules that several torch optimizers share, in torch's order."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.dtypes import canonicalize_dtype

from .._core import TENSOR_DTYPES
from .._math import (
    add,
    add_scalar,
    addcmul,
    cpu_barrier,
    is_reduced,
    lerp,
    mul,
    reciprocal,
    scalar,
    sqrt,
    tensor_op,
    widest_float,
)


def group_rule(rule, *, narrow: bool = False, **hparam_of: str):
    r"""`rule` with keyword arguments from each group's tensor hyperparameters.

    `hparam_of` maps a keyword of `rule` to a hyperparameter, e.g.
    `group_rule(_nadam_rule, lr_dtype="lr")`: a group whose `lr` is a tensor
    (an array) gets `lr_dtype=` its dtype, a group whose `lr` is a Python
    float gets no such keyword. Each group follows its own values, as in
    torch, where every param group may hold its own `lr` (`Adam([{"params":
    a}, {"params": b, "lr": torch.tensor(0.01, dtype=torch.float64)}],
    lr=torch.tensor(0.02))`). `narrow`: a float64 tensor is passed as a
    Python float (its scalar math is Python-float math). One per (rule,
    arguments), so that optimizers share its compiled steps.
    """
    return _group_rule(rule, narrow, tuple(sorted(hparam_of.items())))


@functools.cache
def _group_rule(rule, narrow: bool, hparam_of: tuple[tuple[str, str], ...]):
    @functools.wraps(rule)
    def by_group(param, grad, slots, step, hparams, options):
        dtypes = dict(options[TENSOR_DTYPES])
        kwargs = {
            arg: dtypes[name]
            for arg, name in hparam_of
            if name in dtypes and not (narrow and dtypes[name] == "float64")
        }
        return rule(param, grad, slots, step, hparams, options, **kwargs)

    return by_group


def check_foreach_differentiable(group: Mapping[str, Any]) -> None:
    """torch's `_multi_tensor_*` refusal of `differentiable=True`, with its
    message: torch raises an `AssertionError` at its first step, funcopt a
    `ValueError` when the optimizer is built (an argument error)."""
    if group["foreach"] and group["differentiable"]:
        raise ValueError("_foreach ops don't support autograd")


def foreach_mul(x: jax.Array, s) -> jax.Array:
    """`torch._foreach_mul_([x], s)` for a Python-float `s`.

    Unlike `x.mul_(s)` (the scalar as float32), the in-place foreach
    multiply rounds the scalar to a 16-bit tensor's dtype first (measured,
    torch 2.13 CPU); for float32 and float64 the two agree. The scalar is
    broadcast to `x`'s shape: `tensor_op` reads a 0-d float32 operand in
    float64 (x64), which would widen a float32 `x` outside the bit-exact
    float32 mode.
    """
    return tensor_op(jnp.multiply, x, jnp.broadcast_to(scalar(s, x), jnp.shape(x)))


def powf(base, exponent) -> jax.Array:
    """torch's float32 `pow` (a float32 tensor and a Python float or float32
    tensor: glibc's `powf` of the float32 operands), as float32.

    With x64, the float64 power rounded once to float32: `powf`'s result
    except in rare near-ties (for `beta ** step`, 1 step in ~300 to ~3000
    over 1,000 steps, e.g. steps 58, 309, ... for base 0.95). Without x64,
    XLA's float32 `pow` (about 5% of those steps differ by an ulp).
    """
    f32 = jnp.float32
    base, exponent = jnp.asarray(base).astype(f32), jnp.asarray(exponent).astype(f32)
    if widest_float() == jnp.float64:
        wide = jnp.float64
        return (base.astype(wide) ** exponent.astype(wide)).astype(f32)
    return base**exponent


def float32_times_lr(x: jax.Array, lr: jax.Array, lr_dtype) -> jax.Array:
    """torch's in-place `x.mul_(lr)` (`_foreach_mul_(xs, lr)`) for a 0-d
    float32 tensor `x` of a capturable step: a Python-float `lr`
    (`lr_dtype` None) rounded to float32 first; a tensor `lr` read as its
    value (a float64 one promotes the product), the product rounded once to
    float32."""
    f32 = jnp.float32
    lr = lr.astype(f32) if lr_dtype is None else lr
    wide = widest_float()
    return (x.astype(wide) * lr.astype(wide)).astype(f32)


def zero_d_op(fn, a: jax.Array, b: jax.Array) -> jax.Array:
    """torch's `fn` of two 0-d float tensors (a tensor `lr` and a step's
    float32 scalar): computed and returned in their promoted dtype, so a
    float64 tensor `lr` widens the float32 step's math."""
    wide = canonicalize_dtype(np.promote_types(a.dtype, b.dtype))
    return fn(a.astype(wide), b.astype(wide))


def computes_in_float32(x: jax.Array) -> bool:
    """Whether torch's op of `x` and a 0-d float32 tensor computes in
    float32: `x` is a 0-d 16-bit tensor (two 0-d operands promote to the
    wider dtype); with dimensions, `x`'s own dtype wins."""
    return is_reduced(x) and jnp.ndim(x) == 0


def spread(s: jax.Array, like: jax.Array) -> jax.Array:
    """A 0-d tensor `s` as an operand of a tensor op with `like`: cast to
    `like`'s dtype and broadcast to its shape. (`tensor_op` reads a 0-d
    float32 operand in float64 with x64, see `funcopt._math.opmath`, which
    would widen a float32 `like` outside the bit-exact float32 mode.)"""
    return jnp.broadcast_to(s.astype(like.dtype), jnp.shape(like))


def one_minus(x: jax.Array) -> jax.Array:
    """torch's `1 - x` for a 0-d tensor `x`: a tensor op in its dtype."""
    return add_scalar(-x, 1.0)


def pow_scalar(base: jax.Array, exponent) -> jax.Array:
    r"""torch's `base ** float(exponent)` for a 0-d float tensor `base`.

    torch's CPU kernel special-cases the exponent, each op rounded:
    $x \cdot x$ for 2, $(x \cdot x) \cdot x$ for 3, $\sqrt x$ for 0.5,
    $1/\sqrt x$ for -0.5, $1/x$ for -1 and $1/(x \cdot x)$ for -2;
    otherwise C's `pow` in float64 rounded to `base`'s dtype, for float32
    `powf`'s result but in rare near-ties (see `powf`). Measured, torch 2.13
    CPU: float32 and float64 bases, exponents 1 to 400 and the special ones
    (`tests/parity/test_float32_bits.py`). A 16-bit base takes none of
    them: torch's power in float32, rounded once (as the general case here,
    measured for float16). (A tensor with more than one element takes a
    vectorised `pow` instead, which rounds otherwise.)
    """
    square = tensor_op(jnp.multiply, base, base)
    root = sqrt(base)
    wide = widest_float()
    general = (base.astype(wide) ** jnp.asarray(exponent).astype(wide)).astype(
        base.dtype
    )
    if jnp.dtype(base.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return general
    special = {
        2.0: square,
        3.0: tensor_op(jnp.multiply, square, base),
        0.5: root,
        -0.5: reciprocal(root),
        -1.0: reciprocal(base),
        -2.0: reciprocal(square),
    }
    for value, result in special.items():
        general = jnp.where(exponent == value, result, general)
    return general


def apply_maximize(grad: jax.Array, options: Mapping[str, Any]) -> jax.Array:
    """`grad if not maximize else -grad`."""
    return -grad if options["maximize"] else grad


def coupled_gradient(param, grad, hparams, options) -> jax.Array:
    """torch's gradient after `maximize` and coupled `weight_decay`."""
    grad = apply_maximize(grad, options)
    return coupled_weight_decay(grad, param, hparams["weight_decay"])


def weight_decayed(param, grad, hparams, options) -> tuple[jax.Array, jax.Array]:
    """torch's `(param, grad)` after `maximize` and weight decay.

    Decoupled (`options["decoupled_weight_decay"]`, AdamW's):
    `param.mul_(1 - lr * weight_decay)` (`decoupled_weight_decay`, a
    tensor `lr` or `weight_decay` kept in its dtype); coupled (Adam's default):
    `grad = grad.add(param, alpha=weight_decay)` when `weight_decay != 0`
    (a tensor `weight_decay` read as its value).
    """
    grad = apply_maximize(grad, options)
    weight_decay = hparams["weight_decay"]
    if options["decoupled_weight_decay"]:
        lr = hparams["lr"]
        return decoupled_weight_decay(param, lr, weight_decay, options), grad
    return param, coupled_weight_decay(grad, param, weight_decay)


def adam_moments(param, grad, slots, hparams, options, tensor_betas=False):
    r"""The Adam family's `(param, {"exp_avg": m, "exp_avg_sq": v})`.

    $$
    m_t = \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1), \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2
    $$

    with $g_t$ the gradient after `maximize` and weight decay, and
    `param` after decoupled weight decay (`weight_decayed`; Adam,
    AdamW, NAdam and RAdam). Each moment computes $g_t$ itself
    (`in_own_pass`).

    `tensor_betas` (torch.optim.Adam's Tensor `betas`, given in their dtype):
    $1-\beta_1$ is a tensor op in the param's dtype (torch moves $\beta_1$
    to it) and $1-\beta_2$ one in $\beta_2$'s dtype.
    """
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    if tensor_betas:
        weight, value = one_minus(scalar(beta1, param)), one_minus(beta2)
    else:
        weight, value = 1 - beta1, None
    _, decayed_grad = weight_decayed(param, grad, hparams, options)
    exp_avg = lerp(slots["exp_avg"], decayed_grad, weight)
    param, decayed_grad = in_own_pass(weight_decayed, param, grad, hparams, options)
    exp_avg_sq = ema_of_square(
        slots["exp_avg_sq"], decayed_grad, beta2, options.get("foreach", False), value
    )
    return param, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def write_buffers_first(new_buffers, *inputs):
    """`(new_buffers, *inputs)`, for a param's pass that reads the new buffers.

    Speed only, on CPU (see `recompute_after`). XLA's CPU backend does
    not fuse loops with several outputs by default: a rule that updates k
    buffers runs as k + 1 passes over memory. Left to itself it shares the
    cheap per-element terms between them, e.g. the weight-decayed gradient,
    in a fresh full-size temporary (page faults on every step), or fuses a
    buffer's update into the param's pass too, reading a donated buffer
    after another pass overwrote it (so it copies it first). A rule that
    passes its new buffers and the arrays it reads afterwards (typically
    `param, grad`) through here, and computes the param's update from what
    comes out, gets passes ordered by data (buffers first, written in place;
    the param's pass reads them) and recomputes those terms in the param's
    pass.
    """
    return recompute_after(new_buffers, *inputs)


def in_own_pass(fn, param, grad, *rest):
    """`fn(param, grad, *rest)`, kept apart from any other computation of it.

    For a per-element term (e.g. the weight-decayed gradient) that two
    buffers' updates read: each update then computes its own copy inside
    its own pass. XLA's default CPU fusion duplicates such a term anyway;
    with its multi-output fusion on (`XLA_FLAGS=--xla_backend_extra_options=
    xla_cpu_use_multi_output_fusion`) it does not, and would otherwise
    share it through a full-size temporary instead of updating both
    buffers in one pass.
    """
    param, grad = recompute_after(param, grad)
    return fn(param, grad, *rest)


def recompute_after(*values):
    """`values` through an optimization barrier, where lowered for CPU.

    XLA's CPU pipeline removes the barrier before fusion (its
    `cse_barrier_expander` pass); until then, common-subexpression
    elimination cannot merge what is computed from its outputs with what
    was computed from its inputs. A rule uses it to compute a per-element
    term once in each pass that needs it, rather than once in a full-size
    temporary. It does not order passes; only data dependencies do.

    Values stay torch's; the one visible effect is where LLVM contracts a
    multiply and an add into a fused multiply-add (RMSprop centered: 1
    float32 ulp in some elements, inside every parity tolerance, 16-bit
    results still bit-exact). GPU backends fuse the whole rule into one
    multi-output kernel, where the recomputation would only cost
    arithmetic, so the barrier applies to CPU lowering alone.
    """
    leaves, tree = jax.tree.flatten(values)
    return jax.tree.unflatten(tree, cpu_barrier(*leaves))


def coupled_weight_decay(
    grad: jax.Array, param: jax.Array, weight_decay: jax.Array
) -> jax.Array:
    """torch's `if weight_decay != 0: grad = grad.add(param, alpha=weight_decay)`."""
    return jnp.where(weight_decay != 0, add(grad, param, weight_decay), grad)


def decoupled_weight_decay(
    param: jax.Array,
    lr: jax.Array,
    weight_decay: jax.Array,
    options: Mapping[str, Any],
) -> jax.Array:
    r"""torch's `param.mul_(1 - lr * weight_decay)` (an exact no-op when wd == 0).

    $1 - \gamma\lambda$ is Python-float math where `lr` and `weight_decay`
    are Python floats, and otherwise tensor math in the dtype torch
    promotes the tensors among them to (a Python float takes the tensor's
    dtype: a float32 tensor `weight_decay` with a float `lr` is float32
    math, with a float64 tensor `lr` float64 math), each op rounded.
    `param.mul_` reads the factor as its value (float32 for a 16-bit
    param). With `foreach`, `_foreach_mul_` rounds a Python-float factor
    to a 16-bit param's dtype first (`foreach_mul`), not a tensor's.
    """
    tensor_dtype = scalar_math_dtype(options, "lr", "weight_decay")
    if tensor_dtype is None:
        if options.get("foreach"):
            return foreach_mul(param, 1 - lr * weight_decay)
        return mul(param, 1 - lr * weight_decay)
    dtype = jax.dtypes.canonicalize_dtype(tensor_dtype)
    lr, weight_decay = lr.astype(dtype), weight_decay.astype(dtype)
    return mul(param, add_scalar(-mul(lr, weight_decay), 1.0))


def scalar_math_dtype(options: Mapping[str, Any], *names: str) -> str | None:
    """The dtype of torch's scalar math on the group's hyperparameters
    `names`: None (Python floats) where none is a tensor, otherwise the
    promotion of the tensors' dtypes (a Python float is weak)."""
    dtypes = dict(options.get(TENSOR_DTYPES, ()))
    found = [dtypes[n] for n in names if n in dtypes]
    return np.result_type(*found).name if found else None


def ema_of_square(
    avg: jax.Array,
    grad: jax.Array,
    beta: jax.Array,
    foreach: bool = False,
    value: jax.Array | None = None,
) -> jax.Array:
    """torch's `avg.mul_(beta).addcmul_(grad, grad, value=1 - beta)`
    (`foreach`: `_foreach_mul_`, then `_foreach_addcmul_`); `value`: `1 - beta`
    where torch computes it otherwise (a tensor `beta`: `one_minus`)."""
    decayed = foreach_mul(avg, beta) if foreach else mul(avg, beta)
    return addcmul(decayed, grad, grad, 1 - beta if value is None else value)
