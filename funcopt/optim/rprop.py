"""Rprop, mirroring `torch.optim.Rprop`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import addcmul, scalar, tensor_op
from . import _fused_native
from ._common import apply_maximize


def _validate_rprop(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_at_least_zero(group["lr"], "learning rate")
    etas = group["etas"]
    if not 0.0 < etas[0] < 1.0 < etas[1]:
        raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")


def _rprop_slots(param, group):
    # torch seeds step_size with the group's lr (complex: lr + lr*1j)
    lr = float(group["lr"])
    value = complex(lr, lr) if jnp.iscomplexobj(param) else lr
    return {"prev": jnp.zeros_like(param), "step_size": jnp.full_like(param, value)}


def _rprop_rule(param, grad, slots, step, hparams, options):
    etaminus = scalar(hparams["etas"][0], param)
    etaplus = scalar(hparams["etas"][1], param)
    step_size_min = scalar(hparams["step_sizes"][0], param)
    step_size_max = scalar(hparams["step_sizes"][1], param)
    grad = apply_maximize(grad, options)
    # torch creates step_size at the first step, from the group's lr then
    step_size = jnp.where(step == 1, scalar(hparams["lr"], param), slots["step_size"])
    sign = jnp.sign(tensor_op(jnp.multiply, grad, slots["prev"]))
    # three masked assignments, in torch's order (NaN stays NaN)
    sign = jnp.where(sign > 0, etaplus, sign)
    sign = jnp.where(sign < 0, etaminus, sign)
    sign = jnp.where(sign == 0, jnp.ones_like(sign), sign)
    # step_size.mul_(sign).clamp_(min, max), every step
    step_size = tensor_op(jnp.multiply, step_size, sign)
    step_size = jnp.minimum(jnp.maximum(step_size, step_size_min), step_size_max)
    # after a sign change the element does not move and prev becomes 0
    grad = jnp.where(sign == etaminus, jnp.zeros_like(grad), grad)
    new_param = addcmul(param, jnp.sign(grad), step_size, -1.0)
    return new_param, {"prev": grad, "step_size": step_size}


# torch's default step: native where it applies, else `_rprop_rule`
_rprop_default_rule = _fused_native.with_kernel(_fused_native.rprop(), _rprop_rule)


@_validate.optimizer_factory
def rprop(
    lr: float = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50),
    *,
    capturable: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Rprop (resilient backpropagation), as `torch.optim.Rprop`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}), \quad
    s = \operatorname{sign}(g_t\, g'_{t-1}) \\
    f_t &= \eta_+ \text{ where } s > 0,\; \eta_- \text{ where } s < 0,\;
           1 \text{ where } s = 0 \\
    \Delta_t &= \operatorname{clamp}(\Delta_{t-1} f_t,\,
                \Delta_{\min}, \Delta_{\max}), \quad \Delta_0 = \gamma \\
    g'_t &= 0 \text{ where } f_t = \eta_- \text{ else } g_t \\
    \theta_t &= \theta_{t-1} - \operatorname{sign}(g'_t)\,\Delta_t
    \end{aligned}
    $$

    with $(\eta_-, \eta_+)$ = `etas`,
    $(\Delta_{\min}, \Delta_{\max})$ = `step_sizes`. `lr`
    ($\gamma$) only seeds the step sizes, at each parameter's first step;
    changing it later has no effect, as in torch. The clamp acts every step.
    (`optax.rprop` is a different, stale-by-one-step algorithm.)

    On the CPU (one device, or each device's piece of a sharded param),
    for float32 and float64 params, the step runs
    funcopt's native kernel (`funcopt.optim._fused_native`): torch's
    `_single_tensor_rprop` in C++, one pass over memory, torch's bits (as
    the JAX rule's: only its two products and the update round);
    elsewhere the same formula in JAX.

    `capturable`, `foreach` and `differentiable` are accepted; the
    result is torch's default CPU path, which is also what torch's
    `foreach=True`, `differentiable=True` and a float32 tensor `lr` give,
    bit for bit (`benchmarks/results/flag_paths.md`).
    State: `prev` ($g'$), `step_size` ($\Delta$); the
    step count is `state.step`.
    """
    return make_optimizer(
        name="Rprop",
        elementwise=True,
        rule=_rprop_default_rule,
        init_slots=_rprop_slots,
        hyperparams={"lr": lr, "etas": etas, "step_sizes": step_sizes},
        options={"maximize": maximize},
        validate=_validate_rprop,
        param_groups=param_groups,
        extra_defaults={
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
        },
    )
