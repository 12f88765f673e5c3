"""The scheduler protocol: torch's `LRScheduler` as pure, jit-able functions.

A scheduler is static configuration (torch's constructor arguments) plus two
methods:

```python
state, sched_state = sched.init(state)                 # the constructor
state, sched_state = sched.step(state, sched_state)    # scheduler.step()
```

`state` is any pytree holding one funcopt [`OptState`][funcopt.OptState] (an
optimizer state, an `optax.chain` state, a [`TrainState`][funcopt.TrainState]);
the learning rates (and, for the cycling schedulers, `momentum` or
`betas[0]`) are read and written with [`funcopt.get_hparam`][funcopt.get_hparam] /
[`funcopt.set_hparam`][funcopt.set_hparam]. `sched_state` is a `NamedTuple` of arrays
only (torch's `last_epoch`, `_step_count`, `base_lrs` = each group's
`initial_lr`, plus what a scheduler needs), so `step` runs under
`jax.jit`: every decision on a traced value is a `jnp.where`.

The lr math is torch's *recursive* (chainable) `get_lr`, evaluated on the
current lr in the state, because that is what torch computes and what
[`chained_scheduler`][funcopt.lr_scheduler.chained_scheduler] composes through; the
closed form (`_get_closed_form_lr`) is used exactly where torch uses it: `step`
with an `epoch` and [`sequential_lr`][funcopt.lr_scheduler.sequential_lr] milestones.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._hparams import get_hparam, hparams_only, set_hparam, with_hparams
from .._math import divide_exactly

# (flag, value): raise ``ValueError(template.format(value))`` when ``flag``
Errors = tuple[tuple[jax.Array, jax.Array], ...]

_INITIAL_LR_MISSING = (
    "param 'initial_lr' is not specified in param_groups[0] when resuming "
    "scheduler with last_epoch >= 0.\n"
    "This typically happens when:\n"
    "1. You're trying to resume training from a checkpoint but haven't properly "
    "loaded the optimizer state\n"
    "2. You're using last_epoch >= 0 for a fresh training run (not recommended)"
)


class SchedulerState(NamedTuple):
    """State of an `LRScheduler`: torch's `last_epoch`, `_step_count`
    and `base_lrs` (one per parameter group).
    """

    last_epoch: jax.Array
    step_count: jax.Array
    base_lrs: jax.Array


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def current_lr(state: Any) -> jax.Array:
    """`[g["lr"] for g in param_groups]` as one array `[n_groups]`."""
    return jnp.stack(get_hparam(state, "lr"))


def write_lr(state: Any, lrs: jax.Array) -> Any:
    """Every group's lr set at once (`_update_param_group_val`)."""
    return set_hparam(state, "lr", jnp.asarray(lrs))


def const(x: Any, like: jax.Array) -> jax.Array:
    """A Python number (or per-group list) as an array of `like`'s dtype."""
    return jnp.asarray(np.asarray(x, dtype=np.float64), dtype=like.dtype)


def as_float(x: jax.Array, like: jax.Array) -> jax.Array:
    """An integer array as `like`'s float dtype (exact for epoch counts)."""
    return jnp.asarray(x).astype(like.dtype)


def div(a: Any, b: Any) -> jax.Array:
    """`a / b` correctly rounded, as Python's float division, also under jit.

    XLA rewrites a division by a constant, or by a broadcast scalar, into a
    multiplication by the reciprocal, which is off by an ulp for most
    divisors (e.g. `31.0 / 31` becomes `1 - 2**-53`). Hiding the full-shape
    divisor behind an optimization barrier keeps a true division.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    dtype = jnp.result_type(a, b)
    return divide_exactly(a.astype(dtype), b.astype(dtype))


def int32(x: Any) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.int32)


def format_param(name: str, n_groups: int, param: Any) -> list[Any]:
    """torch's `_format_param`: a scalar for every group, or a list per group."""
    if isinstance(param, (list, tuple)):
        if len(param) != n_groups:
            raise ValueError(
                f"{name} must have the same length as optimizer.param_groups. "
                f"{name} has {len(param)} values, param_groups has {n_groups}."
            )
        return list(param)
    return [param] * n_groups


def pick(param: Any, group: int) -> Any:
    """Group `group`'s value of a scalar-or-per-group-list argument."""
    return param[group] if isinstance(param, (list, tuple)) else param


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


@functools.partial(jax.jit, static_argnums=0)
def _compiled_step(sched: Scheduler, reduced: list, sched_state: Any):
    """`sched._step` on `hparams_only` states, compiled (`Scheduler.step`);
    one program per scheduler (a static argument, hashed by identity)."""
    return sched._step(reduced, sched_state)


# what tracing code that needs concrete values raises
_NEEDS_CONCRETE_VALUES = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


def _is_real(x: Any) -> bool:
    if isinstance(x, numbers.Real):  # bool, int, float, numpy real scalars
        return True
    if isinstance(x, np.ndarray | jax.Array) and not isinstance(x, jax.core.Tracer):
        return np.ndim(x) == 0 and np.asarray(x).dtype.kind in "biuf"
    return False


def check_arguments(
    name: str,
    *,
    ints: dict[str, Any] | None = None,
    reals: dict[str, Any] | None = None,
    group_reals: dict[str, Any] | None = None,
) -> None:
    """`TypeError` naming an argument of the wrong type.

    torch takes these as they come and fails (or computes with them) in
    `step`; funcopt turns them into arrays, so it checks them when the
    scheduler is made, after torch's own checks. `ints`: integers (not bools);
    `reals`: real numbers (or 0-d real arrays); `group_reals`: a real
    number or a list/tuple of them, one per parameter group. A traced value
    is refused: schedulers are configuration, made outside `jit`.
    """
    for key, value in (ints or {}).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: {key} must be an int, got {value!r}")
    for key, value in (reals or {}).items():
        if not _is_real(value):
            raise TypeError(f"{name}: {key} must be a real number, got {value!r}")
    for key, value in (group_reals or {}).items():
        items = value if isinstance(value, list | tuple) else [value]
        if not all(_is_real(v) for v in items):
            raise TypeError(
                f"{name}: {key} must be a real number or a list of them (one per "
                f"parameter group), got {value!r}"
            )


def raise_errors(templates: Sequence[str], errors: Errors) -> None:
    """Raise torch's `ValueError` for a flagged error, when not traced.

    Under `jit` the flag cannot be inspected; the scheduler that flags it
    writes NaN learning rates instead (documented where it applies).
    """
    for template, (flag, value) in zip(templates, errors, strict=True):
        if is_concrete(flag) and bool(flag):
            raise ValueError(template.format(int(value)))


def select(pred: jax.Array, a: Any, b: Any) -> Any:
    """`a` where `pred` else `b`, leaf by leaf."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


_CYCLED = ("lr", "momentum", "betas")


def scheduled_hparams(state: Any) -> dict[str, jax.Array]:
    """The hyperparameters a scheduler may change (lr, momentum, betas)."""
    out = {}
    for name in _CYCLED:
        try:
            out[name] = jnp.stack(get_hparam(state, name))
        except KeyError:
            pass
    return out


def restore_hparams(state: Any, values: dict[str, jax.Array]) -> Any:
    for name, value in values.items():
        state = set_hparam(state, name, value)
    return state


# --------------------------------------------------------------------------
# the base class
# --------------------------------------------------------------------------


class Scheduler:
    """Base of every funcopt scheduler (torch's `LRScheduler`).

    Subclasses set `name` (the torch class) and implement
    [`get_lr`][funcopt.lr_scheduler.Scheduler.get_lr] (torch's recursive `get_lr`) and,
    where torch has one, [`closed_form`][funcopt.lr_scheduler.Scheduler.closed_form]
    (`_get_closed_form_lr`).

    The private methods mirror torch's internals one to one, so that the
    composite schedulers can call them as torch does: `_construct`
    (`__init__`), `_initial_step`, `_step` (`step`), `_update_lr`
    and `_undo` (`SequentialLR.recursive_undo`). Each returns a tuple of
    error flags aligned with `error_templates`.
    """

    name = "LRScheduler"
    error_templates: tuple[str, ...] = ()
    has_closed_form = False

    def __init__(self, last_epoch: int = -1):
        self.last_epoch = last_epoch

    def __repr__(self) -> str:
        return f"funcopt.lr_scheduler.{type(self).__name__}"

    # ---- public API -------------------------------------------------------

    def init(self, state: Any, *, initial_lr: Any = None) -> tuple[Any, Any]:
        """Torch's constructor: `(state, sched_state)`; `state`'s lr is
        already the epoch-0 value.

        `initial_lr` (one value per group) plays the role of the groups'
        `initial_lr` key that an earlier scheduler on the same optimizer
        set; torch's `setdefault` then keeps it as `base_lrs` (pass
        `earlier_sched_state.base_lrs`). It is required with
        `last_epoch >= 0`, as in torch. Composite schedulers thread it
        through their children themselves.
        """
        keys = {}
        if initial_lr is not None:
            dtype = current_lr(state).dtype
            keys["initial_lr"] = jnp.asarray(initial_lr, dtype=dtype)
        state, sched_state, _, errors = self._construct(state, keys)
        raise_errors(self.error_templates, errors)
        return state, sched_state

    def step(self, state: Any, sched_state: Any, epoch: Any = None):
        """Torch's `scheduler.step(epoch=None)`: `(state, sched_state)`.

        With `epoch` (torch's deprecated form, no warning here), torch's
        closed form at that epoch is used where it has one. Works under
        `jax.jit`; `epoch` may be traced.

        Called on concrete arrays (outside `jit`), the step runs compiled:
        the operations `jax.jit(sched.step)` runs, on the hyperparameters
        alone (the optimizer's buffers are neither passed nor copied), one
        program per scheduler and state layout. 0.05-0.1 ms a step (2-core
        x86 CPU), where op by op it took 0.55 ms (`step_lr`) to 7.7 ms (a
        `sequential_lr` of two). A lambda that needs concrete values (a
        Python `if` on the epoch) runs op by op; so does a step with an
        `epoch`, whose concrete value some schedulers use in Python.
        """
        if (
            epoch is None
            and not self._op_by_op
            and type(self).__hash__ is not None  # `_compiled_step`'s static argument
        ):
            compiled = self._step_compiled(state, sched_state)
            if compiled is not None:
                return compiled
        state, sched_state, errors = self._step(state, sched_state, epoch)
        raise_errors(self.error_templates, errors)
        return state, sched_state

    def _step_compiled(self, state: Any, sched_state: Any):
        """`step` as one compiled program on `hparams_only(state)`, or None
        where it cannot run so: traced inputs (inside `jit`), or a lambda
        that needs concrete values (remembered: later steps run op by op)."""
        if not all(map(is_concrete, jax.tree.leaves(sched_state))):
            return None
        reduced = hparams_only(state)
        if not all(map(is_concrete, jax.tree.leaves(reduced))):
            return None
        try:
            reduced, sched_state, errors = _compiled_step(self, reduced, sched_state)
        except _NEEDS_CONCRETE_VALUES:
            self._op_by_op = True  # e.g. `lr_lambda=lambda e: 1 if e < 5 else 0.1`
            return None
        raise_errors(self.error_templates, errors)
        return with_hparams(state, reduced), sched_state

    # set once a step could not be compiled (see `step`)
    _op_by_op = False

    # ---- what subclasses implement ---------------------------------------

    def get_lr(self, state, s, initial: bool):
        """Torch's `get_lr` at `s.last_epoch`: `(state, lrs, errors)`.

        `initial` is torch's `_is_initial` (static). `state` is returned
        because the cycling schedulers also write momentum.
        """
        raise NotImplementedError

    def closed_form(self, s, lr: jax.Array) -> jax.Array:
        """Torch's `_get_closed_form_lr` at `s.last_epoch`."""
        raise NotImplementedError

    def _prepare(self, state: Any, n_groups: int, keys: dict) -> tuple[Any, Any]:
        """What torch's constructor does before `LRScheduler.__init__`
        (Cyclic/OneCycle set lr, momentum): `(state, extra)`. `keys` holds
        the per-group values torch keeps in `param_groups` (`initial_lr`,
        `swa_lr`, `max_lr`, ...), shared by every scheduler of the
        optimizer; a scheduler that sets one writes it there."""
        return state, None

    def _bind(self, s, keys: dict):
        """Re-read the group keys this scheduler's `get_lr` reads from
        `param_groups` (a later scheduler may have overwritten them).
        """
        return s

    def _make_state(self, last_epoch, step_count, base_lrs, extra):
        return SchedulerState(last_epoch, step_count, base_lrs)

    # ---- torch's internals ------------------------------------------------

    def _no_errors(self) -> Errors:
        return tuple(
            (jnp.asarray(False), jnp.asarray(0, jnp.int32))
            for _ in self.error_templates
        )

    def _construct(self, state, keys):
        """`LRScheduler.__init__`: `(state, s, keys, errors)`."""
        keys = dict(keys)
        n_groups = current_lr(state).shape[0]
        state, extra = self._prepare(state, n_groups, keys)
        lr = current_lr(state)
        initial_lr = self._initial_lr(lr, keys.get("initial_lr"), extra)
        keys["initial_lr"] = initial_lr
        s = self._make_state(int32(self.last_epoch), int32(0), initial_lr, extra)
        state, s, errors = self._initial_step(state, s)
        return state, s, keys, errors

    def _initial_lr(self, lr, initial_lr, extra):
        if self.last_epoch == -1:
            return lr if initial_lr is None else initial_lr  # setdefault
        if initial_lr is None:
            raise KeyError(_INITIAL_LR_MISSING)
        return initial_lr

    def _initial_step(self, state, s):
        s = s._replace(step_count=int32(0))
        return self._step(state, s, None, initial=True)

    def _step(self, state, s, epoch=None, initial=False):
        s = s._replace(step_count=s.step_count + 1)
        return self._update_lr(state, s, epoch, initial=initial)

    def _update_lr(self, state, s, epoch=None, initial=False):
        if epoch is None:
            s = s._replace(last_epoch=s.last_epoch + 1)
            state, lrs, errors = self.get_lr(state, s, initial)
        else:
            s = s._replace(last_epoch=int32(epoch))
            if self.has_closed_form:
                lrs, errors = self.closed_form(s, current_lr(state)), self._no_errors()
            else:
                state, lrs, errors = self.get_lr(state, s, False)
        return write_lr(state, lrs), s, errors

    def _undo(self, s):
        return s._replace(last_epoch=s.last_epoch - 1)

    # ---- optax ------------------------------------------------------------

    def optax_lr(self, count: jax.Array, base_lr: jax.Array | None, group: int):
        """The lr of `group` at epoch `count` in closed form, given torch's
        `base_lr` (the group's `initial_lr`); see `as_optax_schedule`.
        """
        if not self.has_closed_form:
            raise TypeError(
                f"{self.name} has no closed form; it cannot be an optax schedule"
            )
        if base_lr is None:
            raise TypeError(f"as_optax_schedule({self.name}) needs base_lr")
        s = self._make_state(count, int32(1), base_lr[None], None)
        return self.closed_form(s, base_lr[None])[0]


def as_optax_schedule(
    sched: Scheduler, base_lr: float | None = None, group: int = 0
) -> Callable[[Any], jax.Array]:
    """An optax schedule `count -> lr`: torch's closed form at
    `last_epoch = count`, for one parameter group.

    `count` is optax's number of prior updates, i.e. torch's `last_epoch`
    when `scheduler.step()` follows every `optimizer.step()`. `base_lr`
    is the optimizer's lr (torch's `initial_lr`); CyclicLR and OneCycleLR
    define their own lrs and ignore it (`group` picks the entry of a
    per-group `max_lr`/`base_lr` list). Schedulers whose lr depends on
    the history (MultiplicativeLR, ReduceLROnPlateau, SWALR, the composites)
    have no closed form and raise `TypeError`. The values are torch's
    closed form, so they differ from the stepped (recursive) torch sequence
    by rounding only (~1e-15 relative in float64). They are evaluated in the
    widest enabled float (float32 without `jax_enable_x64`).
    """
    if not isinstance(sched, Scheduler):
        raise TypeError(f"expected a funcopt scheduler, got {type(sched).__name__}")
    # raises TypeError now for schedulers without a closed form
    with jax.ensure_compile_time_eval():
        sched.optax_lr(int32(0), None if base_lr is None else _f(base_lr), group)

    def schedule(count):
        count = jnp.asarray(count).astype(jnp.int32)
        return sched.optax_lr(count, None if base_lr is None else _f(base_lr), group)

    return schedule


def _f(x: Any) -> jax.Array:
    return jnp.asarray(x, dtype=jax.dtypes.canonicalize_dtype(jnp.float64))
