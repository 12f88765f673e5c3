r"""Dynamic loss scaling: `torch.amp.GradScaler` as pure, jit-able state.

[`GradScaler`][funcopt.amp.GradScaler] holds the static configuration (torch's
constructor arguments); [`GradScalerState`][funcopt.amp.GradScalerState] holds
the two arrays torch keeps in the scaler, the scale (`float32`) and the growth
tracker (`int32`). Every method is a pure function of them, so a whole mixed
precision train step is one `jax.jit`:

=== "torch"

    ```python
    scaler = torch.amp.GradScaler("cpu", growth_interval=2000)
    # every step:
    optimizer.zero_grad()
    scaler.scale(loss_fn(model, batch)).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)  # skipped if a gradient is inf/NaN
    scaler.update()
    ```

=== "funcopt"

    ```python
    scaler = fo.amp.GradScaler("cpu", growth_interval=2000)
    sstate = scaler.init()

    @jax.jit
    def train_step(params, opt_state, sstate, batch):
        grads = jax.grad(lambda p: scaler.scale(loss_fn(p, batch), sstate))(params)
        grads, found_inf = scaler.unscale(grads, sstate)
        grads, _ = fo.clip_grad_norm(grads, 1.0)
        params, opt_state = scaler.step(opt, params, grads, opt_state, found_inf)
        return params, opt_state, scaler.update(sstate, found_inf)
    ```

The arithmetic is torch's CPU kernels', bit for bit: `unscale` multiplies each
gradient by $\mathrm{fl}_{32}(1/s)$ (torch's `scale.double().reciprocal().float()`)
in torch's "opmath" (float32 for bfloat16/float16 gradients, float64 for float64
ones) and reports `found_inf` (`float32`, $1$ if any gradient entry *before*
unscaling is inf or NaN, else $0$), as `_amp_foreach_non_finite_check_and_unscale_`;
`update` is `_amp_update_scale_` (see
[`GradScaler.update`][funcopt.amp.GradScaler.update]).

What is not mirrored, because there is nothing to mirror in a pure API: torch's
per-optimizer bookkeeping and its `RuntimeError`s for calling `unscale_` twice or
`step` after `step` within one iteration (here each call returns new values and
`step` takes the `found_inf` that `unscale` returned), and the `device`
argument (accepted, ignored: the state lives where its arrays live). On CPU,
XLA flushes float32 subnormals to zero where torch keeps them, so a scale that
has fallen below $2^{-126}$ (only after about 140 consecutive overflows from the
default $2^{16}$) is zero here and subnormal in torch, and above $2^{126}$ its
reciprocal is; the same holds for any unscaled gradient entry below
$2^{-126}$ in magnitude.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _math
from ._tree import PyTree, is_trainable
from .reliability import _inner_step, _select

__all__ = ["GradScaler", "GradScalerState"]

_FLT_MAX = float(np.finfo(np.float32).max)
_INT32 = (-(2**31), 2**31 - 1)


class GradScalerState(NamedTuple):
    """State of a [`GradScaler`][funcopt.amp.GradScaler]: torch's `_scale` and
    `_growth_tracker`.

    Attributes:
      scale: `float32` scalar, the current loss scale $s$.
      growth_tracker: `int32` scalar, the number of consecutive steps without
        inf/NaN gradients since the scale last changed.
    """

    scale: jax.Array
    growth_tracker: jax.Array


def _float32_fill(value: Any) -> np.float32:
    """`torch.full((), value, dtype=float32)` / `fill_(value)`: a Python
    number, refused as torch refuses it."""
    if not isinstance(value, numbers.Number) or isinstance(value, complex):
        raise TypeError(
            f"full(): argument 'fill_value' (position 2) must be Number, not "
            f"{type(value).__name__}"
        )
    value = float(value)  # type: ignore[arg-type]
    if math.isfinite(value) and abs(value) > _FLT_MAX:
        raise RuntimeError("value cannot be converted to type float without overflow")
    return np.float32(value)


def _check_int(value: Any, name: str, position: int, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{fn}(): argument '{name}' (position {position}) must be int, not "
            f"{type(value).__name__}"
        )
    return int(value)


@dataclasses.dataclass(frozen=True)
class GradScaler:
    r"""`torch.amp.GradScaler`: dynamic loss scaling for float16 training.

    The static part of torch's scaler, with torch's arguments and defaults;
    the scale and growth tracker live in a
    [`GradScalerState`][funcopt.amp.GradScalerState] made by
    [`init`][funcopt.amp.GradScaler.init]. Being a frozen dataclass, a
    `GradScaler` is hashable and can be closed over by (or passed as a static
    argument to) a jitted function.

    Each iteration:

    1. `scaler.scale(loss, state)` multiplies the loss by the scale $s$, so
       that small float16 gradients do not underflow;
    2. `grads, found_inf = scaler.unscale(grads, state)` multiplies the
       gradients by $\mathrm{fl}_{32}(1/s)$ and reports whether any was
       inf/NaN (clip *after* this, as with torch's `unscale_`);
    3. `params, opt_state = scaler.step(opt, params, grads, opt_state, found_inf)`
       is `opt.step` unless `found_inf`, in which case nothing changes;
    4. `state = scaler.update(state, found_inf)` backs the scale off after an
       overflow and grows it after `growth_interval` clean steps in a row.

    Args:
      device: accepted for torch's signature (`"cuda"`, `"cpu"`, ...) and
        ignored: the arithmetic is torch's CPU kernels', and the state lives
        where its arrays are put. Unlike torch, `"cuda"` without CUDA does
        not disable the scaler.
      init_scale: the initial scale, rounded to float32.
      growth_factor: the factor applied to the scale after `growth_interval`
        consecutive steps without inf/NaN gradients (must be `> 1.0`).
      backoff_factor: the factor applied to the scale after a step with
        inf/NaN gradients (must be `< 1.0`).
      growth_interval: the number of consecutive clean steps before growing.
      enabled: `False` turns every method into the identity (`unscale`
        returns the gradients unchanged with `found_inf = 0`, `step` is
        `opt.step`), as in torch.

    Raises:
      AssertionError: torch's `"The growth factor must be > 1.0."` or
        `"The backoff factor must be < 1.0."` (checked only when enabled,
        as torch does).
      TypeError, RuntimeError: for an `init_scale` that is not a number or
        overflows float32, and a `growth_interval` that is not an `int`:
        torch's messages, raised here at construction (torch raises them at
        the first `scale` or `update`).

    See `torch.amp.GradScaler`.
    """

    device: str = "cuda"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.growth_factor <= 1.0:
            raise AssertionError("The growth factor must be > 1.0.")
        if self.backoff_factor >= 1.0:
            raise AssertionError("The backoff factor must be < 1.0.")
        _float32_fill(self.init_scale)
        _check_int(self.growth_interval, "growth_interval", 6, "_amp_update_scale_")

    # ------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------

    def init(self) -> GradScalerState:
        """A fresh state: scale `init_scale` (float32), growth tracker 0 (int32).

        torch creates them at the first `scale()`; a disabled scaler has
        scale 1 (torch's `get_scale()` of a disabled scaler).
        """
        scale = _float32_fill(self.init_scale) if self.enabled else 1.0
        return GradScalerState(
            scale=jnp.asarray(scale, jnp.float32),
            growth_tracker=jnp.zeros((), jnp.int32),
        )

    def is_enabled(self) -> bool:
        """Whether scaling is on (torch's `is_enabled()`)."""
        return bool(self.enabled)

    def get_scale(self, state: GradScalerState) -> jax.Array:
        """The current scale (torch's `get_scale()`, as an array; 1 if disabled)."""
        _check_state(state)
        if not self.enabled:
            return jnp.ones((), jnp.float32)
        return state.scale

    # ------------------------------------------------------------------
    # the four calls of an iteration
    # ------------------------------------------------------------------

    def scale(self, outputs: PyTree, state: GradScalerState) -> PyTree:
        """`outputs * scale` for an array or any pytree of arrays (torch's `scale`).

        The product has torch's dtype: a 0-dim output (a loss) is promoted
        with float32 (a float16/bfloat16 loss becomes float32, a float64 one
        stays float64), a larger one keeps its floating dtype (16-bit ones
        are multiplied in float32 and rounded once, as torch does), integer
        and boolean outputs become float32. Disabled: `outputs` unchanged.

        Raises:
          ValueError: a leaf that is not an array (torch: "outputs must be a
            Tensor or an iterable of Tensors").
        """
        if not self.enabled:
            return outputs
        _check_state(state)
        s = state.scale

        def one(x):
            if not isinstance(x, jax.Array | np.ndarray | np.generic):
                raise ValueError(
                    "outputs must be a Tensor or an iterable of Tensors (here: an "
                    f"array or a pytree of arrays), got {type(x).__name__}"
                )
            x = jnp.asarray(x)
            dtype = _scaled_dtype(x)
            if _math.is_reduced(jnp.zeros((), dtype)):
                return _math.mul(x, s)  # float32 opmath, rounded once
            return x.astype(dtype) * s.astype(dtype)

        return jax.tree.map(one, outputs)

    def unscale(
        self,
        grads: PyTree,
        state: GradScalerState,
        *,
        has_grad: PyTree | None = None,
        allow_fp16: bool = False,
    ) -> tuple[PyTree, jax.Array]:
        r"""Unscale gradients before clipping: torch's `unscale_(optimizer)`.

        Returns `(grads * inv_scale, found_inf)` with
        $\text{inv\_scale} = \mathrm{fl}_{32}(1/s)$ and `found_inf` a
        `float32` scalar, $1$ if any entry of any gradient is inf or NaN
        (checked before unscaling), else $0$. Each gradient keeps its dtype;
        a bfloat16 (or allowed float16) gradient is multiplied in float32 and
        rounded once, a float64 one in float64. A `None` leaf (torch's
        `p.grad is None`) and, with `has_grad` (booleans shaped like the
        gradients, as [`funcopt.TrainState`][funcopt.TrainState] keeps them),
        a leaf marked `False`, is neither checked nor unscaled. Disabled:
        `(grads, 0.0)`.

        Raises:
          ValueError: `"Attempting to unscale FP16 gradients."` for a float16
            gradient, as torch's `unscale_` (torch's internal
            `allow_fp16=True`, used for fused optimizers, is the keyword here).
          NotImplementedError: a complex gradient (torch's kernel has no
            complex version).
        """
        _check_state(state)
        if not self.enabled:
            return grads, jnp.zeros((), jnp.float32)
        inv_scale = _reciprocal(state.scale)
        flags = (
            jax.tree.map(lambda g: None, grads, is_leaf=lambda x: x is None)
            if has_grad is None
            else has_grad
        )
        found = []

        def one(g, flag):
            if g is None or not is_trainable(g):
                return g
            g = jnp.asarray(g)
            if g.dtype == jnp.float16 and not allow_fp16:
                raise ValueError("Attempting to unscale FP16 gradients.")
            if jnp.issubdtype(g.dtype, jnp.complexfloating):
                name = {"complex64": "ComplexFloat", "complex128": "ComplexDouble"}
                raise NotImplementedError(
                    '"_amp_foreach_non_finite_check_and_unscale_cpu" not implemented '
                    f"for '{name.get(str(g.dtype), str(g.dtype))}'"
                )
            bad = jnp.logical_not(jnp.all(jnp.isfinite(g)))
            out = _math.mul(g, inv_scale)
            if flag is not None:
                bad = jnp.logical_and(bad, flag)
                out = jnp.where(flag, out, g)
            found.append(bad)
            return out

        unscaled = jax.tree.map(one, grads, flags, is_leaf=lambda x: x is None)
        any_bad = jnp.any(jnp.stack(found)) if found else jnp.asarray(False)
        return unscaled, any_bad.astype(jnp.float32)

    def step(
        self,
        opt: optax.GradientTransformation,
        params: PyTree,
        grads: PyTree,
        opt_state: Any,
        found_inf: jax.Array,
        *,
        has_grad: PyTree | None = None,
    ) -> tuple[PyTree, Any]:
        """`opt.step(params, grads, opt_state)` unless `found_inf` (torch's
        `scaler.step(optimizer)`).

        `grads` are the unscaled gradients and `found_inf` the flag that
        [`unscale`][funcopt.amp.GradScaler.unscale] returned. When `found_inf`
        is nonzero the step is skipped: `params` and `opt_state` (buffers and
        every per-parameter step count) come back unchanged. The choice is a
        `jnp.where`, so it runs under `jit` without recompiling. `opt` is any
        funcopt optimizer (or optax transformation, applied with
        `optax.apply_updates`); `has_grad` is passed to `opt.step`.
        Disabled: plain `opt.step`.

        Raises:
          RuntimeError: for [`funcopt.lbfgs`][funcopt.optim.lbfgs.lbfgs],
            torch's "Closure use is not currently supported if GradScaler is
            enabled."
        """
        if not self.enabled:
            return _inner_step(opt, params, grads, opt_state, has_grad)
        from .optim.lbfgs import LBFGS

        if isinstance(opt, LBFGS):
            raise RuntimeError(
                "Closure use is not currently supported if GradScaler is enabled."
            )
        new_params, new_state = _inner_step(opt, params, grads, opt_state, has_grad)
        keep = jnp.asarray(found_inf) == 0
        return _select(keep, new_params, params), _select(keep, new_state, opt_state)

    def update(
        self,
        state: GradScalerState,
        found_inf: jax.Array | Sequence[jax.Array] | None = None,
        *,
        new_scale: float | jax.Array | None = None,
    ) -> GradScalerState:
        r"""The new scale and growth tracker (torch's `scaler.update()`).

        With $s$ the scale, $t$ the growth tracker, $\gamma$ `growth_factor`,
        $\beta$ `backoff_factor` and $n$ `growth_interval`, torch's
        `_amp_update_scale_`:

        $$
        (s, t) \leftarrow
        \begin{cases}
        (\mathrm{fl}_{32}(s\beta),\ 0) & \text{if found\_inf} \\
        (\mathrm{fl}_{32}(s\gamma) \text{ if finite, else } s,\ 0)
            & \text{else if } t + 1 = n \\
        (s,\ t + 1) & \text{else}
        \end{cases}
        $$

        where $\mathrm{fl}_{32}(s\gamma)$ is the product of the float32 scale
        and the Python-float factor in float64, rounded to float32 (C++'s
        `float = float * double`; computed exactly also without
        `jax_enable_x64`). With the default factors (powers of two) the scale
        stays a power of two times `init_scale`.

        `found_inf` is what [`unscale`][funcopt.amp.GradScaler.unscale]
        returned; a sequence of them (one per optimizer sharing the scaler)
        is summed, as torch sums its per-optimizer flags. `new_scale` sets
        the scale instead (a Python number, or an array with one element),
        leaving the growth tracker as it is, as torch does. Disabled: `state`
        unchanged.

        Raises:
          AssertionError: neither `found_inf` nor `new_scale` given (torch's
            "No inf checks were recorded prior to update.").
        """
        _check_state(state)
        if not self.enabled:
            return state
        if new_scale is not None:
            if isinstance(new_scale, numbers.Number):
                scale = jnp.asarray(_float32_fill(new_scale))
            else:
                new = jnp.asarray(new_scale)
                if new.size != 1:
                    raise AssertionError(
                        "new_scale should be a float or a 1-element torch.cuda."
                        "FloatTensor or torch.FloatTensor with requires_grad=False."
                    )
                scale = new.reshape(()).astype(jnp.float32)
            return state._replace(scale=scale)
        if found_inf is None or (
            isinstance(found_inf, list | tuple) and len(found_inf) == 0
        ):
            raise AssertionError("No inf checks were recorded prior to update.")
        if isinstance(found_inf, list | tuple):
            combined = jnp.asarray(found_inf[0], jnp.float32)
            for f in found_inf[1:]:
                combined = combined + jnp.asarray(f, jnp.float32)
        else:
            combined = jnp.asarray(found_inf)
        found = combined != 0  # C++ `if (*found_inf)`: NaN counts as found
        scale, tracker = state.scale, state.growth_tracker
        successful = tracker + jnp.int32(1)  # int32, wraps as C++ int does
        interval = self.growth_interval
        if _INT32[0] <= interval <= _INT32[1]:
            grow = successful == jnp.int32(interval)
        else:  # int vs int64: never equal
            grow = jnp.zeros((), bool)
        grown = _mul_double(scale, float(self.growth_factor))
        backed_off = _mul_double(scale, float(self.backoff_factor))
        new_scale_value = jnp.where(
            found,
            backed_off,
            jnp.where(jnp.logical_and(grow, jnp.isfinite(grown)), grown, scale),
        )
        new_tracker = jnp.where(
            jnp.logical_or(found, grow), jnp.zeros((), jnp.int32), successful
        )
        return GradScalerState(new_scale_value, new_tracker)


def _scaled_dtype(x: jax.Array) -> jnp.dtype:
    """torch's dtype of `x * scale` (a 0-dim float32 tensor): a 0-dim `x`
    takes part in promotion, a larger floating one wins its category."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.dtype(jnp.float32)  # a higher category: the scale's dtype
    if x.ndim > 0 or x.dtype.itemsize >= 4 and x.dtype != jnp.float16:
        return jnp.dtype(x.dtype)
    return jnp.dtype(jnp.float32)  # a 0-dim 16-bit float meets float32


def _check_state(state: Any) -> None:
    if not isinstance(state, GradScalerState):
        raise TypeError(
            "GradScaler expects the state made by its init(), got "
            f"{type(state).__name__}"
        )


def _reciprocal(scale: jax.Array) -> jax.Array:
    """torch's `scale.double().reciprocal().float()`, in float32.

    The float32 division is correctly rounded, and it equals the double
    rounding (to float64, then float32): $1/s$ for a float32 $s$ that is not a
    power of two is at least about $2^{-49}$ (relative) away from any
    midpoint between float32 numbers, far more than float64's rounding error,
    and for a power of two it is exact.
    """
    return jnp.float32(1.0) / scale.astype(jnp.float32)


# --------------------------------------------------------------------------
# float32 * double, rounded as C++ does, without float64
# --------------------------------------------------------------------------

_LIMB = 12  # bits per limb: a limb product and a sum of two fit in uint32
_MASK = (1 << _LIMB) - 1


def _mul_double(s: jax.Array, factor: float) -> jax.Array:
    """`static_cast<float>(s * factor)` for a float32 `s` and a double `factor`.

    When `factor` is a float32 number (2.0, 0.5, ...) this is the float32
    product (exact in float64, so one rounding either way). Otherwise the
    product is rounded to float64 and then to float32 (two roundings, which
    can differ from one), which is done here in integer arithmetic so that it
    is exact with or without `jax_enable_x64`.
    """
    f32 = np.float32(factor) if abs(factor) <= _FLT_MAX else None
    if f32 is not None and (
        float(f32) == factor
        and (factor == 0.0 or abs(factor) >= float(np.finfo(np.float32).tiny))
    ):
        return s * jnp.float32(factor)
    if not math.isfinite(factor):
        return s * jnp.float32(factor)
    return _mul_double_exact(s, factor)


def _bits(limbs: list[jax.Array], lo: int, width: int) -> jax.Array:
    """Bits `[lo, lo + width)` of the integer held in 12-bit `limbs` (width <= 29)."""
    out = jnp.zeros((), jnp.uint32)
    for k, limb in enumerate(limbs):
        a, b = max(lo, _LIMB * k), min(lo + width, _LIMB * (k + 1))
        if a >= b:
            continue
        part = (limb >> jnp.uint32(a - _LIMB * k)) & jnp.uint32((1 << (b - a)) - 1)
        out = out | (part << jnp.uint32(a - lo))
    return out


def _mul_double_exact(s: jax.Array, factor: float) -> jax.Array:
    r"""`_mul_double` for a finite `factor` that is not a float32 number.

    $|s| = m\,2^e$ ($2^{23} \le m < 2^{24}$), $|f| = M\,2^E$
    ($2^{52} \le M < 2^{53}$): the 76- or 77-bit product $mM$ is formed in
    12-bit limbs, rounded to 53 bits and then to 24 (to nearest, ties to even).
    """
    fr, ex = math.frexp(abs(factor))
    big_m, big_e = int(fr * 2.0**53), ex - 53
    m_limbs = [(big_m >> (_LIMB * j)) & _MASK for j in range(5)]

    bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
    sign = (bits & jnp.uint32(0x80000000)) ^ jnp.uint32(0x80000000 if factor < 0 else 0)
    field = ((bits >> jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32)
    mant = bits & jnp.uint32(0x7FFFFF)
    # normal: implicit bit; subnormal: normalise (exact as a bit pattern)
    shift = jnp.where(
        field == 0,
        jax.lax.clz(jnp.maximum(mant, jnp.uint32(1))).astype(jnp.int32) - 8,
        0,
    )
    m = jnp.where(field == 0, mant << shift.astype(jnp.uint32), mant | (1 << 23))
    e = jnp.where(field == 0, -149 - shift, field - 150)

    s_limbs = [m & jnp.uint32(_MASK), m >> jnp.uint32(_LIMB)]
    limbs, carry = [], jnp.zeros((), jnp.uint32)
    for k in range(6):
        col = carry
        for i in (0, 1):
            j = k - i
            if 0 <= j < 5 and m_limbs[j]:
                col = col + s_limbs[i] * jnp.uint32(m_limbs[j])
        limbs.append(col & jnp.uint32(_MASK))
        carry = col >> jnp.uint32(_LIMB)
    limbs.append(carry)

    def rounded(d1: int) -> tuple[jax.Array, jax.Array]:
        # the product has d1 + 53 bits: keep 53 (C: 24 high, D: 29 low)
        c = _bits(limbs, d1 + 29, 24)
        d = _bits(limbs, d1, 29)
        b = _bits(limbs, 0, d1)
        half = jnp.uint32(1 << (d1 - 1))
        up = (b > half) | ((b == half) & ((d & 1) == 1))  # to float64
        d = d + up.astype(jnp.uint32)
        c = c + (d >> jnp.uint32(29))
        d = d & jnp.uint32((1 << 29) - 1)
        half = jnp.uint32(1 << 28)
        up = (d > half) | ((d == half) & ((c & 1) == 1))  # to float32
        c = c + up.astype(jnp.uint32)
        return c, jnp.asarray(d1 + 29, jnp.int32)

    long = _bits(limbs, 76, 1) == 1
    c77, q77 = rounded(24)
    c76, q76 = rounded(23)
    c = jnp.where(long, c77, c76)
    q = jnp.where(long, q77, q76) + e + jnp.int32(big_e)
    overflowed = c == jnp.uint32(1 << 24)  # rounded up to the next binade
    c = jnp.where(overflowed, jnp.uint32(1 << 23), c)
    biased = q + overflowed.astype(jnp.int32) + 150
    finite_bits = (biased.astype(jnp.uint32) << jnp.uint32(23)) | (
        c & jnp.uint32(0x7FFFFF)
    )
    out = jnp.where(
        biased >= 255,
        jnp.uint32(0x7F800000),  # inf
        jnp.where(biased <= 0, jnp.uint32(0), finite_bits),  # flushed, as XLA
    )
    result = jax.lax.bitcast_convert_type(out | sign, jnp.float32)
    # zero, inf, NaN: the float32 product by the factor's sign is exact
    special = jnp.logical_or(field == 255, jnp.logical_and(field == 0, mant == 0))
    return jnp.where(special, s * jnp.float32(math.copysign(1.0, factor)), result)
