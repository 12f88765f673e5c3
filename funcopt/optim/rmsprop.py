"""RMSprop, mirroring `torch.optim.RMSprop`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, add_scalar, addcdiv, addcmul, lerp, mul, sqrt
from . import _fused_native
from ._common import (
    coupled_gradient,
    ema_of_square,
    in_own_pass,
    write_buffers_first,
)


def _validate_rmsprop(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_at_least_zero(group["lr"], "learning rate")
    _validate.check_at_least_zero(group["eps"], "epsilon value")
    _validate.check_at_least_zero(group["momentum"], "momentum value")
    _validate.check_at_least_zero(group["weight_decay"], "weight_decay value")
    _validate.check_at_least_zero(group["alpha"], "alpha value")


def _rmsprop_slots(param, group):
    # torch decides which buffers exist once, when the state is created
    slots = {"square_avg": jnp.zeros_like(param)}
    if group["momentum"] > 0:
        slots["momentum_buffer"] = jnp.zeros_like(param)
    if group["centered"]:
        slots["grad_avg"] = jnp.zeros_like(param)
    return slots


def _rmsprop_denominator(averages, hparams):
    """`sqrt(square_avg [- grad_avg**2]) + eps`, in torch's op order."""
    square_avg = averages["square_avg"]
    if "grad_avg" in averages:
        grad_avg = averages["grad_avg"]
        avg = sqrt(addcmul(square_avg, grad_avg, grad_avg, -1.0))
    else:
        avg = sqrt(square_avg)
    return add_scalar(avg, hparams["eps"])


def _rmsprop_jax_rule(param, grad, slots, step, hparams, options):
    lr, alpha, momentum = hparams["lr"], hparams["alpha"], hparams["momentum"]
    d_p = coupled_gradient(param, grad, hparams, options)
    new_slots = {"square_avg": ema_of_square(slots["square_avg"], d_p, alpha)}
    if "grad_avg" in slots:
        d_p = in_own_pass(coupled_gradient, param, grad, hparams, options)
        new_slots["grad_avg"] = lerp(slots["grad_avg"], d_p, 1 - alpha)
    new_slots, param, grad = write_buffers_first(new_slots, param, grad)
    d_p = coupled_gradient(param, grad, hparams, options)
    avg = _rmsprop_denominator(new_slots, hparams)
    if "momentum_buffer" not in slots:
        return addcdiv(param, d_p, avg, -lr), new_slots
    # torch reads the group's momentum at every step: ``if momentum > 0``
    old = slots["momentum_buffer"]
    buf = jnp.where(momentum > 0, addcdiv(mul(old, momentum), d_p, avg, 1.0), old)
    (buf, new_slots), param, grad = write_buffers_first((buf, new_slots), param, grad)
    d_p = coupled_gradient(param, grad, hparams, options)
    plain = addcdiv(param, d_p, _rmsprop_denominator(new_slots, hparams), -lr)
    new_param = jnp.where(momentum > 0, add(param, buf, -lr), plain)
    return new_param, {**new_slots, "momentum_buffer": buf}


# torch's default step: native where it applies, else `_rmsprop_jax_rule`
_rmsprop_rule = _fused_native.with_kernel(_fused_native.rmsprop(), _rmsprop_jax_rule)


@_validate.optimizer_factory
def rmsprop(
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum: float = 0,
    centered: bool = False,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""RMSprop, as `torch.optim.RMSprop`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1} \\
    v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2 \\
    \bar g_t &= \operatorname{lerp}(\bar g_{t-1}, g_t, 1-\alpha)
                \text{ (centered)} \\
    a_t &= \sqrt{v_t - \bar g_t^2} + \epsilon \text{ (centered) else }
           \sqrt{v_t} + \epsilon \\
    b_t &= \mu b_{t-1} + g_t / a_t, \quad
    \theta_t = \theta_{t-1} - \gamma b_t \text{ (momentum > 0)} \\
    \theta_t &= \theta_{t-1} - \gamma\, g_t / a_t \text{ (otherwise)}
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\mu$ = `momentum`,
    $\lambda$ = `weight_decay` (coupled). `eps` is outside the
    square root and there is no bias correction, as in torch (optax's
    `rmsprop` defaults differ on both). `alpha` has no upper bound.

    On the CPU (one device, or each device's piece of a sharded param),
    for float32 and float64 params, the step runs
    funcopt's native kernel (`funcopt.optim._fused_native`): torch's
    `_single_tensor_rmsprop` op by op in C++, one pass over memory, torch's
    float32 bits without x64 wherever torch's `sqrt` (MKL's) is correctly
    rounded; elsewhere the same formula in JAX.

    `capturable`, `foreach` and `differentiable` are accepted; the
    result is torch's default CPU path, which is also what torch's
    `foreach=True`, `differentiable=True` and a float32 tensor `lr` give,
    bit for bit (`benchmarks/results/flag_paths.md`).
    State: `square_avg`; `momentum_buffer` only for groups with
    `momentum > 0` and `grad_avg` only for `centered` groups, decided
    at init as torch decides it when it creates the state.
    """
    return make_optimizer(
        name="RMSprop",
        elementwise=True,
        rule=_rmsprop_rule,
        init_slots=_rmsprop_slots,
        hyperparams={
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
        },
        options={"centered": centered, "maximize": maximize},
        validate=_validate_rmsprop,
        param_groups=param_groups,
        extra_defaults={
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
        },
    )
