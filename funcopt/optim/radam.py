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
from . import _fused_native
from ._common import (
    adam_moments,
    check_foreach_differentiable,
    decoupled_weight_decay,
    float32_times_lr,
    group_rule,
    one_minus,
    powf,
    spread,
)


def _validate_radam(group: Mapping[str, Any]) -> None:
    _validate.check_adam_family(group)
    check_foreach_differentiable(group)


def _radam_slots(param, group):
    return {"exp_avg": jnp.zeros_like(param), "exp_avg_sq": jnp.zeros_like(param)}


def _radam_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if lr_dtype is not None:
        param, hparams = _tensor_lr_decay(param, hparams, options, lr_dtype)
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    param, moments = adam_moments(param, grad, slots, hparams, options)
    exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
    if options["capturable"] and options["foreach"]:
        update = _foreach_capturable_update(param, moments, step, hparams, lr_dtype)
        return update, moments
    if options["capturable"]:
        return _capturable_update(param, moments, step, hparams), moments
    # torch: Python-float scalar math on float(step)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bias_corrected_exp_avg = div(exp_avg, bias_correction1)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    # only used where rho_t > 5 (then rho_inf > rho_t > 5 and the root is
    # real); elsewhere the root of 1, whose derivative is no NaN that the
    # branch not taken would pass on (0 * NaN) to a gradient of the step
    ratio = (
        (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    )
    rect = jnp.where(rho_t > 5.0, ratio, 1.0) ** 0.5
    if options["foreach"]:
        update = _foreach_update(param, moments, step, rho_t, rect, hparams, lr_dtype)
        return update, moments
    # (bias_correction2**0.5) / tensor is Tensor.__rtruediv__: reciprocal() * scalar
    adaptive_lr = mul(
        reciprocal(add_scalar(sqrt(exp_avg_sq), eps)), bias_correction2**0.5
    )
    plain = mul(bias_corrected_exp_avg, lr)
    adapted = mul(tensor_op(jnp.multiply, plain, adaptive_lr), rect)
    new_param = add(param, jnp.where(rho_t > 5.0, adapted, plain), -1.0)
    return new_param, moments


# torch's default step: native where it applies, else `_radam_rule`
_radam_default_rule = _fused_native.with_kernel(_fused_native.radam(), _radam_rule)


def _capturable_update(param, moments, step, hparams):
    r"""torch's `capturable=True` step (`_single_tensor_radam`): the scalar
    math as 0-d float32 tensor ops on the float32 step, and the
    rectification chosen per element,

        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive_lr = bias_correction2**0.5 / (exp_avg_sq.sqrt() + eps)
        update = torch.where(rho_t > 5, rect * adaptive_lr, 1.0)
        param.add_(exp_avg / bias_correction1 * lr * update, alpha=-1)

    ($\rho_\infty$ a Python float; `where` takes 1 while $\rho_t \le 5$,
    where torch's `rect` can be NaN)."""
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
    step = jnp.asarray(step).astype(jnp.float32)
    bias_correction1 = one_minus(powf(beta1, step))
    bias_correction2 = one_minus(powf(beta2, step))
    rho_t, rect = _float32_rectification(step, beta2)
    denom = add_scalar(sqrt(exp_avg_sq), eps)
    root = spread(sqrt(bias_correction2), denom)
    adaptive_lr = tensor_op(lambda d, r: r / d, denom, root)
    rectified = tensor_op(jnp.multiply, adaptive_lr, spread(rect, denom))
    update = jnp.where(rho_t > 5.0, rectified, jnp.ones_like(rectified))
    step_size = mul(div(exp_avg, bias_correction1), lr)
    return add(param, tensor_op(jnp.multiply, step_size, update), -1.0)


def _float32_rectification(step, beta2):
    r"""$\rho_t$ and $r_t$ as torch's capturable steps compute them: 0-d
    float32 tensor ops on the float32 `step` ($\rho_\infty$ a Python
    float), the same ops in `_single_tensor_radam` and
    `_multi_tensor_radam` (the single-tensor `2 * step * p` here, the
    multi-tensor `p * step * 2` rounds alike: doubling is exact). $r_t$ is
    the root of 1 where $\rho_t \le 5$ (see `_radam_rule`)."""
    beta2_power = powf(beta2, step)
    rho_inf = 2 / (1 - beta2) - 1
    weighted = tensor_op(jnp.multiply, mul(step, 2.0), beta2_power)
    rho_t = add_scalar(
        -tensor_op(jnp.divide, weighted, one_minus(beta2_power)), rho_inf
    )
    numerator = mul(
        tensor_op(jnp.multiply, add_scalar(rho_t, -4.0), add_scalar(rho_t, -2.0)),
        rho_inf,
    )
    denominator = mul(rho_t, (rho_inf - 4) * (rho_inf - 2))
    ratio = tensor_op(jnp.divide, numerator, denominator)
    return rho_t, sqrt(jnp.where(rho_t > 5.0, ratio, jnp.ones_like(ratio)))


def _foreach_capturable_update(param, moments, step, hparams, lr_dtype):
    r"""torch's `foreach=True, capturable=True` step
    (`_multi_tensor_radam`): `_foreach_update`'s factor with its step sizes
    0-d float32 tensors, each op rounded to float32,

        rect = torch.where(rho_t > 5, r_t, 0.0)
        u = -(torch.where(rect > 0, 0.0, 1.0) * lr / (1 - beta1**step))
        s = -(sqrt(1 - beta2**step) * lr * rect) / (1 - beta1**step)

    (`rho_t`, `r_t`: `_float32_rectification`). `lr` meets the float32
    tensors as a float32 scalar (a Python float rounded to float32); a
    float64 tensor `lr` promotes the product, rounded once to float32.
    """
    f32 = jnp.float32
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]

    def times_lr(x):  # `_foreach_mul_(xs, lr)`
        return float32_times_lr(x, hparams["lr"], lr_dtype)

    step = jnp.asarray(step).astype(f32)
    rho_t, rect = _float32_rectification(step, beta2)
    rect = jnp.where(rho_t > 5.0, rect, jnp.zeros_like(rect))
    unrectified = jnp.where(rect > 0, 0.0, 1.0).astype(f32)
    bias_correction1 = one_minus(powf(beta1, step))
    unrect_step_size = -tensor_op(jnp.divide, times_lr(unrectified), bias_correction1)
    scale = tensor_op(jnp.multiply, times_lr(sqrt(one_minus(powf(beta2, step)))), rect)
    scale = tensor_op(jnp.divide, -scale, bias_correction1)
    return _factor_update(param, moments, scale, unrect_step_size, hparams["eps"])


def _tensor_lr_decay(param, hparams, options, lr_dtype):
    r"""`(param, hparams)` for a tensor `lr` (the single-tensor path's
    `param.mul_(1 - lr * weight_decay)` too).

    `lr` keeps its dtype (a float64 tensor's scalar math is Python-float
    math), and the decoupled decay
    $\theta \leftarrow \theta (1 - \gamma\lambda)$ is
    `_foreach_mul_(params, 1 - lr * weight_decay)` with a 0-d tensor: a
    tensor op in lr's dtype, read as its value by `mul` (not rounded to a
    16-bit param's dtype first, unlike a Python float's). It is applied
    here, and `weight_decay` is then 0 for `adam_moments`.
    """
    if lr_dtype != "float64":
        hparams = {**hparams, "lr": hparams["lr"].astype(lr_dtype)}
    if options["decoupled_weight_decay"]:
        weight_decay = hparams["weight_decay"]
        param = decoupled_weight_decay(param, hparams["lr"], weight_decay, options)
        hparams = {**hparams, "weight_decay": jnp.zeros_like(weight_decay)}
    return param, hparams


def _foreach_update(param, moments, step, rho_t, rect, hparams, lr_dtype=None):
    r"""torch's `_multi_tensor_radam` update: one per-element factor.

    `buffer = 1 / ((sqrt(v) + eps) / s) + u` with the Python floats
    `s = -sqrt(1 - beta2^t) * lr * r / (1 - beta1^t)` (`r = 0` while
    $\rho_t \le 5$, where `1 / (x / -0.0)` is `-0.0`) and
    `u = -lr / (1 - beta1^t)` while $\rho_t \le 5$, else 0; then
    `param.addcmul_(exp_avg, buffer)`.

    With a tensor `lr` (`lr_dtype`), `s` and `u` are 0-d tensors in lr's
    dtype, each product and quotient a tensor op, and `_foreach_div_`
    reads `s` as its value. Adding `u` is exact either way: the buffer is
    $\pm 0$ wherever $u \ne 0$ (where `s = -0.0`).
    """
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    rect = jnp.where(rho_t > 5, rect, 0.0)
    unrectified = jnp.where(rect > 0, 0.0, 1.0)
    bias_correction1 = 1 - beta1**step
    if lr_dtype is None:
        unrect_step_size = (lr * unrectified / bias_correction1) * -1
    else:
        unrect_step_size = mul(div(mul(lr, unrectified), bias_correction1), -1.0)
    root = (1 - beta2**step) ** 0.5
    if lr_dtype is None:
        scale = root * (lr * rect / bias_correction1) * -1
    else:
        scale = mul(mul(div(mul(lr, rect), bias_correction1), root), -1.0)
    return _factor_update(param, moments, scale, unrect_step_size, eps)


def _factor_update(param, moments, scale, unrect_step_size, eps):
    """`param.addcmul_(exp_avg, 1 / ((sqrt(exp_avg_sq) + eps) / s) + u)`,
    `_multi_tensor_radam`'s update for its step sizes `s` and `u` (Python
    floats, or 0-d tensors read as their values)."""
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

    On the CPU (one device, or each device's piece of a sharded param),
    for float32 and float64 params, the default step
    runs funcopt's native kernel (`funcopt.optim._fused_native`): torch's
    `_single_tensor_radam` op by op in C++, one pass over memory, torch's
    float32 bits without x64 wherever torch's `sqrt` (MKL's) is correctly
    rounded; elsewhere, and with `foreach=True`, the same formulas in JAX.

    `differentiable` is accepted; the result is torch's default CPU path,
    which is also what torch's `differentiable=True` and a float32 tensor
    `lr` give, bit for bit (`benchmarks/results/flag_paths.md`), except
    that a tensor `lr` makes the decoupled decay factor
    $1 - \gamma\lambda$ a tensor op in its dtype. `foreach=True` mirrors
    torch's `_multi_tensor_radam`: one
    factor $b_t = 1 / \bigl((\sqrt{v_t}+\epsilon) / s_t\bigr) + u_t$ with
    the Python floats $s_t = -\gamma r_t\sqrt{1-\beta_2^t}/(1-\beta_1^t)$
    ($r_t = 0$ while $\rho_t \le 5$) and $u_t = -\gamma/(1-\beta_1^t)$
    while $\rho_t \le 5$, else 0, then $\theta_t = \theta_{t-1} + m_t b_t$
    (and `_foreach_mul_` rounds its scalar to a 16-bit tensor's dtype
    first); with `differentiable=True` it raises a `ValueError` with
    torch's message (torch: an `AssertionError` at its first step).
    With a tensor `lr` (an array, e.g. `np.float32(0.02)`), `foreach=True`
    mirrors torch's 0-d tensor step sizes: $s_t$, $u_t$ and the decoupled
    decay factor $1 - \gamma\lambda$ are tensor ops in lr's dtype (a
    float64 one's are Python-float math), and `_foreach_div_` and
    `_foreach_mul_` read them as their values (float32 for a 16-bit param,
    not rounded to its dtype first).
    `capturable=True` (without `foreach`) is torch's capturable step: the
    scalar math as float32 0-d tensor ops on the float32 step and the
    rectification chosen per element by `torch.where` (torch runs it on
    accelerators only; tested against torch's own with its device check
    lifted). With `foreach=True` it is torch's `_multi_tensor_radam`
    capturable branch: the `foreach` factor above with $s_t$ and $u_t$
    float32 0-d tensor ops on the float32 step ($r_t$ 0 while
    $\rho_t \le 5$, `lr` rounded to float32, or read as its value if a
    tensor).
    State: `exp_avg`, `exp_avg_sq`; the step count is
    `state.step`.
    """
    return make_optimizer(
        name="RAdam",
        elementwise=True,
        # each group's rule from its own lr (a float or a tensor)
        rule=group_rule(_radam_default_rule, lr_dtype="lr"),
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
            "capturable": capturable,
        },
        validate=_validate_radam,
        param_groups=param_groups,
    )
