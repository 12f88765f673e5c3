"""Schedule-free AdamW and SGD, mirroring `schedulefree.AdamWScheduleFree` and
`schedulefree.SGDScheduleFree` (schedulefree 1.4.1, the non-reference classes).

Train and eval parameters
-------------------------
Schedule-free optimizes a sequence `z` and trains at `y`, an interpolation
of `z` and the average `x`; the model should be *evaluated* at `x`.
torch switches in place: `optimizer.eval()` moves `p` from `y` to `x`
(`p.lerp_(z, 1 - 1/beta)`), `optimizer.train()` back
(`p.lerp_(z, 1 - beta)`). funcopt keeps the training parameters `y` as
*the* parameters (`step` takes and returns them) and gives the switch as
two pure functions, also methods of the optimizer:

```python
x = opt.eval_params(params, state)      # torch: optimizer.eval()
y = opt.train_params(x, state)          # torch: optimizer.train()
```

Both are exact mirrors of torch's `lerp_`: evaluating at
`opt.eval_params(params, state)` while training on `params` gives torch's
eval-mode parameters bit for bit, and a loop that switches back and forth
(`params = opt.train_params(opt.eval_params(params, state), state)`)
reproduces torch's round trip, rounding included. Leaves that never had a
gradient (no `z` in torch) are returned unchanged. There is no mode flag:
`step` always expects train-mode parameters (torch raises if not in train
mode; here it is the caller's contract).

Group scalars
-------------
torch keeps `k`, `weight_sum`, `lr_max` and `scheduled_lr` in each
param group and updates them every step (even for a group without
gradients); here they are hyperparameters in the state
(`fo.get_hparam(state, "weight_sum")`), advanced by a group step before the
per-array rule (`funcopt.contrib._grouped`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import PyTreeDef

from .. import _groups, _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, lerp, scalar
from ..optim._common import ema_of_square
from ._grouped import GroupStep, with_group_state

_GROUP_SCALARS = {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}


def _advance(hparams: dict[str, jax.Array], stats) -> GroupStep:
    """torch's per-group scalar code at the top of `step` (Python floats)."""
    k, warmup = hparams["k"], hparams["warmup_steps"]
    sched = jnp.where(k < warmup, (k + 1) / jnp.where(warmup == 0, 1, warmup), 1.0)
    lr = hparams["lr"] * sched
    lr_max = jnp.where(lr >= hparams["lr_max"], lr, hparams["lr_max"])
    weight = _weight(k + 1, lr_max, hparams)
    new = {
        **hparams,
        "k": k + 1,
        "scheduled_lr": lr,
        "lr_max": lr_max,
        "weight_sum": hparams["weight_sum"] + weight,
    }
    return GroupStep(new, new)


def _weight(k, lr_max, hparams):
    return (k ** hparams["r"]) * (lr_max ** hparams["weight_lr_power"])


def _ckp1(hparams):
    """`weight / weight_sum` (0 on ZeroDivisionError), after the group step."""
    weight = _weight(hparams["k"], hparams["lr_max"], hparams)
    weight_sum = hparams["weight_sum"]
    safe = jnp.where(weight_sum == 0, 1, weight_sum)
    return jnp.where(weight_sum == 0, 0.0, weight / safe)


def _z_slots(param, group):
    return {"z": param}


def _adamw_slots(param, group):
    return {"z": param, "exp_avg_sq": jnp.zeros_like(param)}


def _interpolate_then_step(y, z, grad, lr, beta, ckp1):
    """`y.lerp_(z, ckp1); y.add_(grad, lr*(beta*(1-ckp1)-1)); z.sub_(grad, lr)`."""
    y = lerp(y, z, ckp1)
    y = add(y, grad, lr * (beta * (1 - ckp1) - 1))
    z = add(z, grad, -lr)
    return y, z


def _adamw_rule(param, grad, slots, step, hparams, options):
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    decay, k = hparams["weight_decay"], hparams["k"]
    bias_correction2 = 1 - beta2**k
    exp_avg_sq = ema_of_square(slots["exp_avg_sq"], grad, beta2)
    denom = jnp.sqrt(exp_avg_sq / scalar(bias_correction2, param)) + scalar(
        hparams["eps"], param
    )
    grad = grad / denom
    grad = jnp.where(decay != 0, add(grad, param, decay), grad)
    y, z = _interpolate_then_step(
        param, slots["z"], grad, hparams["scheduled_lr"], beta1, _ckp1(hparams)
    )
    return y, {"z": z, "exp_avg_sq": exp_avg_sq}


def _sgd_rule(param, grad, slots, step, hparams, options):
    decay = hparams["weight_decay"]
    grad = jnp.where(decay != 0, add(grad, param, decay), grad)
    y, z = _interpolate_then_step(
        param,
        slots["z"],
        grad,
        hparams["scheduled_lr"],
        hparams["momentum"],
        _ckp1(hparams),
    )
    return y, {"z": z}


@_validate.torch_checks("SGDScheduleFree")
def _validate_sgd(group: Mapping[str, Any]) -> None:
    lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if momentum <= 0 or momentum >= 1:
        raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")


def _switch(opt, params, state, beta_of_group, to_eval: bool):
    names, group_of = _groups.resolve(opt.param_groups, params)
    treedef: PyTreeDef
    leaves, treedef = jax.tree.flatten(params)
    z = treedef.flatten_up_to(state.unpacked().slots["z"])
    out = []
    for i, (p, g) in enumerate(zip(leaves, group_of)):
        if g is None:
            out.append(p)
            continue
        beta = beta_of_group(state.hparams, g)
        weight = 1 - 1 / beta if to_eval else 1 - beta
        # torch: only parameters with a ``z`` (that have stepped) move
        out.append(jnp.where(state.step[i] > 0, lerp(p, z[i], weight), p))
    return treedef.unflatten(out)


def _attach_switch(opt: Optimizer, beta_of_group) -> Optimizer:
    opt.eval_params = lambda params, state: _switch(
        opt, params, state, beta_of_group, True
    )
    opt.train_params = lambda params, state: _switch(
        opt, params, state, beta_of_group, False
    )
    return opt


def schedulefree_eval_params(opt: Optimizer, params, state):
    """torch's `optimizer.eval()`: the parameters `x` to evaluate at."""
    return opt.eval_params(params, state)


def schedulefree_train_params(opt: Optimizer, params, state):
    """torch's `optimizer.train()`: back from eval-mode to train-mode params."""
    return opt.train_params(params, state)


@_validate.optimizer_factory
def adamw_schedule_free(
    lr: float = 0.0025,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    foreach: bool | None = True,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Schedule-free AdamW, as `schedulefree.AdamWScheduleFree`.

    With $k$ the group's step (from 1), $\gamma_k$ = `lr` times
    the linear warmup $\min(1, k/\text{warmup\_steps})$,
    $\gamma_{\max}$ its running max and
    $w_k = k^r\gamma_{\max}^{p}$ ($p$ = `weight_lr_power`):

    $$
    \begin{aligned}
    c_k &= w_k / \textstyle\sum_{i\le k} w_i \\
    v_k &= \beta_2 v_{k-1} + (1-\beta_2) g_k^2 \\
    \hat g_k &= g_k / (\sqrt{v_k/(1-\beta_2^k)} + \epsilon)
                + \lambda y_{k-1} \\
    y_k &= \operatorname{lerp}(y_{k-1}, z_{k-1}, c_k)
           + \gamma_k(\beta_1(1-c_k) - 1)\,\hat g_k \\
    z_k &= z_{k-1} - \gamma_k \hat g_k
    \end{aligned}
    $$

    The parameters are $y$; evaluate at
    `opt.eval_params(params, state)` ($x$, torch's `eval()`, see the
    module doc). `foreach` is accepted and ignored (both torch paths round
    alike). Like the reference there is no argument validation. Complex
    parameters are not supported. State: `z`, `exp_avg_sq`; the group
    scalars `k`, `weight_sum`, `lr_max`, `scheduled_lr` are
    hyperparameters.
    """
    inner = make_optimizer(
        name="AdamWScheduleFree",
        rule=_adamw_rule,
        init_slots=_adamw_slots,
        hyperparams={
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "r": r,
            "warmup_steps": warmup_steps,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            **_GROUP_SCALARS,
        },
        param_groups=param_groups,
        supports_complex=False,
        extra_defaults={"foreach": foreach},
    )
    opt = with_group_state(inner, _advance)
    return _attach_switch(opt, lambda hparams, g: hparams["betas"][g, 0])


@_validate.optimizer_factory
def sgd_schedule_free(
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2,
    foreach: bool | None = True,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Schedule-free SGD, as `schedulefree.SGDScheduleFree`.

    With $k$, $\gamma_k$, $c_k$ as in
    [`adamw_schedule_free`][funcopt.contrib.adamw_schedule_free] and $\mu$ = `momentum`:

    $$
    \begin{aligned}
    \hat g_k &= g_k + \lambda y_{k-1} \\
    y_k &= \operatorname{lerp}(y_{k-1}, z_{k-1}, c_k)
           + \gamma_k(\mu(1-c_k) - 1)\,\hat g_k \\
    z_k &= z_{k-1} - \gamma_k \hat g_k
    \end{aligned}
    $$

    The parameters are $y$; `opt.eval_params(params, state)` gives
    torch's `eval()` parameters $x$ (`lerp(y, z, 1 - 1/\mu)`).
    `foreach` is accepted and ignored. State: `z`; group scalars as in
    [`adamw_schedule_free`][funcopt.contrib.adamw_schedule_free].
    """
    inner = make_optimizer(
        name="SGDScheduleFree",
        rule=_sgd_rule,
        init_slots=_z_slots,
        hyperparams={
            "lr": lr,
            "momentum": momentum,
            "r": r,
            "warmup_steps": warmup_steps,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            **_GROUP_SCALARS,
        },
        validate=_validate_sgd,
        param_groups=param_groups,
        extra_defaults={"foreach": foreach},
    )
    opt = with_group_state(inner, _advance)
    return _attach_switch(opt, lambda hparams, g: hparams["momentum"][g])
