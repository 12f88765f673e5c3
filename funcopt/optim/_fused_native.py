"""torch's fused CPU kernels as native code: one pass per element, in place.

`fused=True` Adam/AdamW, SGD and Adagrad run a C++ kernel (`funcopt/_native`,
an XLA FFI custom call) on float32 and float64 CPU params when its library
is built (`make venv`, or `pip install` with a C++ compiler) and JAX runs
on one CPU device; elsewhere (16-bit params, GPU, several devices, tensor
`lr` or `betas`, no library) the pure JAX rules in `adam.py`, `sgd.py` and
`adagrad.py` run. Both give torch's `fused=True` bits where the JAX rule
does (x64 and [`set_exact_float32`][funcopt.precision.set_exact_float32]);
the kernel gives them without either, since it rounds every op in the
param's dtype and does the scalar math in C++ `double` as ATen does.

Without x64 the hyperparameters are held as float32; the kernel reads each
back as the shortest decimal that rounds to it (the Python float that was
written, for values of up to 7 significant digits: `1e-3`, `0.999`, `3e-4`),
so a computed value (a scheduler's cosine) can differ from torch's double in
its last bits; with x64 the double itself is passed.

The kernel's results alias its inputs: under `jax.jit` with the params and
state donated the update is in place (no copies). `lr`, the step count and
the other hyperparameters are runtime buffers (no recompile when they
change). It differentiates through the JAX rule (`jax.custom_jvp`), and
`vmap` runs it once per batch element.

`FUNCOPT_NATIVE=0` in the environment, or
[`set_native_fused(False)`][funcopt.precision.set_native_fused], selects the
JAX path; one INFO log line (logger `funcopt`) says which path runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _native
from .._math import packed_layout, torch_cpu_block

_log = logging.getLogger("funcopt")
_switch: dict[str, Any] = {"enabled": None, "logged": False}


def available() -> bool:
    """Whether the native kernels' library is built and loaded."""
    return isinstance(_native.load(), tuple)


def set_native_fused(enabled: bool) -> None:
    """Run `fused=True` Adam/AdamW, SGD and Adagrad steps on the native CPU
    kernels where they apply (`True`, the default unless the environment sets
    `FUNCOPT_NATIVE=0`), or always on the pure JAX rules (`False`): the same
    bits, the kernels in one pass over memory.

    Read when a step is traced, like
    [`set_exact_float32`][funcopt.precision.set_exact_float32]: a jitted step
    already compiled keeps its path.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _switch["enabled"] = enabled
    _switch["logged"] = False


def _requested() -> bool:
    if _switch["enabled"] is None:
        return _native.enabled_by_environment()
    return bool(_switch["enabled"])


def native_fused() -> bool:
    """Whether `fused=True` steps run the native CPU kernels where they apply
    (float32/float64 params, one CPU device): the library is built and
    [`set_native_fused`][funcopt.precision.set_native_fused] (or
    `FUNCOPT_NATIVE`) did not turn them off. Logs the answer once (INFO,
    logger `funcopt`)."""
    requested = _requested()
    off = "FUNCOPT_NATIVE=0 or set_native_fused(False)"
    loaded = _native.load() if requested else off
    native = requested and isinstance(loaded, tuple)
    if not _switch["logged"]:
        _switch["logged"] = True
        if native:
            _log.info(
                "funcopt: fused=True runs the native CPU kernels (%s)", _native.LIBRARY
            )
        else:
            _log.info("funcopt: fused=True runs the pure JAX path: %s", loaded)
    return native


def _applies(param: Any) -> bool:
    return (
        jnp.dtype(param.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
        and native_fused()
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
    )


def _layout(param, step) -> tuple[np.ndarray, np.ndarray, jax.Array] | None:
    """The leaves packed in `param` (sizes, spans: elements each occupies)
    and their step counts; None where the layout is not understood."""
    shape = tuple(jnp.shape(param))
    step = jnp.ravel(jnp.asarray(step))
    packed = packed_layout()
    if packed is None or packed[0] != shape:
        if step.size != 1:
            return None
        return np.zeros(0, np.int64), np.zeros(0, np.int64), step
    sizes = np.asarray(packed[1], np.int64)
    if len(shape) != 2:
        return None
    width = shape[1]
    rows = np.maximum(1, -(-sizes // width))
    if int(rows.sum()) != shape[0]:
        return None
    if step.size == shape[0]:
        first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int32)
        step = step[first]
    elif step.size != 1:
        return None
    return sizes, rows * width, step


def _scalars(hparams: dict, keys: tuple[str, ...]) -> list[jax.Array] | None:
    """The hyperparameters `keys` as the kernel's buffers (float32 or
    float64; `betas` two values, the others one); None otherwise."""
    out = []
    for k in keys:
        v = jnp.asarray(hparams[k])
        if not jnp.issubdtype(v.dtype, jnp.floating) or v.dtype.itemsize < 4:
            return None
        if v.size != (2 if k == "betas" else 1):
            return None
        out.append(jnp.ravel(v) if k == "betas" else jnp.reshape(v, ()))
    return out


def _run(target, param, grad, slots, names, step, hparams, keys, options, jax_rule):
    """The kernel `target` on the param, gradient and buffers `names` (the
    param and buffers updated in place), differentiated through `jax_rule`
    (`jax.custom_jvp`); None where the kernel does not apply."""
    if not _applies(param) or jnp.dtype(grad.dtype) != jnp.dtype(param.dtype):
        return None
    if any(jnp.dtype(slots[k].dtype) != jnp.dtype(param.dtype) for k in names):
        return None
    if any(jnp.shape(slots[k]) != jnp.shape(param) for k in names):
        return None
    layout = _layout(param, step)
    if layout is None or _scalars(hparams, keys) is None:
        return None
    sizes, spans, _ = layout
    attrs = {
        "fma": np.bool_(torch_cpu_block() is not None),
        "maximize": np.bool_(bool(options["maximize"])),
        "sizes": sizes,
        "spans": spans,
    }
    if target.startswith("funcopt_adam"):
        attrs["decoupled"] = np.bool_(bool(options["decoupled_weight_decay"]))
    if target.startswith("funcopt_sgd"):
        attrs["nesterov"] = np.bool_(bool(options["nesterov"]))
    arrays = [param, grad, *(slots[k] for k in names)]
    out_index = [0, *range(2, len(arrays))]
    results = [jax.ShapeDtypeStruct(param.shape, param.dtype) for _ in out_index]
    call = jax.ffi.ffi_call(
        target,
        results,
        vmap_method="sequential",
        input_output_aliases={i: k for k, i in enumerate(out_index)},
    )

    @jax.custom_jvp
    def kernel(arrays, step, hparams):
        layout = _layout(arrays[0], step)
        scalars = _scalars(hparams, keys)
        assert layout is not None and scalars is not None
        step_arg = layout[2].astype(scalars[0].dtype)
        return tuple(call(*arrays, step_arg, *scalars, **attrs))

    def fallback(arrays, step, hparams):
        p, g, *bufs = arrays
        new_p, new = jax_rule(p, g, dict(zip(names, bufs)), step, hparams, options)
        return (new_p, *(new[k] for k in names))

    @kernel.defjvp
    def _jvp(primals, tangents):
        return kernel(*primals), jax.jvp(fallback, primals, tangents)[1]

    out = kernel(arrays, step, dict(hparams))
    return out[0], dict(zip(names, out[1:]))


def with_kernel(kernel: Callable, jax_rule: Callable) -> Callable:
    """A fused rule that runs the native `kernel` where it applies, else
    `jax_rule` (torch's fused kernel in JAX, the same bits).

    `kernel(param, grad, slots, step, hparams, options, jax_rule)` returns
    None where it does not apply; a group with a tensor `lr` or `betas`
    (`jax_rule`'s `lr_dtype`/`betas_dtype` keywords, from
    `_common.group_rule`) always takes `jax_rule`.
    """

    # not `functools.wraps`: `__wrapped__` would lead `inspect` and
    # `_compile` past the kernel to `jax_rule`
    def rule(param, grad, slots, step, hparams, options, **tensor_dtypes):
        if not tensor_dtypes:
            out = kernel(param, grad, slots, step, hparams, options, jax_rule)
            if out is not None:
                return out
        return jax_rule(param, grad, slots, step, hparams, options, **tensor_dtypes)

    return rule


def adam(param, grad, slots, step, hparams, options, jax_rule) -> Any:
    """Adam's fused step through the kernel; None where it does not apply."""
    names = ["exp_avg", "exp_avg_sq"]
    target = "funcopt_adam"
    if options["amsgrad"]:
        names.append("max_exp_avg_sq")
        target = "funcopt_adam_amsgrad"
    keys = ("lr", "betas", "eps", "weight_decay")
    return _run(
        target, param, grad, slots, names, step, hparams, keys, options, jax_rule
    )


def sgd(param, grad, slots, step, hparams, options, jax_rule) -> Any:
    """SGD's fused step through the kernel; None where it does not apply."""
    names = ["momentum_buffer"] if "momentum_buffer" in slots else []
    target = "funcopt_sgd_momentum" if names else "funcopt_sgd"
    keys = ("lr", "momentum", "dampening", "weight_decay")
    return _run(
        target, param, grad, slots, names, step, hparams, keys, options, jax_rule
    )


def adagrad(param, grad, slots, step, hparams, options, jax_rule) -> Any:
    """Adagrad's fused step through the kernel; None where it does not apply."""
    keys = ("lr", "lr_decay", "weight_decay", "eps")
    return _run(
        "funcopt_adagrad",
        param,
        grad,
        slots,
        ["sum"],
        step,
        hparams,
        keys,
        options,
        jax_rule,
    )
