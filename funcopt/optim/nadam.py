"""NAdam, mirroring `torch.optim.NAdam`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.dtypes import canonicalize_dtype

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import (
    _wide32,
    add_scalar,
    addcdiv,
    addcmul,
    div,
    mul,
    opmath,
    reciprocal,
    round_float32,
    sqrt,
    tensor_op,
    widest_float,
)
from . import _fused_native
from ._common import (
    adam_moments,
    check_foreach_differentiable,
    computes_in_float32,
    float32_times_lr,
    group_rule,
    one_minus,
    powf,
    spread,
    weight_decayed,
    write_buffers_first,
    zero_d_op,
)


def _validate_nadam(group: Mapping[str, Any]) -> None:
    _validate.check_adam_family(group)
    _validate.check_at_least_zero(group["momentum_decay"], "momentum_decay value")
    check_foreach_differentiable(group)


def _nadam_slots(param, group):
    return {
        # torch: a 0-dim float32 tensor (its default dtype), rounded every step
        "mu_product": jnp.ones((), jnp.float32),
        "exp_avg": jnp.zeros_like(param),
        "exp_avg_sq": jnp.zeros_like(param),
    }


def _nadam_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if lr_dtype is not None:
        # a tensor lr: torch's scalar math with it runs in its dtype (a
        # float64 one's in float32 without x64)
        lr = hparams["lr"].astype(canonicalize_dtype(lr_dtype))
        hparams = {**hparams, "lr": lr}
    if options["capturable"] and options["foreach"]:
        return _foreach_capturable_step(
            param, grad, slots, step, hparams, options, lr_dtype
        )
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    momentum_decay = hparams["momentum_decay"]
    # torch's capturable step: its scalar math on the float32 step tensor
    capturable = options["capturable"] and not options["foreach"]
    if capturable:
        step = jnp.asarray(step).astype(jnp.float32)
        mu = _tensor_mu(mul(step, momentum_decay), beta1)
        mu_next = _tensor_mu(mul(add_scalar(step, 1.0), momentum_decay), beta1)
    else:  # the momentum cache mu_t and mu_{t+1}, Python-float math
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = _times_mu(slots["mu_product"], mu)
    _, moments = adam_moments(param, grad, slots, hparams, options)
    # the param's pass reads the new moments and recomputes the decayed
    # gradient (no full-size temporary for it)
    moments, param, grad = write_buffers_first(moments, param, grad)
    param, grad = weight_decayed(param, grad, hparams, options)
    denom = add_scalar(
        _bias_corrected_root(moments["exp_avg_sq"], step, beta2, options), eps
    )
    if options["differentiable"] or capturable:
        coefficients = _tensor_mu_coefficients if capturable else _tensor_coefficients
        grad_scale, exp_avg_scale = coefficients(
            mu_product, mu, mu_next, lr, lr_dtype is not None
        )
        param = addcdiv(param, mul(grad, grad_scale), denom, 1)
        param = addcdiv(param, mul(moments["exp_avg"], exp_avg_scale), denom, 1)
        return param, {"mu_product": mu_product, **moments}
    # _get_value(mu_product): the float32 value read back as a Python float
    mu_product_value = mu_product.astype(widest_float())
    mu_product_next = mu_product_value * mu_next
    if lr_dtype is not None and options["foreach"]:
        # foreach: the step sizes read a tensor lr as a Python float
        # (`_get_value(lr)`); its weight decay factor stays tensor math
        lr = lr.astype(widest_float())
        grad_value = -lr * (1.0 - mu) / (1.0 - mu_product_value)
        exp_avg_value = (-lr * mu_next) / (1.0 - mu_product_next)
    elif lr_dtype is not None:  # `-lr * c / d`: tensor ops in lr's dtype
        # mu_product read through its bits (`opmath`): XLA would otherwise
        # fuse its float32 product into `1 - mu_product` (one rounding)
        exact_value = opmath(mu_product).astype(widest_float())
        grad_value = div(mul(-lr, 1.0 - mu), 1.0 - exact_value)
        exp_avg_value = div(mul(-lr, mu_next), 1.0 - exact_value * mu_next)
    else:
        grad_value = -lr * (1.0 - mu) / (1.0 - mu_product_value)
        exp_avg_value = (-lr * mu_next) / (1.0 - mu_product_next)
    param = addcdiv(param, grad, denom, grad_value)
    param = addcdiv(param, moments["exp_avg"], denom, exp_avg_value)
    return param, {"mu_product": mu_product, **moments}


def _foreach_capturable_step(param, grad, slots, step, hparams, options, lr_dtype):
    r"""torch's `foreach=True, capturable=True` step (`_multi_tensor_nadam`):
    the `foreach` moments, and every scalar a 0-d float32 tensor op on the
    float32 step, each rounded to float32 (`lr` as `float32_times_lr`),

        mu = beta1 * (1 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** (step * psi + psi))
        mu_product *= mu
        denom = sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps
        a = (mu - 1) * lr / (1 - mu_product)
        b = mu_next * lr / (mu_product * mu_next - 1)
        param.addcdiv_(a * grad + b * exp_avg, denom)

    (one `addcdiv`, where the other steps take two).
    """
    eps, beta1, beta2 = hparams["eps"], hparams["betas"][0], hparams["betas"][1]
    momentum_decay = hparams["momentum_decay"]
    step = jnp.asarray(step).astype(jnp.float32)
    exponent = mul(step, momentum_decay)
    mu = _tensor_mu(exponent, beta1)
    mu_next = _tensor_mu(add_scalar(exponent, momentum_decay), beta1)
    mu_product = _times_mu(slots["mu_product"], mu)
    _, moments = adam_moments(param, grad, slots, hparams, options)
    moments, param, grad = write_buffers_first(moments, param, grad)
    param, grad = weight_decayed(param, grad, hparams, options)
    root = sqrt(one_minus(powf(beta2, step)))
    denom = add_scalar(div(sqrt(moments["exp_avg_sq"]), root), eps)
    grad_scale = tensor_op(
        jnp.divide,
        float32_times_lr(add_scalar(mu, -1.0), hparams["lr"], lr_dtype),
        -add_scalar(mu_product, -1.0),
    )
    exp_avg_scale = tensor_op(
        jnp.divide,
        float32_times_lr(mu_next, hparams["lr"], lr_dtype),
        add_scalar(tensor_op(jnp.multiply, mu_product, mu_next), -1.0),
    )
    # `numerator.addcmul_(b, exp_avg)`, `param.addcdiv_(numerator, denom)`:
    # in the numerator's dtype (float32 for a 0-d 16-bit param, whose
    # operands are all 0-d: torch promotes them)
    numerator = _scalar_times(grad_scale, grad)
    wide = numerator.dtype
    exp_avg = moments["exp_avg"].astype(wide)
    numerator = addcmul(numerator, exp_avg, spread(exp_avg_scale, numerator), 1.0)
    new_param = addcdiv(param.astype(wide), numerator, denom.astype(wide), 1.0)
    param = new_param.astype(param.dtype)
    return param, {"mu_product": mu_product, **moments}


def _scalar_times(s, x):
    """torch's `s.mul(x)` (`_foreach_mul(scalars, xs)`) for a 0-d float32
    tensor `s`: with dimensions, `x`'s dtype (`s` cast to it first, a 16-bit
    one too); a 0-d 16-bit `x` promotes to float32 (two 0-d operands)."""
    if computes_in_float32(x):
        return s * x.astype(jnp.float32)
    return tensor_op(jnp.multiply, spread(s, x), x)


def _tensor_mu_coefficients(mu_product, mu, mu_next, lr, tensor_lr):
    """`_tensor_coefficients` in the `capturable` step, where `mu` and
    `mu_next` are float32 tensors too: every product and quotient a tensor
    op."""
    mu_product_next = tensor_op(jnp.multiply, mu_product, mu_next)
    one_minus_product = one_minus(mu_product)
    one_minus_next = one_minus(mu_product_next)
    if tensor_lr:
        grad_numerator = zero_d_op(jnp.multiply, -lr, one_minus(mu))
        exp_avg_numerator = zero_d_op(jnp.multiply, -lr, mu_next)
        return (
            zero_d_op(jnp.divide, grad_numerator, one_minus_product),
            zero_d_op(jnp.divide, exp_avg_numerator, one_minus_next),
        )
    return (
        tensor_op(jnp.divide, mul(one_minus(mu), -lr), one_minus_product),
        tensor_op(jnp.divide, mul(mu_next, -lr), one_minus_next),
    )


# torch's default step: native where it applies, else `_nadam_rule`
_nadam_default_rule = _fused_native.with_kernel(_fused_native.nadam(), _nadam_rule)


def _times_mu(mu_product, mu):
    r"""torch's `mu_product *= mu`, in place on the float32 0-dim tensor:
    `mu` rounded to float32, the product rounded once.

    $\Pi_t$ decays geometrically and reaches float32's subnormal range
    (below $2^{-126}$; step 197 with `betas[0]=0.8`,
    `momentum_decay=0.3`), where torch's CPU kernels keep subnormal
    results and XLA's CPU backend flushes them to zero (in a multiply and
    in a conversion alike). With x64 the product is exact in float64 and
    rounded by `round_float32`, which keeps them; the stored value was
    read back through its bits (`_wide32`). The update itself does not
    move: $1 - \Pi_t$ is 1 either way.
    """
    mu32 = mu.astype(jnp.float32)
    if widest_float() != jnp.float64:
        return mu_product * mu32
    return round_float32(_wide32(mu_product) * _wide32(mu32))


def _bias_corrected_root(exp_avg_sq, step, beta2, options):
    r"""$\sqrt{v_t / (1-\beta_2^t)}$ in torch's op order.

    Single-tensor: `exp_avg_sq.div(bias_correction2).sqrt()`; foreach:
    `_foreach_sqrt(exp_avg_sqs)` divided by the Python float
    `(1 - beta2**step) ** 0.5`.
    """
    if options["foreach"]:
        return div(sqrt(exp_avg_sq), (1 - beta2**step) ** 0.5)
    if options["capturable"]:  # a 0-d float32 tensor (`capturable` step)
        return sqrt(div(exp_avg_sq, one_minus(powf(beta2, step))))
    return sqrt(div(exp_avg_sq, 1 - beta2**step))


def _tensor_mu(exponent, beta1) -> jax.Array:
    """torch's capturable `beta1 * (1.0 - 0.5 * (0.96 ** exponent))` for a
    float32 tensor `exponent` (`step * momentum_decay`; `(step + 1) *
    momentum_decay` or, foreach, `step * momentum_decay + momentum_decay`
    for the next): float32 tensor ops (foreach's `* -0.5`, `+ 1` round as
    `1 - 0.5 * p`)."""
    power = powf(0.96, exponent)
    return mul(one_minus(mul(power, 0.5)), beta1)


def _tensor_coefficients(mu_product, mu, mu_next, lr, tensor_lr):
    """torch's `differentiable` path: `mu_product` stays a 0-d float32 tensor.

    The coefficients of `grad` and `exp_avg`,
    `-lr * (1 - mu) / (1 - mu_product)` and
    `-lr * mu_next / (1 - mu_product * mu_next)`, are float32 tensor ops
    (`python_float / tensor` is `tensor.reciprocal() * python_float`; with a
    tensor `lr`, `tensor / tensor`); torch multiplies the two terms by them
    before its two `addcdiv_(term, denom)`.
    """
    # torch's float32 ops one by one, each rounded (`1.0 - t` as `-t + 1.0`):
    # the helpers keep XLA from fusing `1 - a*b` into one rounding
    mu_product_next = mul(mu_product, mu_next)
    one_minus = add_scalar(-mu_product, 1.0)
    one_minus_next = add_scalar(-mu_product_next, 1.0)
    if tensor_lr:
        return (
            tensor_op(jnp.divide, mul(-lr, 1.0 - mu), one_minus),
            tensor_op(jnp.divide, mul(-lr, mu_next), one_minus_next),
        )
    return (
        mul(reciprocal(one_minus), -lr * (1.0 - mu)),
        mul(reciprocal(one_minus_next), -lr * mu_next),
    )


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

    On the CPU (one device, or each device's piece of a sharded param),
    for float32 and float64 params, the default step
    runs funcopt's native kernel (`funcopt.optim._fused_native`): torch's
    `_single_tensor_nadam` op by op in C++, one pass over memory, $\Pi$
    multiplied in float32 with subnormals kept, torch's float32 bits
    without x64 wherever torch's `sqrt` (MKL's) is correctly rounded;
    elsewhere, and with `foreach=True`, `differentiable=True`,
    `capturable=True` or a tensor `lr`, the same formulas in JAX.

    `differentiable=True` mirrors torch's tensor path: $\Pi$ stays a
    float32 scalar in the update, whose two coefficients
    $-\gamma(1-\mu_t)/(1-\Pi_t)$ and $-\gamma\mu_{t+1}/(1-\Pi_t\mu_{t+1})$
    are float32 (each op rounded) and multiply $g_t$ and $m_t$ before the
    two `addcdiv` steps. A tensor `lr` (an array, e.g. `np.float32(2e-3)`)
    keeps its dtype: both coefficients are tensor ops in it, as in torch;
    each param group follows its own `lr` (a float, or a tensor of its own
    dtype). A tensor `weight_decay` keeps its dtype in the decoupled decay
    $1 - \gamma\lambda$ (tensor math in the promoted dtype of the tensors
    among `lr` and `weight_decay`); coupled decay reads its value.
    `foreach=True` mirrors torch's `_multi_tensor_nadam`:
    $d_t = \sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon$ (the root of
    the Python float), and `_foreach_mul_` rounds its scalar to a 16-bit
    tensor's dtype first ($v_t$'s decay, decoupled weight decay); a tensor
    `lr` then enters the step sizes as a Python float. It refuses
    `differentiable=True` with a `ValueError` with torch's message (torch:
    an `AssertionError` at its first step). `capturable=True` (without
    `foreach`) is torch's capturable step: the differentiable path with
    $\mu_t$, $\mu_{t+1}$ and $1-\beta_2^t$ float32 tensor ops on the
    float32 step (torch runs it on accelerators only; tested against
    torch's own with its device check lifted). With `foreach=True` it is
    torch's `_multi_tensor_nadam` capturable branch: the `foreach`
    denominator with a float32 $\sqrt{1-\beta_2^t}$, and one update
    $\theta_t = \theta_{t-1} + (a_t g_t + b_t m_t) / d_t$ with
    $a_t = (\mu_t - 1)\gamma / (1 - \Pi_t)$ and
    $b_t = \mu_{t+1}\gamma / (\Pi_t\mu_{t+1} - 1)$ float32 tensor ops
    ($\mu_{t+1}$'s exponent $t\psi + \psi$). State:
    `mu_product` (a float32 scalar), `exp_avg`, `exp_avg_sq`; the step
    count is `state.step`.
    """
    return make_optimizer(
        name="NAdam",
        elementwise=True,
        # each group's rule from its own lr (a float or a tensor)
        rule=group_rule(_nadam_default_rule, lr_dtype="lr"),
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
            "differentiable": differentiable,
            "capturable": capturable,
            # torch's `_multi_tensor_nadam` (foreach=None on CPU: single-tensor)
            "foreach": foreach,
        },
        validate=_validate_nadam,
        param_groups=param_groups,
    )
