"""Adam and AdamW, mirroring `torch.optim.Adam` and `torch.optim.AdamW`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import (
    add_scalar,
    addcdiv,
    div,
    mul,
    reciprocal,
    sqrt,
    sqrt_nonnegative,
)
from . import _fused_native
from ._common import (
    adam_moments,
    group_rule,
    one_minus,
    pow_scalar,
    powf,
    zero_d_op,
)
from ._fused import (
    FusedMath,
    by_fused_loop,
    check_fused_params,
    fused_scalar_tail,
    kernel_value,
)


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


def _adam_rule(
    param, grad, slots, step, hparams, options, lr_dtype=None, betas_dtype=None
):
    if lr_dtype is not None:
        # a tensor lr: torch's scalar math with it runs in its dtype
        hparams = {**hparams, "lr": hparams["lr"].astype(lr_dtype)}
    if betas_dtype is not None:
        # tensor betas: so does the scalar math with them (float64 without
        # x64: float32, as the state holds them)
        betas = hparams["betas"].astype(jax.dtypes.canonicalize_dtype(betas_dtype))
        hparams = {**hparams, "betas": betas}
    tensor_betas = betas_dtype is not None
    param, new_slots = adam_moments(param, grad, slots, hparams, options, tensor_betas)
    if options["amsgrad"]:
        # the max is over the raw second moment, bias-corrected afterwards
        second = jnp.maximum(slots["max_exp_avg_sq"], new_slots["exp_avg_sq"])
        new_slots["max_exp_avg_sq"] = second
    else:
        second = new_slots["exp_avg_sq"]
    if options["differentiable"] or options["capturable"]:
        update = functools.partial(_tensor_scalar_update, tensor_betas=tensor_betas)
    elif tensor_betas:
        update = _tensor_betas_update
    else:
        update = _float_scalar_update
    tensor_lr = lr_dtype is not None
    param = update(param, new_slots["exp_avg"], second, step, hparams, tensor_lr)
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


def _tensor_betas_update(param, exp_avg, second, step, hparams, tensor_lr):
    """torch's default path with tensor `betas`: the same formula, its scalar
    math as 0-d tensor ops in the betas' dtype on `float(step)`
    (`pow_scalar`), `lr / bias_correction1` as
    `bias_correction1.reciprocal() * lr` for a Python-float `lr`."""
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    bias_correction1 = one_minus(pow_scalar(beta1, step))
    bias_correction2 = one_minus(pow_scalar(beta2, step))
    if tensor_lr:
        step_size = zero_d_op(div, lr, bias_correction1)
    else:
        step_size = mul(reciprocal(bias_correction1), lr)
    bias_correction2_sqrt = sqrt(bias_correction2)
    denom = add_scalar(div(sqrt_nonnegative(second), bias_correction2_sqrt), eps)
    return addcdiv(param, exp_avg, denom, -step_size)


def _tensor_scalar_update(
    param, exp_avg, second, step, hparams, tensor_lr, *, tensor_betas
):
    """torch's `capturable or differentiable` path.

    The step is a 0-d tensor of torch's default dtype (float32), so every
    scalar is a tensor op in float32 (or in float64 for float64 tensor
    `betas`), arranged as torch does:
    `denom = (v.sqrt() / (bc2_sqrt * step_size_neg)).add_(eps / step_size_neg)`
    and `param.addcdiv_(exp_avg, denom)`; `python_float / tensor` is
    `tensor.reciprocal() * python_float`, a Python float meets a float32
    tensor as float32.
    """
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    dtype = np.promote_types(beta1.dtype, jnp.float32) if tensor_betas else jnp.float32
    if dtype == jnp.float32:
        bias_correction1 = 1 - powf(beta1, step)
        bias_correction2 = 1 - powf(beta2, step)
    else:  # float64 tensor betas: C's `pow` of the float64 operands
        bias_correction1 = one_minus(beta1 ** step.astype(dtype))
        bias_correction2 = one_minus(beta2 ** step.astype(dtype))
    if tensor_lr:
        step_size = zero_d_op(jnp.divide, lr, bias_correction1)
    else:
        step_size = reciprocal(bias_correction1) * lr.astype(dtype)
    step_size_neg = -step_size
    # a float64 tensor lr widens the product (tensor * tensor)
    bias_correction2_sqrt = sqrt(bias_correction2).astype(step_size_neg.dtype)
    denom = add_scalar(
        div(sqrt_nonnegative(second), bias_correction2_sqrt * step_size_neg),
        reciprocal(step_size_neg) * eps.astype(step_size_neg.dtype),
    )
    return addcdiv(param, exp_avg, denom, 1)


def _fused_adam_jax(
    param, grad, slots, step, hparams, options, lr_dtype=None, betas_dtype=None
):
    """torch's fused CPU kernel (`adam_fused_step_impl`, `adam_math`) in JAX: one
    pass per element, in the order and rounding of its vectorised loop and,
    where the bits are mirrored, of its scalar tail; see `adam`'s
    docstring."""
    k = FusedMath(param)
    # a tensor lr or tensor betas reach the kernel as their values (`.item()`)
    lr = kernel_value(hparams["lr"], lr_dtype)
    beta1 = kernel_value(hparams["betas"][0], betas_dtype)
    beta2 = kernel_value(hparams["betas"][1], betas_dtype)
    eps, weight_decay = hparams["eps"], hparams["weight_decay"]
    # the kernel's prologue, in double (`step` is the float32 state step)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = jnp.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    p, g = k.load(param), k.load(grad)
    if options["maximize"]:
        g = -g
    decay = options["decoupled_weight_decay"]
    if not decay:
        # `grad += param * weight_decay`, contracted; skipped for 0
        g = jnp.where(weight_decay != 0, k.fma(p, k.scalar(weight_decay), g), g)
    else:
        p = k.mul(p, k.scalar(1 - lr * weight_decay))
    # exp_avg.lerp_(grad, 1 - beta1): blendv, then one fmadd
    weight = k.scalar(1 - beta1)
    small = jnp.abs(weight) < 0.5
    coeff = jnp.where(small, weight, k.sub(weight, k.scalar(1.0)))
    m = k.load(slots["exp_avg"])
    m = k.fma(coeff, k.sub(g, m), jnp.where(small, m, g))
    # `v * beta2 + (1 - beta2) * g * g`: the vectorised loop fuses the second
    # product into the sum, the scalar tail the first
    v, b2 = k.load(slots["exp_avg_sq"]), k.scalar(beta2)
    weighted = k.mul(k.scalar(1 - beta2), g)
    (v,) = by_fused_loop(
        lambda: (k.fma(weighted, g, k.mul(v, b2)),),
        lambda: (k.fma(v, b2, k.mul(weighted, g)),),
        k.exact and fused_scalar_tail(param),
    )
    new_slots = {
        "exp_avg": k.store(m, slots["exp_avg"]),
        "exp_avg_sq": k.store(v, slots["exp_avg_sq"]),
    }
    if options["amsgrad"]:
        # the stored maximum is rounded; the kernel divides by the unrounded one
        v = jnp.maximum(k.load(slots["max_exp_avg_sq"]), v)
        new_slots["max_exp_avg_sq"] = k.store(v, slots["max_exp_avg_sq"])
    denom = k.add(k.div(k.sqrt(v), k.scalar(bias_correction2_sqrt)), k.scalar(eps))
    p = k.add(p, k.div(k.mul(k.scalar(-step_size), m), denom))
    return k.store(p, param), new_slots


# torch's fused CPU kernel: native where it applies, else `_fused_adam_jax`
_fused_adam_rule = _fused_native.with_kernel(_fused_native.adam(False), _fused_adam_jax)
# torch's default step: native where it applies, else `_adam_rule`
_default_adam_rule = _fused_native.with_kernel(_fused_native.adam(True), _adam_rule)


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
    are tensor ops in it, as in torch. Tensor `betas` (both arrays, e.g.
    `(np.float32(0.9), np.float32(0.999))`; torch refuses a float and a
    tensor) keep their dtype too, as in torch's single-tensor path: the
    weight $1-\beta_1$ is a tensor op in the params' dtype, $1-\beta_2$,
    $\beta^t$ (`x*x` and `x*x*x` for $t$ = 2, 3) and the bias corrections
    are tensor ops in the betas' dtype, $\gamma/(1-\beta_1^t)$ is
    `reciprocal` times $\gamma$, and with `differentiable=True` float64
    betas move the scalar math to float64. torch refuses `capturable=True`
    for CPU params outside `torch.compile`; funcopt takes it as the same
    path as `differentiable` (torch's CUDA path). `foreach` is accepted and
    ignored: the result is torch's default CPU path.

    On the CPU (one device, or each device's piece of a sharded param),
    float32 and float64 params take the default step
    (not `differentiable` or `capturable`, Python-float `lr` and `betas`)
    through funcopt's native kernel where it is built (`funcopt/_native`,
    as `fused=True` below): torch's `_single_tensor_adam` op by op in C++,
    one pass over memory, in place when donated. In float32, without x64,
    that is torch's bits wherever torch's float32 `sqrt` (MKL's) is
    correctly rounded (the kernel's is); the JAX rule, which GPUs, TPUs and
    sharded steps run (and `FUNCOPT_NATIVE=0` selects), rounds so with x64
    and [`set_exact_float32`][funcopt.precision.set_exact_float32].

    `fused=True` mirrors torch's fused CPU kernel (`torch._fused_adam_`,
    `_fused_adamw_`; `adam_math` in ATen's `FusedAdamKernel.cpp`, torch
    2.13), which computes each element's whole step at once. Its scalars
    are C++ doubles ($\beta^t$ is `std::pow` of the step as a float), cast
    once to the compute type (float32 for 16-bit params):
    $s_t = \gamma/(1-\beta_1^t)$, $c_t = \sqrt{1-\beta_2^t}$,
    $w = 1-\beta_1$, and then, each operation rounded once,

    $$
    \begin{aligned}
    g_t &\leftarrow \operatorname{fma}(\theta_{t-1}, \lambda, g_t)
           \text{ if coupled}, \qquad
    \theta_{t-1} \leftarrow \theta_{t-1} \cdot (1-\gamma\lambda)
           \text{ if decoupled} \\
    m_t &= \operatorname{fma}(w, g_t - m_{t-1}, m_{t-1}) \text{ if } w < 0.5
           \text{ else } \operatorname{fma}(w - 1, g_t - m_{t-1}, g_t) \\
    v_t &= \operatorname{fma}\bigl((1-\beta_2) g_t,\; g_t,\;
           \beta_2 v_{t-1}\bigr) \\
    \theta_t &= \theta_{t-1} + \frac{(-s_t)\, m_t}{\sqrt{\hat v_t}/c_t
           + \epsilon}
    \end{aligned}
    $$

    with the correctly rounded square root. For 16-bit params all of it runs
    in float32 and only the stored buffers and param are rounded to 16 bits
    ($\theta_t$ uses the unrounded $m_t$, $\hat v_t$). A tensor `lr` or
    tensor `betas` enter as their values. The fma is the FMA that torch's
    x86 AVX2/AVX-512 builds contract (`ATEN_CPU_CAPABILITY=default` has
    none: with [`torch_cpu_block`][funcopt.precision.torch_cpu_block]
    `None` the product is rounded first). The kernel's scalar tail, each
    leaf's last `numel % 8` float32 elements (`% 16` for 16-bit params:
    32-byte vectors on AVX2 and AVX-512 alike, whatever torch's thread
    count), computes
    $v_t = \operatorname{fma}(v_{t-1}, \beta_2, ((1-\beta_2) g_t)\, g_t)$
    instead (1 ulp off the vectorised loop's $v_t$ in about 1 tail element
    in 4 per step). With x64 and
    [`set_exact_float32`][funcopt.precision.set_exact_float32] (16-bit
    params: with x64) both loops are mirrored, element by element (also in
    leaves packed by [`funcopt.flat`][funcopt.flat]): torch's bits.
    Complex params raise torch's `RuntimeError`.
    On one CPU device, float32 and float64 params (with `fused=True`,
    bfloat16 and float16 ones too) take funcopt's native
    kernel where it is built (`make venv`, or `pip install` with a C++
    compiler; `funcopt/_native`): the same rounding, op by op, in C++ and in
    place, torch's bits without x64 and the bit-exact mode too;
    `FUNCOPT_NATIVE=0` selects the JAX path.
    State: `exp_avg`, `exp_avg_sq` and, with `amsgrad`, `max_exp_avg_sq`;
    the step count is `state.step`.
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


def _rule_for(fused: bool = False):
    """`_adam_rule` (`_fused_adam_rule` for `fused=True`), with each group's
    tensor `lr` and tensor `betas` dtypes (one per rule, so that optimizers
    share its compiled steps)."""
    rule = _fused_adam_rule if fused else _default_adam_rule
    return group_rule(rule, lr_dtype="lr", betas_dtype="betas")


def _adam_family(name, hyperparams, options, extra_defaults, param_groups):
    fused_kernel = _validate.fused_requested(extra_defaults["fused"])
    return make_optimizer(
        name=name,
        elementwise=True,
        # each group's rule from its own lr and betas (floats or tensors)
        rule=_rule_for(fused_kernel),
        init_slots=_adam_slots,
        hyperparams=hyperparams,
        options=options,
        validate=functools.partial(_validate_adam, foreach=extra_defaults["foreach"]),
        param_groups=param_groups,
        extra_defaults=extra_defaults,
        # torch refuses complex params for its fused kernels (at step)
        check_params=(check_fused_params(name) if fused_kernel else None),
    )
