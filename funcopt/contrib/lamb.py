"""LAMB, mirroring `pytorch_optimizer.Lamb` (pytorch-optimizer 4.1.0)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, addcdiv, scalar
from ..optim._common import ema_of_square
from ._grouped import GroupStep, global_grad_scale, with_group_state
from ._pytorch_optimizer import validate_betas, validate_lr, validate_non_negative

CLAMP = 10.0  # Lamb.clamp: the weight norm's upper bound


@_validate.torch_checks("Lamb")
def _validate_lamb(group: Mapping[str, Any]) -> None:
    validate_lr(group["lr"])
    validate_betas(group["betas"])
    validate_non_negative(group["weight_decay"], "weight_decay")
    validate_non_negative(group["max_grad_norm"], "max_grad_norm")
    validate_non_negative(group["eps"], "eps")


def _lamb_slots(param, group):
    zero = jnp.zeros((), param.dtype)
    return {
        "exp_avg": jnp.zeros_like(param),
        "exp_avg_sq": jnp.zeros_like(param),
        "weight_norm": zero,
        "adam_norm": zero,
        "trust_ratio": zero,
    }


def _step_size(hparams, options, n_sma_threshold, degenerated_to_sgd):
    """`get_rectify_step_size` then `apply_adam_debias`: Python floats."""
    beta1, beta2, t, lr = (
        hparams["betas"][0],
        hparams["betas"][1],
        hparams["step"],
        hparams["lr"],
    )
    n_sma = jnp.zeros_like(lr)
    step_size = lr
    if options["rectify"]:
        n_sma_max = 2.0 / (1.0 - beta2) - 1.0
        beta2_t = beta2**t
        n_sma = n_sma_max - 2 * t * beta2_t / (1.0 - beta2_t)
        rt = jnp.sqrt(
            (1.0 - beta2_t)
            * (n_sma - 4)
            / (n_sma_max - 4)
            * (n_sma - 2)
            / n_sma
            * n_sma_max
            / (n_sma_max - 2)
        )
        rt = jnp.where(
            n_sma >= n_sma_threshold, rt, 1.0 if degenerated_to_sgd else -1.0
        )
        step_size = step_size * rt
    return step_size / (1.0 - beta1**t), n_sma


def _lamb_rule(param, grad, slots, step, hparams, options, *, maximize, **glob):
    # ``grad`` arrives already multiplied by the pre_norm factor
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    lr, wd, eps = hparams["lr"], hparams["weight_decay"], hparams["eps"]
    step_size, n_sma = _step_size(hparams, options, **glob)
    if maximize:
        grad = -grad
    beta3 = 1.0 - beta1 if options["grad_averaging"] else 1.0
    exp_avg = add(slots["exp_avg"] * scalar(beta1, grad), grad, beta3)
    exp_avg_sq = ema_of_square(slots["exp_avg_sq"], grad, beta2)
    if options["weight_decouple"]:
        factor = 1.0 - wd * (1.0 if options["fixed_decay"] else lr)
        param = jnp.where(wd != 0, param * scalar(factor, param), param)
    coupled = (not options["weight_decouple"]) & (wd > 0)
    de_nom = jnp.sqrt(exp_avg_sq) + scalar(eps, param)
    foreach = options["foreach"] is not False and not options["rectify"]
    if options["rectify"]:
        adaptive = n_sma >= glob["n_sma_threshold"]
        update = jnp.where(
            adaptive,
            addcdiv(param, exp_avg, de_nom, -step_size),
            add(param, exp_avg, -step_size),
        )
    elif foreach:  # reciprocal, then product
        update = (1 / de_nom) * exp_avg
        update = jnp.where(coupled, add(update, param, wd), update)
    else:
        update = exp_avg / de_nom
        update = jnp.where(coupled, add(update, param, wd), update)
    weight_norm = jnp.minimum(jnp.sqrt(jnp.sum(param * param)), CLAMP)
    p_norm = jnp.sqrt(jnp.sum(update * update))
    ok = (weight_norm != 0) & (p_norm != 0)
    trust = jnp.where(ok, weight_norm / (p_norm + scalar(eps, param)), 1)
    trust = trust.astype(param.dtype)
    applied = jnp.ones_like(trust) if options["adam"] else trust
    if options["rectify"]:
        alpha = -(scalar(step_size, param) * applied)
        new_param = jnp.where(
            adaptive,
            param + alpha * (exp_avg / de_nom),
            param + alpha * exp_avg,
        )
    elif foreach:
        new_param = add(param, update * applied, -step_size)
    else:
        new_param = param + (-(scalar(step_size, param) * applied)) * update
    new_slots = {
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
        "weight_norm": weight_norm,
        "adam_norm": p_norm,
        "trust_ratio": trust,
    }
    if options["rectify"]:
        # the reference returns after the moments and weight decay when its
        # step size is not positive: no update, no new norms
        skip = step_size <= 0
        new_param = jnp.where(skip, param, new_param)
        for k in ("weight_norm", "adam_norm", "trust_ratio"):
            new_slots[k] = jnp.where(skip, slots[k], new_slots[k])
    return new_param, new_slots


def _norm_stats(param, grad, slots, step, hparams, options):
    return {"norm": jnp.sqrt(jnp.sum(grad * grad))}


def _prepare(hparams, stats, *, pre_norm, max_grad_norm, eps):
    new = {**hparams, "step": hparams["step"] + 1}
    scale = global_grad_scale(stats, max_grad_norm, eps) if pre_norm else None
    return GroupStep(new, new, scale)


@_validate.optimizer_factory
def lamb(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = False,
    degenerated_to_sgd: bool = False,
    n_sma_threshold: int = 5,
    grad_averaging: bool = True,
    max_grad_norm: float = 1.0,
    adam: bool = False,
    pre_norm: bool = False,
    eps: float = 1e-6,
    foreach: bool | None = None,
    maximize: bool = False,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""LAMB (layer-wise adaptive moments), as `pytorch_optimizer.Lamb`.

    With $t$ the group's step, $g_k$ the gradient (times the
    global `pre_norm` factor, negated with `maximize`) and
    $\beta_3 = 1-\beta_1$ (1 without `grad_averaging`):

    $$
    \begin{aligned}
    m_k &= \beta_1 m_{k-1} + \beta_3 g_k, \quad
    v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2 \\
    \theta &\leftarrow \theta(1 - \lambda\gamma)
        \text{ (decoupled; } 1-\lambda \text{ with fixed\_decay)} \\
    u_k &= m_k/(\sqrt{v_k}+\epsilon) \;(+\lambda\theta \text{ coupled}) \\
    r_k &= \frac{\min(\|\theta\|, 10)}{\|u_k\| + \epsilon}
        \text{ (1 if a norm is 0, or with adam=True)} \\
    \theta_k &= \theta - \frac{\gamma}{1-\beta_1^t}\, r_k u_k
    \end{aligned}
    $$

    With `rectify` the step size takes RAdam's rectification and, above
    `n_sma_threshold`, $u_k = \theta - s\,m_k/(\sqrt{v_k}+\epsilon)$
    (the reference's rectified update includes $\theta$ in the trust
    ratio's norm), below it $\theta - s\,m_k$ with
    `degenerated_to_sgd` or no step. As in the reference the step size is
    divided by $1-\beta_1^t$ (`adam_debias` off). `foreach`
    chooses the reference's rounding: its default batched path (unless
    `rectify` or `foreach=False`) multiplies by a reciprocal. `maximize`,
    `pre_norm`, `degenerated_to_sgd`, `n_sma_threshold` and the
    `pre_norm` clip's `max_grad_norm`/`eps` are optimizer-wide in the
    reference, so they cannot differ per param group. The reference's
    `**kwargs` extras (`adanorm`, `adam_debias`) are not supported;
    complex parameters are not supported. State: `exp_avg`, `exp_avg_sq`
    and the last `weight_norm`, `adam_norm`, `trust_ratio`; the group's
    `step` is a hyperparameter.
    """
    _validate_lamb(
        dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            eps=eps,
        )
    )
    inner = make_optimizer(
        name="Lamb",
        rule=functools.partial(
            _lamb_rule,
            maximize=maximize,
            n_sma_threshold=n_sma_threshold,
            degenerated_to_sgd=degenerated_to_sgd,
        ),
        init_slots=_lamb_slots,
        hyperparams={
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "eps": eps,
            "step": 0,
        },
        options={
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "rectify": rectify,
            "grad_averaging": grad_averaging,
            "adam": adam,
            "foreach": foreach,
        },
        validate=_validate_lamb,
        param_groups=param_groups,
        supports_complex=False,
        extra_defaults={
            "degenerated_to_sgd": degenerated_to_sgd,
            "n_sma_threshold": n_sma_threshold,
            "pre_norm": pre_norm,
            "maximize": maximize,
        },
    )
    prepare = functools.partial(
        _prepare, pre_norm=pre_norm, max_grad_norm=max_grad_norm, eps=eps
    )
    needs_norm = pre_norm and max_grad_norm != 0.0
    return with_group_state(
        inner, prepare, leaf_stats=_norm_stats if needs_norm else None
    )
