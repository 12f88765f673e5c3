"""Adafactor, mirroring `torch.optim.Adafactor`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _reductions, _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import (
    _exact32,
    _upcast_opaque,
    add,
    div,
    is_reduced,
    lerp,
    mul,
    opmath,
    rsqrt,
    scalar,
    tensor_op,
    widest_float,
)
from ._common import (
    apply_maximize,
    decoupled_weight_decay,
    foreach_mul,
    group_rule,
)


@_validate.torch_checks("Adafactor")
def _validate_adafactor(group: Mapping[str, Any]) -> None:
    lr, eps = group["lr"], group["eps"]
    _validate.check_scalar_lr(lr)
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not 0.0 >= group["beta2_decay"]:
        raise ValueError(f"beta2_decay should be <= 0 but is: {group['beta2_decay']}")
    if eps[0] is not None and not 0.0 <= eps[0]:
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
    if not 0.0 <= eps[1]:
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
    if not 1.0 <= group["d"]:
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {group['d']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"weight_decay should be >= 0 but is: {group['weight_decay']}")


def _encode_eps(eps: Any) -> tuple[Any, Any]:
    """`eps1=None` (finfo(param dtype).eps) is stored in the state as NaN."""
    return (math.nan if eps[0] is None else eps[0], eps[1])


def _adafactor_slots(param, group):
    if param.ndim > 1:
        row_shape = (*param.shape[:-1], 1)
        col_shape = (*param.shape[:-2], 1, param.shape[-1])
        return {
            "row_var": jnp.zeros(row_shape, param.dtype),
            "col_var": jnp.zeros(col_shape, param.dtype),
        }
    return {"variance": jnp.zeros_like(param)}


def _norm(x, axis=None):
    """`torch.norm(x)` (`axis=None`) or `torch.norm(x, dim=axis, keepdim=True)`:
    the 2-norm, in `x`'s dtype (float32 sums for 16 bits), with torch's
    order of additions where float32 ops mirror torch's (`funcopt._reductions`)."""
    if _exact32(x):
        return _reductions.norm(x, axis)
    single = _reductions.norm_of_single_elements(x, axis)
    if single is not None:
        return single
    kwargs = {} if axis is None else {"axis": axis, "keepdims": True}
    return tensor_op(lambda y: jnp.sqrt(jnp.sum(y * y, **kwargs)), x)


def _mean_of_rows(row_var):
    """`row_var.mean(dim=-2, keepdim=True)`; a 16-bit mean is a float32 sum
    and division, rounded once."""
    if _exact32(row_var):
        return _reductions.mean(row_var, -2)
    return tensor_op(lambda r: jnp.mean(r, axis=-2, keepdims=True), row_var)


def _adafactor_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if lr_dtype not in (None, "float64"):
        # a tensor lr: torch's scalar math with it runs in its dtype (a
        # float64 one's is Python-float math)
        hparams = {**hparams, "lr": hparams["lr"].astype(lr_dtype)}
    lr, d, weight_decay = hparams["lr"], hparams["d"], hparams["weight_decay"]
    eps1, eps2 = hparams["eps"][0], hparams["eps"][1]
    # NaN encodes torch's eps1=None: finfo(param.dtype).eps
    eps1 = jnp.where(jnp.isnan(eps1), float(jnp.finfo(param.dtype).eps), eps1)
    grad = apply_maximize(grad, options)
    # torch: Python-float scalar math on float(step)
    one_minus_beta2_t = step ** hparams["beta2_decay"]
    param_rms = _norm(param).astype(widest_float()) / param.size**0.5
    alpha, tensor_alpha = _step_size(lr, step, jnp.maximum(eps2, param_rms))
    # decoupled, with lr, after alpha is read from the undecayed param
    param = decoupled_weight_decay(param, lr, weight_decay, options)
    new_slots = {}
    if grad.ndim > 1:
        # norm(...).square_().div_(size): three ops, each rounded
        row_norm = _norm(grad, axis=-1)
        row_mean = div(tensor_op(jnp.square, row_norm), grad.shape[-1])
        row_var = lerp(slots["row_var"], row_mean, one_minus_beta2_t)
        col_norm = _norm(grad, axis=-2)
        col_mean = div(tensor_op(jnp.square, col_norm), grad.shape[-2])
        col_var = lerp(slots["col_var"], col_mean, one_minus_beta2_t)
        # torch's row_var @ col_var: an outer product (inner dimension 1)
        var_estimate = tensor_op(jnp.multiply, row_var, col_var)
        row_var_mean = _mean_of_rows(row_var)
        var_estimate = tensor_op(
            jnp.divide, var_estimate, jnp.maximum(row_var_mean, scalar(eps1, param))
        )
        new_slots = {"row_var": row_var, "col_var": col_var}
    else:
        grad_squared = tensor_op(jnp.multiply, grad, grad)
        variance = lerp(slots["variance"], grad_squared, one_minus_beta2_t)
        var_estimate = variance
        new_slots = {"variance": variance}
    # torch's CPU rsqrt is 1/sqrt
    update = rsqrt(jnp.maximum(var_estimate, scalar(eps1 * eps1, param)))
    update = tensor_op(jnp.multiply, update, grad)
    update_rms = _norm(update).astype(widest_float()) / (update.size**0.5 * d)
    denom = jnp.maximum(1.0, update_rms)
    scale = -alpha / denom
    if tensor_alpha is not None:
        # where alpha is a tensor, `-alpha / denom` is a tensor op, read by
        # `add_` as a Python float
        takes_lr, tensor_alpha = tensor_alpha
        tensor_scale = div(-tensor_alpha, denom).astype(widest_float())
        scale = jnp.where(takes_lr, tensor_scale, scale)
    if options["foreach"]:
        # `_foreach_mul_(updates, alphas)`, then `_foreach_add_(params, updates)`
        update = _foreach_scale(update, scale, lr, step, lr_dtype)
        if is_reduced(update):
            # the 16-bit product read through its bits: LLVM would otherwise
            # fuse it into the sum (see `_math._upcast_opaque`)
            total = opmath(param) + _upcast_opaque(update)
            return total.astype(param.dtype), new_slots
        return tensor_op(jnp.add, param, update), new_slots
    return add(param, update, scale), new_slots


def _foreach_scale(update, scale, lr, step, lr_dtype):
    r"""`_foreach_mul_(updates, alphas)`: a Python-float alpha is rounded
    to a 16-bit update's dtype first (`foreach_mul`); a 0-d tensor alpha
    (while $\rho_t$ is a tensor `lr`) is read as its value, as `mul` does."""
    if lr_dtype is None:
        return foreach_mul(update, scale)
    return jnp.where(
        _takes_lr(lr, 1 / step**0.5), mul(update, scale), foreach_mul(update, scale)
    )


def _takes_lr(lr, inv_sqrt):
    r"""Whether torch's `min(lr, inv_sqrt)` ($1/\sqrt t$) is the tensor `lr`:
    unless `inv_sqrt` compares below it, in lr's dtype."""
    return ~(inv_sqrt.astype(lr.dtype) < lr)


def _step_size(lr, step, rms):
    r"""$\alpha_t = \max(\epsilon_2, \operatorname{RMS}) \min(\gamma, 1/\sqrt t)$.

    `(alpha, None)` for a Python-float `lr`. For a tensor `lr`, torch's
    `min(lr, 1 / step**0.5)` is the Python float where it compares below
    `lr` (in lr's dtype) and the tensor `lr` otherwise, whose `alpha` is a
    tensor op in its dtype: `(alpha, (takes_lr, tensor_alpha))`.
    """
    inv_sqrt = 1 / step**0.5
    if lr.dtype == widest_float():
        return rms * jnp.minimum(lr, inv_sqrt), None
    takes_lr = _takes_lr(lr, inv_sqrt)
    tensor_alpha = mul(lr, rms)
    alpha = jnp.where(takes_lr, tensor_alpha.astype(inv_sqrt.dtype), rms * inv_sqrt)
    return alpha, (takes_lr, tensor_alpha)


def _complex_error(paths, indices):
    # torch raises this at step(); funcopt at init() and step()
    return RuntimeError("Adafactor does not support complex parameters")


@_validate.optimizer_factory
def adafactor(
    lr: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Adafactor, as `torch.optim.Adafactor` (torch's variant, not optax's).

    $$
    \begin{aligned}
    G_t &= \pm\nabla_\theta f_t(\theta_{t-1}) \\
    \hat\beta_t &= t^{\tau} \quad (= 1 - \beta_{2,t}) \\
    \rho_t &= \min(\gamma, 1/\sqrt t) \\
    \alpha_t &= \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))\,\rho_t \\
    \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
    R_t &= \operatorname{lerp}(R_{t-1}, \operatorname{mean}_{-1}(G_t^2),
           \hat\beta_t), \quad
    C_t = \operatorname{lerp}(C_{t-1}, \operatorname{mean}_{-2}(G_t^2),
           \hat\beta_t) \\
    V_t &= \frac{R_t C_t}{\max(\operatorname{mean}_{-2}(R_t), \epsilon_1)}
           \quad\text{(}\ge\text{2-D; else }
           V_t = \operatorname{lerp}(V_{t-1}, G_t^2, \hat\beta_t)\text{)} \\
    U_t &= G_t / \sqrt{\max(V_t, \epsilon_1^2)} \\
    \theta_t &= \theta_{t-1} - \frac{\alpha_t}
           {\max(1, \operatorname{RMS}(U_t)/d)}\, U_t
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\tau$ = `beta2_decay`,
    $(\epsilon_1, \epsilon_2)$ = `eps`, $\lambda$ =
    `weight_decay`; `t` is each parameter's own step count. `lr` only
    caps the relative step $\rho_t$ and scales the decoupled weight
    decay. Leaves with two or more dimensions keep factored second moments
    over their last two dimensions, with torch's shapes: `row_var`
    (`shape[:-1] + (1,)`) and `col_var` (`shape[:-2] + (1, shape[-1])`);
    0-D and 1-D leaves keep a full `variance`. There is no first moment.

    `eps[0] = None` means `jnp.finfo(param.dtype).eps`, resolved per
    parameter (torch resolves it on the first parameter with a gradient of
    each group, so a group mixing float32 and float64 parameters uses that
    parameter's dtype for all of them). In the state it is stored as NaN:
    `fo.get_hparam(state, "eps")` shows NaN for None, and
    `fo.set_hparam(state, "eps", (float("nan"), 1e-3))` sets it back.

    `foreach=True` mirrors torch's `_multi_tensor_adafactor`: the update is
    scaled in place, $u \leftarrow \operatorname{round}(u \cdot (-\alpha_t/
    \text{denom}))$, then added ($\theta + u$, two roundings instead of one
    multiply-add), and `_foreach_mul_` rounds its scalar to a 16-bit
    tensor's dtype first (the update's scale, the weight decay factor).
    With `eps1=None`, torch's foreach path takes the finfo `eps` of the
    first dtype it groups for every later dtype of the group; funcopt uses
    each parameter's own (equal for a group of one dtype). A tensor `lr`
    (an array, e.g. `np.float32(0.3)`) keeps its dtype, as in torch:
    $\rho_t$ is `lr` until $1/\sqrt t$ compares below it (in its dtype),
    and while it is, $\alpha_t$ and $-\alpha_t/\text{denom}$ are tensor
    ops in lr's dtype, as is the decay factor $1 - \gamma\lambda$
    always. With `foreach=True` as well, `_foreach_mul_` gets those 0-d
    tensors (the decay factor, and $-\alpha_t/\text{denom}$ while
    $\rho_t$ is `lr`; float32 or float64) and reads them as their values:
    for a 16-bit tensor as float32, not rounded to its dtype first. There
    torch raises a `TypeError` when one foreach group (one dtype, and 2-D
    or more or not) mixes parameters whose $\rho_t$ is `lr` with others
    (unequal step counts); funcopt steps each. Complex parameters raise
    torch's `RuntimeError` at `init` and `step` (torch: at `step`).
    """
    group = dict(
        lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay
    )
    # validate torch's values (None included) here; the state holds NaN for None
    _validate_adafactor(group)
    _validate.check_param_groups(param_groups)
    if param_groups is not None:
        for values in param_groups.overrides.values():
            _validate_adafactor({**group, **values})
        param_groups = ParamGroups(
            param_groups.labels,
            {
                name: (
                    {**values, "eps": _encode_eps(values["eps"])}
                    if "eps" in values
                    else values
                )
                for name, values in param_groups.overrides.items()
            },
        )
    # a tensor lr keeps its dtype
    opt = make_optimizer(
        name="Adafactor",
        # each group's rule from its own lr (a float or a tensor)
        rule=group_rule(_adafactor_rule, lr_dtype="lr"),
        init_slots=_adafactor_slots,
        hyperparams={**group, "eps": _encode_eps(eps)},
        # foreach: torch's `_multi_tensor_adafactor` (None on CPU: single-tensor)
        options={"maximize": maximize, "foreach": foreach},
        param_groups=param_groups,
        supports_complex=False,
        complex_error=_complex_error,
    )
    opt.defaults = {**opt.defaults, "eps": eps}
    return opt
