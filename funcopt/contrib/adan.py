"""Adan, mirroring `pytorch_optimizer.Adan` (pytorch-optimizer 4.1.0)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, addcdiv, addcmul, lerp, scalar
from ._grouped import GroupStep, global_grad_scale, with_group_state
from ._pytorch_optimizer import validate_betas, validate_lr, validate_non_negative


@_validate.torch_checks("Adan")
def _validate_adan(group: Mapping[str, Any]) -> None:
    validate_lr(group["lr"])
    validate_betas(group["betas"])
    validate_non_negative(group["weight_decay"], "weight_decay")
    validate_non_negative(group["eps"], "eps")


def _adan_slots(param, group):
    zeros = jnp.zeros_like(param)
    return {
        "exp_avg": zeros,
        "exp_avg_sq": zeros,
        "exp_avg_diff": zeros,
        "previous_grad": zeros,
    }


def _adan_rule(param, grad, slots, step, hparams, options, *, maximize):
    # ``grad`` arrives already multiplied by the global clip factor
    beta1, beta2, beta3 = (hparams["betas"][i] for i in range(3))
    lr, wd, t = hparams["lr"], hparams["weight_decay"], hparams["step"]
    # the reference seeds previous_grad with -(clip * raw gradient) before
    # maximize negates it, so a maximizing first step sees -2 * grad
    previous = jnp.where(step == 1, -grad, slots["previous_grad"])
    if maximize:
        grad = -grad
    grad_diff = previous + grad
    exp_avg = lerp(slots["exp_avg"], grad, 1.0 - beta1)
    exp_avg_diff = lerp(slots["exp_avg_diff"], grad_diff, 1.0 - beta2)
    grad_diff = add(grad_diff * scalar(beta2, grad_diff), grad, 1.0)
    exp_avg_sq = addcmul(
        slots["exp_avg_sq"] * scalar(beta3, grad), grad_diff, grad_diff, 1.0 - beta3
    )
    # Python floats: 1 - beta ** step, math.sqrt
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    bias_correction3_sq = jnp.sqrt(1.0 - beta3**t)
    de_nom = jnp.sqrt(exp_avg_sq) / scalar(bias_correction3_sq, param) + scalar(
        hparams["eps"], param
    )
    if options["weight_decouple"]:
        param = jnp.where(wd != 0, param * scalar(1.0 - lr * wd, param), param)
    param = addcdiv(param, exp_avg, de_nom, -lr / bias_correction1)
    param = addcdiv(param, exp_avg_diff, de_nom, -lr * beta2 / bias_correction2)
    if not options["weight_decouple"]:
        param = jnp.where(wd != 0, param / scalar(1.0 + lr * wd, param), param)
    return param, {
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
        "exp_avg_diff": exp_avg_diff,
        "previous_grad": -grad,
    }


def _norm_stats(param, grad, slots, step, hparams, options):
    return {"norm": jnp.sqrt(jnp.sum(grad * grad))}


def _prepare(hparams, stats, *, max_grad_norm, eps):
    new = {**hparams, "step": hparams["step"] + 1}
    return GroupStep(new, new, global_grad_scale(stats, max_grad_norm, eps))


@_validate.optimizer_factory
def adan(
    lr: float = 1e-3,
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
    weight_decay: float = 0.0,
    weight_decouple: bool = False,
    max_grad_norm: float = 0.0,
    foreach: bool | None = None,
    eps: float = 1e-8,
    maximize: bool = False,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Adan (adaptive Nesterov momentum), as `pytorch_optimizer.Adan`.

    With $c$ the global clip factor (1 unless `max_grad_norm` > 0),
    $g_k \leftarrow \pm c\,g_k$, $t$ the group's step and
    $\Delta_k = g_k - g_{k-1}$ (0 on a parameter's first step):

    $$
    \begin{aligned}
    m_k &= \operatorname{lerp}(m_{k-1}, g_k, 1-\beta_1) \\
    d_k &= \operatorname{lerp}(d_{k-1}, \Delta_k, 1-\beta_2) \\
    n_k &= \beta_3 n_{k-1} + (1-\beta_3)(g_k + \beta_2\Delta_k)^2 \\
    \rho_k &= \sqrt{n_k}/\sqrt{1-\beta_3^t} + \epsilon \\
    \theta_k &= \Big(\theta_{k-1}(1-\gamma\lambda)^{[\text{decouple}]}
        - \frac{\gamma}{1-\beta_1^t}\frac{m_k}{\rho_k}
        - \frac{\gamma\beta_2}{1-\beta_2^t}\frac{d_k}{\rho_k}\Big)
        \big/ (1+\gamma\lambda)^{[\text{not decouple}]}
    \end{aligned}
    $$

    The clip factor is pytorch-optimizer's
    `clamp(max_grad_norm / (||g||_2 + eps), max=1)` over every gradient of
    every group, in float32 as the reference computes it. `maximize`,
    `max_grad_norm` and the clip's `eps` are optimizer-wide in the
    reference (its `self.` attributes and `defaults`), so they cannot
    differ per param group here. `foreach` is accepted and ignored (both
    reference paths round alike). The reference's `**kwargs` extras
    (`use_gc`, `adanorm`) are not supported. Complex parameters are not
    supported. State: `exp_avg`, `exp_avg_sq`, `exp_avg_diff`,
    `previous_grad`; the group's `step` is a hyperparameter.
    """
    _validate_adan(dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=1.0))
    validate_non_negative(max_grad_norm, "max_grad_norm")
    validate_non_negative(eps, "eps")
    inner = make_optimizer(
        name="Adan",
        rule=functools.partial(_adan_rule, maximize=maximize),
        init_slots=_adan_slots,
        hyperparams={
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "eps": eps,
            "step": 0,
        },
        # foreach is per group in the reference; both of its paths round alike
        options={"weight_decouple": weight_decouple, "foreach": foreach},
        validate=_validate_adan,
        param_groups=param_groups,
        supports_complex=False,
        extra_defaults={
            "max_grad_norm": max_grad_norm,
            "maximize": maximize,
        },
    )
    prepare = functools.partial(_prepare, max_grad_norm=max_grad_norm, eps=eps)
    return with_group_state(
        inner, prepare, leaf_stats=_norm_stats if max_grad_norm != 0.0 else None
    )
