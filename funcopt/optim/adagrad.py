"""Adagrad, mirroring `torch.optim.Adagrad`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import (
    add_scalar,
    addcdiv,
    addcmul,
    div,
    is_reduced,
    scalar,
    sqrt,
    tensor_op,
    widest_float,
)
from . import _fused_native, _sparse
from ._common import (
    apply_maximize,
    coupled_gradient,
    group_rule,
    write_buffers_first,
)
from ._fused import (
    FusedMath,
    by_fused_loop,
    check_fused_params,
    fused_scalar_tail,
    kernel_value,
)


def _validate_adagrad(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_at_least_zero(group["lr"], "learning rate")
    _validate.check_at_least_zero(group["lr_decay"], "lr_decay value")
    _validate.check_at_least_zero(group["weight_decay"], "weight_decay value")
    _validate.check_at_least_zero(
        group["initial_accumulator_value"], "initial_accumulator_value value"
    )
    _validate.check_at_least_zero(group["eps"], "epsilon value")


def _adagrad_slots(initial_accumulator_value):
    # torch fills ``sum`` with the constructor's value for every group (a
    # group's own ``initial_accumulator_value`` is ignored)
    def init(param, group):
        value = initial_accumulator_value
        if jnp.iscomplexobj(param):
            value = complex(value, value)
        return {"sum": jnp.full_like(param, value)}

    return init


def _check_sparse_adagrad(group: Mapping[str, Any], fused: bool | None) -> None:
    """torch's errors for a sparse gradient."""
    if fused:
        raise RuntimeError("`fused` does not support sparse grad or complex param")
    if group["weight_decay"] != 0:
        raise RuntimeError(
            "weight_decay option is not compatible with sparse gradients"
        )


def _clr(hparams, step, lr_dtype):
    """`lr / (1 + (step - 1) * lr_decay)`: Python-float scalar math on
    `float(step)`, or with a tensor `lr` (`lr_dtype`) a tensor op in its dtype."""
    decay = 1 + (step - 1) * hparams["lr_decay"]
    if lr_dtype is None:
        return hparams["lr"] / decay
    return div(hparams["lr"].astype(lr_dtype), decay)


def _adagrad_sparse_rule(param, grad, slots, step, hparams, options, lr_dtype):
    """torch's step with a sparse gradient, at its coalesced indices only
    (`weight_decay` is 0, see `_check_sparse_adagrad`)."""
    grad = _sparse.coalesce(grad)
    values = apply_maximize(grad.data, options)
    squares = tensor_op(jnp.multiply, values, values)
    state_sum = _sparse.scatter_add(slots["sum"], grad, squares)
    std = add_scalar(sqrt(_sparse.gather(state_sum, grad)), hparams["eps"])
    quotient = tensor_op(jnp.divide, values, std)
    clr = _clr(hparams, step, lr_dtype)
    return _sparse.scatter_add(param, grad, quotient, alpha=-clr), {"sum": state_sum}


def _fused_decay(step, lr_decay):
    """The fused kernel's `1.0 + (step - 1.0) * lr_decay`, a C++ `double`
    expression that GCC contracts into one multiply-add (measured).

    With x64, `step - 1` (an integer below $2^{24}$, the float32 step) times
    each half of `lr_decay` split at its bits is exact, whether or not XLA
    contracts it; the three terms are summed with the first sum's error
    (the correctly rounded result, but for ties in the last sum).
    """
    n = step - 1
    if widest_float() != jnp.float64:
        return 1 + n * lr_decay
    u64 = jnp.uint64
    bits = jax.lax.bitcast_convert_type(lr_decay, u64)
    high = jax.lax.bitcast_convert_type(bits & ~u64((1 << 24) - 1), jnp.float64)
    a, b = n * high, n * (lr_decay - high)
    s = a + 1
    # the rounding error of a + 1 (Knuth's TwoSum)
    a_part = s - 1
    err = (a - a_part) + (1 - (s - a_part))
    return s + (b + err)


def _adagrad_fused_jax(param, grad, slots, step, hparams, options, lr_dtype=None):
    """torch's fused CPU kernel (`adagrad_fused_step_impl`, `adagrad_math`) in
    JAX: one pass per element in the kernel's compute type; see `adagrad`'s
    docstring."""
    k = FusedMath(param)
    # a tensor lr reaches the kernel as its value (`.item()`)
    lr = kernel_value(hparams["lr"], lr_dtype)
    clr = lr / _fused_decay(step, hparams["lr_decay"])
    weight_decay = hparams["weight_decay"]
    p, g = k.load(param), k.load(grad)
    if options["maximize"]:
        g = -g

    def update(cast):
        d_p = jnp.where(weight_decay != 0, k.fma(p, cast(weight_decay), g), g)
        state_sum = k.fma(d_p, d_p, k.load(slots["sum"]))
        std = k.add(k.sqrt(state_sum), cast(hparams["eps"]))
        return k.sub(p, k.div(k.mul(cast(clr), d_p), std)), state_sum

    # 16-bit params: the vectorised loop takes each scalar as `scalar_t(s)`,
    # rounded to 16 bits; the scalar loop as float32 (`opmath_t(s)`)
    tail = fused_scalar_tail(param) if is_reduced(param) else True
    new_p, state_sum = by_fused_loop(
        lambda: update(lambda s: k.load(scalar(s, param))),
        lambda: update(k.scalar),
        tail,
    )
    return k.store(new_p, param), {"sum": k.store(state_sum, slots["sum"])}


# torch's fused CPU kernel: native where it applies, else `_adagrad_fused_jax`
_adagrad_fused_rule = _fused_native.with_kernel(
    _fused_native.adagrad(False), _adagrad_fused_jax
)


def _adagrad_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if isinstance(grad, jsparse.BCOO):
        return _adagrad_sparse_rule(
            param, grad, slots, step, hparams, options, lr_dtype
        )
    d_p = coupled_gradient(param, grad, hparams, options)
    clr = _clr(hparams, step, lr_dtype)
    state_sum = addcmul(slots["sum"], d_p, d_p, 1.0)
    state_sum, param, grad = write_buffers_first(state_sum, param, grad)
    d_p = coupled_gradient(param, grad, hparams, options)
    std = add_scalar(sqrt(state_sum), hparams["eps"])
    return addcdiv(param, d_p, std, -clr), {"sum": state_sum}


# torch's default step: native where it applies, else `_adagrad_rule`
_adagrad_default_rule = _fused_native.with_kernel(
    _fused_native.adagrad(True), _adagrad_rule
)


@_validate.optimizer_factory
def adagrad(
    lr: float = 1e-2,
    lr_decay: float = 0,
    weight_decay: float = 0,
    initial_accumulator_value: float = 0,
    eps: float = 1e-10,
    foreach: bool | None = None,
    *,
    maximize: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Adagrad, as `torch.optim.Adagrad`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1} \\
    \tilde\gamma_t &= \frac{\gamma}{1 + (t-1)\eta} \\
    S_t &= S_{t-1} + g_t^2, \quad S_0 = s_0 \\
    \theta_t &= \theta_{t-1} - \tilde\gamma_t\, \frac{g_t}{\sqrt{S_t} + \epsilon}
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\eta$ = `lr_decay`,
    $\lambda$ = `weight_decay` (coupled), $s_0$ =
    `initial_accumulator_value`. `eps` is outside the square root (optax's
    `adagrad` puts it inside and starts from 0.1). `t` is each parameter's
    own step count.

    Like torch, the state exists from `init` for every parameter, and
    $s_0$ is the constructor's value for every group: a group's own
    `initial_accumulator_value` is ignored.

    A sparse gradient (`jax.experimental.sparse.BCOO`, torch's sparse
    `p.grad`) is coalesced (repeated indices summed) and, at its indices
    $I$ only,

    $$
    S_I \leftarrow S_I + g_I^2, \qquad
    \theta_I \leftarrow \theta_I - \tilde\gamma_t\, \frac{g_I}{\sqrt{S_I} + \epsilon}
    $$

    (torch's `state_sum.sparse_mask(grad)`); every stored index counts,
    also one whose value is zero. As in torch, $\lambda \ne 0$ raises
    `RuntimeError: weight_decay option is not compatible with sparse
    gradients`, and `fused` raises too. See
    [`funcopt.sparse_adam`][funcopt.optim.sparse_adam.sparse_adam] for
    building a BCOO gradient.

    `foreach` and `differentiable` are accepted and ignored (torch's
    `foreach=True` and `differentiable=True` give its default path's bits,
    `benchmarks/results/flag_paths.md`). A tensor `lr` (an array, e.g.
    `np.float32(0.01)`) keeps its dtype: $\tilde\gamma_t$ is a tensor op
    in it, as in torch.

    `fused=True` is torch's fused CPU kernel (`torch._fused_adagrad_`,
    `torch.optim.Adagrad(fused=True)`): $\tilde\gamma_t =
    \gamma / \operatorname{fma}(t - 1, \eta, 1)$ in C++ `double` (a tensor
    `lr` as its value), then one pass per element in the param's compute
    type, each op rounded once ($\operatorname{fma}$ a fused multiply-add):

    $$
    g_t = \operatorname{fma}(\theta_{t-1}, \lambda, \pm\nabla_\theta f_t)
    \;(\lambda \ne 0), \quad
    S_t = \operatorname{fma}(g_t, g_t, S_{t-1}), \quad
    \theta_t = \theta_{t-1} - \frac{\tilde\gamma_t\, g_t}{\sqrt{S_t} + \epsilon}
    $$

    with the hardware square root (correctly rounded, where torch's default
    path takes MKL's `vsSqrt`, 1 ulp low on ~0.7% of float32 roots on
    AVX-512): float32 bit-exact in funcopt's exact mode
    ([`set_exact_float32`][funcopt.precision.set_exact_float32]) on any x86
    CPU. 16-bit params compute in float32 and round only at each store
    ($\theta_t$ from the unrounded $S_t$); the kernel's vectorised loop
    rounds $\lambda$, $\epsilon$ and $\tilde\gamma_t$ to the param's dtype
    first, its scalar tail (each leaf's last $n \bmod 16$ elements: 32-byte
    vectors, measured in torch 2.13's AVX2 and AVX-512 dispatch alike)
    takes them as float32; both are mirrored. Complex params raise torch's
    `RuntimeError` (when the state is made, torch at its first step);
    `fused` combined with `foreach` or `differentiable` raises as in torch.
    On one CPU device, float32 and float64 params (with `fused=True`,
    bfloat16 and float16 ones too) take funcopt's native
    kernel where it is built (`make venv`, or `pip install` with a C++
    compiler; `funcopt/_native`): the same rounding, op by op, in C++ and in
    place, torch's bits without x64 and the bit-exact mode too;
    `FUNCOPT_NATIVE=0` selects the JAX path.
    State: `sum`; the step count is `state.step`.
    """
    fused_kernel = _validate.fused_requested(fused)
    opt = make_optimizer(
        name="Adagrad",
        elementwise=True,
        # each group's rule from its own lr (a float or a tensor)
        rule=group_rule(
            _adagrad_fused_rule if fused_kernel else _adagrad_default_rule,
            lr_dtype="lr",
        ),
        init_slots=_adagrad_slots(initial_accumulator_value),
        hyperparams={
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
        },
        options={"maximize": maximize},
        validate=_validate_adagrad,
        param_groups=param_groups,
        sparse_grads=True,
        sparse_check=functools.partial(_check_sparse_adagrad, fused=fused),
        extra_defaults={
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        },
        # torch refuses complex params for its fused kernel (at step)
        check_params=check_fused_params("Adagrad") if fused_kernel else None,
    )
    # torch checks ``fused`` after the argument checks
    _validate.check_fused(
        {"fused": fused, "foreach": foreach, "differentiable": differentiable}
    )
    return opt
