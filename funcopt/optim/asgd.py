"""ASGD, mirroring `torch.optim.ASGD`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, add_scalar, mul, tensor_op, widest_float
from ._common import coupled_gradient, powf, tensor_dtype


def _validate_asgd(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_at_least_zero(group["lr"], "learning rate")
    _validate.check_at_least_zero(group["weight_decay"], "weight_decay value")


def _asgd_slots(param, group):
    # torch: eta and mu are 0-dim float32 tensors (its default dtype)
    return {
        "eta": jnp.asarray(float(group["lr"]), jnp.float32),
        "mu": jnp.ones((), jnp.float32),
        "ax": jnp.zeros_like(param),
    }


def _asgd_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    lr, lambd = hparams["lr"], hparams["lambd"]
    alpha, t0 = hparams["alpha"], hparams["t0"]
    grad = coupled_gradient(param, grad, hparams, options)
    # torch creates eta at the first step, from the group's lr then
    eta = jnp.where(step == 1, lr.astype(jnp.float32), slots["eta"])
    eta_value = eta.astype(widest_float())  # _get_value(eta)
    param = mul(param, 1 - lambd * eta_value)
    param = add(param, grad, -eta_value)
    mu = slots["mu"]
    ax = slots["ax"]
    # ax.add_(param.sub(ax).mul_(mu)) if mu.item() != 1 else ax.copy_(param)
    # (mu: a float32 0-dim tensor, taken as float32 by 16-bit kernels)
    averaged = tensor_op(jnp.add, ax, mul(tensor_op(jnp.subtract, param, ax), mu))
    ax = jnp.where(mu != 1, averaged, param)
    # the next step's eta and mu, Python floats stored as float32
    if lr_dtype is None:
        new_eta = (lr / ((1 + lambd * lr * step) ** alpha)).astype(jnp.float32)
    else:
        new_eta = _tensor_lr_eta(lr.astype(lr_dtype), lambd, alpha, step)
    excess = step - t0
    new_mu = (1 / jnp.where(excess > 1, excess, 1.0)).astype(jnp.float32)
    return param, {"eta": new_eta, "mu": new_mu, "ax": ax}


def _tensor_lr_eta(lr, lambd, alpha, step):
    """`lr / ((1 + lambd * lr * step) ** alpha)` for a tensor `lr`: tensor
    ops in lr's dtype (float32: `**` is `powf`), stored as float32."""
    base = add_scalar(mul(mul(lr, lambd), step), 1.0)
    if base.dtype == jnp.float32:
        power = powf(base, alpha)
    else:
        power = base ** alpha.astype(base.dtype)
    return tensor_op(jnp.divide, lr, power).astype(jnp.float32)


@_validate.optimizer_factory
def asgd(
    lr: float = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Averaged SGD, as `torch.optim.ASGD`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda'\theta_{t-1} \\
    \theta_t &= \theta_{t-1}(1 - \lambda\eta_{t-1}) - \eta_{t-1} g_t \\
    \bar\theta_t &= \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1})
        \text{ if } \mu_{t-1} \ne 1 \text{ else } \theta_t \\
    \eta_t &= \operatorname{f32}\!\left(\frac{\gamma}
              {(1 + \lambda\gamma t)^{\alpha}}\right), \quad
    \mu_t = \operatorname{f32}\!\left(\frac{1}{\max(1, t - t_0)}\right)
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda$ = `lambd`,
    $\lambda'$ = `weight_decay` (coupled), $\eta_0 = \gamma$,
    $\mu_0 = 1$. `eta` and `mu` are float32 scalars in torch and are
    rounded to float32 here too. The averaged iterate $\bar\theta$
    (`ax`) is state only; the parameters are never replaced by it. This is
    torch's single-tensor algebra (its foreach path differs by rounding).

    `foreach`, `differentiable` and `capturable` are accepted; the
    result is torch's default CPU path, which is also what torch's
    `differentiable=True` gives, bit for bit
    (`benchmarks/results/flag_paths.md`; torch's `foreach` path rounds
    differently and is not reproduced). A tensor `lr` (an array, e.g.
    `np.float32(0.01)`) keeps its dtype: $\eta_t$ is computed in tensor
    ops in it, as in torch.
    State: `eta`, `mu` (float32 scalars) and `ax`; the step
    count is `state.step`.
    """
    lr_dtype = tensor_dtype(lr)
    return make_optimizer(
        name="ASGD",
        elementwise=True,
        # one rule per lr type (the constructor's; groups follow it)
        rule=_asgd_rule
        if lr_dtype is None
        else functools.partial(_asgd_rule, lr_dtype=lr_dtype),
        init_slots=_asgd_slots,
        hyperparams={
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
        },
        options={"maximize": maximize},
        validate=_validate_asgd,
        param_groups=param_groups,
        extra_defaults={
            "foreach": foreach,
            "differentiable": differentiable,
            "capturable": capturable,
        },
    )
