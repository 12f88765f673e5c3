"""Adam and AdamW, mirroring `torch.optim.Adam` and `torch.optim.AdamW`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add_scalar, addcdiv, div, sqrt_nonnegative
from ._common import adam_moments


def _validate_adam(
    group: Mapping[str, Any], foreach: Any = None, capturable: Any = False
) -> None:
    if _validate.is_array(group["lr"]) and foreach and not capturable:
        raise ValueError(
            "lr as a Tensor is not supported for capturable=False and foreach=True"
        )
    _validate.check_adam_family(group)
    _validate.check_betas_both_floats(group["betas"], foreach, capturable)


def _adam_slots(param, group):
    slots = {"exp_avg": jnp.zeros_like(param), "exp_avg_sq": jnp.zeros_like(param)}
    if group["amsgrad"]:
        slots["max_exp_avg_sq"] = jnp.zeros_like(param)
    return slots


def _adam_rule(param, grad, slots, step, hparams, options):
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    param, new_slots = adam_moments(param, grad, slots, hparams, options)
    exp_avg, exp_avg_sq = new_slots["exp_avg"], new_slots["exp_avg_sq"]
    # torch: Python-float scalar math on float(step)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = jnp.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    if options["amsgrad"]:
        # the max is over the raw second moment, bias-corrected afterwards
        second = jnp.maximum(slots["max_exp_avg_sq"], exp_avg_sq)
        new_slots["max_exp_avg_sq"] = second
    else:
        second = exp_avg_sq
    # (v.sqrt() / bias_correction2_sqrt).add_(eps): three ops, each rounded
    denom = add_scalar(div(sqrt_nonnegative(second), bias_correction2_sqrt), eps)
    return addcdiv(param, exp_avg, denom, -step_size), new_slots


@_validate.optimizer_factory
def adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    amsgrad: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    decoupled_weight_decay: bool = False,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Adam, as `torch.optim.Adam`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) \;(+\lambda\theta_{t-1}
           \text{ if coupled}) \\
    \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda)
           \text{ if decoupled\_weight\_decay} \\
    m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
    \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
           \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda$ = `weight_decay`. Note
    where `eps` sits: after the bias-corrected square root, as in torch
    (optax's `eps_root` has no torch counterpart). `t` is each parameter's
    own step count. AMSGrad takes the max of the raw $v_t$ (optax's
    `amsgrad` takes it of the bias-corrected one).

    `foreach`, `fused`, `capturable` and `differentiable` are accepted
    and ignored. State: `exp_avg`, `exp_avg_sq` and, with `amsgrad`,
    `max_exp_avg_sq`; the step count is `state.step`.
    """
    opt = _adam_family(
        "Adam",
        dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
        dict(
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        ),
        dict(
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        ),
        param_groups,
    )
    # torch checks ``fused`` after the argument checks
    _validate.check_fused(
        {"fused": fused, "foreach": foreach, "differentiable": differentiable}
    )
    return opt


@_validate.optimizer_factory
def adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""AdamW, as `torch.optim.AdamW`: `adam` with decoupled weight decay.

    $$
    \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
    $$

    is applied before the moment updates, with the group's current `lr`
    $\gamma$; the rest is [`adam`][funcopt.optim.adam.adam]. The default
    `weight_decay` is torch's `1e-2` (optax's `adamw` defaults to `1e-4`).
    """
    opt = _adam_family(
        "AdamW",
        dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
        dict(amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True),
        dict(
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        ),
        param_groups,
    )
    _validate.check_fused(
        {"fused": fused, "foreach": foreach, "differentiable": differentiable}
    )
    return opt


def _adam_family(name, hyperparams, options, extra_defaults, param_groups):
    return make_optimizer(
        name=name,
        elementwise=True,
        rule=_adam_rule,
        init_slots=_adam_slots,
        hyperparams=hyperparams,
        options=options,
        validate=functools.partial(
            _validate_adam,
            foreach=extra_defaults["foreach"],
            capturable=extra_defaults["capturable"],
        ),
        param_groups=param_groups,
        extra_defaults=extra_defaults,
    )
