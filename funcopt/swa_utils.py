r"""Weight averaging, mirroring `torch.optim.swa_utils`.

| torch | funcopt |
|---|---|
| `swa = AveragedModel(model, avg_fn=...)` | `averaged_model(params, buffers, ...)` |
| `swa.update_parameters(model)` | `swa = swa.update_parameters(params, buffers)` |
| `swa.module.parameters()`, `.buffers()` | `swa.params`, `swa.buffers` |
| `swa.n_averaged` | `swa.n_averaged` |
| `get_ema_multi_avg_fn(decay)` and the others | the same names |
| `update_bn(loader, model)` | `update_bn(loader, stats_fn, params)` (see there) |
| `SWALR` | `swalr` (funcopt.lr_scheduler's) |
| `swa.state_dict()` | `fti.averaged_model_state_dict(swa)` (see below) |
| `swa.load_state_dict(sd)` | `swa = fti.load_averaged_model_state_dict(swa, sd)` |

[`AveragedModel`][funcopt.swa_utils.AveragedModel] is a pytree of arrays (the averaged
`params`, the `buffers` and `n_averaged`) whose averaging functions are static, so
`jax.jit(lambda swa, p: swa.update_parameters(p))` compiles once.

`update_parameters` follows torch:

1. the first call (`n_averaged == 0`) *copies* the model's values;
2. later calls average with `multi_avg_fn` (per dtype group, as torch groups
   tensors by device and dtype), else `avg_fn` (per array), else the
   default SWA running mean $\bar w \leftarrow \bar w + (w - \bar w)/(n+1)$,
   torch's CPU per-tensor path (on CUDA torch takes a `foreach` `lerp`
   whose weight is rounded to float32; that is
   [`get_swa_multi_avg_fn`][funcopt.swa_utils.get_swa_multi_avg_fn]);
3. buffers: torch's `use_buffers=True` averages the model's buffers with the
   parameters; with `use_buffers=False` they are copied from the model on
   every call. JAX keeps batch-norm statistics and other buffers outside the
   parameters (flax's `batch_stats` collection, for instance), so they are
   a second, optional pytree `buffers` with the same two behaviours;
4. `n_averaged += 1`.

State dicts: `fti` is `funcopt.torch_interop`;
[`averaged_model_state_dict`][funcopt.torch_interop.averaged_model_state_dict]
writes torch's keys (`n_averaged`, `module.<name>` for every parameter and
buffer), which `torch.optim.swa_utils.AveragedModel(model).load_state_dict`
accepts, and
[`load_averaged_model_state_dict`][funcopt.torch_interop.load_averaged_model_state_dict]
reads torch's into an `AveragedModel` built like the torch one (the averaging
functions and `use_buffers` are not in the dict, in either library).

Functional differences: a `multi_avg_fn` *returns* the list of new averaged
arrays instead of updating them in place (`avg_fn` already returns in
torch); `n_averaged` is an `int32` scalar array (torch: a `long` 0-d
tensor) and is what both functions receive. Results are cast to each
averaged array's dtype, as torch's `copy_` does (float to int truncates).
Integer arrays (e.g. `num_batches_tracked`) follow torch's integer branches,
which compute in float32, torch's default dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import PyTreeDef

from ._math import lerp
from ._tree import PyTree
from .lr_scheduler import swalr as swalr

__all__ = [
    "AveragedModel",
    "averaged_model",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "swalr",
    "update_bn",
]

AvgFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
MultiAvgFn = Callable[[list[jax.Array], list[jax.Array], jax.Array], list[jax.Array]]


def _is_float(x: jax.Array) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _default_float(x: jax.Array) -> jax.Array:
    """An integer array promoted the way torch promotes it against a Python float."""
    return x if _is_float(x) else x.astype(jnp.float32)


def _check_decay(decay: float) -> None:
    if decay < 0.0 or decay > 1.0:
        raise ValueError(
            f"Invalid decay value {decay} provided. Please provide a value in "
            "[0,1] range."
        )


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    r"""EMA over lists of arrays: `torch.optim.swa_utils.get_ema_multi_avg_fn`.

    $$
    W^{\text{EMA}}_{t+1} = \operatorname{lerp}(W^{\text{EMA}}_t,\, W_{t+1},\,
        1-\text{decay})
    $$

    with torch's two-branch `lerp` rounding for floating (and complex)
    arrays; integer arrays take `avg*decay + p*(1-decay)` in float32. Raises
    `ValueError` for `decay` outside [0, 1]. Because of the first-call copy in
    [`AveragedModel.update_parameters`][funcopt.swa_utils.AveragedModel.update_parameters],
    the EMA starts from the first model values.
    """
    _check_decay(decay)
    weight = 1 - decay

    def ema_update(ema_list, current_list, num_averaged):
        del num_averaged
        if _is_float(ema_list[0]):
            return [lerp(e, c, weight) for e, c in zip(ema_list, current_list)]
        return [
            _default_float(e) * decay + _default_float(c) * weight
            for e, c in zip(ema_list, current_list)
        ]

    return ema_update


def get_swa_multi_avg_fn() -> MultiAvgFn:
    r"""SWA over lists of arrays: `torch.optim.swa_utils.get_swa_multi_avg_fn`.

    For floating arrays `lerp(avg, p, 1/(n+1))` where, as in torch (`1 /
    tensor` is `tensor.reciprocal()` in float32, torch's default dtype),
    the weight is the **float32** reciprocal of `n + 1`: in float64 this
    differs from [`get_swa_avg_fn`][funcopt.swa_utils.get_swa_avg_fn] at the 1e-8 level.
    Integer arrays raise, as torch's integer `addcdiv` does.
    """

    def swa_update(averaged_list, current_list, num_averaged):
        if _is_float(averaged_list[0]):
            n = jnp.asarray(num_averaged)
            weight = jnp.reciprocal((n + 1).astype(jnp.float32))
            return [lerp(a, c, weight) for a, c in zip(averaged_list, current_list)]
        raise RuntimeError(
            # torch's message, double space included
            "Integer division with addcdiv is no longer supported, and in a future "
            " release addcdiv will perform a true division of tensor1 and tensor2. "
            "The historic addcdiv behavior can be implemented as (input + value * "
            "torch.trunc(tensor1 / tensor2)).to(input.dtype) for integer inputs and "
            "as (input + value * tensor1 / tensor2) for float inputs. The future "
            "addcdiv behavior is just the latter implementation: (input + value * "
            "tensor1 / tensor2), for all dtypes."
        )

    return swa_update


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    r"""EMA of one array: `torch.optim.swa_utils.get_ema_avg_fn`.

    $$
    W^{\text{EMA}}_{t+1} = \text{decay}\cdot W^{\text{EMA}}_t
        + (1-\text{decay})\cdot W_{t+1}
    $$

    as written (a multiply-add, which rounds differently from the `lerp` of
    [`get_ema_multi_avg_fn`][funcopt.swa_utils.get_ema_multi_avg_fn]). Raises
    `ValueError` for `decay` outside [0, 1].
    """
    _check_decay(decay)

    def ema_update(ema, current, num_averaged):
        del num_averaged
        return decay * _default_float(ema) + (1 - decay) * _default_float(current)

    return ema_update


def get_swa_avg_fn() -> AvgFn:
    r"""SWA of one array: `torch.optim.swa_utils.get_swa_avg_fn`.

    $$
    \bar W_{n+1} = \bar W_n + \frac{W - \bar W_n}{n + 1}
    $$

    (`n + 1` converted to the array's dtype; integer arrays divide in
    float32, torch's true division of integers).
    """

    def swa_update(averaged, current, num_averaged):
        n1 = jnp.asarray(num_averaged) + 1
        if _is_float(averaged):
            return averaged + (current - averaged) / n1.astype(averaged.dtype)
        diff = (current - averaged).astype(jnp.float32)
        return averaged.astype(jnp.float32) + diff / n1.astype(jnp.float32)

    return swa_update


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AveragedModel:
    """Averaged parameters (and buffers): `torch.optim.swa_utils.AveragedModel`.

    Build it with [`averaged_model`][funcopt.swa_utils.averaged_model]. A pytree:
    `params`, `buffers` and `n_averaged` are its leaves; the averaging functions and
    `use_buffers` are static.

    Attributes:
      params: the averaged parameters (torch's `swa.module.parameters()`).
      buffers: the averaged (`use_buffers=True`) or copied buffers, or
        `None` when the model has none.
      n_averaged: `int32` scalar, how many models were averaged.
    """

    params: PyTree
    buffers: PyTree
    n_averaged: jax.Array
    avg_fn: AvgFn | None = dataclasses.field(default=None, metadata=dict(static=True))
    multi_avg_fn: MultiAvgFn | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )
    use_buffers: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def update_parameters(
        self, params: PyTree, buffers: PyTree = None
    ) -> AveragedModel:
        """`swa.update_parameters(model)`: a new `AveragedModel`.

        `params` (and `buffers`) must have the structure, shapes and
        dtypes given to [`averaged_model`][funcopt.swa_utils.averaged_model].
        """
        params_flat, params_def = _flatten_like(self.params, params, "params")
        buffers_flat, buffers_def = _flatten_like(self.buffers, buffers, "buffers")
        own_params = params_def.flatten_up_to(self.params)
        own_buffers = buffers_def.flatten_up_to(self.buffers)
        if self.use_buffers:
            averaged = self._average(
                own_params + own_buffers, params_flat + buffers_flat
            )
            new_params = averaged[: len(own_params)]
            new_buffers = averaged[len(own_params) :]
        else:
            new_params = self._average(own_params, params_flat)
            # not averaged: kept in sync with the source model
            new_buffers = [b.astype(o.dtype) for b, o in zip(buffers_flat, own_buffers)]
        return dataclasses.replace(
            self,
            params=params_def.unflatten(new_params),
            buffers=buffers_def.unflatten(new_buffers),
            n_averaged=self.n_averaged + 1,
        )

    def _average(self, own: list, model: list) -> list:
        n = self.n_averaged
        if not own:
            return []
        if not isinstance(n, jax.core.Tracer) and int(n) == 0:
            return model  # eager first call: torch copies, calls no avg fn
        if self.multi_avg_fn is not None or self.avg_fn is None:
            if self.multi_avg_fn is not None:
                averaged: list[Any] = [None] * len(own)
                for idx in _group_by_dtype(own):
                    out = self.multi_avg_fn(
                        [own[i] for i in idx], [model[i] for i in idx], n
                    )
                    if len(out) != len(idx):
                        raise ValueError(
                            "multi_avg_fn must return one array per averaged array "
                            f"(got {len(out)} for {len(idx)})"
                        )
                    for i, value in zip(idx, out):
                        averaged[i] = value
            else:
                avg_fn = get_swa_avg_fn()  # torch's CPU path
                averaged = [avg_fn(a, m, n) for a, m in zip(own, model)]
        else:
            averaged = [self.avg_fn(a, m, n) for a, m in zip(own, model)]
        first = n == 0
        return [
            jnp.where(first, m, jnp.asarray(v).astype(a.dtype))
            for a, m, v in zip(own, model, averaged)
        ]


def averaged_model(
    params: PyTree,
    buffers: PyTree = None,
    *,
    device: Any = None,
    avg_fn: AvgFn | None = None,
    multi_avg_fn: MultiAvgFn | None = None,
    use_buffers: bool = False,
) -> AveragedModel:
    """`torch.optim.swa_utils.AveragedModel` for a pytree of parameters.

    Args:
      params: the model's parameters (any pytree of arrays); the averaged
        copy starts as them, with `n_averaged = 0`.
      buffers: optional second pytree of model state that is not trained
        (batch-norm running statistics, ...), torch's `model.buffers()`.
      device: if given, the copies are placed there (`jax.device_put`).
      avg_fn: `avg_fn(averaged, current, n_averaged) -> new`, per array.
      multi_avg_fn: `multi_avg_fn(averaged_list, current_list, n_averaged)
        -> new_list`, per dtype group (torch updates the lists in place).
      use_buffers: average `buffers` with the parameters (`True`) or copy
        them from the model at every update (`False`, torch's default).

    Giving both `avg_fn` and `multi_avg_fn` raises torch's
    `AssertionError`. Neither gives the SWA running mean.
    """
    if avg_fn is not None and multi_avg_fn is not None:
        raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
    params = jax.tree.map(jnp.asarray, params)
    buffers = jax.tree.map(jnp.asarray, buffers)
    if device is not None:
        params, buffers = jax.device_put((params, buffers), device)
    return AveragedModel(
        params=params,
        buffers=buffers,
        n_averaged=jnp.zeros((), jnp.int32),
        avg_fn=avg_fn,
        multi_avg_fn=multi_avg_fn,
        use_buffers=use_buffers,
    )


def _flatten_like(own: PyTree, new: PyTree, what: str) -> tuple[list, Any]:
    treedef: PyTreeDef = jax.tree.structure(own)
    try:
        flat = treedef.flatten_up_to(new)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"update_parameters: {what} do not have the structure of the averaged "
            f"{what} ({treedef} vs {jax.tree.structure(new)})"
        ) from e
    out = []
    for a, b in zip(treedef.flatten_up_to(own), flat):
        b = jnp.asarray(b)
        if b.shape != a.shape:
            raise ValueError(
                f"update_parameters: {what} leaf of shape {b.shape} where the "
                f"averaged model has {a.shape}"
            )
        out.append(b.astype(a.dtype))  # torch: p_model.to(p_averaged)/copy_
    return out, treedef


def _group_by_dtype(arrays: Sequence[jax.Array]) -> list[list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(jnp.dtype(a.dtype), []).append(i)
    return list(groups.values())


def update_bn(
    loader: Iterable[Any],
    stats_fn: Callable[[PyTree, jax.Array], PyTree],
    params: PyTree,
) -> tuple[PyTree, int]:
    r"""The functional counterpart of `torch.optim.swa_utils.update_bn`.

    torch resets every BatchNorm's running statistics, switches them to a
    cumulative average (`momentum=None`) and runs one pass of the model over
    `loader` in train mode. A JAX model keeps those statistics outside its
    parameters and we cannot reach into its layers, so the caller supplies

    `stats_fn(params, x) -> stats`: the per-batch statistics each
    normalisation layer feeds its running buffers in train mode (for torch's
    BatchNorm: the batch mean and the *unbiased* batch variance), as a pytree
    shaped like the running buffers.

    Returns `(running_stats, num_batches)`: the statistics after torch's
    recursion with $f_k = 1/k$ (`running = f*batch + (1-f)*running`,
    from the reset values, which the first batch replaces), i.e. what the
    model's `running_mean`/`running_var` buffers would hold, and torch's
    `num_batches_tracked`. As in torch a `list`/`tuple` batch uses its
    first element. Put the result in your model's buffers (e.g. flax's
    `batch_stats`) or pass it as `buffers` to the averaged model. With an
    empty loader it returns `(None, 0)` (torch leaves the reset values).
    """
    running = None
    count = 0
    for batch in loader:
        if isinstance(batch, list | tuple):
            batch = batch[0]
        stats = stats_fn(params, batch)
        count += 1
        if running is None:
            running = stats
            continue
        running = jax.tree.map(
            functools.partial(_cumulative, 1.0 / float(count)), stats, running
        )
    return running, count


def _cumulative(f: float, batch_stat: jax.Array, running: jax.Array) -> jax.Array:
    # torch's BatchNorm: running = momentum * batch + (1 - momentum) * running
    return f * batch_stat + (1.0 - f) * running
