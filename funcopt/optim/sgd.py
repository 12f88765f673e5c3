"""SGD, mirroring `torch.optim.SGD`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, is_reduced, mul
from . import _fused_native, _sparse
from ._common import apply_maximize, coupled_gradient, write_buffers_first
from ._fused import FusedMath, by_fused_loop, check_fused_params, fused_scalar_tail


def _validate_sgd(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_not_negative(group["lr"], "learning rate")
    _validate.check_not_negative(group["momentum"], "momentum value")
    _validate.check_not_negative(group["weight_decay"], "weight_decay value")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _sgd_slots(param, group):
    # torch keeps a momentum buffer only for groups with momentum != 0
    if group["momentum"] != 0:
        return {"momentum_buffer": jnp.zeros_like(param)}
    return {}


def _check_sparse_sgd(group: Mapping[str, Any], fused: bool | None) -> None:
    """torch's errors for a sparse gradient: `_fused_sgd` refuses it, and
    `grad.add(param, alpha=weight_decay)` is `add(sparse, dense)`."""
    if fused:
        raise RuntimeError("`_fused_sgd` does not support sparse gradients")
    if group["weight_decay"] != 0:
        raise RuntimeError(
            "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
        )


def _sgd_sparse_rule(param, grad, slots, step, hparams, options):
    """torch's single-tensor step with a sparse gradient (`weight_decay` is
    0, see `_check_sparse_sgd`). Without momentum `param.add_(grad,
    alpha=-lr)` adds the entries in turn; with momentum torch's buffer is a
    sparse tensor, held here as the dense array of the same values."""
    if "momentum_buffer" in slots:
        return _sgd_rule(
            param, _sparse.todense(grad, param), slots, step, hparams, options
        )
    coalesced = _sparse.is_coalesced(grad)  # before `entries` drops the flags
    grad = _sparse.entries(grad)
    values = apply_maximize(grad.data, options)
    new = _sparse.scatter_add(
        param, grad, values, alpha=-hparams["lr"], coalesced=coalesced
    )
    return new, {}


def _fused_gradient(k: FusedMath, param, grad, hparams, options):
    """The fused kernel's `(param, grad)` in its compute type, after
    `maximize` and `grad += param * weight_decay` (`vec::fmadd`, contracted
    in the tail too)."""
    p, g = k.load(param), k.load(grad)
    if options["maximize"]:
        g = -g
    weight_decay = hparams["weight_decay"]
    return p, jnp.where(weight_decay != 0, k.fma(p, k.scalar(weight_decay), g), g)


def _sgd_fused_jax(param, grad, slots, step, hparams, options):
    """torch's fused CPU kernel (`sgd_fused_step_impl`, `sgd_math`) in JAX: one
    pass per element in the kernel's compute type; see `sgd`'s docstring."""
    k = FusedMath(param)
    momentum = hparams["momentum"]
    p, g = _fused_gradient(k, param, grad, hparams, options)
    new_slots = {}
    if "momentum_buffer" in slots:
        old = slots["momentum_buffer"]
        b, mu = k.load(old), k.scalar(momentum)
        damp = k.scalar(1 - hparams["dampening"])
        # 16-bit params: torch 2.13's vectorised loop is broken (it never
        # stores the param); every element follows its scalar loop
        where = True if is_reduced(param) else k.exact and fused_scalar_tail(param)
        (buf,) = by_fused_loop(
            lambda: (k.fma(damp, g, k.mul(b, mu)),),
            lambda: (k.fma(b, mu, k.mul(g, damp)),),
            where,
        )
        # the first step (torch: every buffer of the group still unset)
        buf = jnp.where(step == 1, g, buf)
        # torch's kernel touches the buffer only while momentum != 0
        stored = jnp.where(momentum != 0, k.store(buf, old), old)
        if not (k.exact or is_reduced(param)):
            # the stored buffer is `buf` itself: write it first, then the
            # param's pass reads it (speed only, see `write_buffers_first`)
            stored, param, grad = write_buffers_first(stored, param, grad)
            p, g = _fused_gradient(k, param, grad, hparams, options)
            buf = k.load(stored)
        direction = k.fma(buf, mu, g) if options["nesterov"] else buf
        g = jnp.where(momentum != 0, direction, g)
        new_slots["momentum_buffer"] = stored
    return k.store(k.fma(g, k.scalar(-hparams["lr"]), p), param), new_slots


# torch's fused CPU kernel: native where it applies, else `_sgd_fused_jax`
_sgd_fused_rule = _fused_native.with_kernel(_fused_native.sgd(False), _sgd_fused_jax)


def _sgd_rule(param, grad, slots, step, hparams, options):
    if isinstance(grad, jsparse.BCOO):
        return _sgd_sparse_rule(param, grad, slots, step, hparams, options)
    lr, momentum = hparams["lr"], hparams["momentum"]
    if "momentum_buffer" not in slots:
        return add(param, coupled_gradient(param, grad, hparams, options), -lr), {}
    old = slots["momentum_buffer"]
    d_p = coupled_gradient(param, grad, hparams, options)
    # torch: the first step with a gradient clones it (no dampening)
    buf = jnp.where(
        step == 1,
        d_p,
        add(mul(old, momentum), d_p, 1 - hparams["dampening"]),
    )
    # torch touches the buffer only while the group's momentum != 0
    buf = jnp.where(momentum != 0, buf, old)
    buf, param, grad = write_buffers_first(buf, param, grad)
    d_p = coupled_gradient(param, grad, hparams, options)
    direction = add(d_p, buf, momentum) if options["nesterov"] else buf
    d_p = jnp.where(momentum != 0, direction, d_p)
    return add(param, d_p, -lr), {"momentum_buffer": buf}


# torch's default step: native where it applies, else `_sgd_rule`
_sgd_default_rule = _fused_native.with_kernel(_fused_native.sgd(True), _sgd_rule)


@_validate.optimizer_factory
def sgd(
    lr: float = 1e-3,
    momentum: float = 0,
    dampening: float = 0,
    weight_decay: float = 0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    fused: bool | None = None,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Stochastic gradient descent with momentum, as `torch.optim.SGD`.

    $$
    \begin{aligned}
    g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1} \\
    b_t &= \begin{cases} g_t & t = 1 \\
           \mu b_{t-1} + (1-\tau) g_t & t > 1 \end{cases} \\
    d_t &= g_t + \mu b_t \text{ (nesterov) else } b_t \\
    \theta_t &= \theta_{t-1} - \gamma d_t
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\mu$ = `momentum`, $\tau$ =
    `dampening`, $\lambda$ = `weight_decay` (coupled, added to the
    gradient); $-\nabla$ when `maximize`. Without momentum
    $d_t = g_t$. The first momentum step copies the gradient: dampening
    acts from the second step on.

    `foreach` and `differentiable` are torch execution switches, accepted
    and ignored (torch's `foreach=True` and `differentiable=True` give its
    default path's bits). On the CPU (one device, or each device's piece of
    a sharded param), float32 and float64 params take the default step
    through funcopt's native kernel where it is built
    (`funcopt/_native`): torch's `_single_tensor_sgd` op by op in C++, one
    pass over memory, in place when donated, torch's bits in float32
    without x64; the JAX rule (GPUs, TPUs, sharded steps,
    `FUNCOPT_NATIVE=0`) gives them with x64 and
    [`set_exact_float32`][funcopt.precision.set_exact_float32].
    `fused=True` is torch's fused CPU kernel (`torch._fused_sgd_`,
    `torch.optim.SGD(fused=True)`): one pass per element in the param's
    compute type (float32 for 16-bit params), each op rounded once,
    $\operatorname{fma}$ a fused multiply-add:

    $$
    \begin{aligned}
    g_t &= \operatorname{fma}(\theta_{t-1}, \lambda, \pm\nabla_\theta f_t)
        \quad (\lambda \ne 0) \\
    b_t &= \begin{cases} g_t & t = 1 \\
           \operatorname{fma}(1-\tau, g_t, \mu b_{t-1}) & \text{vectorised loop} \\
           \operatorname{fma}(\mu, b_{t-1}, (1-\tau) g_t) & \text{scalar tail}
           \end{cases} \\
    \theta_t &= \operatorname{fma}(-\gamma, d_t, \theta_{t-1}), \quad
    d_t = \operatorname{fma}(\mu, b_t, g_t) \text{ (nesterov) else } b_t
    \end{aligned}
    $$

    ($d_t = g_t$ and no buffer when $\mu = 0$). The vectorised loop gives
    the default path's bits. The scalar tail is each leaf's last
    $n \bmod w$ elements, $w$ = 8 (float32), 4 (float64) or 16 (16-bit): the
    kernel's 32-byte vectors, in torch 2.13's AVX2 and AVX-512 dispatch
    alike, over chunks of whole cache lines, so whatever torch's thread
    count (measured). There the compiler contracts the momentum update the
    other way: the buffer 1 ulp off the default path in some steps (float32:
    32 ulp on the params after 1,000 steps, `benchmarks/results/flag_paths.md`).
    funcopt mirrors the split in the bit-exact float32 mode
    ([`set_exact_float32`][funcopt.precision.set_exact_float32]); 16-bit
    params round only at each store (the update uses the unrounded
    float32 $b_t$). torch 2.13's vectorised 16-bit loop never stores the
    param and reads its buffer as float32 bits (pytorch/pytorch#191763, fixed
    after 2.13): funcopt computes every 16-bit element as torch's scalar
    loop does, torch's bits on leaves of fewer than 16 elements. torch
    creates a group's buffers together and raises `TypeError` at a step
    where one param's first gradient comes after the others'; funcopt takes
    each param's first step as its own ($t = 1$). Complex params raise
    torch's `RuntimeError` (when the state is made, torch at its first
    step). `fused` combined with `foreach` or `differentiable` raises as in
    torch. On one CPU device, float32 and float64 params (with `fused=True`,
    bfloat16 and float16 ones too) take funcopt's native
    kernel where it is built (`make venv`, or `pip install` with a C++
    compiler; `funcopt/_native`): the same rounding, op by op, in C++ and in
    place, torch's bits without x64 and the bit-exact mode too;
    `FUNCOPT_NATIVE=0` selects the JAX path.
    `param_groups` comes from [`funcopt.param_groups`][funcopt.param_groups].

    Sparse gradients (`jax.experimental.sparse.BCOO`, torch's sparse
    `p.grad`, e.g. from `nn.Embedding(sparse=True)`) are taken as torch's
    `SGD` takes them: without momentum $\theta \leftarrow \theta - \gamma g$
    adds the gradient's entries one by one (repeated indices too); with
    momentum $b_t$ is torch's sparse buffer held as a dense array (the same
    values). As in torch, $\lambda \ne 0$ raises torch's `RuntimeError`
    (`add(sparse, dense)`), and so does `fused`. torch refuses two more
    mixes that depend on the state's history, which funcopt accepts: a
    dense gradient after sparse ones with momentum, and a sparse gradient
    after dense ones with `nesterov`. See
    [`funcopt.sparse_adam`][funcopt.optim.sparse_adam.sparse_adam] for
    building a BCOO gradient.

    State: `momentum_buffer` per parameter, only for groups whose
    `momentum != 0`.
    """
    fused_kernel = _validate.fused_requested(fused)
    opt = make_optimizer(
        name="SGD",
        elementwise=True,
        rule=_sgd_fused_rule if fused_kernel else _sgd_default_rule,
        init_slots=_sgd_slots,
        hyperparams={
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
        },
        options={"nesterov": nesterov, "maximize": maximize},
        validate=_validate_sgd,
        param_groups=param_groups,
        sparse_grads=True,
        sparse_check=functools.partial(_check_sparse_sgd, fused=fused),
        extra_defaults={
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        },
        # torch refuses complex params for its fused kernel (at step)
        check_params=check_fused_params("SGD") if fused_kernel else None,
    )
    # torch checks ``fused`` after the argument checks
    _validate.check_fused(
        {"fused": fused, "foreach": foreach, "differentiable": differentiable}
    )
    return opt
