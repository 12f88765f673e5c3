r"""The epoch-driven schedulers: torch's LambdaLR ... CosineAnnealingWarmRestarts.

Notation in the docstrings: $e$ = `last_epoch` after the increment,
$b$ = the group's `base_lr` (torch's `initial_lr`), $\eta$ =
the group's current lr (the recursive forms read it from the state).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._base import (
    Scheduler,
    as_float,
    check_arguments,
    const,
    current_lr,
    div,
    int32,
    is_concrete,
    pick,
    write_lr,
)

LrLambda = Callable[[jax.Array], Any]


def _lambdas(lr_lambda, n_groups: int) -> list[LrLambda]:
    if not isinstance(lr_lambda, (list, tuple)):
        return [lr_lambda] * n_groups
    if len(lr_lambda) != n_groups:
        raise ValueError(f"Expected {n_groups} lr_lambdas, but got {len(lr_lambda)}")
    return list(lr_lambda)


def _eval_lambdas(lambdas: list[LrLambda], e: jax.Array, like: jax.Array):
    epoch = as_float(e, like)
    return jnp.stack([jnp.asarray(f(epoch)).astype(like.dtype) for f in lambdas])


class LambdaLR(Scheduler):
    name = "LambdaLR"

    def __init__(self, lr_lambda, last_epoch=-1):
        super().__init__(last_epoch)
        self.lr_lambda = lr_lambda

    def get_lr(self, state, s, initial):
        lr = current_lr(state)
        lambdas = _lambdas(self.lr_lambda, lr.shape[0])
        return state, s.base_lrs * _eval_lambdas(lambdas, s.last_epoch, lr), ()

    def optax_lr(self, count, base_lr, group):
        if base_lr is None:
            raise TypeError(f"as_optax_schedule({self.name}) needs base_lr")
        fn = pick(self.lr_lambda, group)
        return base_lr * _eval_lambdas([fn], count, base_lr)[0]


class MultiplicativeLR(LambdaLR):
    name = "MultiplicativeLR"

    def get_lr(self, state, s, initial):
        lr = current_lr(state)
        if initial:
            return state, lr, ()
        lambdas = _lambdas(self.lr_lambda, lr.shape[0])
        return state, lr * _eval_lambdas(lambdas, s.last_epoch, lr), ()

    optax_lr = Scheduler.optax_lr  # no closed form: raises TypeError

    def _prepare(self, state, n_groups, keys):
        for f in _lambdas(self.lr_lambda, n_groups):
            if not callable(f):
                raise TypeError(
                    f"lr_lambda should be a function, but got {type(f).__name__}"
                )
        return state, None


def lambda_lr(lr_lambda: LrLambda | list[LrLambda], last_epoch: int = -1) -> Scheduler:
    r"""`torch.optim.lr_scheduler.LambdaLR`: $\eta_e = b\,\lambda(e)$.

    `lr_lambda` is one function of the epoch, or a list with one per
    parameter group. It receives the epoch as a scalar array of the widest
    float dtype (integer-valued) and must be jnp-traceable to run under
    `jit` (`0.95 ** epoch`, `epoch // 30`, `jnp.minimum(1.0, epoch /
    10)`; no Python `if` on it). Un-jitted, a function with a Python `if`
    still works: the step then runs op by op instead of compiled. A wrong
    list length raises torch's `ValueError` at `init` (where the groups are
    known).
    """
    sched = LambdaLR(lr_lambda, last_epoch)
    check_arguments("LambdaLR", ints={"last_epoch": last_epoch})
    return sched


def multiplicative_lr(
    lr_lambda: LrLambda | list[LrLambda], last_epoch: int = -1
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.MultiplicativeLR`: recursive
    $\eta_e = \eta_{e-1}\,\lambda(e)$ for $e \ge 1$.

    `lr_lambda` as in [`lambda_lr`][funcopt.lr_scheduler.lambda_lr] (jnp-traceable for
    `jit`). It has no closed form, so `step(epoch=...)` multiplies the current lr by
    $\lambda(\text{epoch})$, as torch does.
    """
    sched = MultiplicativeLR(lr_lambda, last_epoch)
    check_arguments("MultiplicativeLR", ints={"last_epoch": last_epoch})
    return sched


class StepLR(Scheduler):
    name = "StepLR"
    has_closed_form = True

    def __init__(self, step_size, gamma, last_epoch):
        super().__init__(last_epoch)
        self.step_size, self.gamma = step_size, gamma

    def get_lr(self, state, s, initial):
        lr, e = current_lr(state), s.last_epoch
        decay = (e != 0) & (jnp.mod(e, self.step_size) == 0)
        return state, jnp.where(decay, lr * const(self.gamma, lr), lr), ()

    def closed_form(self, s, lr):
        k = as_float(jnp.floor_divide(s.last_epoch, self.step_size), lr)
        return s.base_lrs * jnp.power(const(self.gamma, lr), k)


def step_lr(step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> Scheduler:
    r"""`torch.optim.lr_scheduler.StepLR`: $\eta_e = \gamma\,\eta_{e-1}$
    when $e > 0$ and `e % step_size == 0`; closed form
    $b\,\gamma^{\lfloor e / \text{step\_size} \rfloor}$.
    """
    check_arguments(
        "StepLR",
        ints={"step_size": step_size, "last_epoch": last_epoch},
        reals={"gamma": gamma},
    )
    return StepLR(step_size, gamma, last_epoch)


class MultiStepLR(Scheduler):
    name = "MultiStepLR"
    has_closed_form = True

    def __init__(self, milestones, gamma, last_epoch):
        super().__init__(last_epoch)
        self.milestones = Counter(milestones)
        self.gamma = gamma
        # torch's Python-float powers, computed once
        self._keys = sorted(self.milestones)
        self._factors = [gamma ** self.milestones[m] for m in self._keys]
        self._sorted = sorted(self.milestones.elements())
        self._powers = [gamma**k for k in range(len(self._sorted) + 1)]

    def get_lr(self, state, s, initial):
        lr, e = current_lr(state), s.last_epoch
        if not self._keys:
            return state, lr, ()
        keys = jnp.asarray(self._keys, dtype=jnp.int32)
        hit = keys == e
        factor = jnp.sum(jnp.where(hit, const(self._factors, lr), 0))
        return state, jnp.where(jnp.any(hit), lr * factor, lr), ()

    def closed_form(self, s, lr):
        k = jnp.searchsorted(
            jnp.asarray(self._sorted, dtype=jnp.int32), s.last_epoch, side="right"
        )
        return s.base_lrs * const(self._powers, lr)[k]


def multi_step_lr(
    milestones: Iterable[int], gamma: float = 0.1, last_epoch: int = -1
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.MultiStepLR`: $\eta_e =
    \gamma^{c(e)}\eta_{e-1}$ where $c(e)$ counts `e` in
    `milestones` (duplicates compound, order does not matter); closed form
    $b\,\gamma^{\#\{m \le e\}}$.
    """
    milestones = list(milestones) if isinstance(milestones, Iterable) else milestones
    check_arguments(
        "MultiStepLR",
        ints={"last_epoch": last_epoch},
        reals={"gamma": gamma},
    )
    if not isinstance(milestones, list) or not all(
        isinstance(m, numbers.Integral) for m in milestones
    ):
        raise TypeError(
            f"MultiStepLR: milestones must be a list of ints, got {milestones!r}"
        )
    return MultiStepLR(milestones, gamma, last_epoch)


class ConstantLR(Scheduler):
    name = "ConstantLR"
    has_closed_form = True

    def __init__(self, factor, total_iters, last_epoch):
        if factor > 1.0 or factor < 0:
            raise ValueError(
                "Constant multiplicative factor expected to be between 0 and 1."
            )
        super().__init__(last_epoch)
        self.factor, self.total_iters = factor, total_iters

    def get_lr(self, state, s, initial):
        lr, e = current_lr(state), s.last_epoch
        inverse = 1.0 / self.factor if self.factor != 0 else math.inf
        new = jnp.where(
            e == 0,
            lr * const(self.factor, lr),
            jnp.where(e != self.total_iters, lr, lr * const(inverse, lr)),
        )
        return state, new, ()

    def closed_form(self, s, lr):
        done = s.last_epoch >= self.total_iters
        return s.base_lrs * (
            const(self.factor, lr)
            + jnp.where(done, const(1 - self.factor, lr), const(0.0, lr))
        )


def constant_lr(
    factor: float = 1.0 / 3, total_iters: int = 5, last_epoch: int = -1
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.ConstantLR`: the lr is multiplied by
    `factor` at $e = 0$ and by `1/factor` at $e =$
    `total_iters`; closed form $b\,(f + [e \ge T](1 - f))$.

    Deviation: with `factor=0` torch raises `ZeroDivisionError` at
    $e = T$; funcopt multiplies by `inf` (NaN for a zero lr).
    """
    sched = ConstantLR(factor, total_iters, last_epoch)
    check_arguments(
        "ConstantLR",
        ints={"total_iters": total_iters, "last_epoch": last_epoch},
        reals={"factor": factor},
    )
    return sched


class LinearLR(Scheduler):
    name = "LinearLR"
    has_closed_form = True

    def __init__(self, start_factor, end_factor, total_iters, last_epoch):
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError(
                "Starting multiplicative factor expected to be greater than 0 and "
                "less or equal to 1."
            )
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError(
                "Ending multiplicative factor expected to be between 0 and 1."
            )
        super().__init__(last_epoch)
        self.start_factor, self.end_factor = start_factor, end_factor
        self.total_iters = total_iters

    def get_lr(self, state, s, initial):
        lr, e = current_lr(state), s.last_epoch
        start, end, total = self.start_factor, self.end_factor, self.total_iters
        if initial:
            return state, jnp.where(e == 0, lr * const(start, lr), lr), ()
        diff = const(end - start, lr)
        denom = const(total * start, lr) + as_float(e - 1, lr) * diff
        ramp = lr * (1.0 + diff / denom)
        new = jnp.where(e == 0, lr * const(start, lr), jnp.where(e > total, lr, ramp))
        return state, new, ()

    def closed_form(self, s, lr):
        start, end, total = self.start_factor, self.end_factor, self.total_iters
        progress = jnp.minimum(int32(total), s.last_epoch)
        return s.base_lrs * (
            const(start, lr)
            + div(const(end - start, lr) * as_float(progress, lr), const(total, lr))
        )


def linear_lr(
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    total_iters: int = 5,
    last_epoch: int = -1,
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.LinearLR`: $\eta_0 = s\,\eta$, then
    recursively, for $1 \le e \le T$,

    $$
    \eta_e = \eta_{e-1}\Bigl(1 + \frac{f - s}{T s + (e - 1)(f - s)}\Bigr);
    $$

    closed form $b\,(s + (f - s)\min(T, e)/T)$.
    """
    sched = LinearLR(start_factor, end_factor, total_iters, last_epoch)
    check_arguments(
        "LinearLR",
        ints={"total_iters": total_iters, "last_epoch": last_epoch},
        reals={"start_factor": start_factor, "end_factor": end_factor},
    )
    return sched


class ExponentialLR(Scheduler):
    name = "ExponentialLR"
    has_closed_form = True

    def __init__(self, gamma, last_epoch):
        super().__init__(last_epoch)
        self.gamma = gamma

    def get_lr(self, state, s, initial):
        lr = current_lr(state)
        return state, lr if initial else lr * const(self.gamma, lr), ()

    def closed_form(self, s, lr):
        return s.base_lrs * jnp.power(const(self.gamma, lr), as_float(s.last_epoch, lr))


def exponential_lr(gamma: float, last_epoch: int = -1) -> Scheduler:
    r"""`torch.optim.lr_scheduler.ExponentialLR`: $\eta_e =
    \gamma\,\eta_{e-1}$; closed form $b\,\gamma^e$.
    """
    check_arguments(
        "ExponentialLR", ints={"last_epoch": last_epoch}, reals={"gamma": gamma}
    )
    return ExponentialLR(gamma, last_epoch)


class PolynomialLR(Scheduler):
    name = "PolynomialLR"
    has_closed_form = True

    def __init__(self, total_iters, power, last_epoch):
        super().__init__(last_epoch)
        self.total_iters, self.power = total_iters, power

    def get_lr(self, state, s, initial):
        lr, e, total = current_lr(state), s.last_epoch, self.total_iters
        if initial:
            return state, lr, ()
        t = const(total, lr)
        ratio = (1.0 - div(as_float(e, lr), t)) / (1.0 - div(as_float(e - 1, lr), t))
        decay = jnp.power(ratio, const(self.power, lr))
        return state, jnp.where(e > total, lr, lr * decay), ()

    def closed_form(self, s, lr):
        total = self.total_iters
        progress = as_float(jnp.minimum(int32(total), s.last_epoch), lr)
        return s.base_lrs * jnp.power(
            1.0 - div(progress, const(total, lr)), const(self.power, lr)
        )


def polynomial_lr(
    total_iters: int = 5, power: float = 1.0, last_epoch: int = -1
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.PolynomialLR`: for $1 \le e \le T$,

    $$
    \eta_e = \eta_{e-1}\Bigl(\frac{1 - e/T}{1 - (e-1)/T}\Bigr)^p,
    $$

    unchanged after $T$; closed form $b\,(1 - \min(T, e)/T)^p$.
    """
    check_arguments(
        "PolynomialLR",
        ints={"total_iters": total_iters, "last_epoch": last_epoch},
        reals={"power": power},
    )
    return PolynomialLR(total_iters, power, last_epoch)


class CosineAnnealingLR(Scheduler):
    name = "CosineAnnealingLR"
    has_closed_form = True

    def __init__(self, T_max, eta_min, last_epoch):
        super().__init__(last_epoch)
        self.T_max, self.eta_min = T_max, eta_min

    def _closed(self, e, base_lrs, lr):
        eta = const(self.eta_min, lr)
        # torch: (1 + cos(e * pi / T)) / 2 and (1 + cos(pi * e / T)) / 2 are the
        # same float: both multiply the float(e) by pi first
        cos = jnp.cos(div(as_float(e, lr) * const(math.pi, lr), const(self.T_max, lr)))
        return eta + (base_lrs - eta) * (1.0 + cos) / 2

    def get_lr(self, state, s, initial):
        lr, e, T = current_lr(state), s.last_epoch, self.T_max
        if initial:
            return state, lr, ()
        eta = const(self.eta_min, lr)
        pi = const(math.pi, lr)
        restart = lr + (s.base_lrs - eta) * const(1 - math.cos(math.pi / T), lr) / 2
        ratio = (1.0 + jnp.cos(div(pi * as_float(e, lr), const(T, lr)))) / (
            1.0 + jnp.cos(div(pi * as_float(e - 1, lr), const(T, lr)))
        )
        rec = ratio * (lr - eta) + eta
        if isinstance(T, int):
            at_restart = jnp.mod(e - 1 - T, 2 * T) == 0
        else:
            at_restart = jnp.mod(as_float(e - 1, lr) - T, const(2 * T, lr)) == 0
        new = jnp.where(
            (s.step_count == 1) & (e > 0),
            self._closed(e, s.base_lrs, lr),
            jnp.where(at_restart, restart, rec),
        )
        return state, new, ()

    def closed_form(self, s, lr):
        return self._closed(s.last_epoch, s.base_lrs, lr)


def cosine_annealing_lr(
    T_max: int, eta_min: float = 0.0, last_epoch: int = -1
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.CosineAnnealingLR`, torch's recursion

    $$
    \eta_e = \eta_{\min} + (\eta_{e-1} - \eta_{\min})
    \frac{1 + \cos(\pi e / T)}{1 + \cos(\pi (e-1) / T)},
    $$

    with torch's special step $\eta_{e-1} + (b - \eta_{\min})(1 -
    \cos(\pi/T))/2$ when `(e - 1 - T) % (2T) == 0`. Like torch it is not
    clamped at `T_max` (period $2T$). Closed form
    $\eta_{\min} + (b - \eta_{\min})(1 + \cos(\pi e/T))/2$.
    """
    check_arguments(
        "CosineAnnealingLR",
        ints={"T_max": T_max, "last_epoch": last_epoch},
        reals={"eta_min": eta_min},
    )
    return CosineAnnealingLR(T_max, eta_min, last_epoch)


# --------------------------------------------------------------------------
# CosineAnnealingWarmRestarts
# --------------------------------------------------------------------------


class WarmRestartsState(NamedTuple):
    """`SchedulerState` plus torch's `T_cur` and `T_i` (floats)."""

    last_epoch: jax.Array
    step_count: jax.Array
    base_lrs: jax.Array
    T_cur: jax.Array
    T_i: jax.Array


class CosineAnnealingWarmRestarts(Scheduler):
    name = "CosineAnnealingWarmRestarts"

    def __init__(self, T_0, T_mult, eta_min, last_epoch):
        if T_0 <= 0 or not isinstance(T_0, int):
            raise ValueError(f"Expected positive integer T_0, but got {T_0}")
        if T_mult < 1 or not isinstance(T_mult, int):
            raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
        if not isinstance(eta_min, (float, int)):
            raise ValueError(
                f"Expected float or int eta_min, but got {eta_min} of type "
                f"{type(eta_min)}"
            )
        super().__init__(last_epoch)
        self.T_0, self.T_mult, self.eta_min = T_0, T_mult, eta_min

    def _make_state(self, last_epoch, step_count, base_lrs, extra):
        f = base_lrs.dtype
        return WarmRestartsState(
            last_epoch,
            step_count,
            base_lrs,
            jnp.asarray(self.last_epoch, f),  # torch: T_cur = last_epoch
            jnp.asarray(self.T_0, f),
        )

    def get_lr(self, state, s, initial):
        return state, self._lr(s.base_lrs, s.T_cur, s.T_i), ()

    def _lr(self, base_lrs, T_cur, T_i):
        eta = const(self.eta_min, base_lrs)
        cos = jnp.cos(div(const(math.pi, base_lrs) * T_cur, T_i))
        return eta + (base_lrs - eta) * (1.0 + cos) / 2

    def _epoch_python(self, epoch):
        """torch's explicit-epoch branch, in Python floats (bit-exact)."""
        if epoch < 0:
            raise ValueError(f"Expected non-negative epoch, but got {epoch}")
        T_0, T_mult, T_i = self.T_0, self.T_mult, self.T_0
        if epoch >= T_0:
            if T_mult == 1:
                T_cur = epoch % T_0
            else:
                n = int(math.log((epoch / T_0 * (T_mult - 1) + 1), T_mult))
                T_cur = epoch - T_0 * (T_mult**n - 1) / (T_mult - 1)
                T_i = T_0 * T_mult ** (n)
        else:
            T_cur = epoch
        return T_cur, T_i, math.floor(epoch)

    def _epoch_traced(self, epoch, like):
        """The same branch on a traced epoch (`jnp.log` may round the cycle
        index differently from `math.log` at exact cycle boundaries).
        """
        epoch = jnp.asarray(epoch).astype(like.dtype)
        T_0, T_mult = const(self.T_0, like), self.T_mult
        if T_mult == 1:
            late_cur, late_i = jnp.mod(epoch, T_0), T_0
        else:
            m = const(T_mult, like)
            x = div(epoch, T_0) * (T_mult - 1) + 1.0
            n = jnp.trunc(div(jnp.log(x), jnp.log(m)))
            late_cur = epoch - div(T_0 * (jnp.power(m, n) - 1.0), T_mult - 1)
            late_i = T_0 * jnp.power(m, n)
        late = epoch >= T_0
        T_cur = jnp.where(late, late_cur, epoch)
        T_i = jnp.where(late, late_i, T_0)
        return T_cur, T_i, jnp.floor(epoch).astype(jnp.int32)

    def _step(self, state, s, epoch=None, initial=False):
        """torch's overridden `step`; it does not count `_step_count`."""
        like = s.base_lrs
        if epoch is None:
            # first (initial) step: last_epoch < 0 takes the explicit epoch=0
            T_cur = s.T_cur + 1.0
            wrap = T_cur >= s.T_i
            T_cur = jnp.where(wrap, jnp.mod(T_cur, s.T_i), T_cur)
            T_i = jnp.where(wrap, s.T_i * self.T_mult, s.T_i)
            fresh = s.last_epoch < 0
            T_cur = jnp.where(fresh, jnp.zeros_like(T_cur), T_cur)
            T_i = jnp.where(fresh, const(self.T_0, like), T_i)
            last_epoch = jnp.where(fresh, 0, s.last_epoch + 1).astype(jnp.int32)
        elif is_concrete(epoch):
            epoch = epoch.item() if hasattr(epoch, "item") else epoch
            T_cur, T_i, last_epoch = self._epoch_python(epoch)
            T_cur, T_i = const(T_cur, like), const(T_i, like)
            last_epoch = int32(last_epoch)
        else:
            T_cur, T_i, last_epoch = self._epoch_traced(epoch, like)
        s = s._replace(last_epoch=last_epoch, T_cur=T_cur, T_i=T_i)
        return write_lr(state, self._lr(s.base_lrs, T_cur, T_i)), s, ()

    def optax_lr(self, count, base_lr, group):
        if base_lr is None:
            raise TypeError(f"as_optax_schedule({self.name}) needs base_lr")
        like = base_lr
        e = as_float(count, like)
        T_0, T_mult = self.T_0, self.T_mult
        if T_mult == 1:
            T_cur, T_i = jnp.mod(e, T_0), const(T_0, like)
        else:
            # the cycle n with start(n) <= e < start(n + 1), exactly in integers
            m = const(T_mult, like)

            def start(k):
                return div(T_0 * (jnp.power(m, k) - 1.0), T_mult - 1)

            n = jnp.floor(div(jnp.log(div(e, T_0) * (T_mult - 1) + 1.0), jnp.log(m)))
            n = jnp.where(start(n) > e, n - 1, n)
            n = jnp.where(start(n + 1) <= e, n + 1, n)
            T_cur, T_i = e - start(n), T_0 * jnp.power(m, n)
        return self._lr(base_lr, T_cur, T_i)


def cosine_annealing_warm_restarts(
    T_0: int, T_mult: int = 1, eta_min: float = 0.0, last_epoch: int = -1
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.CosineAnnealingWarmRestarts` (SGDR):

    $$
    \eta = \eta_{\min} + (b - \eta_{\min})\frac{1 + \cos(\pi T_{cur}/T_i)}{2},
    $$

    with $T_{cur}$ counting epochs since the last restart and
    $T_i$ multiplied by `T_mult` at each restart. `step(state,
    sched_state, epoch=x)` takes fractional epochs (torch's explicit form;
    a negative Python epoch raises torch's `ValueError`). A Python-number
    epoch is resolved in Python floats exactly as torch; a traced (jnp) epoch
    uses `jnp.log`, which can place an exact cycle boundary one cycle
    earlier than `math.log` does (and is not checked for being negative).
    """
    sched = CosineAnnealingWarmRestarts(T_0, T_mult, eta_min, last_epoch)
    check_arguments(
        "CosineAnnealingWarmRestarts",
        ints={"T_0": T_0, "T_mult": T_mult, "last_epoch": last_epoch},
        reals={"eta_min": eta_min},
    )
    return sched
