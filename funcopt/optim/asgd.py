"""ASGD, mirroring `torch.optim.ASGD`."""

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
    mul,
    reciprocal,
    tensor_op,
    widest_float,
)
from . import _fused_native
from ._common import (
    apply_maximize,
    check_foreach_differentiable,
    computes_in_float32,
    coupled_gradient,
    float32_times_lr,
    group_rule,
    pow_scalar,
    spread,
)


def _validate_asgd(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_at_least_zero(group["lr"], "learning rate")
    _validate.check_at_least_zero(group["weight_decay"], "weight_decay value")
    check_foreach_differentiable(group)


def _asgd_slots(param, group):
    # torch: eta and mu are 0-dim float32 tensors (its default dtype)
    return {
        "eta": jnp.asarray(float(group["lr"]), jnp.float32),
        "mu": jnp.ones((), jnp.float32),
        "ax": jnp.zeros_like(param),
    }


def _asgd_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if options["foreach"]:
        return _foreach_asgd_rule(param, grad, slots, step, hparams, options, lr_dtype)
    if options["capturable"]:
        return _capturable_asgd_rule(
            param, grad, slots, step, hparams, options, lr_dtype
        )
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


# torch's default step: native where it applies, else `_asgd_rule`
_asgd_default_rule = _fused_native.with_kernel(_fused_native.asgd(), _asgd_rule)


def _capturable_asgd_rule(param, grad, slots, step, hparams, options, lr_dtype):
    """torch's `capturable=True` step (`_single_tensor_asgd`): `eta` and
    `mu` stay 0-d float32 tensors, the next ones float32 tensor ops on the
    float32 step, and `ax` is always averaged,

        param.mul_(1 - lambd * eta)
        param.addcmul_(grad, eta, value=-1)
        ax.add_(param.sub(ax).mul_(mu))
        eta.copy_(lr / ((1 + lambd * lr * step) ** alpha))
        mu.copy_(1 / torch.maximum(step - t0, torch.ones_like(step)))
    """
    lr, lambd = hparams["lr"], hparams["lambd"]
    alpha, t0 = hparams["alpha"], hparams["t0"]
    grad = coupled_gradient(param, grad, hparams, options)
    eta = jnp.where(step == 1, lr.astype(jnp.float32), slots["eta"])
    param = mul(param, add_scalar(-mul(eta, lambd), 1.0))
    param = _addcmul_scalar_tensor(param, grad, eta, -1.0)
    ax = slots["ax"]
    ax = tensor_op(jnp.add, ax, mul(tensor_op(jnp.subtract, param, ax), slots["mu"]))
    new_eta = _float32_step_eta(lr, lambd, alpha, step, lr_dtype)
    return param, {"eta": new_eta, "mu": _float32_step_mu(step, t0), "ax": ax}


def _float32_step_mu(step, t0):
    """`1 / max(step - t0, 1)` in float32 tensor ops on torch's float32
    step (the capturable steps')."""
    step32 = jnp.asarray(step).astype(jnp.float32)
    return reciprocal(jnp.maximum(add_scalar(step32, -t0), 1.0))


def _float32_step_eta(lr, lambd, alpha, step, lr_dtype):
    """`lr / ((1 + lambd * lr * step) ** alpha)` with `step` torch's float32
    step tensor: `(lambd * lr)` a Python float, then float32 tensor ops
    (`python_float / tensor` as `tensor.reciprocal() * python_float`); a
    tensor `lr`'s in its dtype (`_tensor_lr_eta`)."""
    if lr_dtype is not None:
        return _tensor_lr_eta(lr.astype(lr_dtype), lambd, alpha, step)
    step32 = jnp.asarray(step).astype(jnp.float32)
    power = pow_scalar(add_scalar(mul(step32, lambd * lr), 1.0), alpha)
    return mul(reciprocal(power), lr)


def _foreach_capturable_eta(lr, lambd, alpha, step, lr_dtype):
    """`_multi_tensor_asgd`'s capturable `eta`: `((step * lambd) * lr + 1)
    ** alpha`, its reciprocal times `lr`, each op a float32 tensor op on
    the float32 step (`lr` as `float32_times_lr`: a float64 tensor one
    promotes its products)."""
    step32 = jnp.asarray(step).astype(jnp.float32)
    base = add_scalar(float32_times_lr(mul(step32, lambd), lr, lr_dtype), 1.0)
    return float32_times_lr(reciprocal(pow_scalar(base, alpha)), lr, lr_dtype)


def _foreach_asgd_rule(param, grad, slots, step, hparams, options, lr_dtype):
    """torch's `_multi_tensor_asgd`: the decay folded into the gradient,
    `ax` always averaged, the next `eta` in float32 tensor ops."""
    lr, lambd = hparams["lr"], hparams["lambd"]
    alpha, t0 = hparams["alpha"], hparams["t0"]
    grad = apply_maximize(grad, options)
    weight_decay = hparams["weight_decay"]
    # `_foreach_add(grads, params, alpha=weight_decay)` if weight_decay != 0,
    # then `_foreach_add_(..., params, alpha=lambd)`
    decayed = jnp.where(weight_decay != 0, add(grad, param, weight_decay), grad)
    direction = add(decayed, param, lambd)
    eta = jnp.where(step == 1, lr.astype(jnp.float32), slots["eta"])
    # `_foreach_addcmul_(params, direction, etas, value=-1)`: eta a 0-dim
    # float32 tensor
    param = _addcmul_scalar_tensor(param, direction, eta, -1.0)
    ax = slots["ax"]
    # `_foreach_addcmul_(axs, params - axs, mus)`, whatever mu is
    diff = tensor_op(jnp.subtract, param, ax)
    ax = _addcmul_scalar_tensor(ax, diff, slots["mu"], 1.0)
    if options["capturable"]:  # its `_multi_tensor_asgd` branch
        new_eta = _foreach_capturable_eta(lr, lambd, alpha, step, lr_dtype)
        return param, {"eta": new_eta, "mu": _float32_step_mu(step, t0), "ax": ax}
    new_eta = _float32_step_eta(lr, lambd, alpha, step, lr_dtype)
    excess = step - t0
    new_mu = (1 / jnp.where(excess > 1, excess, 1.0)).astype(jnp.float32)
    return param, {"eta": new_eta, "mu": new_mu, "ax": ax}


def _addcmul_scalar_tensor(x, t1, t2, value):
    """`x.addcmul_(t1, t2, value=value)` with `t2` a 0-dim float32 tensor.

    torch's type promotion: a 16-bit `x` with dimensions takes `t2`
    rounded to its dtype; a 0-dim 16-bit `x` (two 0-dim operands) computes
    in float32, rounded to its dtype on the write. Leaves packed into one
    buffer (`funcopt.flat`, the multi-tensor policy) all count as having
    dimensions. `t2` is spread to `x`'s shape first (`spread`).
    """
    if computes_in_float32(x):
        f32 = jnp.float32
        return addcmul(x.astype(f32), t1.astype(f32), t2, value).astype(x.dtype)
    return addcmul(x, t1, spread(t2, x), value)


def _tensor_lr_eta(lr, lambd, alpha, step):
    """`lr / ((1 + lambd * lr * step) ** alpha)` for a tensor `lr`: tensor
    ops in lr's dtype (`**` as `pow_scalar`), stored as float32."""
    base = add_scalar(mul(mul(lr, lambd), step), 1.0)
    power = pow_scalar(base, alpha)
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
    torch's single-tensor algebra.

    On the CPU (one device, or each device's piece of a sharded param),
    for float32 and float64 params, the default step
    runs funcopt's native kernel (`funcopt.optim._fused_native`): torch's
    `_single_tensor_asgd` op by op in C++, one pass over memory, $\eta$
    and $\mu$ computed in double and stored as float32 as torch does:
    torch's float32 bits without x64; elsewhere, and with `foreach=True`,
    `differentiable=True` or a tensor `lr`, the same formulas in JAX (and
    the `capturable` step below).

    `foreach=True` mirrors torch's `_multi_tensor_asgd`:
    $\theta_t = \theta_{t-1} - \eta_{t-1}\bigl(g_t + \lambda\theta_{t-1}\bigr)$
    (one `addcmul` with $\eta$ a float32 scalar tensor),
    $\bar\theta_t = \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1})$
    even where $\mu = 1$, and $\eta_t$ computed in float32 tensor ops on
    the float32 step ($\gamma \cdot \operatorname{f32}(1 +
    \operatorname{f32}(\lambda\gamma)\,t)^{-\alpha}$, torch's 0-d `pow`:
    `powf`, but a root, product or reciprocal for the exponents it
    special-cases, $\pm\tfrac12$, $-1$, $\pm 2$, 3); with
    `differentiable=True` it raises a `ValueError` with torch's message
    (torch: an `AssertionError` at its first step). `differentiable` is
    otherwise accepted; the result is torch's default CPU path, which is
    also what torch's `differentiable=True` gives, bit for bit
    (`benchmarks/results/flag_paths.md`). `capturable=True` (without
    `foreach`) is torch's capturable step: the update
    $\theta(1 - \lambda\eta) - \eta g$ with $\eta$ a float32 scalar
    tensor (its factor a tensor op), $\bar\theta$ averaged even where
    $\mu = 1$, and the next $\eta$, $\mu$ float32 tensor ops on the
    float32 step (torch runs it on accelerators only; tested against
    torch's own with its device check lifted). With `foreach=True` it is
    torch's `_multi_tensor_asgd` capturable branch: the `foreach` update
    above, then $\mu_t$ and
    $\eta_t = \gamma / (\operatorname{f32}(t\lambda)\gamma + 1)^{\alpha}$
    in float32 tensor ops ($\gamma$ a factor of its own). A tensor `lr` (an array, e.g.
    `np.float32(0.01)`) keeps its dtype: $\eta_t$ is computed in tensor
    ops in it, as in torch.
    State: `eta`, `mu` (float32 scalars) and `ax`; the step
    count is `state.step`.
    """
    return make_optimizer(
        name="ASGD",
        elementwise=True,
        # each group's rule from its own lr (a float or a tensor)
        rule=group_rule(_asgd_default_rule, lr_dtype="lr"),
        init_slots=_asgd_slots,
        hyperparams={
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
        },
        options={
            "maximize": maximize,
            # torch's `_multi_tensor_asgd` (foreach=None on CPU: single-tensor)
            "foreach": foreach,
            "differentiable": differentiable,
            "capturable": capturable,
        },
        validate=_validate_asgd,
        param_groups=param_groups,
    )
