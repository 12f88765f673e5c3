r"""Scaling out with JAX's own sharding: sharded and ZeRO-style optimizer state.

funcopt adds no communication layer: the optimizer state is a pytree of
arrays, so it is sharded with `jax.sharding.NamedSharding` like anything
else, and XLA's SPMD partitioner inserts the collectives. This module only
computes *where* each state array should live.

Plain sharding (the state follows the parameters):

```python
mesh = jax.make_mesh((4, 2), ("data", "model"),
                     axis_types=(AxisType.Auto, AxisType.Auto))
params = jax.device_put(params, param_shardings)      # model-sharded
state = fo.sharding.init(opt, params)                 # slots like params
step = jax.jit(opt.step, out_shardings=(param_shardings,
               fo.sharding.state_shardings(opt, params)))
```

`opt.init` on sharded params already puts every buffer made with
`zeros_like` on its parameter's sharding; [`init`][funcopt.sharding.init]
(`jax.jit(opt.init, out_shardings=state_shardings(...))`) also places the buffers whose
shape differs from the parameter's (Adafactor's factored `row_var`/`col_var`,
ASGD's and NAdam's 0-d scalars) and replicates the step counts and
hyperparameters. Given abstract params (`jax.ShapeDtypeStruct` with a
`sharding`, e.g. from `jax.eval_shape`) it creates the state directly
sharded, never materialised on one device.

ZeRO-style sharding (`zero_axis="data"`): each buffer is further split
over the data-parallel axis of the mesh (the largest dimension that is free
and divisible by that axis' size), while the parameters stay replicated over
it (ZeRO-1). [`zero_step`][funcopt.sharding.zero_step] constrains params and gradients
to that layout before the per-array rule, so each device updates its slice only, and
constrains the new params back to their own sharding: XLA turns the first
into a slice (or, for gradients that are still partial sums, a
reduce-scatter: ZeRO-2) and the second into an all-gather.

Everything here works across hosts unchanged (`jax.distributed`): the
shardings are global, and [`bytes_per_device`][funcopt.sharding.bytes_per_device] counts
only the shards addressable by this process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import PyTreeDef

from . import _multi_tensor
from ._core import OptState
from ._tree import PyTree
from .optim.lbfgs import LBFGSState

if TYPE_CHECKING:  # annotations only: older jax releases may not export it
    from jax.sharding import AbstractMesh

__all__ = [
    "bytes_per_device",
    "constrain",
    "init",
    "param_shardings",
    "per_leaf",
    "replicated",
    "state_shardings",
    "zero_shardings",
    "zero_step",
]

AxisName = str | Sequence[str]


def replicated(mesh: Mesh | AbstractMesh) -> NamedSharding:
    """A `NamedSharding` that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(params: PyTree) -> PyTree:
    """The `.sharding` of every leaf of `params` (arrays or ShapeDtypeStructs).

    A leaf without one (a NumPy array, a ShapeDtypeStruct made without
    `sharding`) gives `None`.
    """
    return jax.tree.map(lambda x: getattr(x, "sharding", None), params)


def _find_mesh(shardings: PyTree) -> Mesh | AbstractMesh | None:
    for s in jax.tree.leaves(shardings):
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def _spec(sharding: Any, ndim: int) -> list | None:
    """`sharding`'s PartitionSpec as a list of length `ndim` (None: unknown)."""
    if not isinstance(sharding, NamedSharding):
        return None
    spec = list(sharding.spec)
    return spec + [None] * (ndim - len(spec))


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _axis_size(mesh: Mesh | AbstractMesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _add_axis(
    spec: list, shape: Sequence[int], mesh: Mesh | AbstractMesh, axis: AxisName
) -> list:
    """`spec` with the mesh axis (or axes) `axis` added to one dimension.

    The largest dimension that is not sharded yet and that the axis' size
    divides; failing that, the largest already-sharded dimension that the
    combined size divides. A leaf with no such dimension is left as it is
    (small leaves stay replicated over `axis`).
    """
    new = _axes(axis)
    if any(a in _axes(e) for e in spec for a in new):
        return spec
    size = _axis_size(mesh, new)
    free = [
        i
        for i, e in enumerate(spec)
        if e is None and shape[i] > 1 and shape[i] % size == 0
    ]
    if free:
        i = max(free, key=lambda i: (shape[i], -i))
        out = list(spec)
        out[i] = new[0] if len(new) == 1 else new
        return out
    taken = [
        i
        for i, e in enumerate(spec)
        if e is not None
        and shape[i] > 1
        and shape[i] % (size * _axis_size(mesh, _axes(e))) == 0
    ]
    if taken:
        i = max(taken, key=lambda i: (shape[i], -i))
        out = list(spec)
        out[i] = (*_axes(spec[i]), *new)
        return out
    return spec


def _like(
    param_sharding: Any,
    param_shape: Sequence[int],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    zero_axis: AxisName | None,
) -> Any:
    """The sharding of a buffer of `shape` that belongs to a parameter.

    Same shape: the parameter's sharding (plus `zero_axis`). Same rank: the
    parameter's spec with the dimensions whose size differs unsharded
    (Adafactor's factored moments). Otherwise (0-d scalars): replicated.
    """
    shape, param_shape = tuple(shape), tuple(param_shape)
    spec = _spec(param_sharding, len(param_shape))
    if spec is None:
        if shape == param_shape and param_sharding is not None and zero_axis is None:
            return param_sharding
        spec = [None] * len(param_shape)
    if len(shape) != len(param_shape):
        return replicated(mesh)
    spec = [e if n == m else None for e, n, m in zip(spec, shape, param_shape)]
    if zero_axis is not None:
        spec = _add_axis(spec, shape, mesh, zero_axis)
    return NamedSharding(mesh, PartitionSpec(*spec))


def zero_shardings(
    params: PyTree,
    param_shardings_: PyTree | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    zero_axis: AxisName = "data",
) -> PyTree:
    """Per-leaf shardings of `params` further split over `zero_axis`.

    The layout of the ZeRO-sharded buffers, and the one
    [`zero_step`][funcopt.sharding.zero_step] gives params and gradients while the
    optimizer rule runs.
    """
    if param_shardings_ is None:
        param_shardings_ = param_shardings(params)
    mesh = mesh or _find_mesh(param_shardings_)
    if mesh is None:
        raise ValueError("zero_shardings needs a mesh or NamedSharding params")
    treedef: PyTreeDef
    leaves, treedef = jax.tree.flatten(params)
    shardings = treedef.flatten_up_to(param_shardings_)
    return treedef.unflatten(
        [
            _like(s, np.shape(p), np.shape(p), mesh, zero_axis)
            for p, s in zip(leaves, shardings)
        ]
    )


def _is_state_node(x: Any) -> bool:
    return isinstance(x, OptState | LBFGSState)


def state_shardings(
    opt: Any,
    params: PyTree,
    param_shardings_: PyTree | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    *,
    zero_axis: AxisName | None = None,
) -> PyTree:
    """The sharding of every leaf of `opt.init(params)`'s state.

    Args:
      opt: a funcopt optimizer, or any optax transform whose state holds
        funcopt states (`optax.chain(fo.clip_grad_norm_transform(1.0),
        fo.adam())`); other state leaves are replicated.
      params: the params, concrete or abstract (`jax.ShapeDtypeStruct`);
        only shapes and dtypes are read (`opt.init` runs under
        `jax.eval_shape`).
      param_shardings_: one sharding per leaf of `params`; by default the
        leaves' own `.sharding`.
      mesh: by default the mesh of the first `NamedSharding`.
      zero_axis: a mesh axis name (or names): the per-parameter buffers are
        additionally split over it (ZeRO-style), see
        [`zero_shardings`][funcopt.sharding.zero_shardings].

    Per-parameter buffers follow their parameter (see `zero_axis`); the step
    counts and hyperparameters are replicated. LBFGS's flat vectors (its
    direction, previous gradient and history) are replicated, or split over
    `zero_axis` when its size divides their length.
    """
    if param_shardings_ is None:
        param_shardings_ = param_shardings(params)
    mesh = mesh or _find_mesh(param_shardings_)
    if mesh is None:
        raise ValueError(
            "state_shardings needs a mesh: pass mesh=, or params (or "
            "param_shardings) with NamedSharding"
        )
    abstract = jax.eval_shape(opt.init, params)
    treedef: PyTreeDef
    leaves, treedef = jax.tree.flatten(params)
    p_shardings = treedef.flatten_up_to(param_shardings_)
    rep = replicated(mesh)

    def node(x):
        if isinstance(x, OptState):
            slots = {}
            for name, tree in x.slots.items():
                if isinstance(tree, _multi_tensor.FlatParams):  # packed: replicated
                    rest = [
                        None
                        if s is None
                        else _like(
                            p_shardings[i],
                            np.shape(leaves[i]),
                            s.shape,
                            mesh,
                            zero_axis,
                        )
                        for i, s in zip(tree.layout.outside, tree.rest)
                    ]
                    buffers = [None if b is None else rep for b in tree.buffers]
                    slots[name] = _multi_tensor.FlatParams(buffers, rest, tree.layout)
                    continue
                flat = treedef.flatten_up_to(tree)
                slots[name] = treedef.unflatten(
                    [
                        None
                        if s is None
                        else _like(ps, np.shape(p), s.shape, mesh, zero_axis)
                        for s, p, ps in zip(flat, leaves, p_shardings)
                    ]
                )
            return OptState(rep, jax.tree.map(lambda _: rep, x.hparams), slots)
        if isinstance(x, LBFGSState):
            vec = rep
            n = x.d.shape[0]
            if zero_axis is not None and n % _axis_size(mesh, _axes(zero_axis)) == 0:
                axis = _axes(zero_axis)
                axis = axis[0] if len(axis) == 1 else axis
                vec = NamedSharding(mesh, PartitionSpec(axis))
            hist = NamedSharding(mesh, PartitionSpec(None, *vec.spec))
            out = jax.tree.map(lambda _: rep, x)
            return out._replace(d=vec, prev_flat_grad=vec, old_dirs=hist, old_stps=hist)
        return rep

    return jax.tree.map(node, abstract, is_leaf=_is_state_node)


def init(
    opt: Any,
    params: PyTree,
    param_shardings_: PyTree | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    *,
    zero_axis: AxisName | None = None,
) -> PyTree:
    """`opt.init(params)`, created directly with `state_shardings`.

    `params` may be abstract (`jax.ShapeDtypeStruct`): the state is then
    built by one jitted computation whose outputs are born sharded. An
    optimizer whose state copies parameter values (schedule-free's `z`)
    raises `ValueError` there: give it the (sharded) params themselves.
    """
    shardings = state_shardings(
        opt, params, param_shardings_, mesh, zero_axis=zero_axis
    )
    leaves, treedef = jax.tree.flatten(params)
    abstract = [isinstance(x, jax.ShapeDtypeStruct) for x in leaves]

    def make(concrete):
        # abstract leaves become zeros inside the computation: init reads
        # only their shapes and dtypes, so XLA never materialises them
        it = iter(concrete)
        full = [
            jnp.zeros(x.shape, x.dtype) if a else next(it)
            for x, a in zip(leaves, abstract)
        ]
        return opt.init(treedef.unflatten(full))

    if any(abstract) and _reads_values(opt, params):
        raise ValueError(
            f"{getattr(opt, 'name', 'this optimizer')}'s state copies parameter "
            "values (e.g. schedule-free's z), so init needs concrete params, "
            "not jax.ShapeDtypeStruct"
        )
    concrete = [x for x, a in zip(leaves, abstract) if not a]
    return jax.jit(make, out_shardings=shardings)(concrete)


def _reads_values(opt: Any, params: PyTree) -> bool:
    """Whether `opt.init`'s output depends on the parameters' values."""
    closed = jax.make_jaxpr(opt.init)(params)
    inputs = set(closed.jaxpr.invars)
    reads = [v for eqn in closed.jaxpr.eqns for v in eqn.invars]
    reads += list(closed.jaxpr.outvars)
    return any(not isinstance(v, Literal) and v in inputs for v in reads)


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
    """`jax.lax.with_sharding_constraint` leaf by leaf; `None` leaves pass.

    `shardings` has the structure of the params; `tree` (gradients, say)
    may have `None` where a leaf has no value.
    """
    treedef: PyTreeDef = jax.tree.structure(shardings, is_leaf=lambda s: s is None)
    flat = treedef.flatten_up_to(tree)
    out = [
        x if x is None or s is None else jax.lax.with_sharding_constraint(x, s)
        for x, s in zip(flat, treedef.flatten_up_to(shardings))
    ]
    return treedef.unflatten(out)


def zero_step(
    opt: Any,
    params: PyTree,
    param_shardings_: PyTree | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    *,
    zero_axis: AxisName = "data",
    donate: bool = False,
) -> Callable:
    """A jitted `step(params, grads, state) -> (params, state)`, ZeRO-sharded.

    The state must be laid out by `state_shardings(..., zero_axis=zero_axis)`
    (e.g. made by `init(..., zero_axis=zero_axis)`). Inside, params and
    grads are constrained to [`zero_shardings`][funcopt.sharding.zero_shardings] (a
    local slice, or a reduce-scatter for partial gradients), the optimizer runs on the
    slices, and the new params are constrained back to `param_shardings_` (an
    all-gather over `zero_axis`). `donate` donates params and state.

    Use the same pieces inside your own train step to fuse the backward pass:
    `grads = constrain(grads, zero_shardings(...))` right after
    `jax.grad` is ZeRO-2 (gradients never exist unsharded over the data
    axis).
    """
    if param_shardings_ is None:
        param_shardings_ = param_shardings(params)
    mesh = mesh or _find_mesh(param_shardings_)
    local = zero_shardings(params, param_shardings_, mesh, zero_axis)
    st = state_shardings(opt, params, param_shardings_, mesh, zero_axis=zero_axis)

    def step(p, g, s):
        with per_leaf():
            new_p, new_s = opt.step(constrain(p, local), constrain(g, local), s)
        return constrain(new_p, param_shardings_), new_s

    return jax.jit(
        step,
        out_shardings=(param_shardings_, st),
        donate_argnums=(0, 2) if donate else (),
    )


def per_leaf():
    """A context: `opt.step` traced inside it keeps every leaf in its own
    buffers (per-leaf state; Adam/AdamW, SGD, Adagrad and RMSprop on one CPU
    device still step a group's leaves in one native call, each where it
    is).

    By default an elementwise optimizer may pack many small leaves into one
    buffer per step (the multi-tensor path, `funcopt._multi_tensor`); on
    sharded leaves that concatenation makes XLA move data between devices.
    Trace sharded steps inside `with fo.sharding.per_leaf():` (as
    [`zero_step`][funcopt.sharding.zero_step] does) so that every leaf keeps its own
    sharding.
    """
    return _multi_tensor.policy("never")


def bytes_per_device(tree: PyTree) -> dict[Any, int]:
    """Bytes of `tree`'s arrays held by each device this process addresses.

    Counted from the arrays' addressable shards, so a replicated array counts
    fully on every device and a sharded one only by its shard.
    """
    out: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
