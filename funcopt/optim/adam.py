"""Adam and AdamW, mirroring `torch.optim.Adam` and `torch.optim.AdamW`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import (
    add_scalar,
    addcdiv,
    div,
    reciprocal,
    sqrt,
    sqrt_nonnegative,
)
from ._common import adam_moments, powf, tensor_dtype


def _validate_adam(group: Mapping[str, Any], foreach: Any = None) -> None:
    capturable = group["capturable"]
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


def _adam_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if lr_dtype is not None:
        # a tensor lr: torch's scalar math with it runs in its dtype
        hparams = {**hparams, "lr": hparams["lr"].astype(lr_dtype)}
    param, new_slots = adam_moments(param, grad, slots, hparams, options)
    if options["amsgrad"]:
        # the max is over the raw second moment, bias-corrected afterwards
        second = jnp.maximum(slots["max_exp_avg_sq"], new_slots["exp_avg_sq"])
        new_slots["max_exp_avg_sq"] = second
    else:
        second = new_slots["exp_avg_sq"]
    update = (
        _tensor_scalar_update
        if options["differentiable"] or options["capturable"]
        else _float_scalar_update
    )
    param = update(
        param, new_slots["exp_avg"], second, step, hparams, lr_dtype is not None
    )
    return param, new_slots


def _float_scalar_update(param, exp_avg, second, step, hparams, tensor_lr):
    """torch's default path: Python-float scalar math on `float(step)`."""
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = jnp.sqrt(1 - beta2**step)
    if tensor_lr:  # `lr / bias_correction1`, a tensor op in lr's dtype
        step_size = div(lr, bias_correction1)
    else:
        step_size = lr / bias_correction1
    # (v.sqrt() / bias_correction2_sqrt).add_(eps): three ops, each rounded
    denom = add_scalar(div(sqrt_nonnegative(second), bias_correction2_sqrt), eps)
    return addcdiv(param, exp_avg, denom, -step_size)


def _tensor_scalar_update(param, exp_avg, second, step, hparams, tensor_lr):
    """torch's `capturable or differentiable` path.

    The step is a 0-d tensor of torch's default dtype (float32), so every
    scalar is a float32 tensor op, arranged as torch does:
    `denom = (v.sqrt() / (bc2_sqrt * step_size_neg)).add_(eps / step_size_neg)`
    and `param.addcdiv_(exp_avg, denom)`; `python_float / tensor` is
    `tensor.reciprocal() * python_float`, a Python float meets a float32
    tensor as float32.
    """
    f32 = jnp.float32
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    bias_correction1 = 1 - powf(beta1, step)
    bias_correction2 = 1 - powf(beta2, step)
    if tensor_lr:  # tensor / tensor, in the wider of the two dtypes
        wide = jnp.promote_types(lr.dtype, f32)
        step_size = lr.astype(wide) / bias_correction1.astype(wide)
    else:
        step_size = reciprocal(bias_correction1) * lr.astype(f32)
    step_size_neg = -step_size
    bias_correction2_sqrt = sqrt(bias_correction2)
    denom = add_scalar(
        div(sqrt_nonnegative(second), bias_correction2_sqrt * step_size_neg),
        reciprocal(step_size_neg) * eps.astype(step_size_neg.dtype),
    )
    return addcdiv(param, exp_avg, denom, 1)


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

    `differentiable=True` (and `capturable=True`, which takes the same
    branch in torch) mirrors torch's tensor-scalar path: the step is a
    0-d tensor of torch's default dtype, float32 (as `mu_product` in
    [`nadam`][funcopt.optim.nadam.nadam]), so the scalars are float32
    tensor ops, whatever the params' dtype, arranged as torch does,

    $$
    s_t = -\gamma\,\frac{1}{1-\beta_1^t}, \qquad
    \theta_t = \theta_{t-1} + \frac{m_t}{\sqrt{\hat v_t} /
           \bigl(\sqrt{1-\beta_2^t}\, s_t\bigr) + \epsilon / s_t},
    $$

    which rounds differently from the default path (measured in
    `benchmarks/results/flag_paths.md`). $\beta^t$ is glibc's `powf`,
    mirrored as the float64 power rounded to float32 (with x64; `powf`
    itself misrounds about one step in a few hundred to a few thousand).
    A tensor `lr` (an array given as `lr`, e.g. `np.float32(1e-3)`) keeps
    its dtype: $\gamma/(1-\beta_1^t)$ and AdamW's `1 - lr * weight_decay`
    are tensor ops in it, as in torch. torch refuses `capturable=True`
    for CPU params outside `torch.compile`; funcopt takes it as the same
    path as `differentiable` (torch's CUDA path). `foreach` and `fused`
    are accepted and ignored: the result is torch's default CPU path
    (torch's fused kernel rounds differently). State: `exp_avg`,
    `exp_avg_sq` and, with `amsgrad`, `max_exp_avg_sq`; the step count is
    `state.step`.
    """
    opt = _adam_family(
        "Adam",
        dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
        dict(
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            capturable=capturable,
            differentiable=differentiable,
        ),
        dict(foreach=foreach, fused=fused),
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
    `foreach`, `fused`, `capturable` and `differentiable` act as in
    [`adam`][funcopt.optim.adam.adam].
    """
    opt = _adam_family(
        "AdamW",
        dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
        dict(
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
            capturable=capturable,
            differentiable=differentiable,
        ),
        dict(foreach=foreach, fused=fused),
        param_groups,
    )
    _validate.check_fused(
        {"fused": fused, "foreach": foreach, "differentiable": differentiable}
    )
    return opt


def _adam_family(name, hyperparams, options, extra_defaults, param_groups):
    lr_dtype = tensor_dtype(hyperparams["lr"])
    return make_optimizer(
        name=name,
        elementwise=True,
        # one rule per lr type (the constructor's; groups follow it)
        rule=_adam_rule
        if lr_dtype is None
        else functools.partial(_adam_rule, lr_dtype=lr_dtype),
        init_slots=_adam_slots,
        hyperparams=hyperparams,
        options=options,
        validate=functools.partial(_validate_adam, foreach=extra_defaults["foreach"]),
        param_groups=param_groups,
        extra_defaults=extra_defaults,
    )
