"""Adamax, mirroring `torch.optim.Adamax`."""

from __future__ import annotations

import jax.numpy as jnp
from jax.dtypes import canonicalize_dtype

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add_scalar, addcdiv, div, lerp, mul, true_divide
from . import _fused_native
from ._common import coupled_gradient, group_rule, in_own_pass, powf, zero_d_op


def _adamax_slots(param, group):
    return {"exp_avg": jnp.zeros_like(param), "exp_inf": jnp.zeros_like(param)}


def _adamax_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    exp_avg = lerp(
        slots["exp_avg"], coupled_gradient(param, grad, hparams, options), 1 - beta1
    )
    grad = in_own_pass(coupled_gradient, param, grad, hparams, options)
    # torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps)): eps inside the max
    exp_inf = jnp.maximum(mul(slots["exp_inf"], beta2), add_scalar(jnp.abs(grad), eps))
    if options["capturable"]:
        new_param = _capturable_update(param, exp_avg, exp_inf, step, hparams, lr_dtype)
        return new_param, {"exp_avg": exp_avg, "exp_inf": exp_inf}
    # torch: Python-float scalar math on float(step)
    if lr_dtype is None:
        clr = lr / (1 - beta1**step)
    else:  # a tensor lr: `lr / bias_correction`, a tensor op in its dtype
        clr = div(lr.astype(lr_dtype), 1 - beta1**step)
    new_param = addcdiv(param, exp_avg, exp_inf, -clr)
    return new_param, {"exp_avg": exp_avg, "exp_inf": exp_inf}


def _capturable_update(param, exp_avg, exp_inf, step, hparams, lr_dtype):
    """torch's `capturable=True` step: the bias correction as 0-d tensor ops
    on the float32 step, negated and folded into the denominator,

        neg_bias_correction = beta1**step_t - 1
        neg_bias_correction.div_(lr)
        param.addcdiv_(exp_avg, exp_inf * neg_bias_correction)

    (float32; a float64 tensor `lr` widens the in-place division, whose
    result stays float32). torch refuses it for CPU params."""
    lr, beta1 = hparams["lr"], hparams["betas"][0]
    neg_bias_correction = add_scalar(powf(beta1, step), -1.0)
    if lr_dtype is None:
        neg_bias_correction = div(neg_bias_correction, lr)
    else:
        lr = lr.astype(canonicalize_dtype(lr_dtype))
        quotient = zero_d_op(true_divide, neg_bias_correction, lr)
        neg_bias_correction = quotient.astype(jnp.float32)
    return addcdiv(param, exp_avg, mul(exp_inf, neg_bias_correction), 1)


# torch's default step: native where it applies, else `_adamax_rule`
_adamax_default_rule = _fused_native.with_kernel(_fused_native.adamax(), _adamax_rule)


@_validate.optimizer_factory
def adamax(
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    foreach: bool | None = None,
    *,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Adamax (Adam with the infinity norm), as `torch.optim.Adamax`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1} \\
    m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1) \\
    u_t &= \max(\beta_2 u_{t-1},\, |g_t| + \epsilon) \\
    \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda$ = `weight_decay` (coupled,
    added to the gradient); $-\nabla$ when `maximize`. `eps` sits
    inside the max, as in torch. `t` is each parameter's own step count.

    On the CPU (one device, or each device's piece of a sharded param),
    for float32 and float64 params, the step runs
    funcopt's native kernel (`funcopt.optim._fused_native`): torch's
    `_single_tensor_adamax` op by op in C++, one pass over memory, torch's
    float32 bits with or without x64; elsewhere the same formula in JAX.

    `foreach` and `differentiable` are accepted; the result is torch's
    default CPU path, which is also what torch's `foreach=True` and
    `differentiable=True` give, bit for bit
    (`benchmarks/results/flag_paths.md`). `capturable=True` is torch's
    capturable step, its bias correction as float32 0-d tensor ops on the
    float32 step folded into the denominator (torch runs it on accelerators
    only; tested against torch's own with its device check lifted). A
    tensor `lr` (an array, e.g. `np.float32(2e-3)`) keeps its dtype:
    `lr / (1 - beta1**t)` is a tensor op in it, as in torch.
    State: `exp_avg`, `exp_inf`; the step count is `state.step`.
    """
    return make_optimizer(
        name="Adamax",
        elementwise=True,
        # each group's rule from its own lr (a float or a tensor)
        rule=group_rule(_adamax_default_rule, lr_dtype="lr"),
        init_slots=_adamax_slots,
        hyperparams={
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
        },
        options={"maximize": maximize, "capturable": capturable},
        validate=_validate.check_adam_family,
        param_groups=param_groups,
        extra_defaults={"foreach": foreach, "differentiable": differentiable},
    )
