"""Lion, mirroring `lion_pytorch.Lion` (lion-pytorch 0.2.5)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, scalar


@_validate.torch_checks("Lion")
def _validate_lion(group: Mapping[str, Any]) -> None:
    # lion-pytorch checks with bare asserts: the same AssertionError, here
    # with a message (and also under ``python -O``)
    if not group["lr"] > 0.0:
        raise AssertionError(f"Lion: lr must be > 0, got {group['lr']!r}")
    if not all([0.0 <= beta <= 1.0 for beta in group["betas"]]):
        raise AssertionError(
            f"Lion: betas must each be in [0, 1], got {group['betas']!r}"
        )


def _lion_slots(param, group):
    return {"exp_avg": jnp.zeros_like(param)}


def _lion_rule(param, grad, slots, step, hparams, options, *, init_lr, decoupled):
    lr, wd = hparams["lr"], hparams["weight_decay"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    if decoupled:
        wd = wd / init_lr  # Python float math in lion-pytorch
    param = param * scalar(1.0 - lr * wd, param)
    exp_avg = slots["exp_avg"]
    update = jnp.sign(add(exp_avg * scalar(beta1, exp_avg), grad, 1.0 - beta1))
    param = add(param, update, -lr)
    exp_avg = add(exp_avg * scalar(beta2, exp_avg), grad, 1.0 - beta2)
    return param, {"exp_avg": exp_avg}


@_validate.optimizer_factory
def lion(
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    use_triton: bool = False,
    decoupled_weight_decay: bool = False,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Lion (evolved sign momentum), as `lion_pytorch.Lion`.

    $$
    \begin{aligned}
    \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda') \\
    c_t &= \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t) \\
    \theta_t &= \theta_{t-1} - \gamma c_t \\
    m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda' = \lambda$ = `weight_decay`,
    or $\lambda/\gamma_0$ with `decoupled_weight_decay` where
    $\gamma_0$ is the `lr` given here (lion-pytorch's `_init_lr`,
    shared by every group). `decoupled_weight_decay` is optimizer-wide in
    lion-pytorch, so it cannot differ per param group here either;
    `use_triton` is accepted and ignored. Bad arguments raise
    `AssertionError` as lion-pytorch's asserts do. Complex parameters are
    not supported. State: `exp_avg`.
    """
    return make_optimizer(
        name="Lion",
        rule=functools.partial(
            _lion_rule, init_lr=lr, decoupled=decoupled_weight_decay
        ),
        init_slots=_lion_slots,
        hyperparams={"lr": lr, "betas": betas, "weight_decay": weight_decay},
        options={},
        validate=_validate_lion,
        param_groups=param_groups,
        supports_complex=False,
        extra_defaults={
            "use_triton": use_triton,
            "decoupled_weight_decay": decoupled_weight_decay,
        },
    )
