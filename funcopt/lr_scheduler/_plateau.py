"""ReduceLROnPlateau, mirroring `torch.optim.lr_scheduler.ReduceLROnPlateau`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._base import (
    Scheduler,
    check_arguments,
    const,
    current_lr,
    int32,
    is_concrete,
    write_lr,
)


class PlateauState(NamedTuple):
    """torch's `last_epoch`, `best`, `num_bad_epochs`,
    `cooldown_counter` and `min_lrs` (one per group).
    """

    last_epoch: jax.Array
    best: jax.Array
    num_bad_epochs: jax.Array
    cooldown_counter: jax.Array
    min_lrs: jax.Array


class ReduceLROnPlateau(Scheduler):
    name = "ReduceLROnPlateau"

    def __init__(
        self, mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps
    ):
        if factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        if mode not in {"min", "max"}:
            raise ValueError("mode " + mode + " is unknown!")
        if threshold_mode not in {"rel", "abs"}:
            raise ValueError("threshold mode " + threshold_mode + " is unknown!")
        super().__init__(-1)
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self.cooldown, self.min_lr, self.eps = cooldown, min_lr, eps
        self.mode_worse = math.inf if mode == "min" else -math.inf

    def init(self, state, *, initial_lr=None):
        """No initial step, no `initial_lr`, `last_epoch = 0` (torch)."""
        lr = current_lr(state)
        n = lr.shape[0]
        if isinstance(self.min_lr, (list, tuple)):
            if len(self.min_lr) != n:
                raise ValueError(f"expected {n} min_lrs, got {len(self.min_lr)}")
            min_lrs = list(self.min_lr)
        else:
            min_lrs = [self.min_lr] * n
        s = PlateauState(
            int32(0),
            const(self.mode_worse, lr),
            int32(0),
            int32(0),
            const(min_lrs, lr),
        )
        return state, s

    def _is_better(self, a, best):
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    # torch's ReduceLROnPlateau.step(metrics, epoch=None) has another signature
    # than LRScheduler.step(epoch=None); torch ignores [override] there too
    def step(  # type: ignore[override]
        self, state, sched_state, metrics: Any = None, epoch: Any = None
    ):
        """torch's `step(metrics, epoch=None)`; jit-able (`metrics` may be
        a traced scalar)."""
        if metrics is None:
            raise TypeError(
                "ReduceLROnPlateau.step() missing 1 required positional argument: "
                "'metrics'"
            )
        s = sched_state
        lr = current_lr(state)
        if is_concrete(metrics) and not isinstance(metrics, jax.Array):
            metrics = float(metrics)  # torch: float(metrics)
        current = jnp.asarray(metrics).astype(lr.dtype).reshape(())
        last_epoch = s.last_epoch + 1 if epoch is None else int32(epoch)
        better = self._is_better(current, s.best)
        best = jnp.where(better, current, s.best)
        bad = jnp.where(better, 0, s.num_bad_epochs + 1)
        in_cooldown = s.cooldown_counter > 0
        cooldown_counter = jnp.where(
            in_cooldown, s.cooldown_counter - 1, s.cooldown_counter
        )
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > self.patience
        # _reduce_lr: new = max(old * factor, min_lr), applied if old - new > eps
        new = jnp.maximum(lr * const(self.factor, lr), s.min_lrs)
        lr = jnp.where(reduce & (lr - new > const(self.eps, lr)), new, lr)
        cooldown_counter = jnp.where(reduce, self.cooldown, cooldown_counter)
        bad = jnp.where(reduce, 0, bad)
        s = PlateauState(
            int32(last_epoch),
            best,
            bad.astype(jnp.int32),
            cooldown_counter.astype(jnp.int32),
            s.min_lrs,
        )
        return write_lr(state, lr), s


def reduce_lr_on_plateau(
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: list[float] | float = 0,
    eps: float = 1e-8,
) -> Scheduler:
    r"""`torch.optim.lr_scheduler.ReduceLROnPlateau`.

    `init` takes no step (torch: no `initial_lr`, `last_epoch = 0`).
    `step(state, sched_state, metrics=m)`: `m` is better than `best`
    when, strictly,

    * min/rel: $m < \text{best}(1 - \text{threshold})$;
      min/abs: $m < \text{best} - \text{threshold}$;
    * max/rel: $m > \text{best}(1 + \text{threshold})$;
      max/abs: $m > \text{best} + \text{threshold}$

    (NaN is never better). On the `patience + 1`-th consecutive bad epoch
    each group's lr becomes $\max(\eta\,\text{factor}, \text{min\_lr})$
    if that lowers it by more than `eps`; then `cooldown` epochs are not
    counted as bad. `min_lr` is a scalar or one value per group (checked at
    `init`). Deviation: a NaN lr is handled by `jnp.maximum` (NaN), where
    Python's `max` depends on the argument order.
    """
    sched = ReduceLROnPlateau(
        mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps
    )
    check_arguments(
        "ReduceLROnPlateau",
        ints={"patience": patience, "cooldown": cooldown},
        reals={"factor": factor, "threshold": threshold, "eps": eps},
        group_reals={"min_lr": min_lr},
    )
    return sched
