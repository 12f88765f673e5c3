"""CyclicLR, OneCycleLR (which also cycle momentum) and SWALR."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._hparams import get_hparam, set_hparam
from ._base import (
    Scheduler,
    as_float,
    check_arguments,
    const,
    current_lr,
    div,
    format_param,
    is_concrete,
    pick,
    write_lr,
)

# --------------------------------------------------------------------------
# momentum / beta1
# --------------------------------------------------------------------------


def _momentum_kind(state: Any) -> str:
    """`"betas"` (Adam-like: cycles `betas[0]`) or `"momentum"`."""
    for name in ("betas", "momentum"):
        try:
            get_hparam(state, name)
        except KeyError:
            continue
        return name
    raise ValueError(
        "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
    )


def _check_momentum_buffers(state: Any, kind: str) -> None:
    """funcopt's documented limit: a group built with `momentum=0` has no
    momentum buffer, which torch would create lazily once cycling turns
    momentum on."""
    if kind != "momentum":
        return
    values = jnp.stack(get_hparam(state, "momentum"))
    if is_concrete(values) and bool(jnp.any(values == 0)):
        groups = [int(i) for i in np.flatnonzero(np.asarray(values) == 0)]
        raise ValueError(
            "cycle_momentum=True would switch on momentum for parameter group(s) "
            f"{groups}, which were built with momentum=0 and so have no momentum "
            "buffer in funcopt's state (torch creates it lazily). Construct the "
            "optimizer with momentum > 0 (any value: the scheduler overwrites it), "
            "or pass cycle_momentum=False."
        )


def _write_momentum(state: Any, kind: str, momentum: jax.Array) -> Any:
    if kind == "betas":
        betas = jnp.stack(get_hparam(state, "betas"))
        return set_hparam(state, "betas", betas.at[:, 0].set(momentum))
    return set_hparam(state, "momentum", momentum)


def _setup_momentum(
    state, keys, n_groups, cycle, base_momentum, max_momentum, last_epoch
):
    """torch's constructor code for `cycle_momentum`: `(state, base, max)`;
    the groups start at `max_momentum`.
    """
    if not cycle:
        return state, [0.0] * n_groups, [0.0] * n_groups
    kind = _momentum_kind(state)
    base = format_param("base_momentum", n_groups, base_momentum)
    top = format_param("max_momentum", n_groups, max_momentum)
    if last_epoch == -1:
        _check_momentum_buffers(state, kind)
        like = current_lr(state)
        state = _write_momentum(state, kind, const(top, like))
        keys["max_momentum"] = const(top, like)
        keys["base_momentum"] = const(base, like)
    return state, base, top


# --------------------------------------------------------------------------
# CyclicLR
# --------------------------------------------------------------------------


class CyclicState(NamedTuple):
    """`SchedulerState` plus per-group `max_lrs` and momentum bounds."""

    last_epoch: jax.Array
    step_count: jax.Array
    base_lrs: jax.Array
    max_lrs: jax.Array
    base_momentums: jax.Array
    max_momentums: jax.Array


class CyclicLR(Scheduler):
    name = "CyclicLR"

    def __init__(self, base_lr, max_lr, step_size_up, step_size_down, mode, gamma,
                 scale_fn, scale_mode, cycle_momentum, base_momentum, max_momentum,
                 last_epoch):  # fmt: skip
        super().__init__(last_epoch)
        self.base_lr, self.max_lr = base_lr, max_lr
        up = float(step_size_up)
        down = float(step_size_down) if step_size_down is not None else up
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        if mode not in ["triangular", "triangular2", "exp_range"] and scale_fn is None:
            raise ValueError("mode is invalid and scale_fn is None")
        self.mode, self.gamma = mode, gamma
        self.scale_fn = scale_fn
        if scale_fn is None:  # the built-in modes force their scale_mode
            scale_mode = "iterations" if mode == "exp_range" else "cycle"
        self.scale_mode = scale_mode
        self.cycle_momentum = cycle_momentum
        self.base_momentum, self.max_momentum = base_momentum, max_momentum

    def _prepare(self, state, n_groups, keys):
        base_lrs = format_param("base_lr", n_groups, self.base_lr)
        lr = current_lr(state)
        if self.last_epoch == -1:
            state = write_lr(state, const(base_lrs, lr))
        max_lrs = format_param("max_lr", n_groups, self.max_lr)
        state, base_m, max_m = _setup_momentum(
            state,
            keys,
            n_groups,
            self.cycle_momentum,
            self.base_momentum,
            self.max_momentum,
            self.last_epoch,
        )
        extra = [const(v, lr) for v in (base_lrs, max_lrs, base_m, max_m)]
        return state, extra

    def _make_state(self, last_epoch, step_count, base_lrs, extra):
        _, max_lrs, base_m, max_m = extra
        return CyclicState(last_epoch, step_count, base_lrs, max_lrs, base_m, max_m)

    def _construct(self, state, keys):
        keys = dict(keys)
        n_groups = current_lr(state).shape[0]
        state, extra = self._prepare(state, n_groups, keys)
        initial_lr = self._initial_lr(current_lr(state), keys.get("initial_lr"), extra)
        keys["initial_lr"] = initial_lr
        s = self._make_state(
            jnp.asarray(self.last_epoch, jnp.int32), jnp.asarray(0, jnp.int32),
            initial_lr, extra,
        )  # fmt: skip
        state, s, errors = self._initial_step(state, s)
        # torch: self.base_lrs = base_lrs after LRScheduler.__init__
        return state, s._replace(base_lrs=extra[0]), keys, errors

    def _scale(self, cycle, e, like):
        if self.scale_fn is not None:
            x = cycle if self.scale_mode == "cycle" else as_float(e, like)
            return jnp.asarray(self.scale_fn(x)).astype(like.dtype)
        if self.mode == "triangular":
            return const(1.0, like)
        if self.mode == "triangular2":
            return 1 / jnp.power(const(2.0, like), cycle - 1)
        return jnp.power(const(self.gamma, like), as_float(e, like))

    def _values(self, s, like):
        e = as_float(s.last_epoch, like)
        cycle = jnp.floor(1 + div(e, self.total_size))
        x = 1.0 + div(e, self.total_size) - cycle
        ratio = self.step_ratio
        factor = jnp.where(x <= ratio, div(x, ratio), div(x - 1, ratio - 1))
        scale = self._scale(cycle, s.last_epoch, like)
        lrs = s.base_lrs + (s.max_lrs - s.base_lrs) * factor * scale
        momentum = s.max_momentums - (s.max_momentums - s.base_momentums) * factor * (
            scale
        )
        return lrs, momentum

    def get_lr(self, state, s, initial):
        lrs, momentum = self._values(s, current_lr(state))
        if self.cycle_momentum:
            state = _write_momentum(state, _momentum_kind(state), momentum)
        return state, lrs, ()

    def optax_lr(self, count, base_lr, group):
        like = jnp.zeros((), jax.dtypes.canonicalize_dtype(jnp.float64))
        base = const(pick(self.base_lr, group), like)
        top = const(pick(self.max_lr, group), like)
        zero = const(0.0, like)
        s = CyclicState(count, count, base, top, zero, zero)
        return self._values(s, like)[0]


def cyclic_lr(
    base_lr: float | list[float],
    max_lr: float | list[float],
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[jax.Array], Any] | None = None,
    scale_mode: str = "cycle",
    cycle_momentum: bool = True,
    base_momentum: float | list[float] = 0.8,
    max_momentum: float | list[float] = 0.9,
    last_epoch: int = -1,
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.CyclicLR`: at step $e$, with
    $S$ = up + down and $r$ = up/$S$,

    $$
    \begin{aligned}
    c &= \lfloor 1 + e/S \rfloor,\quad x = 1 + e/S - c,\quad
    f = \begin{cases} x/r & x \le r \\ (x-1)/(r-1) & \text{else}\end{cases} \\
    \eta &= b + (M - b)\,f\,s(\cdot),\qquad
    \mu = M_\mu - (M_\mu - b_\mu)\,f\,s(\cdot)
    \end{aligned}
    $$

    with $s$ = 1 (triangular), $2^{1-c}$ (triangular2),
    $\gamma^e$ (exp_range) or `scale_fn` of the cycle or the
    iteration (`scale_mode`; the built-in modes force theirs, as torch).
    `scale_fn` receives a float scalar array and must be jnp-traceable.

    `init` sets every group's lr to `base_lr` (so torch's
    `initial_lr = base_lr`). With `cycle_momentum` the momentum
    (SGD-like `momentum`, or `betas[0]` for Adam-like states) is cycled
    and starts at `max_momentum`. Per-group lists are checked at `init`
    (where the groups are known) with torch's message. Deviation: a group
    built with `momentum=0` has no momentum buffer in funcopt, so
    `cycle_momentum=True` raises `ValueError` at `init` for it, where
    torch silently switches momentum on.
    """
    sched = CyclicLR(
        base_lr=base_lr,
        max_lr=max_lr,
        step_size_up=step_size_up,
        step_size_down=step_size_down,
        mode=mode,
        gamma=gamma,
        scale_fn=scale_fn,
        scale_mode=scale_mode,
        cycle_momentum=cycle_momentum,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
        last_epoch=last_epoch,
    )
    check_arguments(
        "CyclicLR",
        ints={"last_epoch": last_epoch},
        reals={
            "step_size_up": step_size_up,
            "gamma": gamma,
            **({} if step_size_down is None else {"step_size_down": step_size_down}),
        },
        group_reals={
            "base_lr": base_lr,
            "max_lr": max_lr,
            "base_momentum": base_momentum,
            "max_momentum": max_momentum,
        },
    )
    return sched


# --------------------------------------------------------------------------
# OneCycleLR
# --------------------------------------------------------------------------


class OneCycleState(NamedTuple):
    """`SchedulerState` plus each group's `initial_lr`, `max_lr`,
    `min_lr` and momentum bounds (torch's group keys).
    """

    last_epoch: jax.Array
    step_count: jax.Array
    base_lrs: jax.Array
    initial_lrs: jax.Array
    max_lrs: jax.Array
    min_lrs: jax.Array
    base_momentums: jax.Array
    max_momentums: jax.Array


class OneCycleLR(Scheduler):
    name = "OneCycleLR"

    def __init__(self, max_lr, total_steps, epochs, steps_per_epoch, pct_start,
                 anneal_strategy, cycle_momentum, base_momentum, max_momentum,
                 div_factor, final_div_factor, three_phase, last_epoch):  # fmt: skip
        super().__init__(last_epoch)
        if total_steps is not None:
            if total_steps <= 0 or not isinstance(total_steps, int):
                raise ValueError(
                    f"Expected positive integer total_steps, but got {total_steps}"
                )
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            if not isinstance(epochs, int) or epochs <= 0:
                raise ValueError(f"Expected positive integer epochs, but got {epochs}")
            if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
                raise ValueError(
                    "Expected positive integer steps_per_epoch, but got "
                    f"{steps_per_epoch}"
                )
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError(
                "You must define either total_steps OR (epochs AND steps_per_epoch)"
            )
        T = self.total_steps
        # (end_step, start, end) with lr keys and momentum keys, as torch
        if three_phase:
            self.phases = [
                (float(pct_start * T) - 1, "initial", "max", "max_m", "base_m"),
                (float(2 * pct_start * T) - 2, "max", "initial", "base_m", "max_m"),
                (T - 1, "initial", "min", "max_m", "max_m"),
            ]
        else:
            self.phases = [
                (float(pct_start * T) - 1, "initial", "max", "max_m", "base_m"),
                (T - 1, "max", "min", "base_m", "max_m"),
            ]
        if pct_start < 0 or pct_start > 1 or not isinstance(pct_start, float):
            raise ValueError(
                f"Expected float between 0 and 1 pct_start, but got {pct_start}"
            )
        if anneal_strategy not in ["cos", "linear"]:
            raise ValueError(
                "anneal_strategy must be one of 'cos' or 'linear', instead got "
                f"{anneal_strategy}"
            )
        self.anneal_strategy = anneal_strategy
        self.max_lr, self.div_factor = max_lr, div_factor
        self.final_div_factor = final_div_factor
        self.cycle_momentum = cycle_momentum
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        self.error_templates = (
            "Tried to step {} times. The specified number of total steps is "
            f"{self.total_steps}",
        )

    def _group_lrs(self, n_groups, max_lr):
        max_lrs = format_param("max_lr", n_groups, max_lr)
        initial = [m / self.div_factor for m in max_lrs]
        return initial, max_lrs, [i / self.final_div_factor for i in initial]

    def _prepare(self, state, n_groups, keys):
        lr = current_lr(state)
        initial, max_lrs, min_lrs = self._group_lrs(n_groups, self.max_lr)
        if self.last_epoch == -1:
            keys["max_lr"], keys["min_lr"] = const(max_lrs, lr), const(min_lrs, lr)
        state, base_m, max_m = _setup_momentum(
            state,
            keys,
            n_groups,
            self.cycle_momentum,
            self.base_momentum,
            self.max_momentum,
            self.last_epoch,
        )
        return state, [const(v, lr) for v in (initial, max_lrs, min_lrs, base_m, max_m)]

    def _initial_lr(self, lr, initial_lr, extra):
        if self.last_epoch == -1:
            return extra[0]  # torch overwrites group["initial_lr"]
        return super()._initial_lr(lr, initial_lr, extra)

    def _make_state(self, last_epoch, step_count, base_lrs, extra):
        return OneCycleState(last_epoch, step_count, base_lrs, *extra)

    def _bind(self, s, keys):
        fields = {
            "initial_lrs": "initial_lr",
            "max_lrs": "max_lr",
            "min_lrs": "min_lr",
        }
        if self.cycle_momentum:
            fields.update(base_momentums="base_momentum", max_momentums="max_momentum")
        return s._replace(**{f: keys.get(k, getattr(s, f)) for f, k in fields.items()})

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            cos_out = jnp.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def _values(self, s, like):
        step = as_float(s.last_epoch, like)
        keys = {
            "initial": s.initial_lrs,
            "max": s.max_lrs,
            "min": s.min_lrs,
            "base_m": s.base_momentums,
            "max_m": s.max_momentums,
        }
        lrs = momentum = None
        start_step = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in reversed(list(enumerate(self.phases))):
            start_step = 0.0 if i == 0 else self.phases[i - 1][0]
            pct = div(step - start_step, end_step - start_step)
            lr_i = self._anneal(keys[lr0], keys[lr1], pct)
            m_i = self._anneal(keys[m0], keys[m1], pct)
            if lrs is None:  # the last phase takes everything past its end
                lrs, momentum = lr_i, m_i
            else:
                here = step <= end_step
                lrs = jnp.where(here, lr_i, lrs)
                momentum = jnp.where(here, m_i, momentum)
        return lrs, momentum

    def get_lr(self, state, s, initial):
        lr = current_lr(state)
        too_far = s.last_epoch > self.total_steps
        lrs, momentum = self._values(s, lr)
        # torch raises ValueError; under jit the lr becomes NaN instead
        lrs = jnp.where(too_far, jnp.nan, lrs)
        if self.cycle_momentum:
            momentum = jnp.where(too_far, jnp.nan, momentum)
            state = _write_momentum(state, _momentum_kind(state), momentum)
        return state, lrs, ((too_far, s.last_epoch),)

    def optax_lr(self, count, base_lr, group):
        like = jnp.zeros((), jax.dtypes.canonicalize_dtype(jnp.float64))
        initial, max_lrs, min_lrs = self._group_lrs(1, pick(self.max_lr, group))
        vals = [const(v[0], like) for v in (initial, max_lrs, min_lrs)]
        zero = const(0.0, like)
        s = OneCycleState(count, count, vals[0], *vals, zero, zero)
        lrs, _ = self._values(s, like)
        return jnp.where(count > self.total_steps, jnp.nan, lrs)


def one_cycle_lr(
    max_lr: float | list[float],
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    cycle_momentum: bool = True,
    base_momentum: float | list[float] = 0.85,
    max_momentum: float | list[float] = 0.95,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    last_epoch: int = -1,
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.OneCycleLR` (1cycle policy).

    Each group's `initial_lr = max_lr/div_factor` (overwriting any earlier
    `initial_lr`, as torch) and `min_lr = initial_lr/final_div_factor`.
    Phases end at steps $pT - 1$ and $T - 1$ (three-phase:
    $pT - 1$, $2pT - 2$, $T - 1$); within a phase the value
    goes from start to end by

    $$
    \text{cos: } e + \tfrac{s - e}{2}(\cos(\pi p) + 1) \qquad
    \text{linear: } (e - s)p + s,\quad p = \tfrac{k - k_0}{k_1 - k_0}.
    $$

    Momentum (`momentum` or `betas[0]`) moves inversely, from
    `max_momentum`. Like torch, step $k = T$ extrapolates past the
    last phase and step $T+1$ raises `ValueError` ("Tried to step
    ..."); under `jit` it cannot raise and sets the lr (and momentum) to
    NaN instead. Same `momentum=0` deviation as
    [`cyclic_lr`][funcopt.lr_scheduler.cyclic_lr].
    """
    sched = OneCycleLR(
        max_lr=max_lr,
        total_steps=total_steps,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=pct_start,
        anneal_strategy=anneal_strategy,
        cycle_momentum=cycle_momentum,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=three_phase,
        last_epoch=last_epoch,
    )
    check_arguments(
        "OneCycleLR",
        ints={"last_epoch": last_epoch},
        reals={"div_factor": div_factor, "final_div_factor": final_div_factor},
        group_reals={
            "max_lr": max_lr,
            "base_momentum": base_momentum,
            "max_momentum": max_momentum,
        },
    )
    return sched


# --------------------------------------------------------------------------
# SWALR
# --------------------------------------------------------------------------


class SWALRState(NamedTuple):
    """`SchedulerState` plus each group's `swa_lr`."""

    last_epoch: jax.Array
    step_count: jax.Array
    base_lrs: jax.Array
    swa_lrs: jax.Array


class SWALR(Scheduler):
    name = "SWALR"

    def __init__(self, swa_lr, anneal_epochs, anneal_strategy, last_epoch):
        if anneal_strategy not in ["cos", "linear"]:
            raise ValueError(
                "anneal_strategy must be one of 'cos' or 'linear', "
                f"instead got {anneal_strategy}"
            )
        if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(
                f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}"
            )
        super().__init__(last_epoch)
        self.swa_lr, self.anneal_epochs = swa_lr, anneal_epochs
        self.anneal_strategy = anneal_strategy

    def _prepare(self, state, n_groups, keys):
        swa = const(format_param("swa_lr", n_groups, self.swa_lr), current_lr(state))
        keys["swa_lr"] = swa
        return state, swa

    def _bind(self, s, keys):
        return s._replace(swa_lrs=keys.get("swa_lr", s.swa_lrs))

    def _make_state(self, last_epoch, step_count, base_lrs, extra):
        return SWALRState(last_epoch, step_count, base_lrs, extra)

    def _anneal(self, t):
        if self.anneal_strategy == "cos":
            return (1 - jnp.cos(math.pi * t)) / 2
        return t

    def get_lr(self, state, s, initial):
        lr = current_lr(state)
        step = s.step_count - 1
        if self.anneal_epochs == 0:
            step = jnp.maximum(1, step)
        A = max(1, self.anneal_epochs)
        prev_t = jnp.clip(div(as_float(step - 1, lr), A), 0, 1)
        prev_alpha = self._anneal(prev_t)
        swa = s.swa_lrs
        prev_lrs = jnp.where(
            prev_alpha == 1, swa, div(lr - prev_alpha * swa, 1 - prev_alpha)
        )
        alpha = self._anneal(jnp.clip(div(as_float(step, lr), A), 0, 1))
        return state, swa * alpha + prev_lrs * (1 - alpha), ()


def swalr(
    swa_lr: float | list[float],
    anneal_epochs: int = 10,
    anneal_strategy: str = "cos",
    last_epoch: int = -1,
) -> Scheduler:
    r"""`torch.optim.swa_utils.SWALR`: anneals every group's lr to
    `swa_lr` over `anneal_epochs` steps and keeps it there. Torch's
    recursion, driven by `_step_count` $k$ (0 after `init`):

    $$
    \eta_{\text{prev}} = \frac{\eta - \alpha_{k-1} s}{1 - \alpha_{k-1}},\quad
    \eta_k = s\,\alpha_k + \eta_{\text{prev}}(1 - \alpha_k),\quad
    \alpha_k = f(\operatorname{clip}(k/\max(1, A), 0, 1)),
    $$

    $f(t) = (1 - \cos\pi t)/2$ (cos) or $t$ (linear); in effect
    $\eta_k = s\,\alpha_k + \eta_0(1 - \alpha_k)$. A `swa_lr` list of
    the wrong length raises torch's `ValueError` at `init`.
    """
    sched = SWALR(swa_lr, anneal_epochs, anneal_strategy, last_epoch)
    check_arguments(
        "SWALR", ints={"last_epoch": last_epoch}, group_reals={"swa_lr": swa_lr}
    )
    return sched
