"""Adagrad, mirroring `torch.optim.Adagrad`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add_scalar, addcdiv, addcmul, sqrt
from ._common import coupled_gradient, write_buffers_first


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


def _adagrad_rule(param, grad, slots, step, hparams, options):
    lr, lr_decay = hparams["lr"], hparams["lr_decay"]
    d_p = coupled_gradient(param, grad, hparams, options)
    # torch: Python-float scalar math on float(step)
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum = addcmul(slots["sum"], d_p, d_p, 1.0)
    state_sum, param, grad = write_buffers_first(state_sum, param, grad)
    d_p = coupled_gradient(param, grad, hparams, options)
    std = add_scalar(sqrt(state_sum), hparams["eps"])
    return addcdiv(param, d_p, std, -clr), {"sum": state_sum}


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
    r"""Adagrad, as `torch.optim.Adagrad` (dense gradients).

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

    `foreach`, `fused` and `differentiable` are accepted and ignored
    (`fused` combined with the others raises as in torch). State: `sum`;
    the step count is `state.step`.
    """
    opt = make_optimizer(
        name="Adagrad",
        elementwise=True,
        rule=_adagrad_rule,
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
        extra_defaults={
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        },
    )
    # torch checks ``fused`` after the argument checks
    _validate.check_fused(
        {"fused": fused, "foreach": foreach, "differentiable": differentiable}
    )
    return opt
