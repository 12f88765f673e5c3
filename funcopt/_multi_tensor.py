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
* a plain pytree through `opt.step`/`TrainState`: leaves are packed,
  updated and copied back per step, by default where that compiles and runs
  faster than one kernel per leaf (many small leaves on one CPU device; see
  [`set_policy`][funcopt.flat.set_policy]).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    most `AUTO_MAX_LEAF_BYTES` bytes, where a bucket (group, dtype) has at
    least `AUTO_MIN_LEAVES` (2) of them; larger leaves, 0-d leaves (torch's
    0-d tensor math, see `_auto_packs`), and every leaf elsewhere (GPU, TPU,
    several devices, no library), run one kernel per leaf. The parity
    table's tree has leaves of both kinds, so each of its rows runs both
    paths. `"always"`: every bucket of an elementwise optimizer; `"never"`:
    the per-leaf path.
    [`funcopt.flat.FlatParams`][funcopt.flat.FlatParams] always take the
    multi-tensor path. Read at trace time.

    A per-step pack copies each buffer in and out (`funcopt._packing`: one
    native `memcpy` call per buffer). Measured for Adam on float32 leaves of
    1,000 elements (2-core CPU, jax 0.10.2, params and state donated):
    compile 0.41 s packed vs 1.03 s per leaf at 100 leaves and 3.3 s vs 13.5
    s at 1,000 (optax 0.84 s and 10.8 s); a step of 28.5 vs 32.4 ms at 1,000
    leaves (optax 25.0 ms), about even at 100. The copies cost about as much
    as the rule itself, so leaves of 3,000 elements step 1.4x slower packed:
    hence the size limit. With XLA's own concatenate and slices instead of
    the native copies, the same 1,000 leaves compile in 10.6 s (46 s with
    static slices: one kernel per piece), so elsewhere `"auto"` does not
    pack. For many large leaves, keep them packed with
    [`funcopt.flat`][funcopt.flat] (no copies per step).

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
    """

    group: int
    dtype: np.dtype
    leaves: tuple[int, ...]
    sizes: tuple[int, ...]
    width: int
    first_row: tuple[int, ...]
    rows: tuple[int, ...]
    row_leaf: np.ndarray

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
    leaves: Sequence[Any], group_of: Sequence[int | None], select: Sequence[int]
) -> list[Bucket]:
    """Buckets of the leaves `select` (indices), by (group, real dtype)."""
    by_key: dict[tuple[int, str], list[int]] = {}
    for i in select:
        # the callers select only leaves that have a group
        key = (cast(int, group_of[i]), str(real_dtype(leaves[i])))
        by_key.setdefault(key, []).append(i)
    buckets = []
    for (group, _), idx in by_key.items():
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
    """Whether `"auto"` packs this leaf (`set_policy`): a small leaf with
    dimensions. A 0-d leaf keeps torch's 0-d tensor math, which its own
    program gives it: torch rounds a 0-d float32 param as scalar math (see
    `funcopt._math.is_per_param_scalar`), and promotes a 0-d 16-bit param
    with a 0-d float32 tensor (ASGD's `eta`) to float32, where a packed row
    counts as having dimensions."""
    shape = real_shape(leaf)
    if not shape:
        return False
    return math.prod(shape) * real_dtype(leaf).itemsize <= AUTO_MAX_LEAF_BYTES


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
        steps = _take_leaves(state.step, idx)
        hparams = {k: v[bucket.group] for k, v in state.hparams.items()}
        m = None
        if mask is not None:  # one flag per leaf
            flags = [_packing.as_packable(mask[i], bool) for i in idx]
            m = _packing.stack_scalars(flags)
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


def _take_leaves(per_leaf: jax.Array, idx: Sequence[int]) -> jax.Array:
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

    Static (hashable by identity): build it once with
    [`funcopt.flat.layout`][funcopt.flat.layout] and keep it; it is the `FlatParams`'s
    pytree metadata.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    group_names: tuple[str, ...]
    group_of: tuple[int | None, ...]
    buckets: tuple[Bucket, ...]
    frozen: tuple[int, ...]  # leaves that are not trainable

    def __hash__(self) -> int:
        return id(self)

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
        rest = tuple(leaves[i] for i in self.frozen)
        return FlatParams(buffers, rest, self)

    def unpack(self, flat: FlatParams):
        """`FlatParams` -> the params tree: views (slices) under `jit`."""
        leaves: list[Any] = [None] * self.n_leaves
        for b, buf in zip(self.buckets, flat.buffers):
            shapes = [real_shape_of(self.shapes[i], self.dtypes[i]) for i in b.leaves]
            for i, piece in zip(b.leaves, b.split(buf, shapes)):
                leaves[i] = _to_complex(piece, self.dtypes[i])
        for i, leaf in zip(self.frozen, flat.rest):
            leaves[i] = leaf
        return self.treedef.unflatten(leaves)

    def unpack_slots(self, flat: FlatParams):
        """A state buffer tree (`state.slots[name]`) -> per-leaf tree.

        0-dim state buffers (`[n_rows]` in the flat state) become one
        0-dim array per leaf; leaves without that buffer get `None`.
        """
        leaves: list[Any] = [None] * self.n_leaves
        for b, buf in zip(self.buckets, flat.buffers):
            if buf is None:
                continue
            if buf.ndim == 1:  # a 0-dim buffer per parameter, one value per row
                vals = b.first_of_rows(buf)
                for j, i in enumerate(b.leaves):
                    leaves[i] = vals[j]
                continue
            shapes = [real_shape_of(self.shapes[i], self.dtypes[i]) for i in b.leaves]
            for i, piece in zip(b.leaves, b.split(buf, shapes)):
                leaves[i] = _to_complex(piece, self.dtypes[i])
        return self.treedef.unflatten(leaves)

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
    per_bucket = []
    for b, buf in zip(layout.buckets, flat.buffers):
        slots = definition.init_slots(buf, values[b.group])
        per_bucket.append(
            {
                k: v if np.shape(v) == buf.shape else jnp.broadcast_to(v, (b.n_rows,))
                for k, v in slots.items()
            }
        )
    names = list(dict.fromkeys(k for s in per_bucket for k in s))
    slots = {
        k: FlatParams(
            [s.get(k) for s in per_bucket], [None] * len(layout.frozen), layout
        )
        for k in names
    }
    return OptState(jnp.zeros(layout.n_leaves, jnp.int32), hparams, slots)


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
    if not isinstance(grads, FlatParams) or grads.layout is not layout:
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
