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
from .._math import add, mul, scalar
from . import _sparse
from ._common import apply_maximize, coupled_gradient, write_buffers_first


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
    grad = _sparse.entries(grad)
    values = apply_maximize(grad.data, options)
    return _sparse.scatter_add(param, grad, scalar(-hparams["lr"], param) * values), {}


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

    `foreach`, `fused` and `differentiable` are torch execution switches,
    accepted and ignored (`fused` combined with the others raises as in
    torch). `param_groups` comes from [`funcopt.param_groups`][funcopt.param_groups].

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
    opt = make_optimizer(
        name="SGD",
        elementwise=True,
        rule=_sgd_rule,
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
    )
    # torch checks ``fused`` after the argument checks
    _validate.check_fused(
        {"fused": fused, "foreach": foreach, "differentiable": differentiable}
    )
    return opt
