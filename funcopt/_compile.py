"""Programs that XLA compiles once per shape, not once per leaf.

XLA's CPU backend generates machine code for every distinct fused kernel
(measured on jaxlib 0.10.2, 2-core x86: ~7-40 ms each) and reuses the code of
kernels that are identical. A per-leaf step is identical for leaves of one
shape, dtype and group, except where it reads *its own* element of a shared
array: `state.step[i]` or a slice of a packed buffer bakes the constant
`i` (or the offset) into the kernel, so every leaf compiles its own code.
300 leaves of 1,000 elements, measured: 300 static slices of a packed buffer
compile in 2.1 s; the same 300 slices taken with `dynamic_slice` at
indices XLA cannot fold to constants compile in 0.17 s (one kernel, reused).

`runtime_ints` makes such indices: the integers a step needs, returned
by a `lax.cond` whose predicate is always false but which XLA cannot
evaluate at compile time, so they stay runtime values (one conditional per
step, a few microseconds). Only where lowered for CPU: a GPU backend may
synchronise with the host to branch, so elsewhere they are constants, as
before. The values are exact whichever way XLA treats them; the trick only
decides how much code it generates.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def runtime_ints(values: Sequence[int], anchor: jax.Array) -> list[jax.Array]:
    """`values` as int32 scalars that XLA cannot fold into constants.

    `anchor` is any non-empty real array computed at run time (a state
    buffer, a param): the predicate `min(anchor[0], 0) > 0` is false for
    every value (NaN included) but unknown to XLA, so the outputs of the
    `cond` that returns `values` on its false branch are runtime values.
    Outside `jit` they are plain device scalars (one eager executable per
    shape instead of one per index); lowered for a backend other than CPU,
    constants.
    """
    consts = [np.int32(v) for v in values]

    def constants():
        return tuple(jnp.asarray(c) for c in consts)

    if not consts or not isinstance(anchor, jax.core.Tracer):
        return list(constants())

    def opaque():
        first = jnp.ravel(anchor)[0]
        never = jnp.minimum(first, jnp.zeros((), first.dtype)) > 0
        zeros = tuple(jnp.zeros((), jnp.int32) for _ in consts)
        return jax.lax.cond(never, lambda: zeros, constants)

    return list(jax.lax.platform_dependent(cpu=opaque, default=constants))


def take(vector: jax.Array, index: jax.Array) -> jax.Array:
    """`vector[index]` along the first axis at a runtime `index`."""
    return jax.lax.dynamic_index_in_dim(vector, index, keepdims=False)
