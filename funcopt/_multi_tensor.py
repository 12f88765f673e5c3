"""The multi-tensor execution path: many leaves, one fused kernel.

An *elementwise* rule (`make_optimizer(..., elementwise=True)`: every
output element depends only on the same element of the inputs, plus
per-parameter scalars) gives the same numbers whether it runs on one leaf or
on many leaves laid end to end. This module runs it on *buckets*: all leaves
of one parameter group and one (real) dtype, packed into one 2-D buffer
`[n_blocks, width]`. Each leaf owns whole rows (its tail row padded with
zeros), so a per-parameter scalar (its step count, its `has_grad` flag, a
0-dim state buffer such as NAdam's `mu_product`) is one value per row,
shaped `[n_blocks, 1]`: it broadcasts against the buffer with no
per-element index, and the rule's scalar math (`beta1 ** step`) runs once
per row, vectorised over leaves, never in a Python loop of per-leaf ops.
The group's hyperparameters are the bucket's plain scalars, exactly as in
the per-leaf path, so the rule sees the same arguments, only wider.

`width` is picked per bucket to trade padding against rows (the cost model
in [`choose_width`][funcopt.flat.choose_width]): 2,000 leaves of 1,000 elements become
`[2000, 1000]`, one leaf of 10M becomes `[125, 80000]`.

Two ways in:

* [`funcopt.flat`][funcopt.flat]: params, grads and state *live* packed
  ([`FlatParams`][funcopt.flat.FlatParams]); the model reads views (`layout.unpack`) and
  the optimizer step is one kernel per bucket with no packing per step;
* a plain pytree through `opt.step`/`TrainState`: the optimizer state of
  a bucket's leaves lives packed (`init`), and the leaves are packed,
  updated and copied back per step, by default where that compiles and runs
  faster than one kernel per leaf (many small leaves on one CPU device; see
  [`set_policy`][funcopt.flat.set_policy]); under `"always"`, large
  leaves whose rule's native kernel steps many leaves in one call
  (Adam/AdamW, SGD, Adagrad, RMSprop) get buckets of their own
  (`Bucket.in_place`), stepped with their params and gradients read where
  they are: nothing copied (`step_bucket_in_place`). `update` on gradients
  the jitted program computes steps every bucket of those rules so, where
  their kernel applies (`_fused_native.update_steps_buckets_where_they_are`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import _groups, _math, _packing
from ._math import widest_float
from ._tree import check_params, is_trainable

# a row's scalar math (pow, sqrt, ... in the widest float) costs about this
# many elements of streaming work: the cost model of choose_width
_ROW_COST = 32
_MAX_WIDTH = 1 << 16

_policy = threading.local()


def get_policy() -> str:
    """`"auto"`, `"always"` or `"never"` (see `set_policy`)."""
    return getattr(_policy, "value", "auto")


def set_policy(value: str) -> None:
    """When `opt.step` on a plain pytree packs leaves into buckets.

    `"auto"` (default): on one CPU device with the native library loaded
    (`funcopt._packing.native_available`), the leaves with dimensions of at
    most `AUTO_MAX_LEAF_BYTES` bytes, where a bucket (group, dtype, size
    class) has at least `AUTO_MIN_LEAVES` (2) of them; large
    leaves, 0-d leaves (torch's 0-d tensor math, see `_auto_packs`), and
    every leaf elsewhere (GPU, TPU, several devices, no library), keep a
    per-leaf state (Adam/AdamW, SGD, Adagrad and RMSprop still step a
    group's large leaves in one native call, `_core._many_leaves`; other
    rules one kernel per leaf). The parity table's tree has leaves of both
    kinds, so each of its rows runs both paths. `"always"`: every bucket of
    an elementwise optimizer, the large leaves of Adam/AdamW, SGD, Adagrad
    and RMSprop on the native kernels in buckets of their own whose params
    and gradients are read where they are (`step_bucket_in_place`;
    Adam's `opt.step` at 100 leaves of 100,000 measured up to 20% faster
    than on per-leaf state, but `update` runs the kernel on such a bucket,
    which XLA cannot fuse with `apply_updates`: 2x the JAX rules' step on
    per-leaf state; a step with the kernels off packs those leaves every
    step: 7x slower); `"never"`: the per-leaf path (per-leaf state;
    Adam/AdamW, SGD, Adagrad and RMSprop still step a group's leaves in one
    native call there).
    [`funcopt.flat.FlatParams`][funcopt.flat.FlatParams] always take the
    multi-tensor path. Read when a step is traced, and by `init`: the
    buckets it selects there keep their optimizer state packed
    (`state_layout`; `state.unpacked()` gives per-leaf trees). A state of
    either layout steps on either path with the same bits (tested); a
    packed bucket under `"never"` is unpacked, stepped leaf by leaf and
    packed again, and the leaves outside a packed state's buckets (large,
    0-d and complex ones under `"auto"`) step one program each.

    Where the bucket does not step in place, each step copies its params
    and grads in and the params out (`funcopt._packing`: one native
    `memcpy` call per buffer); the state stays packed. Measured with the
    copies for Adam on 1,000 float32 leaves of 1,000
    elements (2-core AMD EPYC, jax 0.10.2, params and state donated):
    compile 0.6-1.0 s (optax 5.0 s), a step of 5.8-6.0 ms (optax 13.8-15.8
    ms); with a per-leaf state, packed per step, it was 1.1 s and 16.7 ms
    (each array a program takes or returns costs the runtime microseconds).
    Leaves of 3,000 elements stepped 1.4x slower packed per step than one
    kernel each: hence the size limit. With XLA's own concatenate and
    slices instead of the native copies, the same 1,000 leaves compiled in
    10.6 s (46 s with static slices: one kernel per piece), so elsewhere
    `"auto"` does not pack. For many large leaves, keep them packed with
    [`funcopt.flat`][funcopt.flat] (no copies per step). `update` on
    gradients the jitted program computes (a clip's in `optax.chain`,
    backprop's) copies nothing either where the kernels of Adam/AdamW,
    SGD, Adagrad and RMSprop apply: they read each bucket's params and
    gradients where they are and write the new params over the gradients
    (`_fused_native.update_steps_buckets_where_they_are`).

    Bits: where funcopt is bit-exact with torch (16-bit leaves, the exact
    float32 mode, the native kernels) both
    paths give the same bits (tested). In plain float32
    or float64 programs XLA compiles the same elementwise ops per shape, and
    the two paths can differ by an ulp, as each differs from torch by a few.
    """
    if value not in ("auto", "always", "never"):
        raise ValueError(f"policy must be 'auto', 'always' or 'never', got {value!r}")
    _policy.value = value


@contextlib.contextmanager
def policy(value: str):
    """`with policy("always"): ...` sets `set_policy` for a block."""
    old = get_policy()
    set_policy(value)
    try:
        yield
    finally:
        set_policy(old)


AUTO_MIN_LEAVES = 2
AUTO_MAX_LEAF_BYTES = 4096


# --------------------------------------------------------------------------
# bucket geometry
# --------------------------------------------------------------------------


def _candidate_widths(sizes: np.ndarray) -> list[int]:
    cands = {1 << k for k in range(17)}
    distinct = np.unique(sizes[sizes > 0])
    if len(distinct) > 64:  # the most common sizes are the ones that matter
        values, counts = np.unique(sizes[sizes > 0], return_counts=True)
        distinct = values[np.argsort(-counts)[:64]]
    for s in distinct.tolist():
        if s <= _MAX_WIDTH:
            cands.add(s)
            continue
        first = -(-s // _MAX_WIDTH)
        for d in range(first, first + 256):  # a divisor: rows with no padding
            if s % d == 0:
                cands.add(s // d)
                break
        else:
            cands.add(-(-s // first))
    return sorted(cands)


def choose_width(sizes: Sequence[int]) -> int:
    """Row width minimising `padded elements + _ROW_COST * rows`."""
    arr = np.asarray(sizes, dtype=np.int64)
    best, best_cost = 1, None
    for w in _candidate_widths(arr):
        rows = np.maximum(1, -(-arr // w))
        cost = int((rows * (w + _ROW_COST)).sum())
        if best_cost is None or cost < best_cost or (cost == best_cost and w > best):
            best, best_cost = w, cost
    return best


@dataclasses.dataclass(frozen=True, eq=False)
class Bucket:
    """Leaves of one group and one real dtype, packed as `[rows, width]`.

    Attributes:
      group: the parameter group index.
      dtype: the buffer's (real) dtype; complex leaves are stored as their
        real views (`[..., 2]`, torch's `view_as_real`).
      leaves: indices of the bucket's leaves among all leaves of the tree.
      sizes: each leaf's number of real elements.
      width: the row width.
      first_row: each leaf's first row; `rows[i]` rows each (at least one,
        so a 0-size leaf still has its per-parameter scalars).
      row_leaf: `int32[n_rows]`, the local leaf index of every row.
      in_place: a packed state's bucket of large leaves whose rule steps
        them where they are (`step_bucket_in_place`), not packed per step.
    """

    group: int
    dtype: np.dtype
    leaves: tuple[int, ...]
    sizes: tuple[int, ...]
    width: int
    first_row: tuple[int, ...]
    rows: tuple[int, ...]
    row_leaf: np.ndarray
    in_place: bool = False

    @property
    def n_rows(self) -> int:
        return int(self.row_leaf.shape[0])

    @property
    def one_row_per_leaf(self) -> bool:
        return self.n_rows == len(self.leaves)

    def expand(self, per_leaf: jax.Array) -> jax.Array:
        """`[n_leaves, ...]` per-leaf values -> `[n_rows, 1, ...]` per row."""
        per_row = per_leaf if self.one_row_per_leaf else per_leaf[self.row_leaf]
        return jnp.expand_dims(per_row, 1)

    def first_of_rows(self, per_row: jax.Array) -> jax.Array:
        """`[n_rows]` -> `[n_leaves]`: each leaf's value (its first row)."""
        if self.one_row_per_leaf:
            return per_row
        return per_row[np.asarray(self.first_row, dtype=np.int32)]

    @property
    def spans(self) -> tuple[int, ...]:
        """The elements each leaf owns in the packed buffer (whole rows)."""
        return tuple(rows * self.width for rows in self.rows)

    def pack(self, real_leaves: Sequence[jax.Array], dtype=None) -> jax.Array:
        """Real leaves (in bucket order) -> `[n_rows, width]` (zero padded)
        of the bucket's dtype, or of `dtype` (a state buffer kept in another
        dtype, `funcopt.precision_policy`): one copy (`funcopt._packing.pack`)."""
        dtype = self.dtype if dtype is None else dtype
        leaves = [_packing.as_packable(x, dtype) for x in real_leaves]
        return _packing.pack(leaves, self.spans, (self.n_rows, self.width))

    def unpack(self, buffer: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list:
        """`[n_rows, width]` -> real leaves of `shapes`, copied out
        (`funcopt._packing.unpack`): the per-step path's split."""
        return _packing.unpack(buffer, self.spans, shapes)

    def split(self, buffer: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list:
        """`[n_rows, width]` -> real leaves of `shapes` (one `split`): views
        XLA may fuse into their readers (`funcopt.flat`'s model side)."""
        flat = buffer.reshape(-1)
        cuts: list[int] = []
        keep: list[int] = []
        pos = 0
        for size, rows in zip(self.sizes, self.rows):
            keep.append(len(cuts))
            cuts.append(pos + size)
            pos += rows * self.width
            cuts.append(pos)
        pieces = jnp.split(flat, cuts[:-1]) if len(cuts) > 1 else [flat]
        return [pieces[k].reshape(s) for k, s in zip(keep, shapes)]

    def scalar_loop_mask(
        self, tail_elements: Callable[[int], int] = _math.scalar_loop_elements
    ) -> jax.Array:
        """`bool[n_rows, width]`: the elements torch's CPU loop over their
        own leaf runs in its scalar tail, the last `tail_elements(size)` of
        each leaf (TensorIterator's loop by default, `funcopt._math.add`; a
        fused kernel's, `funcopt.optim._fused`).
        """
        start = np.empty(self.n_rows, np.int64)
        for first, rows, size in zip(self.first_row, self.rows, self.sizes):
            tail = size - tail_elements(size)
            start[first : first + rows] = tail - np.arange(rows) * self.width
        start = np.clip(start, 0, self.width).astype(np.int32)
        col = jax.lax.broadcasted_iota(jnp.int32, (self.n_rows, self.width), 1)
        return col >= jnp.asarray(start)[:, None]

    def pack_scalars(self, values: Sequence[jax.Array]) -> jax.Array:
        """Per-leaf 0-dim values -> `[n_rows]` (one value per row), in one
        copy."""
        per_leaf = _packing.stack_scalars(values)
        return per_leaf if self.one_row_per_leaf else per_leaf[self.row_leaf]

    def unpack_scalars(self, per_row: jax.Array) -> list:
        """`[n_rows]` -> each leaf's 0-dim value (its first row), one copy."""
        return _packing.unstack_scalars(self.first_of_rows(per_row))


def real_shape(leaf) -> tuple[int, ...]:
    shape = tuple(np.shape(leaf))
    return (*shape, 2) if jnp.iscomplexobj(leaf) else shape


def real_dtype(leaf) -> np.dtype:
    dtype = jnp.dtype(leaf.dtype)
    return jnp.finfo(dtype).dtype if jnp.iscomplexobj(leaf) else dtype


def make_buckets(
    leaves: Sequence[Any],
    group_of: Sequence[int | None],
    select: Sequence[int],
    in_place: frozenset[int] = frozenset(),
) -> list[Bucket]:
    """Buckets of the leaves `select` (indices), by (group, real dtype, and
    whether the leaf is `in_place`: see `Bucket.in_place`)."""
    by_key: dict[tuple[int, str, bool], list[int]] = {}
    for i in select:
        # the callers select only leaves that have a group
        key = (cast(int, group_of[i]), str(real_dtype(leaves[i])), i in in_place)
        by_key.setdefault(key, []).append(i)
    buckets = []
    for (group, _, leaves_in_place), idx in by_key.items():
        sizes = [math.prod(real_shape(leaves[i])) for i in idx]
        width = choose_width(sizes)
        rows = [max(1, -(-s // width)) for s in sizes]
        first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int).tolist()
        row_leaf = np.repeat(np.arange(len(idx), dtype=np.int32), rows)
        buckets.append(
            Bucket(
                group,
                real_dtype(leaves[idx[0]]),
                tuple(idx),
                tuple(sizes),
                width,
                tuple(first),
                tuple(rows),
                row_leaf,
                leaves_in_place,
            )
        )
    return buckets


# --------------------------------------------------------------------------
# the kernel: one rule call per bucket
# --------------------------------------------------------------------------


def run_bucket(definition, bucket, p, g, slots, steps, hparams, options, mask):
    """One rule call on packed buffers.

    Args:
      p, g: `[n_rows, width]`; slots: `{name: [n_rows, width]}`, or
      `[n_rows]` for a 0-dim (per-parameter scalar) buffer;
      steps: `int32[n_leaves]` step counts *before* this step;
      hparams: the group's hyperparameters (scalars, as per leaf);
      mask: `bool[n_leaves]` (traced `has_grad`) or None.
    Returns `(new_p, new_slots)`, masked rows unchanged.
    """
    step = bucket.expand(steps + 1).astype(widest_float())
    wide = {k: v[:, None] if v.ndim == 1 else v for k, v in slots.items()}
    # 16-bit rules round like torch's loop over each leaf (see _math.add)
    with _math.packed_leaves(p.shape, bucket.sizes, bucket.scalar_loop_mask):
        new_p, new_slots = definition.rule(p, g, dict(wide), step, hparams, options)
    new_slots = {
        k: jnp.broadcast_to(v, wide[k].shape).astype(wide[k].dtype)
        for k, v in new_slots.items()
    }
    if mask is not None:
        row_mask = bucket.expand(mask)
        new_p = jnp.where(row_mask, new_p, p)
        new_slots = {k: jnp.where(row_mask, v, wide[k]) for k, v in new_slots.items()}
    return new_p, {k: v.reshape(slots[k].shape) for k, v in new_slots.items()}


def _auto_packs(leaf) -> bool:
    """Whether `"auto"` packs this leaf per step (`set_policy`): a small leaf
    with dimensions. A 0-d leaf keeps torch's 0-d tensor math, which its own
    program gives it: torch rounds a 0-d float32 param as scalar math (see
    `funcopt._math.is_per_param_scalar`), and promotes a 0-d 16-bit param
    with a 0-d float32 tensor (ASGD's `eta`) to float32, where a packed row
    counts as having dimensions."""
    shape = real_shape(leaf)
    if not shape:
        return False
    return math.prod(shape) * real_dtype(leaf).itemsize <= AUTO_MAX_LEAF_BYTES


def _leaf_steps_in_place(definition, leaf, group: str) -> bool:
    """Whether a packed state's bucket of leaves like `leaf` in `group`
    would step in place (`step_bucket_in_place`): the rule has a kernel that reads
    many leaves' params where they are and applies to the group's options
    and the leaf's dtype (`rule.steps_in_place`), and every state buffer
    `init` makes is of the leaf's shape and dtype."""
    from ._core import _slot_spec

    check = getattr(definition.rule, "steps_in_place", None)
    if check is None or jnp.iscomplexobj(leaf):
        return False
    options = definition.group_options(definition.group_values(group))
    if not check(jnp.dtype(leaf.dtype), options):
        return False
    spec = _slot_spec(definition, leaf, group)
    own = (tuple(np.shape(leaf)), np.dtype(leaf.dtype))
    return bool(spec) and all(s == own for s in spec.values())


def apply_tree(
    definition, leaves, grad_leaves, group_of, slot_leaves, state, options, mask
):
    """The tree-mode hook of `_core._apply`: `{leaf: (new_p, slots, inc)}`.

    Packs the leaves of every bucket the policy selects, runs the rule once
    per bucket and splits the results back into leaves. Leaves it leaves out
    (policy, unsupported slot shapes) go through the per-leaf path.
    """
    pol = get_policy()
    if pol == "never":
        return {}
    from ._core import _as_complex, _as_real

    if pol == "auto" and not _packing.native_available():
        return {}
    live = [
        i
        for i, (g, grp) in enumerate(zip(grad_leaves, group_of))
        if g is not None
        and grp is not None
        and (pol == "always" or _auto_packs(leaves[i]))
    ]
    done = {}
    for bucket in make_buckets(leaves, group_of, live):
        idx = bucket.leaves
        if pol == "auto" and len(idx) < AUTO_MIN_LEAVES:
            continue
        kinds = _slot_kinds(slot_leaves, leaves, idx)
        if kinds is None:
            continue
        p = bucket.pack([_as_real(leaves[i]) for i in idx])
        g = bucket.pack([_as_real(grad_leaves[i]) for i in idx])
        slots = {}
        for k, kind in kinds.items():
            own = [slot_leaves[k][i] for i in idx]
            slots[k] = (
                bucket.pack([_as_real(s) for s in own], real_dtype(own[0]))
                if kind == "array"
                else bucket.pack_scalars(own)
            )
        steps = take_leaves(state.step, idx)
        hparams = {k: v[bucket.group] for k, v in state.hparams.items()}
        m = None
        if mask is not None:  # one flag per leaf
            m = _packing.stack_flags([mask[i] for i in idx], len(idx))
        new_p, new_slots = run_bucket(
            definition, bucket, p, g, slots, steps, hparams, options[bucket.group], m
        )
        shapes = [real_shape(leaves[i]) for i in idx]
        ps = bucket.unpack(new_p, shapes)
        per_slot = {}
        for k, kind in kinds.items():
            if kind == "array":
                per_slot[k] = bucket.unpack(new_slots[k], shapes)
            else:
                per_slot[k] = bucket.unpack_scalars(new_slots[k])
        for j, i in enumerate(idx):
            own = {
                k: _as_complex(per_slot[k][j], slot_leaves[k][i])
                if kinds[k] == "array"
                else per_slot[k][j]
                for k in kinds
            }
            inc = True if mask is None else mask[i]
            done[i] = (_as_complex(ps[j], leaves[i]), own, inc)
    return done


def take_leaves(per_leaf: jax.Array, idx: Sequence[int]) -> jax.Array:
    """`per_leaf[idx]`: a slice where `idx` is a run of consecutive leaves
    (the usual bucket), which XLA fuses into its readers; a gather, a
    kernel of its own, otherwise."""
    start = idx[0]
    if list(idx) == list(range(start, start + len(idx))):
        return per_leaf[start : start + len(idx)]
    return per_leaf[np.asarray(idx, dtype=np.int32)]


def _slot_kinds(slot_leaves, leaves, idx) -> dict[str, str] | None:
    """`{slot: "array" | "scalar"}` for a bucket, None if not uniform (a
    buffer missing for some leaves, of several shapes or dtypes). A buffer
    may have a dtype other than the params' (`funcopt.precision_policy`):
    it is packed in its own."""
    kinds = {}
    for k, per_leaf in slot_leaves.items():
        own = [per_leaf[i] for i in idx]
        if all(s is None for s in own):
            continue
        if any(s is None for s in own):
            return None
        if len({jnp.dtype(s.dtype) for s in own}) != 1:
            return None
        if all(np.shape(s) == np.shape(leaves[i]) for s, i in zip(own, idx)):
            kinds[k] = "array"
        elif all(np.shape(s) == () for s in own):
            kinds[k] = "scalar"
        else:
            return None
    return kinds


# --------------------------------------------------------------------------
# the flat layout
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Where every leaf of a params tree lives in the packed buffers.

    Static: build it once with [`funcopt.flat.layout`][funcopt.flat.layout]
    and keep it; it is the `FlatParams`'s pytree metadata. Two layouts of
    the same tree, groups and buckets are equal (and hash alike), so the
    states of two `init` calls have one pytree structure (`jit` caches,
    `lax.scan` carries, `jax.tree.map` over both).

    `outside` are the leaves in no bucket, held as they are (`FlatParams.rest`):
    the non-trainable leaves and, in a plain tree's packed state (`state_layout`),
    the leaves its step runs one by one.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    group_names: tuple[str, ...]
    group_of: tuple[int | None, ...]
    buckets: tuple[Bucket, ...]
    outside: tuple[int, ...]

    @functools.cached_property
    def _key(self) -> tuple:
        buckets = tuple(
            (b.group, str(b.dtype), b.leaves, b.sizes, b.width, b.rows, b.in_place)
            for b in self.buckets
        )
        dtypes = tuple(None if d is None else str(jnp.dtype(d)) for d in self.dtypes)
        return (
            self.treedef,
            self.shapes,
            dtypes,
            self.group_names,
            self.group_of,
            buckets,
            self.outside,
        )

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Layout) and self._key == other._key)

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self._key)

    def __hash__(self) -> int:  # once per layout: jit hashes it every call
        return self._hash

    @property
    def n_leaves(self) -> int:
        return len(self.shapes)

    def pack(self, params) -> FlatParams:
        """A params tree -> [`FlatParams`][funcopt.flat.FlatParams] (copies, once)."""
        from ._core import _as_real

        leaves = self.treedef.flatten_up_to(check_params(params))
        buffers = tuple(
            b.pack([_as_real(jnp.asarray(leaves[i])) for i in b.leaves])
            for b in self.buckets
        )
        rest = tuple(leaves[i] for i in self.outside)
        return FlatParams(buffers, rest, self)

    def unpack(self, flat: FlatParams):
        """`FlatParams` -> the params tree: views (slices) under `jit`. A
        bucket held as a tuple of its leaves (a `TrainState`'s gradients of
        a bucket that steps in place) gives them as they are."""
        leaves: list[Any] = [None] * self.n_leaves
        for b, buf in zip(self.buckets, flat.buffers):
            if isinstance(buf, tuple):
                for i, leaf in zip(b.leaves, buf):
                    leaves[i] = leaf
                continue
            shapes = [real_shape_of(self.shapes[i], self.dtypes[i]) for i in b.leaves]
            for i, piece in zip(b.leaves, b.split(buf, shapes)):
                leaves[i] = _to_complex(piece, self.dtypes[i])
        for i, leaf in zip(self.outside, flat.rest):
            leaves[i] = leaf
        return self.treedef.unflatten(leaves)

    def unpack_slots(self, flat: FlatParams):
        """A state buffer tree (`state.slots[name]`) -> per-leaf tree.

        0-dim state buffers (`[n_rows]` in the flat state) become one
        0-dim array per leaf; leaves without that buffer get `None`; the
        leaves `outside` every bucket get theirs (`flat.rest`) as they are.
        """
        leaves: list[Any] = [None] * self.n_leaves
        for j, buf in enumerate(flat.buffers):
            if buf is not None:
                for i, value in zip(self.buckets[j].leaves, self.bucket_values(j, buf)):
                    leaves[i] = value
        for i, leaf in zip(self.outside, flat.rest):
            leaves[i] = leaf
        return self.treedef.unflatten(leaves)

    def bucket_values(self, j: int, buffer) -> list:
        """Bucket `j`'s state buffer, leaf by leaf: a `[n_rows]` buffer (a
        0-dim buffer per parameter) one 0-dim value each, a `[n_rows, width]`
        one cut to each leaf's shape (complex leaves complex again). Copies
        (`funcopt._packing.unpack`): eagerly on the host, where `split`'s
        slices would compile a program as large as the tree."""
        b = self.buckets[j]
        if buffer.ndim == 1:
            return b.unpack_scalars(buffer)
        shapes = [real_shape_of(self.shapes[i], self.dtypes[i]) for i in b.leaves]
        pieces = b.unpack(buffer, shapes)
        return [_to_complex(x, self.dtypes[i]) for x, i in zip(pieces, b.leaves)]

    def bucket_buffer(self, j: int, values, dtype, per_row: bool) -> jax.Array:
        """The inverse of `bucket_values`: bucket `j`'s leaves' values
        packed into one buffer of `dtype`, `[n_rows]` where `per_row` (0-dim
        values), else `[n_rows, width]`."""
        from ._core import _as_real

        b = self.buckets[j]
        if per_row:
            return b.pack_scalars([_packing.as_packable(v, dtype) for v in values])
        return b.pack([_as_real(_packing.as_packable(v)) for v in values], dtype)

    def unpack_state(self, state):
        """A flat `OptState` -> the per-leaf `OptState` of the same step."""
        from ._core import OptState

        return OptState(
            state.step,
            state.hparams,
            {k: self.unpack_slots(v) for k, v in state.slots.items()},
        )


def real_shape_of(shape, dtype) -> tuple[int, ...]:
    return (*shape, 2) if jnp.issubdtype(dtype, jnp.complexfloating) else tuple(shape)


def _to_complex(x, dtype):
    if not jnp.issubdtype(dtype, jnp.complexfloating):
        return x
    return jax.lax.complex(x[..., 0], x[..., 1]).astype(dtype)


@jax.tree_util.register_pytree_node_class
class FlatParams:
    """Params (or grads, or a state buffer) packed by a [`Layout`][funcopt.flat.Layout].

    Pytree children: one `[n_rows, width]` buffer per bucket, then the
    tree's non-trainable leaves (`rest`) as they are.
    """

    def __init__(self, buffers, rest, layout: Layout):
        self.buffers = tuple(buffers)
        self.rest = tuple(rest)
        self.layout = layout

    def tree_flatten(self):
        return (self.buffers, self.rest), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        buffers, rest = children
        return cls(buffers, rest, layout)

    def unpack(self):
        """`self.layout.unpack(self)`: the params tree (views under jit)."""
        return self.layout.unpack(self)

    def __eq__(self, other) -> bool:
        """As a tuple of its children compares (a `NamedTuple` state
        does): `jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)`."""
        if not isinstance(other, FlatParams):
            return NotImplemented
        return (self.layout, self.buffers, self.rest) == (
            other.layout,
            other.buffers,
            other.rest,
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def __repr__(self) -> str:
        shapes = [getattr(b, "shape", None) for b in self.buffers]
        return f"FlatParams(buffers={shapes}, n_leaves={self.layout.n_leaves})"


def make_layout(params, definition) -> Layout:
    params = check_params(params)
    leaves, treedef = jax.tree.flatten(params)
    names, group_of = _groups.resolve(definition.groups, params)
    trainable = [i for i, p in enumerate(leaves) if is_trainable(p)]
    frozen = [i for i, p in enumerate(leaves) if not is_trainable(p)]
    return Layout(
        treedef,
        tuple(tuple(np.shape(p)) for p in leaves),
        tuple(getattr(p, "dtype", None) for p in leaves),
        tuple(names),
        tuple(group_of),
        tuple(make_buckets(leaves, group_of, trainable)),
        tuple(frozen),
    )


def _check_layout(definition, flat: FlatParams) -> Layout:
    layout = flat.layout
    if not definition.elementwise:
        raise TypeError(
            f"{definition.name} is not elementwise: it runs per leaf only; "
            "pass the params tree (layout.unpack(flat)), not FlatParams"
        )
    template = layout.treedef.unflatten(
        [jax.ShapeDtypeStruct(s, d) for s, d in zip(layout.shapes, layout.dtypes)]
    )
    names, group_of = _groups.resolve(definition.groups, template)
    if tuple(names) != layout.group_names or tuple(group_of) != layout.group_of:
        raise ValueError(
            f"this layout was built for parameter groups {layout.group_names}; "
            f"{definition.name}'s param_groups resolve to {tuple(names)}: build "
            "the layout with this optimizer"
        )
    return layout


def init_flat(definition, flat: FlatParams):
    """`opt.init(flat_params)`: the state, its buffers packed like params."""
    from ._core import OptState

    layout = _check_layout(definition, flat)
    values = [definition.group_values(n) for n in layout.group_names]
    dtype = widest_float()
    hparams = {
        k: jnp.asarray([v[k] for v in values], dtype=dtype).reshape(
            (len(values), *np.shape(definition.hyperparams[k]))
        )
        for k in definition.hyperparams
    }
    per_bucket = _bucket_slots(definition, layout, flat.buffers, values)
    slots = _flat_slots(layout, per_bucket, [{}] * len(layout.outside))
    return OptState(jnp.zeros(layout.n_leaves, jnp.int32), hparams, slots)


def _bucket_slots(definition, layout: Layout, buffers, values) -> list[dict]:
    """`init_slots` on each bucket's packed params: `{slot: buffer}` per
    bucket, a 0-dim buffer as one value per row (`[n_rows]`)."""
    per_bucket = []
    for b, buf in zip(layout.buckets, buffers):
        slots = definition.init_slots(buf, values[b.group])
        per_bucket.append(
            {
                k: v if np.shape(v) == buf.shape else jnp.broadcast_to(v, (b.n_rows,))
                for k, v in slots.items()
            }
        )
    return per_bucket


def _flat_slots(layout: Layout, per_bucket, per_outside) -> dict[str, FlatParams]:
    """`{slot: FlatParams}` from each bucket's and each `outside` leaf's
    `{slot: buffer}` (None where one has no such buffer)."""
    names = dict.fromkeys(k for s in [*per_bucket, *per_outside] for k in s)
    return {
        k: FlatParams(
            [s.get(k) for s in per_bucket], [s.get(k) for s in per_outside], layout
        )
        for k in names
    }


def _flat_masks(layout: Layout, flat: FlatParams, has_grad):
    """Per-bucket `bool[n_leaves_in_bucket]` from `has_grad`: a
    `FlatParams` of flags (one per bucket) or a tree of the params'
    structure (one flag per leaf)."""
    if has_grad is None:
        return None
    if isinstance(has_grad, FlatParams):
        per_bucket = jax.tree.leaves(has_grad)[: len(flat.buffers)]
        return [
            jnp.broadcast_to(jnp.asarray(m), (len(b.leaves),))
            for b, m in zip(layout.buckets, per_bucket)
        ]
    per_leaf = layout.treedef.flatten_up_to(has_grad)
    return [
        jnp.stack([jnp.asarray(per_leaf[i], bool) for i in b.leaves])
        for b in layout.buckets
    ]


def apply_flat(definition, flat: FlatParams, grads, state, has_grad):
    """`opt.step(flat_params, flat_grads, state)`: one rule call per bucket."""
    from ._core import OptState, _check_state

    layout = _check_layout(definition, flat)
    if not isinstance(grads, FlatParams) or grads.layout != layout:
        raise TypeError(
            "grads of FlatParams must be FlatParams of the same layout "
            "(take jax.grad with respect to the FlatParams)"
        )
    _check_state(definition, state, layout.n_leaves, len(layout.group_names))
    values = [definition.group_values(n) for n in layout.group_names]
    options = [definition.group_options(v) for v in values]
    masks = _flat_masks(layout, flat, has_grad)
    new_buffers = []
    new_slots = {k: list(v.buffers) for k, v in state.slots.items()}
    increments = jnp.zeros(layout.n_leaves, jnp.int32)
    for j, (b, p, g) in enumerate(zip(layout.buckets, flat.buffers, grads.buffers)):
        if g is None or getattr(g, "dtype", None) == jax.dtypes.float0:
            new_buffers.append(p)
            continue
        idx = np.asarray(b.leaves, dtype=np.int32)
        slots = {
            k: v.buffers[j] for k, v in state.slots.items() if v.buffers[j] is not None
        }
        mask = None if masks is None else masks[j]
        hparams = {k: v[b.group] for k, v in state.hparams.items()}
        new_p, own = run_bucket(
            definition, b, p, g, slots, state.step[idx], hparams, options[b.group], mask
        )
        new_buffers.append(new_p)
        for k, v in own.items():
            new_slots[k][j] = v
        inc = jnp.ones(len(idx), jnp.int32) if mask is None else mask.astype(jnp.int32)
        increments = increments.at[idx].set(inc)
    new_state = OptState(
        state.step + increments,
        state.hparams,
        {k: FlatParams(v, state.slots[k].rest, layout) for k, v in new_slots.items()},
    )
    return FlatParams(new_buffers, flat.rest, layout), new_state


# --------------------------------------------------------------------------
# a plain tree's state, packed
# --------------------------------------------------------------------------


def state_layout(definition, leaves, treedef, names, group_of) -> Layout | None:
    """The layout `init` keeps a plain tree's state buffers in, or None
    (one buffer per leaf).

    The buckets `set_policy` packs (read at `init`): by default (`"auto"`),
    on one CPU device with the native library, a group's and dtype's small
    leaves, where it has two or more; every bucket with `"always"`, its
    larger leaves that step in place (`_leaf_steps_in_place`) in buckets
    of their own; none with `"never"`. Their buffers (`exp_avg`, ...) are
    one `[rows, width]` array per bucket, the other leaves' as they are
    (`FlatParams.rest`), so a step passes a few state arrays instead of two
    or three per leaf. Each
    array a compiled program takes or returns costs the runtime a few
    microseconds (Adam's per-leaf state of 1,000 leaves: ~9 ms a step, 2-core
    CPU), more than the arithmetic. Whatever the layout, `opt.step` gives
    the same bits (tested); `state.unpacked()` reads the buffers per leaf.
    """
    pol = get_policy()
    if not definition.elementwise or pol == "never":
        return None
    if pol == "auto" and not _packing.native_available():
        return None
    # complex leaves keep per-leaf state: `init_slots` checks them (a
    # precision policy refuses them), which it cannot on a bucket's real view
    candidates = [
        i
        for i, (p, g) in enumerate(zip(leaves, group_of))
        if g is not None and is_trainable(p) and not jnp.iscomplexobj(p)
    ]
    # under "always", large leaves whose bucket steps in place: their own
    # buckets (small ones are packed per step: it compiles faster, and
    # copies little); "auto" keeps their state per leaf, where the optax
    # protocol's `update` steps them with JAX rules that XLA fuses with
    # `apply_updates` (on a packed bucket it runs the kernel)
    in_place: frozenset[int] = frozenset()
    if pol == "always":
        in_place = frozenset(
            i
            for i in candidates
            if np.ndim(leaves[i]) > 0
            and not _auto_packs(leaves[i])
            and _leaf_steps_in_place(definition, leaves[i], names[group_of[i]])
        )
    select = [i for i in candidates if pol == "always" or _auto_packs(leaves[i])]
    buckets = [
        b
        for b in make_buckets(leaves, group_of, select, in_place)
        if pol == "always" or len(b.leaves) >= AUTO_MIN_LEAVES
    ]
    if not buckets:
        return None
    inside = {i for b in buckets for i in b.leaves}
    return Layout(
        treedef,
        tuple(tuple(np.shape(p)) for p in leaves),
        tuple(jnp.result_type(p) if is_trainable(p) else None for p in leaves),
        tuple(names),
        tuple(group_of),
        tuple(buckets),
        tuple(i for i in range(len(leaves)) if i not in inside),
    )


def init_packed(definition, layout: Layout, leaves, values) -> dict[str, FlatParams]:
    """`init`'s buffers in `layout`: `init_slots` once per bucket (on its
    packed params) and once per leaf outside the buckets."""
    from ._core import _as_real

    buffers = []
    for b in layout.buckets:
        if _reads_values(definition.init_slots, b, values[b.group]):
            buffers.append(b.pack([_as_real(jnp.asarray(leaves[i])) for i in b.leaves]))
        else:  # no copy, and no read of params that may be abstract
            buffers.append(jnp.zeros((b.n_rows, b.width), b.dtype))
    per_outside = [
        {}
        if layout.group_of[i] is None
        else definition.init_slots(leaves[i], values[layout.group_of[i]])
        for i in layout.outside
    ]
    per_bucket = _bucket_slots(definition, layout, buffers, values)
    return _flat_slots(layout, per_bucket, per_outside)


def _reads_values(init_slots, bucket: Bucket, group: dict) -> bool:
    """Whether `init_slots` reads its param's values (Adagrad's and
    Rprop's do not, a copy of the params does), not only its shape."""
    spec = jax.ShapeDtypeStruct((bucket.n_rows, bucket.width), bucket.dtype)
    jaxpr = jax.make_jaxpr(lambda x: init_slots(x, group))(spec).jaxpr
    (param,) = jaxpr.invars
    used = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
    return any(v is param for v in used)


def packed_layout(state) -> Layout | None:
    """The layout of a state whose buffers are packed, None for per-leaf ones."""
    for v in state.slots.values():
        if isinstance(v, FlatParams):
            return v.layout
    return None


def unpack_state(state):
    """`state` with every buffer per leaf (`OptState.unpacked`)."""
    layout = packed_layout(state)
    return state if layout is None else layout.unpack_state(state)


def pack_state(definition, params, state):
    """A per-leaf `state` (of `params`) in the layout `init(params)` makes:
    what builds a state other than `init` (`load_state_dict`,
    `add_param_group`) returns, so that it has `init`'s structure."""
    state = unpack_state(state)
    params = check_params(params)
    leaves, treedef = jax.tree.flatten(params)
    names, group_of = _groups.resolve(definition.groups, params)
    layout = state_layout(definition, leaves, treedef, names, group_of)
    if layout is None:
        return state
    return pack_into(layout, state, bucket_buffer_specs(definition, layout))


def bucket_buffer_specs(definition, layout: Layout) -> list[dict[str, tuple]]:
    """Per bucket, `{slot: (shape, dtype)}` of the packed buffers `init`
    makes: `[n_rows, width]`, or `[n_rows]` for a 0-dim buffer per
    parameter (NAdam's `mu_product`). Decided on the bucket's buffer, not
    on a leaf: a 0-d leaf's moments are 0-dim too."""
    from ._core import _slot_spec

    out = []
    for b in layout.buckets:
        whole = (b.n_rows, b.width)
        packed = jax.ShapeDtypeStruct(whole, b.dtype)
        spec = _slot_spec(definition, packed, layout.group_names[b.group])
        out.append(
            {
                k: (whole if shape == whole else (b.n_rows,), np.dtype(dtype))
                for k, (shape, dtype) in spec.items()
            }
        )
    return out


def buffer_specs_of(state) -> list[dict[str, tuple]]:
    """`bucket_buffer_specs` read off a packed state's buffers."""
    layout = packed_layout(state)
    assert layout is not None
    return [
        {
            k: (tuple(np.shape(v.buffers[j])), np.dtype(v.buffers[j].dtype))
            for k, v in state.slots.items()
            if v.buffers[j] is not None
        }
        for j in range(len(layout.buckets))
    ]


def pack_into(layout: Layout, state, specs: list[dict[str, tuple]]):
    """A per-leaf `state` with its buffers packed in `layout`, bucket `j`'s
    as `specs[j]` says (`bucket_buffer_specs`, `buffer_specs_of`): what a
    checkpoint restored into a packed state and `pack_state` return."""
    from ._core import OptState

    slots = {}
    for k, tree in state.slots.items():
        per_leaf = layout.treedef.flatten_up_to(tree)
        buffers: list[jax.Array | None] = []
        for j, (b, spec) in enumerate(zip(layout.buckets, specs)):
            own = [per_leaf[i] for i in b.leaves]
            if k not in spec or own[0] is None:
                buffers.append(None)
            else:
                shape, dtype = spec[k]
                buffers.append(layout.bucket_buffer(j, own, dtype, len(shape) == 1))
        rest = [per_leaf[i] for i in layout.outside]
        slots[k] = FlatParams(buffers, rest, layout)
    return OptState(state.step, state.hparams, slots)


def describes(layout: Layout, leaves, group_of) -> bool:
    """Whether `layout` was made for params of these leaves' shapes and
    dtypes, in these groups (the tree structure is checked apart)."""
    return (
        layout.shapes == tuple(tuple(np.shape(p)) for p in leaves)
        and all(
            d is None or (is_trainable(p) and jnp.result_type(p) == d)
            for d, p in zip(layout.dtypes, leaves)
        )
        and layout.group_of == tuple(group_of)
    )


def runs_packed(bucket: Bucket, grad_leaves) -> bool:
    """Whether a packed state's bucket steps as one kernel: not under
    `set_policy("never")`, and not with a sparse gradient (those leaves
    take the per-leaf path, the bucket's buffers unpacked and packed again)."""
    from jax.experimental import sparse as jsparse

    if get_policy() == "never":
        return False
    return not any(isinstance(grad_leaves[i], jsparse.BCOO) for i in bucket.leaves)


def unpack_step_grads(state, grads: FlatParams, has_grad):
    """`(grads, has_grad, buffers)` of a step given gradients packed in the
    layout of its packed state (`TrainState` keeps them so): the gradients
    per leaf (views of the buffers, for the checks and the leaves stepped
    one by one), the flags per leaf, and the gradient buffers, which the
    buckets read as they are. `has_grad` is None or a `FlatParams` of the
    same layout whose buffers hold a flag per leaf of their bucket (or a
    tree of the params' structure, passed on); flags known while tracing
    (`_packing.known_flags`) stay known."""
    layout = packed_layout(state)
    if layout is None or grads.layout != layout:
        raise TypeError(
            "packed gradients (FlatParams) must be in the layout of the "
            "optimizer state's packed buffers (see funcopt.flat for "
            "FlatParams params)"
        )
    if isinstance(has_grad, FlatParams):
        if has_grad.layout != layout:
            raise TypeError(
                "has_grad of packed gradients must be a FlatParams of their "
                "layout or a tree of the params' structure"
            )
        has_grad = layout.treedef.unflatten(flag_values(has_grad))
    buffers = [None if isinstance(b, tuple) else b for b in grads.buffers]
    return layout.unpack(grads), has_grad, buffers


def flag_values(flags: FlatParams) -> list[Any]:
    """Per leaf, the flags of a `FlatParams` whose bucket buffers hold one
    flag per leaf (`TrainState`'s): Python bools where a buffer is known
    while tracing (`_packing.known_flags`), else its 0-d values; the leaves
    outside the buckets' as they are."""
    layout = flags.layout
    values: list[Any] = [None] * layout.n_leaves
    for b, buffer in zip(layout.buckets, flags.buffers):
        known = _packing.known_flags(buffer)
        per_leaf = (
            _packing.unstack_scalars(buffer)
            if known is None
            else [bool(f) for f in known]
        )
        for i, f in zip(b.leaves, per_leaf):
            values[i] = f
    for i, f in zip(layout.outside, flags.rest):
        values[i] = f
    return values


def apply_packed(
    definition, layout, leaves, grad_leaves, state, options, mask, grad_buffers=None,
    where_they_are=False,
):  # fmt: skip
    """The buckets of a packed state, each one rule call on its buffers.

    Returns `(done, buffers)`: `{leaf: (new_p, {}, stepped)}` and, per
    bucket that ran, `{slot: new buffer}`. A leaf without a gradient
    (`None`, or `has_grad` false) keeps its param, buffers and count. A
    bucket where no leaf has a gradient, or that does not `runs_packed`,
    is left to the caller. `grad_buffers`: the gradients already packed,
    one buffer per bucket (`unpack_step_grads`; None for a bucket held per
    leaf), read as they are. `where_they_are`: every bucket, not only the
    `Bucket.in_place` ones, steps its leaves where they are where its
    rule's kernel applies (`step_bucket_in_place`; `update` on gradients
    the program computes,
    `_fused_native.update_steps_buckets_where_they_are`; never with
    `grad_buffers`, which only `TrainState`'s step passes).
    """
    from ._core import _as_complex, _as_real

    done: dict[int, tuple] = {}
    buffers: dict[int, dict[str, jax.Array]] = {}
    for j, b in enumerate(layout.buckets):
        idx = b.leaves
        grads = [grad_leaves[i] for i in idx]
        if all(g is None for g in grads) or not runs_packed(b, grad_leaves):
            continue
        flags = None
        if mask is not None or any(gr is None for gr in grads):
            flags = [
                False if gr is None else (True if mask is None else mask[i])
                for gr, i in zip(grads, idx)
            ]
        slots = {
            k: v.buffers[j] for k, v in state.slots.items() if v.buffers[j] is not None
        }
        steps = take_leaves(state.step, idx)
        hparams = {k: v[b.group] for k, v in state.hparams.items()}
        params = [leaves[i] for i in idx]
        stepped_in_place = None
        if b.in_place or where_they_are:
            stepped_in_place = step_bucket_in_place(
                definition, b, params, grads, slots, steps, hparams, options[b.group],
                flags,
            )  # fmt: skip
        if stepped_in_place is not None:
            new_params, buffers[j] = stepped_in_place
            for jj, i in enumerate(idx):
                done[i] = (new_params[jj], {}, True if flags is None else flags[jj])
            continue
        shapes = [real_shape(leaves[i]) for i in idx]
        p = b.pack([_as_real(x) for x in params])
        if grad_buffers is not None and grad_buffers[j] is not None:
            # a leaf without a gradient is masked
            g = grad_buffers[j]
        else:
            g = b.pack(
                [
                    jnp.zeros(s, b.dtype) if gr is None else _as_real(gr)
                    for gr, s in zip(grads, shapes)
                ]
            )
        m = None if flags is None else _packing.stack_flags(flags, len(flags))
        new_p, buffers[j] = run_bucket(
            definition, b, p, g, slots, steps, hparams, options[b.group], m
        )
        for jj, (i, piece) in enumerate(zip(idx, b.unpack(new_p, shapes))):
            stepped = True if flags is None else flags[jj]
            done[i] = (_as_complex(piece, leaves[i]), {}, stepped)
    return done, buffers


def step_bucket_in_place(
    definition, bucket, params, grads, slots, steps, hparams, options, flags
):
    """A packed state's bucket stepped by the rule's kernel for many leaves
    (`rule.many_packed`: Adam/AdamW, SGD, Adagrad, RMSprop,
    `_fused_native._run_many_packed`):
    the leaves' params and gradients read where they are, the state buffers
    `slots` updated in place, where `run_bucket` would pack the params and
    gradients and unpack the new params (three copies of the bucket a
    step). The same bits. `steps`: the counts before this step; `flags`:
    which leaves have a gradient (`apply_packed`; None: all). `(new_params,
    new_slots)`, or None where the rule has no such kernel or it does not
    apply."""
    many = getattr(definition.rule, "many_packed", None)
    live = [k for k, g in enumerate(grads) if g is not None]
    if many is None or not live:
        return None
    offsets = [bucket.first_row[k] * bucket.width for k in live]
    counts = take_leaves(steps + 1, live)
    # a traced `has_grad` false: the call leaves that leaf as it is
    stepping = _packing.stack_flags(
        None if flags is None else [flags[k] for k in live], len(live)
    )
    out = many(
        [params[k] for k in live],
        [grads[k] for k in live],
        slots,
        offsets,
        counts.astype(widest_float()),
        stepping,
        hparams,
        options,
    )
    if out is None:
        return None
    new_live, new_slots = out
    new_params = list(params)  # a leaf without a gradient: not in the call
    for k, v in zip(live, new_live):
        new_params[k] = v
    return new_params, new_slots


def unpack_bucket_slots(layout: Layout, j: int, state) -> dict[str, list]:
    """Bucket `j`'s buffers, leaf by leaf: `{slot: [value per leaf]}`."""
    return {
        k: layout.bucket_values(j, v.buffers[j])
        for k, v in state.slots.items()
        if v.buffers[j] is not None
    }


def repack_slots(layout, state, buffers, per_leaf, repack) -> dict[str, FlatParams]:
    """The new packed buffers: the buckets that ran packed (`buffers`),
    those in `repack` packed from their leaves' new per-leaf buffers
    (`per_leaf`, `{slot: list over all leaves}`), the others as they were;
    the leaves `outside` the buckets from `per_leaf`."""
    slots = {}
    for k, v in state.slots.items():
        new = list(v.buffers)
        for j, b in enumerate(layout.buckets):
            if j in buffers and k in buffers[j]:
                new[j] = buffers[j][k]
            elif j in repack and new[j] is not None:
                own = [per_leaf[k][i] for i in b.leaves]
                new[j] = layout.bucket_buffer(j, own, new[j].dtype, new[j].ndim == 1)
        rest = [per_leaf[k][i] for i in layout.outside]
        slots[k] = FlatParams(new, rest, layout)
    return slots
