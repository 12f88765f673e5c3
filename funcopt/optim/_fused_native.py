"""torch's CPU optimizer steps as native code: one pass per element, in place.

Adam/AdamW, SGD and Adagrad, with `fused=True` and without, and the default
step of RMSprop, Adamax, Adadelta, RAdam, Rprop, NAdam and ASGD (torch has no
fused kernel for them) run a C++ kernel (`funcopt/_native`, an XLA FFI
custom call) on float32 and float64 CPU params, and with `fused=True` on
bfloat16 and float16 ones too, when its library is built
(`make venv`, or `pip install` with a C++ compiler): on one CPU device, and
on several, where a default step runs on each device's piece of every leaf
(`_partitioned`; no communication, the single-device bits); elsewhere
(16-bit params on the default step, GPU, the fused kernels and packed buckets on several
devices, a tensor hyperparameter,
Adam's and NAdam's `differentiable`/`capturable` path, the `capturable`
step of Adamax, RAdam and ASGD, the `foreach=True` step of RAdam, NAdam and
ASGD, sparse gradients, no library) the pure JAX
rules in `adam.py`, `sgd.py`, `adagrad.py`, `rmsprop.py`, `adamax.py`,
`adadelta.py`, `radam.py`, `rprop.py`, `nadam.py` and `asgd.py` run.

* `fused=True`: torch's fused kernel (`_fused_adam_`, `_fused_sgd_`,
  `_fused_adagrad_`), its vectorised body and scalar tail; 16-bit params in
  float32, each stored buffer rounded once (torch's `opmath_t`).
* The default step: torch's single-tensor path (`_single_tensor_adam`,
  `_single_tensor_sgd`, `_single_tensor_adagrad`,
  `_single_tensor_rmsprop`, `_single_tensor_adamax`,
  `_single_tensor_adadelta`, `_single_tensor_radam`, `_single_tensor_rprop`,
  `_single_tensor_nadam`, `_single_tensor_asgd`), one torch op after
  another, each rounded in the param's dtype, the multiply-adds of
  `add(alpha=)`, `addcmul` and `lerp` fused as torch's x86 build fuses them
  (`torch_cpu_block`: none on its `default` build), the scalar math
  (`1 - beta ** step`, `bias_correction2 ** 0.5`, `1 - lr * weight_decay`,
  `1 + (step - 1) * lr_decay`) in double as Python computes it. A
  per-parameter 0-d float32 state tensor (NAdam's `mu_product`, ASGD's `eta`
  and `mu`) is updated by the kernel as torch updates it, in float32,
  subnormals kept. For Adam, SGD and Adagrad that is the fused kernel's
  vectorised body, with every element taking it and the scalar math as
  Python's (`pow(x, 0.5)` for `sqrt`, no FMA), so both share one C++ loop
  (attribute `single_tensor`).

Both give torch's bits where the JAX rule does (x64 and
[`set_exact_float32`][funcopt.precision.set_exact_float32]); the kernel
gives them without either, since it rounds every op in the param's dtype and
does the scalar math in C++ `double` as ATen and Python do. The default
steps that take a square root (Adam's, Adagrad's, RMSprop's, Adadelta's,
RAdam's, NAdam's) differ from torch's only where torch's `sqrt` (MKL's) is not
correctly rounded (the kernel's is).

Subnormal values are kept, as torch keeps them: XLA runs its CPU threads with
them flushed to zero (x86 FTZ/DAZ), the kernels clear that while they run.

Without x64 the hyperparameters are held as float32; the kernel reads each
back as the shortest decimal that rounds to it (the Python float that was
written, for values of up to 7 significant digits: `1e-3`, `0.999`, `3e-4`),
so a computed value (a scheduler's cosine) can differ from torch's double in
its last bits; with x64 the double itself is passed.

Adam/AdamW, SGD, Adagrad and RMSprop step many leaves in one call
(`<target>_many`, `_run_many`): every leaf the per-leaf path steps in a
group, and every leaf of a packed state's bucket, its param and gradient
read where they are and its state buffers the bucket's elements
(`_run_many_packed`; under `set_policy("always")` `init` packs large
leaves' state in buckets of their own), at most `LEAVES_PER_CALL` leaves a
call (one a call in a train step, `one_call_per_leaf`). The threads split
a call's leaves' elements as one range; each leaf takes the arithmetic it
takes alone (the same bits, tested). Adagrad and RMSprop at 100 leaves of
100,000 float32 (2-core AMD EPYC): a step in 0.84-0.86x the time of one
call a leaf (Adagrad `fused=True` 6.1 ms against 7.2 ms, torch fused 5.9
ms).

The kernel's results alias its inputs: under `jax.jit` with the params and
state donated the update is in place (no copies). In a step inside a `jit`
that computes its gradients (`writing_over_gradients`) the new params are
written over the gradients instead, the params read as they are. The optax
protocol's `update` runs the JAX rules on the leaves it steps one by one
(`jax_rules_only`: XLA fuses them with `optax.apply_updates`, which it
cannot with a kernel), the kernels on packed buckets, written over the
gradients. `lr`, the step count and
the other hyperparameters are runtime buffers (no recompile when they
change). It differentiates through the JAX rule (`jax.custom_jvp`), and
`vmap` runs it once per batch element.

`FUNCOPT_NATIVE=0` in the environment, or
[`set_native_fused(False)`][funcopt.precision.set_native_fused], selects the
JAX path; one INFO log line (logger `funcopt`) says which path runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from .. import _native
from .._core import TENSOR_DTYPES
from .._math import packed_layout, packed_leaves, torch_cpu_block
from .._multi_tensor import take_leaves

_log = logging.getLogger("funcopt")
_switch: dict[str, Any] = {"enabled": None, "logged": False}


def available() -> bool:
    """Whether the native kernels' library is built and loaded."""
    return isinstance(_native.load(), tuple)


def set_native_fused(enabled: bool) -> None:
    """Run Adam/AdamW, SGD and Adagrad steps (`fused=True` and default) and
    the default step of RMSprop, Adamax, Adadelta, RAdam, Rprop, NAdam and
    ASGD on the native CPU kernels where they apply
    (`True`, the default unless the environment sets `FUNCOPT_NATIVE=0`), or
    always on the pure JAX rules (`False`): the same formula, the kernels in
    one pass over memory and in torch's float32 rounding without x64 (the
    JAX rules round so only with x64 and
    [`set_exact_float32`][funcopt.precision.set_exact_float32]).

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
    """Whether the steps of `set_native_fused` run the native CPU kernels
    where they apply (float32/float64 params on the CPU, 16-bit ones with
    `fused=True`): the library
    is built and
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
                "funcopt: Adam/AdamW, SGD, Adagrad, RMSprop, Adamax, Adadelta, "
                "RAdam, Rprop, NAdam and ASGD run the native CPU kernels (%s)",
                _native.LIBRARY,
            )
        else:
            _log.info("funcopt: every optimizer runs its pure JAX rule: %s", loaded)
    return native


_updates = threading.local()


def kernels_now() -> bool:
    """Whether a step traced now runs the kernels where they apply:
    `native_fused`, but for the leaves `update` steps one by one
    (`jax_rules_only`). Read at trace time (part of the per-leaf kernel
    cache key, `funcopt._math.trace_settings`)."""
    return native_fused() and not _switch_is_on("jax_rules")


def _switch_is_on(name: str) -> bool:
    return getattr(_updates, name, False)


@contextlib.contextmanager
def _switched(name: str, value: bool):
    """The trace-time switch `name` (of this thread) set to `value` while a
    block runs."""
    old = _switch_is_on(name)
    setattr(_updates, name, value)
    try:
        yield
    finally:
        setattr(_updates, name, old)


def jax_rules_only() -> contextlib.AbstractContextManager:
    """While the optax protocol's `update` traces its step: the pure JAX
    rules run on the leaves it steps one by one and on `funcopt.flat`
    buckets (`kernels_now` is false), the kernels on a plain tree's packed
    buckets (`kernels_on_packed_buckets`).

    `update` returns `new_params - params`, which `optax.apply_updates`
    adds back: XLA fuses the JAX rule, the subtraction and the addition
    into the loops of the step (optax's own `update` compiles so), where a
    kernel (a custom call, which XLA does not fuse) wrote its new params
    over the gradients and the addition made one more pass over memory,
    after a copy of each gradient that was an argument of the `jit`.
    Measured (2-core AMD EPYC, AdamW, float32, params and state donated,
    interleaved): 100 leaves of 100,000 with the gradients computed in the
    `jit`, 22.9 ms with the kernels, 11.0 ms with the JAX rules, optax 10.4
    ms; one leaf of 1M, 0.98, 0.65 and 0.67 ms. Without x64 the JAX rules
    hold the hyperparameters in float32 (`1 - beta2` is 0.99998713e-3, as
    in optax): torch's float32 numbers to ~1e-5 relative (its bits with
    x64 and `set_exact_float32`); `update` + `apply_updates` already rounds
    `new - old + old`, and `opt.step` keeps the kernels' bits.
    """
    return _switched("jax_rules", True)


def kernels_on_packed_buckets() -> contextlib.AbstractContextManager:
    """While a plain tree's packed buckets step (`_multi_tensor.apply_packed`,
    `apply_tree`): the kernels run there under `update` too
    (`jax_rules_only` off). A bucket's params are copied in and out, or
    read in place by one call for many leaves: XLA has nothing to fuse
    there, and the kernel compiles faster (`optax.chain(clip, fo.adamw())`
    on 10 leaves of 1,000: ~0.8x optax's compile, ~1.1x with the JAX rule)
    and gives torch's bits."""
    return _switched("jax_rules", False)


def writing_over_gradients() -> contextlib.AbstractContextManager:
    """While a step traces whose gradients die with it and whose params are
    read elsewhere (a train step, `tracing_step`): the kernels write the new
    params over the gradients (their last use), the params read as they
    are.

    Backprop reads a layer's weight again for its input's gradient,
    unordered with the weight's own update. There XLA's CPU copy insertion
    copies each such param before a kernel updates it in place, twice, and
    keeps the copies in the step's temporary buffer
    (`benchmarks/in_jit_grads.py`, a 10.5M-param MLP: 18 param copies, a
    40 MB temporary whose pages fault in every step, 1.4x optax's step);
    written over the gradient (dead after the step), the new param is
    copied into the param's buffer once, as optax's step copies it (0.9x).
    A step that returns the gradients too makes XLA copy them instead; a
    param read elementwise only is read before its gradient exists (no
    copy); with XLA's region analysis (`XLA_FLAGS` has
    `--xla_cpu_copy_insertion_use_region_analysis=true`) nothing is
    copied. A fresh buffer per step instead measured 1.41x optax at one 10M
    leaf, its pages faulted in each step.
    """
    return _switched("over_gradients", True)


def params_in_place() -> bool:
    """Whether the kernels of a step traced now write the new params over
    the params (outside `writing_over_gradients`). Read at trace time (part of
    the per-leaf kernel cache key, `funcopt._math.trace_settings`)."""
    return not _switch_is_on("over_gradients")


def keeping_gradients() -> contextlib.AbstractContextManager:
    """While a step whose gradients stay live after it traces
    (`fo.TrainState`, which keeps them as torch keeps `p.grad`): the
    kernels write the new params over the params, in a train step too
    (`tracing_step`)."""
    return _switched("keep_gradients", True)


_REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis=true"


def _region_analysis() -> bool:
    """Whether XLA's CPU copy insertion runs its region analysis (set in
    `XLA_FLAGS` before JAX starts): then it copies no param that a kernel
    updates in place."""
    return _REGION_ANALYSIS in os.environ.get("XLA_FLAGS", "")


@contextlib.contextmanager
def tracing_step(params, grads):
    """The trace-time switches of `step` on these params and gradients. Where
    the traced program computes the gradients by backprop through a matrix
    product of the params (`_computed_after_a_product`): each leaf takes a
    call of its own (`one_call_per_leaf`), and the new params are written
    over the gradients (`writing_over_gradients`) unless they are kept
    (`keeping_gradients`) or XLA's region analysis is on."""
    with contextlib.ExitStack() as switches:
        if kernels_now() and _backprop_computes(params, grads):
            switches.enter_context(_switched("one_call_per_leaf", True))
            if not _switch_is_on("keep_gradients") and not _region_analysis():
                switches.enter_context(writing_over_gradients())
        yield


def one_call_per_leaf() -> bool:
    """Whether the step traced now computes its gradients by backprop (a
    train step: `jax.grad` then `opt.step`, or `TrainState`'s backward then
    step, in one `jit`): each leaf then takes a kernel call of its own, not
    one call for many (`LEAVES_PER_CALL`). XLA's CPU runtime runs a leaf's
    call as soon as its gradient exists, beside the rest of backprop; one
    call for many leaves waits for the last of their gradients and then
    runs alone. Measured (2-core AMD EPYC, a 20-layer MLP of 1024x1024,
    batch 32, AdamW): 50.7 ms a train step with a call a leaf, 96.8 ms with
    one call for the 20 weights, optax 58.1 ms. Gradients elementwise in the
    params (no product: nothing to overlap) keep the calls for many, and so
    do packed buckets of large leaves (`set_policy("always")`: their calls
    chain through the bucket's buffers)."""
    return _switch_is_on("one_call_per_leaf")


def update_steps_buckets_where_they_are(grads) -> bool:
    """Whether `update` (the optax protocol, `jax_rules_only`, its new params
    written over the gradients, `writing_over_gradients`: `new - old` still
    reads the params), traced now on `grads` (a list, None for a missing
    gradient), steps a packed state's buckets of small leaves where their
    rule's kernel for many leaves applies with their params and gradients
    read where they are (`_multi_tensor.step_bucket_in_place`: one call
    for many leaves, the new params written over the gradients) instead of
    packing both and unpacking the new params: where the traced program
    computes every gradient (`optax.clip_by_global_norm`'s, backprop's),
    which then dies with the step. Gradients that are arguments of the
    `jit` are packed, as `opt.step` packs them: written over, each would be
    copied first, and so is a computed gradient the program also returns
    or reads after the step (the same bits, a copy more).

    Measured (2-core AMD EPYC, 1,000 float32 leaves of 1,000, params and
    state donated, both programs interleaved in one process, seven
    processes), the step of `optax.chain(optax.clip_by_global_norm(1.0),
    fo.adamw())` with `update` + `apply_updates`: read where they are,
    0.39-0.51x optax's; packed, 0.40-0.58x; the first the faster in 24 of
    31 paired samples (tied in 2; the five slower all in one process).
    SGD with momentum 0.64-0.78x against 0.69-0.83x, Adagrad 0.63-0.65x
    against 0.66x, RMSprop 0.62-0.66x against 0.68-0.80x. At 100 leaves of
    1,000, within the spread (AdamW 0.55-0.78x against 0.58-0.90x).
    Gradients passed in and written over took 1.2-1.3x the packed step at
    100 leaves (a copy of each gradient)."""
    if not (_switch_is_on("jax_rules") and _switch_is_on("over_gradients")):
        return False
    try:
        return _frame_computing([g for g in grads if g is not None]) is not None
    except AttributeError as error:  # another JAX's tracing internals
        _log.debug("funcopt: the traced program cannot be read: %s", error)
        return False


def _backprop_computes(params, grads) -> bool:
    """Whether the traced program computes `grads` after it took a param (as
    it is, or transposed, reshaped or cast) into a matrix product or
    convolution, directly or in a call (a nested `jit`, `cond`,
    `checkpoint`, ...): the usual train step, `jax.grad(loss)(params, x)`
    then `opt.step`. False where the gradients are arguments of the `jit`
    (`jax.jit(opt.step)`, also called inside another `jit`), computed
    without a product of a param (a clip; a param read elementwise only),
    outside `jit`, under other transformations, and wherever the trace
    cannot be read. Decided at trace time from the traced program (JAX's
    tracing frame)."""
    try:
        return _computed_after_a_product(
            jax.tree.leaves(params), jax.tree.leaves(grads)
        )
    except AttributeError as error:  # another JAX's tracing internals
        _log.debug("funcopt: the traced program cannot be read: %s", error)
        return False


def _frame_computing(grads: list):
    """The one tracing frame that computes every one of `grads` (none of
    them an argument of the `jit`); None where there is none."""
    frames = {id(getattr(g._trace, "frame", None)) for g in grads if _traced(g)}
    if not grads or len(frames) != 1 or not all(map(_traced, grads)):
        return None
    frame = grads[0]._trace.frame
    inputs = {id(v) for v in frame.invars}
    if any(id(g.val) in inputs for g in grads):
        return None
    return frame


def _computed_after_a_product(params: list, grads: list) -> bool:
    frame = _frame_computing(grads)
    if frame is None:
        return False
    # the params and the values laid out or cast from them, in trace order
    derived = {id(p.val) for p in params if _traced(p)}
    holds_product: dict[int, bool] = {}
    for ref in frame.tracing_eqns:
        eqn = ref() if isinstance(ref, weakref.ref) else ref
        if eqn is None or not any(id(_var(v)) in derived for v in eqn.invars):
            continue
        name = eqn.primitive.name
        if name in _PRODUCTS or _calls_a_product(eqn.params, holds_product):
            return True
        if name in _LAYOUT:
            derived.update(id(_var(v)) for v in eqn.outvars)
    return False


_PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})
# ops that pass a param on as the same values, laid out or cast
_LAYOUT = frozenset(
    {
        "transpose",
        "reshape",
        "convert_element_type",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
    }
)
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "branches", "body_jaxpr", "cond_jaxpr")


def _var(v):
    return getattr(v, "val", v)


def _calls_a_product(params: dict, memo: dict[int, bool]) -> bool:
    """Whether an equation's sub-programs (a call's, a `cond`'s branches, a
    loop's body) hold a matrix product or convolution, at any depth."""
    for key in _CALLS:
        value = params.get(key)
        subs = value if isinstance(value, tuple | list) else (value,)
        if any(_holds_product(s, memo) for s in subs if s is not None):
            return True
    return False


def _holds_product(jaxpr, memo: dict[int, bool]) -> bool:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's program
    if id(jaxpr) not in memo:
        memo[id(jaxpr)] = False  # (recursion guard)
        memo[id(jaxpr)] = any(
            eqn.primitive.name in _PRODUCTS or _calls_a_product(eqn.params, memo)
            for eqn in jaxpr.eqns
        )
    return memo[id(jaxpr)]


def _traced(x) -> bool:
    """A value of the `jit` being traced (not of `grad`, `vmap`, ...)."""
    trace = getattr(x, "_trace", None)
    return hasattr(trace, "frame") and hasattr(x, "val")


_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
# torch's fused kernels compute 16-bit params in float32 (`opmath_t`),
# rounding each stored buffer once; its default steps round every op to 16
# bits, which the JAX rules mirror
_FUSED_ONLY_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _applies(param: Any, single_tensor: bool) -> bool:
    dtype = jnp.dtype(param.dtype)
    return (
        (dtype in _KERNEL_DTYPES or (not single_tensor and dtype in _FUSED_ONLY_DTYPES))
        and kernels_now()
        and jax.default_backend() == "cpu"
    )


def _layout(
    param, step, packed
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """The leaves packed in `param` (sizes, spans: elements each occupies)
    and where their step counts are in `step` (each leaf's first row; None:
    `step` is one count); None where the layout is not understood.
    `packed`: `packed_layout()` while the rule is traced."""
    shape = tuple(jnp.shape(param))
    n_steps = int(np.size(step))
    if packed is None or packed[0] != shape:
        if n_steps != 1:
            return None
        return np.zeros(0, np.int64), np.zeros(0, np.int64), None
    sizes = np.asarray(packed[1], np.int64)
    if len(shape) != 2:
        return None
    width = shape[1]
    rows = np.maximum(1, -(-sizes // width))
    if int(rows.sum()) != shape[0]:
        return None
    if n_steps == shape[0]:
        first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int32)
        return sizes, rows * width, first
    if n_steps != 1:
        return None
    return sizes, rows * width, None


def partitions() -> bool:
    """Whether a kernel can be split over the devices of a sharded param:
    XLA partitions with Shardy (`jax_use_shardy_partitioner`, JAX's default),
    whose rule `_partitioned` gives. Read at trace time (part of
    `funcopt._math.trace_settings`)."""
    return bool(getattr(jax.config, "jax_use_shardy_partitioner", False))


def _leaf_rows(param, sizes, spans) -> np.ndarray | None:
    """Each packed leaf's rows in `param` (None: one leaf, not packed)."""
    if len(sizes) == 0:
        return None
    return np.asarray(spans, np.int64) // int(jnp.shape(param)[1])


def _fits_leaf_rows(value, param, rows) -> bool:
    """Whether `value` is a per-parameter 0-d state buffer in the form
    `rows` expects: float32 (torch's default dtype), 0-d for one leaf, one
    value per row of a packed bucket."""
    if jnp.dtype(value.dtype) != jnp.dtype(jnp.float32):
        return False
    if rows is None:
        return jnp.ndim(value) == 0
    return int(np.size(value)) == jnp.shape(param)[0]


# hyperparameters that are pairs (torch's tuples)
_PAIRS = ("betas", "etas", "step_sizes")


def _scalars(hparams: dict, keys: tuple[str, ...]) -> list[jax.Array] | None:
    """The hyperparameters `keys` as the kernel's buffers (float32 or
    float64; the `_PAIRS` two values, the others one); None otherwise."""
    out = []
    for k in keys:
        v = jnp.asarray(hparams[k])
        if not jnp.issubdtype(v.dtype, jnp.floating) or v.dtype.itemsize < 4:
            return None
        if v.size != (2 if k in _PAIRS else 1):
            return None
        out.append(jnp.ravel(v) if k in _PAIRS else jnp.reshape(v, ()))
    return out


def _fits(param, grad, slots, names, single_tensor) -> bool:
    """Whether a kernel can update `param` and its state buffers `names`
    (`slots`) from `grad`: dense, every buffer of the param's dtype and
    shape, a dtype the kernel takes, on the CPU with the kernels on."""
    if not isinstance(grad, jax.Array):  # a sparse gradient (BCOO)
        return False
    if not _applies(param, single_tensor):
        return False
    like = [grad, *(slots[k] for k in names)]
    return all(
        jnp.dtype(x.dtype) == jnp.dtype(param.dtype)
        and jnp.shape(x) == jnp.shape(param)
        for x in like
    )


def _flags(options, single_tensor: bool) -> dict[str, np.bool_]:
    """The kernels' flag attributes for a group's options."""
    attrs = {
        "fma": np.bool_(torch_cpu_block() is not None),
        "maximize": np.bool_(bool(options["maximize"])),
    }
    # the flags some kernels take: every optimizer with the option has one
    # that takes it (Adam/AdamW, RAdam, NAdam; SGD)
    flags = (("decoupled", "decoupled_weight_decay"), ("nesterov", "nesterov"))
    for attr, option in flags:
        if option in options:
            attrs[attr] = np.bool_(bool(options[option]))
    attrs["single_tensor"] = np.bool_(single_tensor)
    return attrs


def _run(
    target, param, grad, slots, names, step, hparams, keys, options, jax_rule,
    single_tensor, leaf_scalars=(),
):  # fmt: skip
    """The kernel `target` on the param, gradient and buffers `names` (the
    param and buffers updated in place), differentiated through `jax_rule`
    (`jax.custom_jvp`); None where the kernel does not apply. The new param
    is written over the gradient while `update` traces (its packed
    buckets), or a step on gradients it computes (`writing_over_gradients`).
    `single_tensor`: torch's single-tensor (default) step instead of its
    fused kernel. `leaf_scalars`: the per-parameter 0-d float32 buffers
    (NAdam's `mu_product`, ASGD's `eta` and `mu`), passed after `names` as
    they are (0-d, or one value per row of a packed bucket: attribute
    `rows`). On several devices (`_partitioned`): torch's default steps on
    unpacked leaves only."""
    if not _fits(param, grad, slots, names, single_tensor):
        return None
    packed = packed_layout()
    layout = _layout(param, step, packed)
    if layout is None or _scalars(hparams, keys) is None:
        return None
    sizes, spans, first = layout
    several_devices = jax.device_count() > 1
    if several_devices and not partitions():
        return None
    if several_devices and (len(sizes) or not single_tensor):
        # split over devices (`_partitioned`) only where every element takes
        # the same arithmetic: one leaf, torch's default step (a fused
        # kernel's scalar tail is the last elements of the whole leaf)
        return None
    rows = _leaf_rows(param, sizes, spans)
    if not all(_fits_leaf_rows(slots[k], param, rows) for k in leaf_scalars):
        return None
    attrs = {**_flags(options, single_tensor), "sizes": sizes, "spans": spans}
    if leaf_scalars:
        attrs["rows"] = np.zeros(0, np.int64) if rows is None else rows
    updated = (*names, *leaf_scalars)  # the state buffers the kernel writes
    arrays = [param, grad, *(slots[k] for k in updated)]
    out_index = [0, *range(2, len(arrays))]
    # the results written over their inputs: the new param over the param,
    # or over the gradient (its last use) under `writing_over_gradients`:
    # `update` (its packed buckets), whose param stays live for
    # `new - param`, and a step on gradients it computes (`tracing_step`)
    aliases = {i: k for k, i in enumerate(out_index)}
    if not params_in_place():
        aliases[1] = aliases.pop(0)

    def call(*operands):
        # the operands as they are: XLA copies a reshaped operand (a bitcast
        # of another buffer) before a call that writes into it
        ffi = jax.ffi.ffi_call(
            target,
            _written_over(operands, out_index),
            vmap_method="sequential",
            input_output_aliases=aliases,
        )
        return tuple(ffi(*operands, **attrs))

    # both traced again when differentiated, after the rule's trace: they
    # close over what they read from it (the layout, `packed_leaves`)
    @jax.custom_jvp
    def kernel(arrays, step, hparams):
        scalars = _scalars(hparams, keys)
        assert scalars is not None
        step = jnp.ravel(jnp.asarray(step))
        step_arg = (step if first is None else step[first]).astype(scalars[0].dtype)
        operands = (*arrays, step_arg, *scalars)
        if several_devices:
            full = 2 + len(names)
            return _partitioned(call, operands, full, len(out_index))(*operands)
        return call(*operands)

    def fallback(arrays, step, hparams):
        p, g, *bufs = arrays
        state = dict(zip(updated, bufs))
        with packed_leaves(*packed) if packed else contextlib.nullcontext():
            new_p, new = jax_rule(p, g, state, step, hparams, options)
        return (new_p, *(new[k] for k in updated))

    @kernel.defjvp
    def _jvp(primals, tangents):
        return kernel(*primals), jax.jvp(fallback, primals, tangents)[1]

    out = kernel(arrays, step, dict(hparams))
    return out[0], dict(zip(updated, out[1:]))


# the kernels with a handler for many leaves in one call (`_run_many`):
# those the library registers a `<target>_many` for
_MANY = frozenset(
    name.removesuffix("_many")
    for name in _native.TARGETS.values()
    if name.endswith("_many")
)


# the most leaves one `<target>_many` call steps: XLA's CPU compiler spends
# time superlinear in one instruction's aliased operands (Adam, 1,000
# leaves of 1,000 in one call: 59 s to compile with per-leaf state, 4.5 s
# packed, against 3.9 s and 0.4 s in calls of one leaf or one packed
# bucket; 2-core AMD EPYC, jaxlib 0.10.2)
LEAVES_PER_CALL = 64


def _chunks(n: int) -> list[range]:
    """`range(n)` cut into runs of at most `LEAVES_PER_CALL`, of even sizes."""
    calls = -(-n // LEAVES_PER_CALL)
    cuts = [n * c // calls for c in range(calls + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def _run_many(
    target, params, grads, slots, names, steps, live, hparams, keys, options,
    jax_rule, single_tensor,
):  # fmt: skip
    """The kernel `target` on many leaves (each its own buffers) in few
    calls (`<target>_many`, `LEAVES_PER_CALL` leaves each): the threads split
    a call's leaves' elements as one range, where one call a leaf split each
    on its own while XLA ran the others' beside it (Adam, 100 leaves of
    100,000 float32, 2-core AMD EPYC: ~20 us a leaf more than one leaf of
    10M). Each leaf is stepped as `_run` steps it alone: the same bits, the
    same aliasing, the same JAX rule to differentiate. `slots[i]`: leaf i's
    buffers; `steps`: each leaf's count after this step; `live`: whether
    each leaf steps (a traced `has_grad`: the others keep their values, no
    select after the call). The `(new_param, new_slots)` of each leaf it
    stepped, by position; none (`_run` steps each) where fewer than two
    leaves fit, on several devices, and for the other kernels."""
    if not _many_applies(target, hparams, keys) or packed_layout() is not None:
        return {}
    fit = [
        i
        for i, (p, g, own) in enumerate(zip(params, grads, slots))
        if _fits(p, g, own, names, single_tensor)
    ]
    if len(fit) < 2:
        return {}
    steps, live = take_leaves(steps, fit), take_leaves(live, fit)
    out = {}
    for run in _chunks(len(fit)):
        leaves = [fit[r] for r in run]
        stepped = _call_many(
            target, [params[i] for i in leaves], [grads[i] for i in leaves],
            [slots[i] for i in leaves], names, steps[run.start : run.stop],
            live[run.start : run.stop], hparams, keys, options, jax_rule,
            single_tensor,
        )  # fmt: skip
        out.update(zip(leaves, stepped))
    return out


def _call_many(
    target, params, grads, slots, names, steps, live, hparams, keys, options,
    jax_rule, single_tensor,
):  # fmt: skip
    """One `<target>_many` call on leaves that fit (`_run_many`): each
    leaf's `(new_param, new_slots)`."""
    n = len(params)
    groups = [params, grads, *([own[k] for own in slots] for k in names)]
    arrays = [x for group in groups for x in group]
    no_offsets = np.zeros(0, np.int64)  # each leaf's own buffers

    def fallback(arrays, steps, live, hparams):
        new_params, new_buffers = [], []
        for rank in range(n):
            p, g, *bufs = arrays[rank::n]
            own = dict(zip(names, bufs))
            new_p, new = jax_rule(p, g, own, steps[rank], hparams, options)
            new_params.append(jnp.where(live[rank], new_p, p))
            new_buffers.append([jnp.where(live[rank], new[k], own[k]) for k in names])
        return (*new_params, *(b[j] for j in range(len(names)) for b in new_buffers))

    kernel = _many_kernel(target, arrays, n, no_offsets, keys, options,
                          single_tensor, fallback)  # fmt: skip
    out = kernel(arrays, steps, live, dict(hparams))
    return [
        (out[rank], {k: out[(1 + j) * n + rank] for j, k in enumerate(names)})
        for rank in range(n)
    ]


def _run_many_packed(
    target, params, grads, buffers, names, offsets, steps, live, hparams, keys,
    options, jax_rule, single_tensor,
):  # fmt: skip
    """The kernel `target` on many leaves whose state is packed (a packed
    state's bucket) in few calls (`<target>_many`, `LEAVES_PER_CALL` leaves
    each, one after another on the bucket's buffers): each leaf's param and
    gradient read where they are (not packed and unpacked around the call),
    its state buffers `names` the elements of `buffers[name]` from
    `offsets[i]`, stepped as `_run` steps it alone (the same bits, the JAX
    rule to differentiate). `steps`: each leaf's count after this step;
    `live`: whether each leaf steps (as `_run_many`).
    `(new_params, new_buffers)`; None where a leaf does not fit (the bucket
    steps packed)."""
    if not _many_applies(target, hparams, keys) or set(names) != set(buffers):
        return None
    if not all(_fits(p, g, {}, (), single_tensor) for p, g in zip(params, grads)):
        return None
    dtypes = {jnp.dtype(x.dtype) for x in (*params, *buffers.values())}
    if len(dtypes) != 1:
        return None
    steps, live = jnp.asarray(steps), jnp.asarray(live)
    new_params = []
    for run in _chunks(len(params)):
        at = slice(run.start, run.stop)
        stepped, buffers = _call_many_packed(
            target, params[at], grads[at], buffers, names, offsets[at], steps[at],
            live[at], hparams, keys, options, jax_rule, single_tensor,
        )  # fmt: skip
        new_params += stepped
    return new_params, buffers


def _call_many_packed(
    target, params, grads, buffers, names, offsets, steps, live, hparams, keys,
    options, jax_rule, single_tensor,
):  # fmt: skip
    """One `<target>_many` call on leaves whose state is packed
    (`_run_many_packed`): `(new_params, new_buffers)`."""
    n = len(params)
    arrays = [*params, *grads, *(buffers[k] for k in names)]
    offsets = np.asarray(offsets, np.int64)

    def fallback(arrays, steps, live, hparams):
        ps, gs, packed = arrays[:n], arrays[n : 2 * n], arrays[2 * n :]
        flat = [jnp.ravel(b) for b in packed]
        new_params = []
        for i, (p, g) in enumerate(zip(ps, gs)):
            at = slice(int(offsets[i]), int(offsets[i]) + p.size)
            own = {k: flat[j][at].reshape(p.shape) for j, k in enumerate(names)}
            new_p, new = jax_rule(p, g, own, steps[i], hparams, options)
            new_params.append(jnp.where(live[i], new_p, p))
            flat = [
                f.at[at].set(jnp.ravel(jnp.where(live[i], new[k], own[k])))
                for f, k in zip(flat, names)
            ]
        return (*new_params, *(f.reshape(b.shape) for f, b in zip(flat, packed)))

    kernel = _many_kernel(target, arrays, n, offsets, keys, options,
                          single_tensor, fallback)  # fmt: skip
    out = kernel(arrays, steps, live, dict(hparams))
    return list(out[:n]), dict(zip(names, out[n:]))


def _many_applies(target, hparams, keys) -> bool:
    """Whether `<target>_many` exists and takes these hyperparameters, on
    one device (several: `_run` splits each leaf over them)."""
    if target not in _MANY or jax.device_count() > 1:
        return False
    return _scalars(hparams, keys) is not None


def _many_kernel(target, arrays, n, offsets, keys, options, single_tensor, fallback):
    """`kernel(arrays, steps, live, hparams)`: `<target>_many` on `arrays` (the `n`
    params, the `n` gradients, then the state buffers; `offsets`: see
    `_run_many_packed`), its results (the params, then the state buffers)
    written over their operands, the params over the params or, where
    `params_in_place` says not, over the gradients (as `_run`);
    differentiated through `fallback` (the JAX rule, `jax.custom_jvp`)."""
    out_index = [*range(n), *range(2 * n, len(arrays))]
    aliases = {i: k for k, i in enumerate(out_index)}
    if not params_in_place():
        for i in range(n):
            aliases[n + i] = aliases.pop(i)
    attrs = {
        **_flags(options, single_tensor),
        "leaves": np.int64(n),
        "offsets": offsets,
    }
    call = jax.ffi.ffi_call(
        target + "_many",
        _written_over(arrays, out_index),
        vmap_method="sequential",
        input_output_aliases=aliases,
    )

    @jax.custom_jvp
    def kernel(arrays, steps, live, hparams):
        scalars = _scalars(hparams, keys)
        assert scalars is not None
        steps = steps.astype(scalars[0].dtype)
        return tuple(call(*arrays, steps, live, *scalars, **attrs))

    @kernel.defjvp
    def _jvp(primals, tangents):
        return kernel(*primals), jax.jvp(fallback, primals, tangents)[1]

    return kernel


def _written_over(operands, out_index) -> list[jax.ShapeDtypeStruct]:
    """A kernel's result types: each that of the operand `out_index` says it
    is written over (under an explicit mesh, its sharding too: the results
    would be replicated otherwise)."""
    return [
        jax.ShapeDtypeStruct(
            jnp.shape(operands[i]),
            operands[i].dtype,
            sharding=jax.typeof(operands[i]).sharding,
        )
        for i in out_index
    ]


def _partitioned(
    call: Callable, operands: tuple, n_full: int, n_results: int
) -> Callable:
    """`call` (a kernel that treats every element alike) split over the
    devices the param is sharded on: each device runs it on its own piece of
    the param and of the other full-size operands (the first `n_full`,
    sharded as the param; the first `n_full - 1` results), the scalars
    replicated (every device computes the same per-parameter scalars). No
    communication: XLA's partitioner (Shardy) is told the operands share
    the param's dimensions (`custom_partitioning`). Under `vmap` each batch
    element runs it in turn (custom_partitioning has no batching rule)."""
    dims = " ".join(f"d{i}" for i in range(jnp.ndim(operands[0])))
    specs, pairs = [], []
    for k, x in enumerate(operands):
        if k < n_full:
            specs.append(dims)
        elif jnp.ndim(x) == 0:
            specs.append("")
        else:  # a pair (betas): whole on every device
            pairs.append(f"r{k}")
            specs.append(f"r{k}")
    n_sharded = n_full - 1  # the results: the param, its buffers, the scalars
    outs = [dims] * n_sharded + [""] * (n_results - n_sharded)
    rule = ", ".join(specs) + " -> " + ", ".join(outs)

    @custom_partitioning
    def split(*args):
        return call(*args)

    def partition(mesh, arg_shapes, result_shape):
        sharding = arg_shapes[0].sharding
        whole = NamedSharding(mesh, PartitionSpec())
        args = [sharding if k < n_full else whole for k in range(len(arg_shapes))]
        results = [sharding if k < n_sharded else whole for k in range(n_results)]
        return mesh, call, tuple(results), tuple(args)

    split.def_partition(
        partition=partition, sharding_rule=rule, need_replication_factors=tuple(pairs)
    )

    @jax.custom_batching.custom_vmap
    def run(*args):
        return split(*args)

    @run.def_vmap
    def _batched(axis_size, in_batched, *args):
        def element(i):
            return [x[i] if batched else x for x, batched in zip(args, in_batched)]

        if axis_size == 0:  # no element: the results' shapes, batched by 0
            one = [
                jax.ShapeDtypeStruct(jnp.shape(x)[1:] if b else jnp.shape(x), x.dtype)
                for x, b in zip(args, in_batched)
            ]
            shapes = jax.eval_shape(call, *one)
            outs = tuple(jnp.zeros((0, *s.shape), s.dtype) for s in shapes)
            return outs, (True,) * n_results
        outs = [run(*element(i)) for i in range(axis_size)]
        return tuple(jnp.stack(o) for o in zip(*outs)), (True,) * n_results

    return run


def with_kernel(kernel: Callable, jax_rule: Callable) -> Callable:
    """A rule that runs the native `kernel` where it applies, else
    `jax_rule` (the same step in JAX: torch's fused kernel, or its default
    path).

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

    def many(params, grads, slots, steps, live, hparams, options) -> dict[int, tuple]:
        """The leaves the kernel steps in one call (`_run_many`), by position:
        `rule` on each, the same bits; a leaf whose `live` flag is false
        keeps its values."""
        if (
            dict(options.get(TENSOR_DTYPES, ()))
            or not hasattr(kernel, "many")
            or one_call_per_leaf()
        ):
            return {}
        return kernel.many(params, grads, slots, steps, live, hparams, options,
                           jax_rule)  # fmt: skip

    def many_packed(params, grads, buffers, offsets, steps, live, hparams, options):
        """A packed state's bucket stepped in one call, its leaves' params and
        gradients where they are (`_run_many_packed`): `(new_params,
        new_buffers)`, or None (the bucket steps packed)."""
        if dict(options.get(TENSOR_DTYPES, ())) or not hasattr(kernel, "many_packed"):
            return None
        return kernel.many_packed(params, grads, buffers, offsets, steps, live,
                                  hparams, options, jax_rule)  # fmt: skip

    def steps_in_place(dtype, options) -> bool:
        """Whether `many_packed` would step a bucket of `dtype` leaves in a
        group with these options (read by `init`, which then packs the
        state of large leaves too under `set_policy("always")`,
        `_multi_tensor.state_layout`)."""
        if dict(options.get(TENSOR_DTYPES, ())) or not hasattr(
            kernel, "steps_in_place"
        ):
            return False
        return kernel.steps_in_place(dtype, options)

    # copied onto `group_rule`'s wrapper (`functools.wraps`), read by
    # `_core._apply` (the per-leaf path) and `_multi_tensor` (`apply_packed`,
    # `state_layout`)
    rule.many = many  # type: ignore[attr-defined]
    rule.many_packed = many_packed  # type: ignore[attr-defined]
    rule.steps_in_place = steps_in_place  # type: ignore[attr-defined]
    return rule


def _single_tensor_applies(options) -> bool:
    """Whether the kernel computes torch's default step for a group: not
    a `differentiable`/`capturable` path (torch's tensor-scalar math),
    and no tensor (array) hyperparameter, whose scalar math torch does in
    the tensor's dtype (AdamW's `1 - lr * weight_decay`); the JAX rules
    mirror both."""
    if options.get("differentiable") or options.get("capturable"):
        return False
    return not dict(options.get(TENSOR_DTYPES, ()))


def _kernel(
    buffers: Callable[[dict, dict], tuple[str, list[str]]],
    keys: tuple[str, ...],
    single_tensor: bool,
    leaf_scalars: tuple[str, ...] = (),
) -> Callable:
    """An optimizer's step through the kernel, torch's fused
    (`single_tensor` False) or default one, for `with_kernel`: None where it
    does not apply. `buffers(slots, options)` gives the FFI target and the
    state buffers it updates; `keys` are the hyperparameters it reads;
    `leaf_scalars` its per-parameter 0-d state buffers (`_run`)."""

    def kernel(param, grad, slots, step, hparams, options, jax_rule) -> Any:
        if single_tensor and not _single_tensor_applies(options):
            return None
        target, names = buffers(slots, options)
        return _run(target, param, grad, slots, names, step, hparams, keys,
                    options, jax_rule, single_tensor, leaf_scalars)  # fmt: skip

    def many(params, grads, slots, steps, live, hparams, options, jax_rule) -> dict:
        if leaf_scalars or (single_tensor and not _single_tensor_applies(options)):
            return {}
        target, names = buffers(slots[0], options)
        same = [i for i, own in enumerate(slots) if buffers(own, options)[0] == target]
        out = _run_many(
            target, [params[i] for i in same], [grads[i] for i in same],
            [slots[i] for i in same], names, take_leaves(steps, same),
            take_leaves(live, same),
            hparams, keys, options, jax_rule, single_tensor,
        )  # fmt: skip
        return {same[rank]: v for rank, v in out.items()}

    def many_packed(params, grads, buffers_, offsets, steps, live, hparams, options,
                    jax_rule):  # fmt: skip
        if leaf_scalars or (single_tensor and not _single_tensor_applies(options)):
            return None
        target, names = buffers(buffers_, options)
        return _run_many_packed(target, params, grads, buffers_, names, offsets,
                                steps, live, hparams, keys, options, jax_rule,
                                single_tensor)  # fmt: skip

    def steps_in_place(dtype, options) -> bool:
        if leaf_scalars or (single_tensor and not _single_tensor_applies(options)):
            return False
        target, _ = buffers({}, options)
        like = jax.ShapeDtypeStruct((), dtype)
        return (
            target in _MANY
            and jax.device_count() == 1
            and _applies(like, single_tensor)
        )

    kernel.many = many  # type: ignore[attr-defined]
    kernel.many_packed = many_packed  # type: ignore[attr-defined]
    kernel.steps_in_place = steps_in_place  # type: ignore[attr-defined]
    return kernel


def _adam_buffers(slots, options) -> tuple[str, list[str]]:
    if options["amsgrad"]:
        return "funcopt_adam_amsgrad", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    return "funcopt_adam", ["exp_avg", "exp_avg_sq"]


def _sgd_buffers(slots, options) -> tuple[str, list[str]]:
    if "momentum_buffer" in slots:
        return "funcopt_sgd_momentum", ["momentum_buffer"]
    return "funcopt_sgd", []


def adam(single_tensor: bool) -> Callable:
    """Adam's step through the kernel (`_kernel`)."""
    return _kernel(_adam_buffers, ("lr", "betas", "eps", "weight_decay"), single_tensor)


def sgd(single_tensor: bool) -> Callable:
    """SGD's step through the kernel (`_kernel`)."""
    keys = ("lr", "momentum", "dampening", "weight_decay")
    return _kernel(_sgd_buffers, keys, single_tensor)


def _rmsprop_buffers(slots, options) -> tuple[str, list[str]]:
    # torch decided at init which of them exist (`rmsprop._rmsprop_slots`)
    names = ["square_avg"] + [k for k in ("grad_avg", "momentum_buffer") if k in slots]
    suffix = "".join(
        f"_{flag}"
        for flag, key in (("centered", "grad_avg"), ("momentum", "momentum_buffer"))
        if key in slots
    )
    return "funcopt_rmsprop" + suffix, names


def rmsprop() -> Callable:
    """RMSprop's default step through the kernel (`_kernel`); torch has no
    fused RMSprop."""
    keys = ("lr", "alpha", "eps", "weight_decay", "momentum")
    return _kernel(_rmsprop_buffers, keys, single_tensor=True)


def _default_step_only(
    target: str,
    names: list[str],
    keys: tuple[str, ...],
    applies: Callable[[dict], bool] = lambda options: True,
    leaf_scalars: tuple[str, ...] = (),
) -> Callable:
    """The default step of an optimizer torch has no fused kernel for, through
    the kernel `target` (`_kernel`), which updates the buffers `names` and
    the per-parameter scalars `leaf_scalars`; `applies(options)`: whether a
    group's flags select that step."""
    kernel = _kernel(lambda slots, options: (target, names), keys, True, leaf_scalars)

    def default_step(param, grad, slots, step, hparams, options, jax_rule) -> Any:
        if not applies(options):
            return None
        return kernel(param, grad, slots, step, hparams, options, jax_rule)

    return default_step


def adamax() -> Callable:
    """Adamax's default step (`_single_tensor_adamax`) through the kernel."""
    keys = ("lr", "betas", "eps", "weight_decay")
    return _default_step_only("funcopt_adamax", ["exp_avg", "exp_inf"], keys)


def adadelta() -> Callable:
    """Adadelta's default step (`_single_tensor_adadelta`) through the kernel."""
    keys = ("lr", "rho", "eps", "weight_decay")
    return _default_step_only("funcopt_adadelta", ["square_avg", "acc_delta"], keys)


def _default_step_not_foreach(options) -> bool:
    # `foreach=True`: torch's `_multi_tensor_*` step, which rounds otherwise
    return not options["foreach"]


def radam() -> Callable:
    """RAdam's default step (`_single_tensor_radam`) through the kernel;
    `foreach=True` (`_multi_tensor_radam`, which rounds otherwise) takes the
    JAX rule."""
    return _default_step_only(
        "funcopt_radam",
        ["exp_avg", "exp_avg_sq"],
        ("lr", "betas", "eps", "weight_decay"),
        applies=_default_step_not_foreach,
    )


def rprop() -> Callable:
    """Rprop's default step (`_single_tensor_rprop`) through the kernel."""
    keys = ("lr", "etas", "step_sizes")
    return _default_step_only("funcopt_rprop", ["prev", "step_size"], keys)


def nadam() -> Callable:
    """NAdam's default step (`_single_tensor_nadam`) through the kernel;
    `foreach=True` takes the JAX rule."""
    return _default_step_only(
        "funcopt_nadam",
        ["exp_avg", "exp_avg_sq"],
        ("lr", "betas", "eps", "weight_decay", "momentum_decay"),
        applies=_default_step_not_foreach,
        leaf_scalars=("mu_product",),
    )


def asgd() -> Callable:
    """ASGD's default step (`_single_tensor_asgd`) through the kernel;
    `foreach=True` takes the JAX rule."""
    return _default_step_only(
        "funcopt_asgd",
        ["ax"],
        ("lr", "lambd", "alpha", "t0", "weight_decay"),
        applies=_default_step_not_foreach,
        leaf_scalars=("eta", "mu"),
    )


def adagrad(single_tensor: bool) -> Callable:
    """Adagrad's step through the kernel (`_kernel`)."""
    keys = ("lr", "lr_decay", "weight_decay", "eps")
    return _kernel(
        lambda slots, options: ("funcopt_adagrad", ["sum"]), keys, single_tensor
    )
