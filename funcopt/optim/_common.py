"""Pieces of update rules that several torch optimizers share, in torch's order."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .._math import (
    add,
    add_scalar,
    addcmul,
    lerp,
    mul,
    scalar,
    tensor_op,
    widest_float,
)
from .._validate import is_array


def tensor_dtype(value: Any) -> str | None:
    """The dtype of a hyperparameter given as an array (torch: a tensor, whose
    scalar math runs in its dtype); None for a Python float."""
    if is_array(value) and jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.dtype(value.dtype).name
    return None


@functools.cache
def _with_lr_dtype(rule, lr_dtype: str):
    return functools.partial(rule, lr_dtype=lr_dtype)


def rule_for_narrow_lr(rule, lr: Any):
    """`rule`, or `rule` with `lr_dtype=` the dtype of a tensor `lr` narrower
    than float64 (a float64 tensor's scalar math is Python-float math). One
    per (rule, dtype), so that optimizers share its compiled steps."""
    lr_dtype = tensor_dtype(lr)
    if lr_dtype in (None, "float64"):
        return rule
    return _with_lr_dtype(rule, lr_dtype)


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
    torch 2.13 CPU); for float32 and float64 the two agree.
    """
    return tensor_op(jnp.multiply, x, scalar(s, x))


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


def one_minus(x: jax.Array) -> jax.Array:
    """torch's `1 - x` for a 0-d tensor `x`: a tensor op in its dtype."""
    return add_scalar(-x, 1.0)


def pow_scalar(base: jax.Array, exponent) -> jax.Array:
    r"""torch's `base ** float(exponent)` for a 0-d float tensor `base`.

    torch's CPU kernel special-cases the exponent: $x \cdot x$ for 2,
    $(x \cdot x) \cdot x$ for 3 (each product rounded), otherwise C's
    `pow` in float64 rounded to `base`'s dtype (measured, torch 2.13 CPU:
    float32 and float64 bases, exponents 1 to 400).
    """
    square = tensor_op(jnp.multiply, base, base)
    cube = tensor_op(jnp.multiply, square, base)
    wide = widest_float()
    general = (base.astype(wide) ** jnp.asarray(exponent).astype(wide)).astype(
        base.dtype
    )
    return jnp.where(exponent == 3, cube, jnp.where(exponent == 2, square, general))


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
    `param.mul_(1 - lr * weight_decay)`; coupled (Adam's default):
    `grad = grad.add(param, alpha=weight_decay)` when `weight_decay != 0`.
    """
    grad = apply_maximize(grad, options)
    weight_decay = hparams["weight_decay"]
    if options["decoupled_weight_decay"]:
        lr = hparams["lr"]
        if options.get("foreach") and lr.dtype == weight_decay.dtype:
            return foreach_mul(param, 1 - lr * weight_decay), grad
        return decoupled_weight_decay(param, lr, weight_decay), grad
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
    return jax.lax.platform_dependent(
        values, cpu=jax.lax.optimization_barrier, default=lambda v: v
    )


def coupled_weight_decay(
    grad: jax.Array, param: jax.Array, weight_decay: jax.Array
) -> jax.Array:
    """torch's `if weight_decay != 0: grad = grad.add(param, alpha=weight_decay)`."""
    return jnp.where(weight_decay != 0, add(grad, param, weight_decay), grad)


def decoupled_weight_decay(
    param: jax.Array, lr: jax.Array, weight_decay: jax.Array
) -> jax.Array:
    """torch's `param.mul_(1 - lr * weight_decay)` (an exact no-op when wd == 0).

    With a tensor `lr` (an array of another dtype than the widest float, as
    the rules pass it) the factor is tensor math in lr's dtype, each op
    rounded.
    """
    if lr.dtype != weight_decay.dtype:
        return mul(param, add_scalar(-mul(lr, weight_decay), 1.0))
    return mul(param, 1 - lr * weight_decay)


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
