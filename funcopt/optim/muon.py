"""Muon, mirroring `torch.optim.Muon`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add, is_reduced, lerp, mul, op_scalar, opmath
from ._common import decoupled_weight_decay, group_rule

# torch.optim._muon's defaults
EPS = 1e-7
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
DEFAULT_NS_STEPS = 5


def _validate_muon(group: Mapping[str, Any]) -> None:
    lr = group["lr"]
    _validate.check_scalar_lr(lr)
    if not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not 0.0 <= group["momentum"]:
        raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
    adjust_lr_fn = group["adjust_lr_fn"]
    known = ["original", "match_rms_adamw"]
    if adjust_lr_fn is not None and not (
        isinstance(adjust_lr_fn, str) and adjust_lr_fn in known
    ):
        raise ValueError(
            f"Adjust learning rate function {adjust_lr_fn} is not supported"
        )
    # torch checks these in Newton-Schulz, at the first step; funcopt at once
    if group["ns_steps"] >= 100:
        raise ValueError(
            "Number of steps must be less than 100 for computational efficiency"
        )
    if not isinstance(group["ns_coefficients"], tuple | list):
        raise TypeError(
            "ns_coefficients must be a tuple of 3 numbers, got "
            f"{group['ns_coefficients']!r}"
        )
    if len(group["ns_coefficients"]) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def _check_2d(param) -> None:
    if param.ndim != 2:
        size = ", ".join(str(n) for n in param.shape)
        raise ValueError(
            "Muon only supports 2D parameters whereas we found a parameter with "
            f"size: torch.Size([{size}])"
        )


def _muon_slots(param, group):
    _check_2d(param)
    return {"momentum_buffer": jnp.zeros_like(param)}


def _bf16_matmul(x, y):
    """A bf16 matmul as torch's CPU kernel: float32 accumulation, one rounding."""
    return jnp.matmul(x, y, preferred_element_type=jnp.float32)


def _zeropower_via_newtonschulz(grad, coefficients, ns_steps, eps):
    """torch's `_zeropower_via_newtonschulz`: bf16, every op rounded once.

    Returns the result and `grad.bfloat16()` divided by its norm (shaped as
    `grad`), which torch writes in place into `grad` when it already is
    bfloat16 (`.bfloat16()` then returns the tensor itself).
    """
    f32, bf16 = jnp.float32, jnp.bfloat16
    a, b, c = (coefficients[i].astype(f32) for i in range(3))
    x = grad.astype(bf16)
    transposed = grad.shape[0] > grad.shape[1]
    if transposed:
        x = x.T
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(f32)))).astype(bf16)
    norm = jnp.maximum(norm.astype(f32), eps.astype(f32)).astype(bf16)
    x = (x.astype(f32) / norm.astype(f32)).astype(bf16)
    normalized = x.T if transposed else x
    for _ in range(ns_steps):
        gram = _bf16_matmul(x, x.T).astype(bf16)
        # addmm(gram, gram, gram, beta=b, alpha=c)
        gram_update = (b * gram.astype(f32) + c * _bf16_matmul(gram, gram)).astype(bf16)
        # addmm(x, gram_update, x, beta=a)
        x = (a * x.astype(f32) + _bf16_matmul(gram_update, x)).astype(bf16)
    return (x.T if transposed else x), normalized


def _adjust_ratio(adjust_lr_fn: str | None, shape) -> float:
    """torch's `_adjust_lr` factor (Python floats, as torch computes it)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _muon_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if grad.ndim != 2:
        raise ValueError("Param gradient must be a 2D matrix")
    lr, momentum = hparams["lr"], hparams["momentum"]
    buf = lerp(slots["momentum_buffer"], grad, 1 - momentum)
    update = lerp(grad, buf, momentum) if options["nesterov"] else buf
    update, normalized = _zeropower_via_newtonschulz(
        update, hparams["ns_coefficients"], options["ns_steps"], hparams["eps"]
    )
    if not options["nesterov"] and buf.dtype == jnp.bfloat16:
        # torch's quirk, kept: for a bfloat16 param the update *is* the buffer,
        # ``buf.bfloat16()`` returns it, and Newton-Schulz's in-place
        # ``div_`` by its norm leaves the stored buffer normalized
        buf = normalized
    ratio = _adjust_ratio(options["adjust_lr_fn"], param.shape)
    if lr_dtype is None:
        adjusted_lr = lr * ratio
    else:
        # a tensor lr: `lr * ratio` is a tensor op in lr's dtype (and so is
        # `1 - lr * weight_decay` below)
        lr = lr.astype(lr_dtype)
        adjusted_lr = mul(lr, ratio)
    # decoupled, with the unadjusted lr, after Newton-Schulz
    param = decoupled_weight_decay(param, lr, hparams["weight_decay"], options)
    if is_reduced(param) and update.dtype != param.dtype:
        # a float16 param plus the bfloat16 update: torch computes in float32
        new = opmath(param) + op_scalar(-adjusted_lr, param) * opmath(update)
        param = new.astype(param.dtype)
    else:
        param = add(param, update.astype(param.dtype), -adjusted_lr)
    return param, {"momentum_buffer": buf}


def _complex_error(paths, indices):
    # torch raises this at step(); funcopt at init() and step()
    return RuntimeError("Muon does not support complex parameters")


@_validate.optimizer_factory
def muon(
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
    eps: float = EPS,
    ns_steps: int = DEFAULT_NS_STEPS,
    adjust_lr_fn: str | None = None,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""Muon, as `torch.optim.Muon`: momentum orthogonalized by Newton–Schulz.

    $$
    \begin{aligned}
    B_t &= \operatorname{lerp}(B_{t-1}, g_t, 1-\mu) \\
    \tilde B_t &= \operatorname{lerp}(g_t, B_t, \mu)
           \text{ if nesterov else } B_t \\
    O_t &= \operatorname{NS}^{(a,b,c)}_k(\tilde B_t; \varepsilon) \\
    \theta_t &= \theta_{t-1}(1 - \gamma\lambda) - \gamma s\, O_t
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $\lambda$ = `weight_decay`,
    $\mu$ = `momentum`, $(a,b,c)$ = `ns_coefficients`,
    $k$ = `ns_steps`, $\varepsilon$ = `eps`. The buffer is an
    EMA (torch's docstring's $\mu B + g$ is not what it computes).
    $\operatorname{NS}$ runs in bfloat16 on $X$ = the matrix
    (transposed when it has more rows than columns) divided by
    $\max(\lVert X\rVert_F, \varepsilon)$, then `ns_steps` times
    $A = XX^\top$, $M = bA + cA^2$, $X = aX + MX$; each
    matmul accumulates in float32 and rounds once to bfloat16, as torch's CPU
    kernels. For a `(rows, cols)` parameter the shape scale $s$ is
    $\sqrt{\max(1, rows/cols)}$ (`adjust_lr_fn` None or
    `"original"`) or $0.2\sqrt{\max(rows, cols)}$
    (`"match_rms_adamw"`); weight decay uses the unadjusted `lr`.

    Every parameter must be 2-D: `init` raises torch's `ValueError`
    otherwise (torch raises it at construction). Torch checks `ns_steps <
    100` and the number of coefficients at the first step; funcopt raises
    the same `ValueError` when the optimizer is made. Complex parameters
    raise torch's `RuntimeError` (at `init` and `step`; torch: at `step`).

    An array `lr` (torch: `lr=torch.tensor(...)`, float32 by default) is
    torch's tensor arithmetic: $1 - \gamma\lambda$ and $\gamma s$ are
    tensor ops in the array's dtype, each rounded; a Python float `lr` is
    torch's Python-float math (float64 with x64 enabled). The factory's `lr`
    decides it for every parameter group.

    State: `momentum_buffer` per parameter; torch keeps no step count (the
    core's `state.step` still counts). For a bfloat16 parameter without
    `nesterov` the stored buffer is $B_t$ divided by its norm, as in
    torch, whose Newton-Schulz normalizes `B_t.bfloat16()` in place (the
    buffer itself when it already is bfloat16).
    """
    opt = make_optimizer(
        name="Muon",
        # each group's rule from its own lr (a float64 tensor: a float)
        rule=group_rule(_muon_rule, narrow=True, lr_dtype="lr"),
        init_slots=_muon_slots,
        hyperparams={
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
        },
        options={
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        },
        validate=_validate_muon,
        param_groups=param_groups,
        supports_complex=False,
        complex_error=_complex_error,
    )
    return opt
