"""Composite schedulers: torch's ChainedScheduler and SequentialLR."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._base import (
    Scheduler,
    int32,
    restore_hparams,
    scheduled_hparams,
    select,
    write_lr,
)


class ChainedState(NamedTuple):
    """One state per chained scheduler, in order."""

    schedulers: tuple


class SequentialState(NamedTuple):
    """SequentialLR's own `last_epoch` and one state per scheduler."""

    last_epoch: jax.Array
    schedulers: tuple


def _check_children(cls_name: str, schedulers: Sequence[Any]) -> None:
    from ._plateau import ReduceLROnPlateau

    for i, sched in enumerate(schedulers):
        if not isinstance(sched, Scheduler):
            raise TypeError(
                f"{cls_name} at index {i} should have `optimizer` as its attribute."
            )
        if isinstance(sched, ReduceLROnPlateau):
            raise ValueError(
                f"{cls_name} does not support `ReduceLROnPlateau` scheduler as it "
                "requires additional kwargs to be specified when calling `step`, "
                f"but got one at index {i} in the given schedulers sequence."
            )


def _gate(errors, flag):
    return tuple((f & flag, v) for f, v in errors)


class _Composite(Scheduler):
    def __init__(self, schedulers):
        super().__init__(-1)
        self.schedulers = tuple(schedulers)
        self.error_templates = tuple(
            t for sched in self.schedulers for t in sched.error_templates
        )

    def _construct_children(self, state, keys):
        states, errors = [], []
        for sched in self.schedulers:
            state, s, keys, errs = sched._construct(state, keys)
            states.append(s)
            errors.extend(errs)
        # a later scheduler may have overwritten shared group keys (swa_lr, ...)
        states = [c._bind(cs, keys) for c, cs in zip(self.schedulers, states)]
        return state, states, keys, tuple(errors)

    def _bind(self, s, keys):
        return s._replace(
            schedulers=tuple(
                c._bind(cs, keys) for c, cs in zip(self.schedulers, s.schedulers)
            )
        )

    def _undo(self, s):
        return s._replace(
            schedulers=tuple(
                c._undo(cs) for c, cs in zip(self.schedulers, s.schedulers)
            )
        )

    def _initial_step(self, state, s):
        # torch: LRScheduler._initial_step -> self.step(), the composite's own
        return self._step(state, s)

    def _update_lr(self, state, s, epoch=None, initial=False):
        raise NotImplementedError(
            f"{self.name} cannot be restarted by an enclosing SequentialLR "
            "(torch raises NotImplementedError from LRScheduler.get_lr)"
        )

    def _no_epoch(self, epoch):
        if epoch is not None:
            raise TypeError(f"{self.name}.step() takes no epoch argument")


class ChainedScheduler(_Composite):
    name = "ChainedScheduler"

    def _construct(self, state, keys):
        state, states, keys, errors = self._construct_children(state, keys)
        return state, ChainedState(tuple(states)), keys, errors

    def _step(self, state, s, epoch=None, initial=False):
        self._no_epoch(epoch)
        states, errors = [], []
        for sched, cs in zip(self.schedulers, s.schedulers):
            state, cs, errs = sched._step(state, cs)
            states.append(cs)
            errors.extend(errs)
        return state, ChainedState(tuple(states)), tuple(errors)


def chained_scheduler(schedulers: Sequence[Scheduler]) -> Scheduler:
    """`torch.optim.lr_scheduler.ChainedScheduler`: every scheduler's
    `step` in order, each on the lr the previous one left.

    The schedulers are passed uninitialized; `init` constructs them in
    order on the same state (each doing torch's initial step, sharing the
    first one's `initial_lr` as torch's `setdefault` does). Recursive
    schedulers compose multiplicatively; closed-form ones (LambdaLR,
    CyclicLR, OneCycleLR, CosineAnnealingWarmRestarts) overwrite the lr.
    """
    schedulers = list(schedulers)
    if len(schedulers) < 1:
        raise ValueError(
            "ChainedScheduler expects at least one scheduler to be chained, but got "
            "no scheduler."
        )
    _check_children("ChainedScheduler", schedulers)
    return ChainedScheduler(schedulers)


class SequentialLR(_Composite):
    name = "SequentialLR"

    def __init__(self, schedulers, milestones, last_epoch):
        super().__init__(schedulers)
        self.milestones = list(milestones)
        self.last_epoch = last_epoch

    def _construct(self, state, keys):
        state, states, keys, errors = self._construct_children(state, keys)
        # reset every group's lr to its initial_lr, undo the children's steps
        state = write_lr(state, keys["initial_lr"])
        states = [c._undo(cs) for c, cs in zip(self.schedulers, states)]
        idx = bisect.bisect_right(self.milestones, 0)
        state, states[idx], errs = self.schedulers[idx]._initial_step(
            state, states[idx]
        )
        offset = sum(len(c.error_templates) for c in self.schedulers[:idx])
        errors = list(errors)
        errors[offset : offset + len(errs)] = errs
        s = SequentialState(int32(self.last_epoch + 1), tuple(states))
        return state, s, keys, tuple(errors)

    def _step(self, state, s, epoch=None, initial=False):
        self._no_epoch(epoch)
        last_epoch = s.last_epoch + 1
        milestones = jnp.asarray(self.milestones, dtype=jnp.int32)
        idx = jnp.searchsorted(milestones, last_epoch, side="right")
        padded = jnp.concatenate([jnp.full((1,), -(2**31), jnp.int32), milestones])
        at_milestone = (idx > 0) & (padded[idx] == last_epoch)
        before = scheduled_hparams(state)
        hparams, states, errors = before, list(s.schedulers), []
        for i, (sched, cs) in enumerate(zip(self.schedulers, s.schedulers)):
            st, new_cs, errs = sched._step(state, cs)
            if i > 0:  # torch: schedulers[i]._update_lr(0) at its milestone
                st0, cs0, errs0 = sched._update_lr(state, cs, 0)
                st = restore_hparams(
                    st,
                    select(at_milestone, scheduled_hparams(st0), scheduled_hparams(st)),
                )
                new_cs = select(at_milestone, cs0, new_cs)
                errs = tuple(
                    (jnp.where(at_milestone, f0, f), jnp.where(at_milestone, v0, v))
                    for (f0, v0), (f, v) in zip(errs0, errs)
                )
            active = idx == i
            hparams = select(active, scheduled_hparams(st), hparams)
            states[i] = select(active, new_cs, cs)
            errors.extend(_gate(errs, active))
        state = restore_hparams(state, hparams)
        return state, SequentialState(last_epoch, tuple(states)), tuple(errors)


def sequential_lr(
    schedulers: Sequence[Scheduler], milestones: Sequence[int], last_epoch: int = -1
) -> Scheduler:
    """`torch.optim.lr_scheduler.SequentialLR`: `schedulers[i]` runs from
    `milestones[i-1]` on.

    `init` constructs the (uninitialized) schedulers in order, as torch's
    user code does, then does what torch's constructor does: resets the lr to
    `initial_lr`, decrements every scheduler's `last_epoch` and re-runs
    the initial step of the scheduler active at epoch 0. At a milestone the
    next scheduler restarts at epoch 0 with its closed form (`get_lr` for
    those without one). Under `jit` every scheduler's step is computed and
    the active one selected. A composite at index > 0 is rejected (torch
    raises `NotImplementedError` when it is reached).
    """
    schedulers = list(schedulers)
    if len(schedulers) < 1:
        raise ValueError(
            "SequentialLR expects at least one scheduler, but got no scheduler."
        )
    _check_children("SequentialLR", schedulers)
    if len(milestones) != len(schedulers) - 1:
        raise ValueError(
            "Sequential Schedulers expects number of schedulers provided to be one "
            "more than the number of milestone points, but got number of schedulers "
            f"{len(schedulers)} and the number of milestones to be equal to "
            f"{len(milestones)}"
        )
    for i, sched in enumerate(schedulers[1:], start=1):
        if isinstance(sched, _Composite):
            raise NotImplementedError(
                f"SequentialLR: the composite {sched.name} at index {i} cannot be "
                "restarted at its milestone (torch raises NotImplementedError)"
            )
    return SequentialLR(schedulers, milestones, last_epoch)
