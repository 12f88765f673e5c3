"""Adadelta, mirroring `torch.optim.Adadelta`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, add_scalar, sqrt, tensor_op
from . import _fused_native
from ._common import (
    coupled_gradient,
    ema_of_square,
    recompute_after,
    write_buffers_first,
)


def _validate_adadelta(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_at_least_zero(group["lr"], "learning rate")
    rho = group["rho"]
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"Invalid rho value: {rho}")
    _validate.check_at_least_zero(group["eps"], "epsilon value")
    _validate.check_at_least_zero(group["weight_decay"], "weight_decay value")


def _adadelta_slots(param, group):
    return {"square_avg": jnp.zeros_like(param), "acc_delta": jnp.zeros_like(param)}


def _adadelta_rule(param, grad, slots, step, hparams, options):
    rho = hparams["rho"]
    square_avg = ema_of_square(
        slots["square_avg"], coupled_gradient(param, grad, hparams, options), rho
    )
    square_avg, param, grad = write_buffers_first(square_avg, param, grad)
    delta = _adadelta_delta(
        param, grad, square_avg, slots["acc_delta"], hparams, options
    )
    new_param = add(param, delta, -hparams["lr"])
    # the same delta, computed again in acc_delta's own pass: no temporary
    # (XLA copies param and acc_delta instead, each pass reading the other's
    # old value: 72 bytes/param in 3 passes, against 80 in 6 with temporaries)
    param, grad, square_avg, acc_delta = recompute_after(
        param, grad, square_avg, slots["acc_delta"]
    )
    delta = _adadelta_delta(param, grad, square_avg, acc_delta, hparams, options)
    acc_delta = ema_of_square(acc_delta, delta, rho)
    return new_param, {"square_avg": square_avg, "acc_delta": acc_delta}


def _adadelta_delta(param, grad, square_avg, acc_delta, hparams, options):
    """torch's `delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)`."""
    eps = hparams["eps"]
    grad = coupled_gradient(param, grad, hparams, options)
    std = sqrt(add_scalar(square_avg, eps))
    delta = sqrt(add_scalar(acc_delta, eps))
    return tensor_op(jnp.multiply, tensor_op(jnp.divide, delta, std), grad)


# torch's default step: native where it applies, else `_adadelta_rule`
_adadelta_default_rule = _fused_native.with_kernel(
    _fused_native.adadelta(), _adadelta_rule
)


@_validate.optimizer_factory
def adadelta(
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0,
    foreach: bool | None = None,
    *,
    capturable: bool = False,
    maximize: bool = False,
    differentiable: bool = False,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Adadelta, as `torch.optim.Adadelta`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1} \\
    v_t &= \rho v_{t-1} + (1-\rho) g_t^2 \\
    \delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
    u_t &= \rho u_{t-1} + (1-\rho)\delta_t^2 \\
    \theta_t &= \theta_{t-1} - \gamma\delta_t
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda$ = `weight_decay`
    (coupled). `rho` may be 1. (optax's `adadelta` with its default
    `learning_rate=None` ascends; this one descends, as torch does.)

    On the CPU (one device, or each device's piece of a sharded param),
    for float32 and float64 params, the step runs
    funcopt's native kernel (`funcopt.optim._fused_native`): torch's
    `_single_tensor_adadelta` op by op in C++, one pass over memory, torch's
    float32 bits without x64 wherever torch's `sqrt` (MKL's) is correctly
    rounded; elsewhere the same formula in JAX.

    `foreach`, `capturable` and `differentiable` are accepted; the
    result is torch's default CPU path, which is also what torch's
    `foreach=True`, `differentiable=True` and a float32 tensor `lr` give,
    bit for bit (`benchmarks/results/flag_paths.md`).
    State: `square_avg` ($v$), `acc_delta` ($u$); the
    step count is `state.step`.
    """
    return make_optimizer(
        name="Adadelta",
        elementwise=True,
        rule=_adadelta_default_rule,
        init_slots=_adadelta_slots,
        hyperparams={"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay},
        options={"maximize": maximize},
        validate=_validate_adadelta,
        param_groups=param_groups,
        extra_defaults={
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        },
    )
