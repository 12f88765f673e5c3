"""RAdam, mirroring `torch.optim.RAdam`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import (
    add,
    add_scalar,
    addcmul,
    div,
    mul,
    reciprocal,
    sqrt,
    tensor_op,
)
from ._common import adam_moments, check_foreach_differentiable


def _validate_radam(group: Mapping[str, Any]) -> None:
    _validate.check_adam_family(group)
    check_foreach_differentiable(group)


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
    if options["foreach"]:
        return _foreach_update(param, moments, step, rho_t, rect, hparams), moments
    # (bias_correction2**0.5) / tensor is Tensor.__rtruediv__: reciprocal() * scalar
    adaptive_lr = mul(
        reciprocal(add_scalar(sqrt(exp_avg_sq), eps)), bias_correction2**0.5
    )
    plain = mul(bias_corrected_exp_avg, lr)
    adapted = mul(tensor_op(jnp.multiply, plain, adaptive_lr), rect)
    new_param = add(param, jnp.where(rho_t > 5.0, adapted, plain), -1.0)
    return new_param, moments


def _foreach_update(param, moments, step, rho_t, rect, hparams):
    r"""torch's `_multi_tensor_radam` update: one per-element factor.

    `buffer = 1 / ((sqrt(v) + eps) / s) + u` with the Python floats
    `s = -sqrt(1 - beta2^t) * lr * r / (1 - beta1^t)` (`r = 0` while
    $\rho_t \le 5$, where `1 / (x / -0.0)` is `-0.0`) and
    `u = -lr / (1 - beta1^t)` while $\rho_t \le 5$, else 0; then
    `param.addcmul_(exp_avg, buffer)`.
    """
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    rect = jnp.where(rho_t > 5, rect, 0.0)
    unrectified = jnp.where(rect > 0, 0.0, 1.0)
    bias_correction1 = 1 - beta1**step
    unrect_step_size = (lr * unrectified / bias_correction1) * -1
    scale = ((1 - beta2**step) ** 0.5) * (lr * rect / bias_correction1) * -1
    buffer = div(add_scalar(sqrt(moments["exp_avg_sq"]), eps), scale)
    buffer = add_scalar(reciprocal(buffer), unrect_step_size)
    return addcmul(param, moments["exp_avg"], buffer, 1.0)


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

    `capturable` and `differentiable` are accepted; the result is torch's
    default CPU path, which is also what torch's `differentiable=True` and
    a float32 tensor `lr` give, bit for bit
    (`benchmarks/results/flag_paths.md`; `capturable=True` raises for CPU
    params). `foreach=True` mirrors torch's `_multi_tensor_radam`: one
    factor $b_t = 1 / \bigl((\sqrt{v_t}+\epsilon) / s_t\bigr) + u_t$ with
    the Python floats $s_t = -\gamma r_t\sqrt{1-\beta_2^t}/(1-\beta_1^t)$
    ($r_t = 0$ while $\rho_t \le 5$) and $u_t = -\gamma/(1-\beta_1^t)$
    while $\rho_t \le 5$, else 0, then $\theta_t = \theta_{t-1} + m_t b_t$
    (and `_foreach_mul_` rounds its scalar to a 16-bit tensor's dtype
    first); with `differentiable=True` it raises a `ValueError` with
    torch's message (torch: an `AssertionError` at its first step).
    `foreach=True` with a tensor `lr` (torch: float32 tensor step sizes)
    is not reproduced: `lr` is read as a Python float.
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
            # torch's `_multi_tensor_radam` (foreach=None on CPU: single-tensor)
            "foreach": foreach,
            "differentiable": differentiable,
        },
        validate=_validate_radam,
        param_groups=param_groups,
        extra_defaults={"capturable": capturable},
    )
