"""NAdam, mirroring `torch.optim.NAdam`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add_scalar, addcdiv, div, sqrt, widest_float
from ._common import adam_moments, weight_decayed, write_buffers_first


def _validate_nadam(group: Mapping[str, Any]) -> None:
    _validate.check_adam_family(group)
    _validate.check_at_least_zero(group["momentum_decay"], "momentum_decay value")


def _nadam_slots(param, group):
    return {
        # torch: a 0-dim float32 tensor (its default dtype), rounded every step
        "mu_product": jnp.ones((), jnp.float32),
        "exp_avg": jnp.zeros_like(param),
        "exp_avg_sq": jnp.zeros_like(param),
    }


def _nadam_rule(param, grad, slots, step, hparams, options):
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    momentum_decay = hparams["momentum_decay"]
    bias_correction2 = 1 - beta2**step
    # the momentum cache mu_t and mu_{t+1}, Python-float math
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # mu_product *= mu: in place on the float32 0-dim tensor
    mu_product = slots["mu_product"] * mu.astype(jnp.float32)
    _, moments = adam_moments(param, grad, slots, hparams, options)
    # the param's pass reads the new moments and recomputes the decayed
    # gradient (no full-size temporary for it)
    moments, param, grad = write_buffers_first(moments, param, grad)
    param, grad = weight_decayed(param, grad, hparams, options)
    denom = add_scalar(sqrt(div(moments["exp_avg_sq"], bias_correction2)), eps)
    # _get_value(mu_product): the float32 value read back as a Python float
    mu_product_value = mu_product.astype(widest_float())
    mu_product_next = mu_product_value * mu_next
    param = addcdiv(param, grad, denom, -lr * (1.0 - mu) / (1.0 - mu_product_value))
    param = addcdiv(
        param, moments["exp_avg"], denom, (-lr * mu_next) / (1.0 - mu_product_next)
    )
    return param, {"mu_product": mu_product, **moments}


@_validate.optimizer_factory
def nadam(
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""NAdam (Adam with Nesterov momentum), as `torch.optim.NAdam`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) \;(+\lambda\theta_{t-1}
           \text{ if coupled}) \\
    \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda)
           \text{ if decoupled\_weight\_decay} \\
    \mu_t &= \beta_1\bigl(1 - \tfrac12\, 0.96^{t\psi}\bigr), \quad
    \Pi_t = \operatorname{f32}(\Pi_{t-1}\mu_t) \\
    m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1), \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    d_t &= \sqrt{v_t / (1-\beta_2^t)} + \epsilon \\
    \theta_t &= \theta_{t-1} - \frac{\gamma(1-\mu_t)}{1-\Pi_t}\frac{g_t}{d_t}
               - \frac{\gamma\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m_t}{d_t}
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda$ = `weight_decay`,
    $\psi$ = `momentum_decay`. The two terms are two separate
    `addcdiv` steps, as in torch. $\Pi$ (`mu_product`) is a float32
    scalar in torch and is rounded to float32 at every step here too.
    `t` is each parameter's own step count.

    `foreach`, `capturable` and `differentiable` are accepted and
    ignored. State: `mu_product` (a float32 scalar), `exp_avg`,
    `exp_avg_sq`; the step count is `state.step`.
    """
    return make_optimizer(
        name="NAdam",
        elementwise=True,
        rule=_nadam_rule,
        init_slots=_nadam_slots,
        hyperparams={
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
        },
        options={
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
        },
        validate=_validate_nadam,
        param_groups=param_groups,
        extra_defaults={
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        },
    )
