r"""Prodigy, mirroring `prodigyopt.Prodigy` (prodigyopt 1.1.2).

Prodigy is Adam whose step size `d` is estimated from *all* parameters
before any is updated, so it is written on
`funcopt.contrib._grouped.with_group_state`: a first pass
(`leaf_stats`) takes each parameter's dot product
$\langle g, p_0 - p\rangle$ and hands its sliced gradient and `s`
buffer to `prepare`, which sums the numerator and denominator in torch's
parameter order, updates `d`/`d_max`/`d_numerator`/`k` (the
reference's group scalars, here hyperparameters in the state) and decides the
reference's early return; then the per-parameter rule updates the moments and
the parameter.

Group-0 values
--------------
The reference reads `betas`, `beta3`, `k`, `d`, `d_max`,
`d_numerator`, `d_coef` and `growth_rate` from its *first* param group
only, the learning rate as the max over groups, and `d0` of the *last* group
in the `d == d0` test; `eps`, `weight_decay`, `d0` (in `d/d0`),
`safeguard_warmup` and `slice_p` are per group. funcopt reads the same.
`use_bias_correction` and `decouple` are read from group 0 only, so they
are optimizer-wide here (not per-group overrides).

The rule's view of the hyperparameters
---------------------------------------
The inner rule sees this step's values under the state's names (the state's
hyperparameter set is fixed): `betas`/`beta3`/`d` are group 0's (`beta3`
resolved from `sqrt(beta2)` when unset), `d_hat` carries the *updated*
`d`, `d_numerator` carries `dlr` and `k` the early-return flag. What is
stored in the state afterwards is exactly what torch stores in every group.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, addcdiv, addcmul, scalar, widest_float
from ._grouped import GroupStep, with_group_state


@_validate.torch_checks("Prodigy")
def _validate_prodigy(group: Mapping[str, Any]) -> None:
    """`Prodigy.__init__`'s checks, in its order (constructor arguments only:
    torch does not check param-group overrides, and a group `lr` of 0 is
    how the reference freezes a group)."""
    d0, lr, eps, betas = group["d0"], group["lr"], group["eps"], group["betas"]
    if not 0.0 < d0:
        raise ValueError(f"Invalid d0 value: {d0}")
    if not 0.0 < lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 < eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    # the reference prints a note here; the comparison is its type check
    if group.get("decouple") and group.get("weight_decay", 0) > 0:
        pass


def _check_slice_p(slice_p: Any, where: str) -> None:
    if isinstance(slice_p, bool) or not isinstance(slice_p, int) or slice_p < 1:
        raise ValueError(
            f"{where}slice_p must be a positive int (the stride of "
            f"p.flatten()[::slice_p]), got {slice_p!r}"
        )


def _sliced(x: jax.Array, slice_p: int) -> jax.Array:
    """`x.flatten()[::slice_p]`."""
    return x.reshape(-1)[::slice_p]


def _prodigy_slots(param, group, *, exp_avg):
    flat = _sliced(param, group["slice_p"])
    slots = {"s": jnp.zeros_like(flat), "p0": flat}
    if exp_avg:
        slots["exp_avg"] = jnp.zeros_like(param)
    slots["exp_avg_sq"] = jnp.zeros_like(param)
    return slots


def _coupled(param, grad, hparams, decouple):
    """`grad.add_(p, alpha=decay)` when `decay != 0 and not decouple`."""
    if decouple:
        return grad
    decay = hparams["weight_decay"]
    return jnp.where(decay != 0, add(grad, param, decay), grad)


def _leaf_stats(param, grad, slots, step, hparams, options, *, decouple):
    """torch's first pass, the part that needs no group-0 value."""
    grad = _coupled(param, grad, hparams, decouple)
    sliced = _sliced(grad, options["slice_p"])
    p0 = slots["p0"]
    return {
        "dot": jnp.dot(sliced, p0 - _sliced(param, options["slice_p"])),
        "sliced_grad": sliced,
        "s": slots["s"],
        "safeguard_warmup": options["safeguard_warmup"],
    }


def _s_update(s, sliced_grad, alpha, beta3):
    """`s.mul_(beta3).add_(sliced_grad, alpha=alpha)`."""
    return add(s * scalar(beta3, s), sliced_grad, alpha)


def _prepare(hparams, stats, *, use_bias_correction):
    """torch's scalar code of `step`: Python floats (the widest float)."""
    f = widest_float()
    n = hparams["lr"].shape[0]
    beta1, beta2 = hparams["betas"][0, 0], hparams["betas"][0, 1]
    beta3 = hparams["beta3"][0]
    beta3 = jnp.where(jnp.isnan(beta3), jnp.sqrt(beta2), beta3)
    k, d, d_max = hparams["k"][0], hparams["d"][0], hparams["d_max"][0]
    lrs = hparams["lr"]
    lr = jnp.max(lrs)
    if use_bias_correction:
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))
        dlr = d * lr * bias_correction
    else:
        dlr = d * lr
    d_numerator = hparams["d_numerator"][0] * beta3
    delta_numerator = jnp.zeros((), f)
    d_denom = jnp.zeros((), f)
    for group, active, st in stats:
        d0 = hparams["d0"][group]
        on = jnp.logical_and(active, lrs[group] > 0.0)
        term = (d / d0) * dlr * st["dot"].astype(f)
        alpha = (d / d0) * (d if st["safeguard_warmup"] else dlr)
        s = _s_update(st["s"], st["sliced_grad"], alpha, beta3)
        total = jnp.sum(jnp.abs(s)).astype(f)
        delta_numerator = jnp.where(on, delta_numerator + term, delta_numerator)
        d_denom = jnp.where(on, d_denom + total, d_denom)

    # the reference returns early when no progress was made (fsdp off)
    skip = d_denom == 0
    global_d_numerator = d_numerator + delta_numerator
    safe_denom = jnp.where(skip, 1.0, d_denom)
    d_hat = hparams["d_coef"][0] * global_d_numerator / safe_denom
    # Python's max/min: the second argument only when strictly larger/smaller;
    # ``group`` after torch's first loop is the last group: its d0
    d_new = jnp.where(d == hparams["d0"][-1], jnp.where(d_hat > d, d_hat, d), d)
    d_max_new = jnp.where(d_hat > d_max, d_hat, d_max)
    grown = d_new * hparams["growth_rate"][0]
    d_new = jnp.where(grown < d_max_new, grown, d_max_new)

    def every(x):
        return jnp.broadcast_to(x, (n,))

    stored = {
        **hparams,
        "d_numerator": every(global_d_numerator),
        "d_denom": every(d_denom),
        "d": every(d_new),
        "d_max": every(d_max_new),
        "d_hat": every(d_hat),
        "k": hparams["k"] + 1,
    }
    stored = {k_: jnp.where(skip, hparams[k_], v) for k_, v in stored.items()}
    rule = {
        **hparams,
        "betas": jnp.broadcast_to(hparams["betas"][0], (n, 2)),
        "beta3": every(beta3),
        "d": every(d),
        "d_hat": every(d_new),
        "d_numerator": every(dlr),
        "k": every(skip.astype(f)),
    }
    return GroupStep(rule, stored, skip=skip)


def _check_group_lrs(lrs: jax.Array) -> None:
    """torch's `RuntimeError` for group lrs other than `max(lr)` and 0.

    Checked on an eager `step` (the lrs are concrete there); under `jit` they
    are traced and cannot raise, see [`prodigy`][funcopt.contrib.prodigy.prodigy].
    """
    values = [float(x) for x in jax.device_get(lrs)]
    top = max(values)
    if any(v not in [top, 0.0] for v in values):
        raise RuntimeError(
            "Setting different lr values in different parameter groups is "
            "only supported for values of 0"
        )


def _prodigy_rule(param, grad, slots, step, hparams, options, *, decouple):
    lr_on = hparams["lr"] > 0.0
    decay, eps, d0 = hparams["weight_decay"], hparams["eps"], hparams["d0"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    beta3 = hparams["beta3"]
    d, d_new, dlr = hparams["d"], hparams["d_hat"], hparams["d_numerator"]
    skip = hparams["k"] > 0
    grad = _coupled(param, grad, hparams, decouple)
    sliced = _sliced(grad, options["slice_p"])

    # first pass: EMAs and s, only in groups whose lr is positive
    alpha = (d / d0) * (d if options["safeguard_warmup"] else dlr)
    new_slots = dict(slots)
    new_slots["s"] = jnp.where(
        lr_on, _s_update(slots["s"], sliced, alpha, beta3), slots["s"]
    )
    if "exp_avg" in slots:
        exp_avg = add(slots["exp_avg"] * scalar(beta1, grad), grad, d * (1 - beta1))
        new_slots["exp_avg"] = jnp.where(
            jnp.logical_and(lr_on, beta1 > 0), exp_avg, slots["exp_avg"]
        )
    exp_avg_sq = addcmul(
        slots["exp_avg_sq"] * scalar(beta2, grad), grad, grad, d * d * (1 - beta2)
    )
    new_slots["exp_avg_sq"] = jnp.where(lr_on, exp_avg_sq, slots["exp_avg_sq"])

    # second pass (skipped on the early return): with the updated d
    denom = jnp.sqrt(new_slots["exp_avg_sq"]) + scalar(d_new * eps, param)
    p = param
    if decouple:
        p = jnp.where(decay != 0, add(p, p, -decay * dlr), p)
    plain = addcdiv(p, grad, denom, -dlr * d_new)
    if "exp_avg" in slots:
        new_p = jnp.where(
            beta1 > 0, addcdiv(p, new_slots["exp_avg"], denom, -dlr), plain
        )
    else:
        new_p = plain
    return jnp.where(skip, param, new_p), new_slots


@_validate.optimizer_factory
def prodigy(
    lr: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0,
    decouple: bool = True,
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: float = 1e-6,
    d_coef: float = 1.0,
    growth_rate: float = float("inf"),
    fsdp_in_use: bool = False,
    slice_p: int = 1,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Prodigy (Adam with a learned step size `d`), as `prodigyopt.Prodigy`.

    With $\gamma$ the largest group `lr`, $k$ the step (from 0),
    $\beta_3$ = `beta3` (default $\sqrt{\beta_2}$),
    $\hat\gamma_k = d_k\gamma$
    ($\times\sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})$ with
    `use_bias_correction`), $g$ the gradient ($+\lambda\theta$
    unless `decouple`) and $\tilde x$ = `x.flatten()[::slice_p]`:

    $$
    \begin{aligned}
    r_k &= \beta_3 r_{k-1} + \textstyle\sum_p \frac{d_k}{d_0}\hat\gamma_k
           \langle \tilde g, \tilde\theta_0 - \tilde\theta\rangle \\
    s &\leftarrow \beta_3 s + \frac{d_k}{d_0}\,
         (d_k \text{ if safeguard\_warmup else } \hat\gamma_k)\,\tilde g \\
    m &\leftarrow \beta_1 m + d_k(1-\beta_1) g, \quad
    v \leftarrow \beta_2 v + d_k^2(1-\beta_2) g^2 \\
    \hat d &= c\, r_k / \textstyle\sum_p \|s\|_1, \quad
    d_{\max} \leftarrow \max(d_{\max}, \hat d) \\
    d_{k+1} &= \min(d_{\max},\, \rho\, d'_k), \quad
    d'_k = \max(d_k, \hat d) \text{ while } d_k = d_0 \text{ else } d_k \\
    \theta &\leftarrow \theta(1 - \lambda\hat\gamma_k) \text{ (decouple)};
    \quad \theta \leftarrow \theta - \hat\gamma_k\,
    m / (\sqrt{v} + d_{k+1}\epsilon)
    \end{aligned}
    $$

    ($c$ = `d_coef`, $\rho$ = `growth_rate`; with
    $\beta_1 = 0$ the last step uses $d_{k+1} g$ for $m$).
    When $\sum_p\|s\|_1 = 0$ the reference returns early: moments and
    `s` keep their update, parameters, step counts and group scalars do
    not; so does funcopt. A group with `lr` 0 skips its moments and `s`
    but still takes the parameter step, as in the reference; other lrs that
    differ from the largest raise torch's `RuntimeError` in an eager
    `step` and, under `jit` (traced lrs cannot raise), are not checked:
    keep group lrs equal or 0.

    The group scalars `d`, `d_max`, `d_numerator`, `d_denom`,
    `d_hat` and `k` are hyperparameters in the state
    (`fo.get_hparam(state, "d")`), as in torch's `param_groups`
    (`d_denom`/`d_hat` exist from the start here, 0 and `d0`);
    `beta3=None` is stored as NaN. See the module doc for which values are
    read from the first group only. `fsdp_in_use=True` is refused: under
    JAX the sums already span a sharded array, so there is nothing to
    all-reduce (leave it False with sharded params); the reference's
    `fsdp_in_use` also disables the early return, which is not mirrored.
    `slice_p` is supported (per group). Complex parameters are not
    supported. State: `s`, `p0` (always the sliced copy; torch stores a
    0-d zero for an all-zero parameter, the same numbers), `exp_avg` (when
    any group's $\beta_1 > 0$ at construction; the reference creates it
    from group 0's) and `exp_avg_sq`.
    """
    _validate_prodigy(
        dict(
            d0=d0,
            lr=lr,
            eps=eps,
            betas=betas,
            decouple=decouple,
            weight_decay=weight_decay,
        )
    )
    if fsdp_in_use:
        raise NotImplementedError(
            "funcopt.contrib.prodigy: fsdp_in_use=True is not supported; JAX "
            "reductions over sharded arrays are already global, so leave it "
            "False (the reference uses it to all-reduce with torch.distributed)"
        )
    _check_slice_p(slice_p, "")
    _validate.check_param_groups(param_groups)
    nan = float("nan")
    if param_groups is not None:
        overrides = {}
        for name, values in param_groups.overrides.items():
            values = dict(values)
            if "beta3" in values and values["beta3"] is None:
                values["beta3"] = nan
            if "slice_p" in values:
                _check_slice_p(values["slice_p"], f"param group {name!r}: ")
            overrides[name] = values
        param_groups = ParamGroups(param_groups.labels, overrides)
    beta1s = [betas[0]]
    if param_groups is not None:
        beta1s += [
            v["betas"][0] for v in param_groups.overrides.values() if "betas" in v
        ]
    any_beta1 = any(b > 0 for b in beta1s)
    inner = make_optimizer(
        name="Prodigy",
        rule=functools.partial(_prodigy_rule, decouple=decouple),
        # torch creates exp_avg when group 0's beta1 > 0, for every group
        init_slots=functools.partial(_prodigy_slots, exp_avg=any_beta1),
        hyperparams={
            "lr": lr,
            "betas": betas,
            "beta3": nan if beta3 is None else beta3,
            "eps": eps,
            "weight_decay": weight_decay,
            "d": d0,
            "d0": d0,
            "d_max": d0,
            "d_numerator": 0.0,
            "d_coef": d_coef,
            "k": 0,
            "growth_rate": growth_rate,
            "d_denom": 0.0,
            "d_hat": d0,
        },
        options={"safeguard_warmup": safeguard_warmup, "slice_p": slice_p},
        param_groups=param_groups,
        supports_complex=False,
        extra_defaults={
            "decouple": decouple,
            "use_bias_correction": use_bias_correction,
            "fsdp_in_use": fsdp_in_use,
        },
    )
    prepare = functools.partial(_prepare, use_bias_correction=use_bias_correction)
    stats = functools.partial(_leaf_stats, decouple=decouple)
    opt = with_group_state(
        inner,
        prepare,
        leaf_stats=stats,
        check_hparams=lambda hparams: _check_group_lrs(hparams["lr"]),
    )
    opt.defaults["beta3"] = beta3  # the state holds NaN for None
    return opt
