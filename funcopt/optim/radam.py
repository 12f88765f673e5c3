"""RAdam, mirroring `torch.optim.RAdam`."""

from __future__ import annotations

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import (
    add,
    add_scalar,
    div,
    mul,
    reciprocal,
    sqrt,
    tensor_op,
)
from ._common import adam_moments


def _radam_slots(param, group):
    return {"exp_avg": jnp.zeros_like(param), "exp_avg_sq": jnp.zeros_like(param)}


def _radam_rule(param, grad, slots, step, hparams, options):
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    param, moments = adam_moments(param, grad, slots, hparams, options)
    exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
    # torch: Python-float scalar math on float(step)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bias_corrected_exp_avg = div(exp_avg, bias_correction1)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    # only used where rho_t > 5 (then rho_inf > rho_t > 5 and the root is real)
    rect = (
        (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    ) ** 0.5
    # (bias_correction2**0.5) / tensor is Tensor.__rtruediv__: reciprocal() * scalar
    adaptive_lr = mul(
        reciprocal(add_scalar(sqrt(exp_avg_sq), eps)), bias_correction2**0.5
    )
    plain = mul(bias_corrected_exp_avg, lr)
    adapted = mul(tensor_op(jnp.multiply, plain, adaptive_lr), rect)
    new_param = add(param, jnp.where(rho_t > 5.0, adapted, plain), -1.0)
    return new_param, moments


@_validate.optimizer_factory
def radam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""RAdam (rectified Adam), as `torch.optim.RAdam`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) \;(+\lambda\theta_{t-1}
           \text{ if coupled}) \\
    \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda)
           \text{ if decoupled\_weight\_decay} \\
    m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1), \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    \hat m_t = m_t / (1-\beta_1^t) \\
    \rho_\infty &= \frac{2}{1-\beta_2} - 1, \quad
    \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t} \\
    \theta_t &= \begin{cases}
        \theta_{t-1} - \gamma\hat m_t\,
        \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}\, r_t & \rho_t > 5 \\
        \theta_{t-1} - \gamma\hat m_t & \text{otherwise}
    \end{cases} \\
    r_t &= \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}
                      {(\rho_\infty-4)(\rho_\infty-2)\rho_t}}
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda$ = `weight_decay`. The
    threshold is strict, as in torch (optax uses `>=`), and `eps` is added
    to the uncorrected $\sqrt{v_t}$. With the default $\beta_2$
    the first five steps are un-adapted. `t` is each parameter's own count.

    `foreach`, `capturable` and `differentiable` are accepted; the
    result is torch's default CPU path, which is also what torch's
    `differentiable=True` and a float32 tensor `lr` give, bit for bit
    (`benchmarks/results/flag_paths.md`; its `foreach` path rounds
    differently, and `capturable=True` raises for CPU params).
    State: `exp_avg`, `exp_avg_sq`; the step count is
    `state.step`.
    """
    return make_optimizer(
        name="RAdam",
        elementwise=True,
        rule=_radam_rule,
        init_slots=_radam_slots,
        hyperparams={
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
        },
        options={
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
        },
        validate=_validate.check_adam_family,
        param_groups=param_groups,
        extra_defaults={
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        },
    )
