"""The core protocol: one per-array update rule, lifted to any pytree.

An update rule is written once, for one parameter array, the way torch writes
the loop body of `_single_tensor_<name>`:

```python
def rule(param, grad, slots, step, hparams, options) -> (param, slots)
```

* `param`, `grad`: arrays of one dtype (complex leaves arrive as real views
  `[..., 2]`, as torch's `view_as_real`);
* `slots`: this parameter's state buffers, `{"exp_avg": ..., ...}`;
* `step`: this parameter's step count *after* the increment, in the widest
  enabled float (torch's `float(state["step"])`);
* `hparams`: this parameter's group's numeric hyperparameters, widest float
  scalars (or small vectors, e.g. `betas`);
* `options`: the group's static options (`maximize`, `amsgrad`, ...).

The rule must be pure: on the per-leaf path it is traced once per (shape,
dtype, options) and that trace is called for every such leaf
(`_leaf_step`); the part of it that reads only the step count and the
hyperparameters (bias corrections, step sizes) runs once for all those
leaves, vectorised over their step counts (`_compile.leaf_program`). Called
outside `jit` (on concrete arrays), `step` and `update` compile that whole
program once (`compiled_when_concrete`), so eager and jitted steps are the same
program and the same bits.

[`make_optimizer`][funcopt.make_optimizer] turns such a rule into an
[`Optimizer`][funcopt.Optimizer]: an `optax.GradientTransformationExtraArgs` with one
more method, `step`, whose state ([`OptState`][funcopt.OptState]) is arrays only:
per-parameter step counts, per-group hyperparameters and per-parameter buffers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse as jsparse
from jax.tree_util import PyTreeDef

from . import _compile, _groups, _math, _multi_tensor, _packing, _tree, _validate
from ._math import widest_float
from ._tree import PyTree, check_params, flatten_grads, is_trainable, leaf_paths

Rule = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
SlotsInit = Callable[[jax.Array, Mapping[str, Any]], dict[str, jax.Array]]
# complex_error(paths, torch_indices) -> the exception to raise; torch_indices
# are torch's ``[group index, index within the group]`` of each complex leaf
ComplexError = Callable[[list[str], list[list[int]]], Exception]
# check_params(params, torch_index) raises torch's error for parameters the
# optimizer refuses; torch_index(i) is torch's ``[group, index]`` of leaf i
ParamsCheck = Callable[[PyTree, Callable[[int], list[int]]], None]
# sparse_check(group) raises torch's error for a sparse gradient in a group
# with these values (e.g. Adagrad's weight_decay)
SparseCheck = Callable[[Mapping[str, Any]], None]


class OptState(NamedTuple):
    """State of a funcopt optimizer: arrays only, so it jits, shards and saves.

    Attributes:
      step: `int32[n_leaves]`, each parameter's own step count (torch's
        `state[p]["step"]`); 0 for leaves that never had a gradient.
      hparams: `{name: array[n_groups, ...]}`, every numeric hyperparameter
        of every parameter group, in the widest enabled float.
      slots: `{name: buffers}`, per-parameter buffers named as in torch's
        `optimizer.state[p]` (`exp_avg`, `momentum_buffer`, ...). Per leaf,
        each is a pytree with the structure of the params and `None` where a
        leaf has no such buffer; by default the small leaves' buffers are
        packed (`funcopt.flat.FlatParams`, see `funcopt.flat.set_policy`),
        and [`unpacked`][funcopt.OptState.unpacked] gives the trees.
    """

    step: jax.Array
    hparams: dict[str, jax.Array]
    slots: dict[str, PyTree]

    def unpacked(self) -> OptState:
        """This state with every buffer per leaf: `slots[name]` a pytree
        of the params' structure (`None` where a leaf has no such buffer).
        The same state when it already is; the buffers are copied out
        (one call per bucket, on the host outside `jit`)."""
        return _multi_tensor.unpack_state(self)


class Optimizer(optax.GradientTransformationExtraArgs):
    """An optax transform with torch's `optimizer.step()` as a pure function.

    `opt.init(params)` and `opt.update(grads, state, params)` follow the
    optax protocol (`update` returns `new_params - params`).
    `opt.step(params, grads, state)` returns `(new_params, new_state)`
    exactly as torch's parameters and state after `optimizer.step()` with
    `p.grad = grads`; prefer it to `update` + `optax.apply_updates`,
    which runs the pure JAX rules (XLA fuses them with the subtraction and
    the addition; without x64 their hyperparameters are float32, so
    torch's float32 numbers to ~1e-5 relative, its bits only with x64 and
    `set_exact_float32`) and rounds `new - old + old` once more.

    `params` is any pytree: its floating-point leaves are trained, Python
    floats included (as the arrays of the default float dtype that `jit`
    and optax make of them, and returned as such); other leaves are carried
    along. torch tensors, modules and iterators such as `model.parameters()`
    raise `TypeError` naming the conversion. Hyperparameters live in the
    state: change them with [`funcopt.set_hparam`][funcopt.set_hparam] (not
    with `optax.inject_hyperparams`, which is refused).
    """

    def step(self, params, grads, state, *, has_grad=None):
        """torch's `optimizer.step()`: `(new_params, new_state)`.

        A `None` leaf of `grads` leaves that parameter and its state
        untouched. `has_grad` (a pytree of booleans shaped like the params)
        does the same with traced flags, for a structure that never changes
        under `jit` (see [`funcopt.TrainState`][funcopt.TrainState]).
        """
        from .optim import _fused_native

        with _fused_native.tracing_step(params, grads):
            return self._step_fn(params, grads, state, has_grad)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"funcopt.{self.name}({args})"


@dataclasses.dataclass(frozen=True, eq=False)
class _Definition:
    name: str
    rule: Rule
    init_slots: SlotsInit
    hyperparams: dict[str, Any]
    options: dict[str, Any]
    groups: _groups.ParamGroups | None
    supports_complex: bool
    sparse_grads: bool = False
    complex_error: ComplexError | None = None
    elementwise: bool = False
    # make_optimizer's `validate`, kept for groups added later (add_param_group)
    validate: Callable[[Mapping[str, Any]], None] | None = None
    check_params: ParamsCheck | None = None
    sparse_check: SparseCheck | None = None
    # (shape, dtype, group name) -> {slot: (shape, dtype)}, see _check_slots
    slot_specs: dict = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # one-leaf steps of groups whose options are not hashable, see _leaf_step
    leaf_steps: dict = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def group_values(self, name: str) -> dict[str, Any]:
        values = {**self.hyperparams, **self.options}
        if self.groups is not None and name in self.groups.overrides:
            values.update(self.groups.overrides[name])
        return values

    def group_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The `options` a rule gets for a group with these values: its
        static options and, under `TENSOR_DTYPES`, the dtype of each
        hyperparameter the group gives as a tensor (see `tensor_dtypes`)."""
        options = {k: values[k] for k in self.options}
        options[TENSOR_DTYPES] = tensor_dtypes({k: values[k] for k in self.hyperparams})
        return options


# the key of `options` that holds a group's tensor hyperparameter dtypes
TENSOR_DTYPES = "tensor_dtypes"


def tensor_dtype(value: Any) -> str | None:
    """The dtype of a hyperparameter given as an array (torch: a tensor, whose
    scalar math runs in its dtype); None for a Python float. A tuple (`betas`)
    is a tensor when its first element is."""
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if _validate.is_array(value) and jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.dtype(value.dtype).name
    return None


def tensor_dtypes(hyperparams: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """`((name, dtype), ...)` of the hyperparameters given as tensors.

    torch lets every param group hold its own `lr` (a Python float or a 0-d
    tensor of any dtype), and a tensor's scalar math runs in its dtype: the
    rule of each group follows its own values, so these dtypes are static
    options of the group (hashable, part of the compiled steps' key).
    """
    found = ((k, tensor_dtype(v)) for k, v in sorted(hyperparams.items()))
    return tuple((k, dtype) for k, dtype in found if dtype is not None)


def make_optimizer(
    *,
    name: str,
    rule: Rule,
    init_slots: SlotsInit,
    hyperparams: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    param_groups: _groups.ParamGroups | None = None,
    supports_complex: bool = True,
    extra_defaults: Mapping[str, Any] | None = None,
    sparse_grads: bool = False,
    complex_error: ComplexError | None = None,
    elementwise: bool = False,
    check_params: ParamsCheck | None = None,
    sparse_check: SparseCheck | None = None,
) -> Optimizer:
    """Lift a per-array update `rule` to a pytree [`Optimizer`][funcopt.Optimizer].

    Args:
      name: the torch class this optimizer mirrors (`"Adam"`).
      rule: `rule(param, grad, slots, step, hparams, options)` (module doc).
      init_slots: `init_slots(param, group) -> {slot: array}`, the buffers
        of one parameter (`group` is its group's values, as Python objects).
      hyperparams: numeric hyperparameters and their values (torch names);
        they live in the state as arrays, so changing them never recompiles.
      options: static per-group options (booleans, strings).
      validate: `validate(group)` raises torch's error for a bad value; it
        runs on the defaults and on every group's overrides.
      param_groups: from [`funcopt.param_groups`][funcopt.param_groups].
      supports_complex: complex leaves are updated as real views (torch's
        `view_as_real`); when False they raise, at `init` and `step`,
        `complex_error(paths, torch_indices)` (default: a `TypeError`
        naming the first complex leaf).
      extra_defaults: torch-only arguments (`foreach`, `fused`, ...) kept
        for display and `state_dict` export; they do not affect the math.
      sparse_grads: the rule takes gradients given as
        `jax.experimental.sparse.BCOO` (passed to it as they are, real
        dtypes only); when False a BCOO gradient raises `RuntimeError`.
      complex_error: see `supports_complex`; `paths` are the key paths of
        the complex leaves, `torch_indices` torch's `[group, index]`.
      elementwise: every output element of `rule` depends only on the same
        element of its inputs and on per-parameter scalars (which may arrive
        as arrays broadcastable to the param: `step` shaped `[rows, 1]`,
        0-dim buffers likewise). Such rules can run on many leaves packed
        into one buffer ([`funcopt.flat`][funcopt.flat], the multi-tensor path).
      check_params: `check_params(params, torch_index)`, run by `init` and
        `step` before any other check of the leaves, raises torch's error
        for parameters the optimizer refuses (SparseAdam's sparse ones);
        `torch_index(i)` is torch's `[group, index]` of leaf `i` (in
        flattening order).
      sparse_check: with `sparse_grads`, `sparse_check(group)` raises
        torch's error for a BCOO gradient in a group with these values
        (e.g. Adagrad's `weight_decay != 0`), the message prefixed with the
        leaf's path. Numeric values are the state's where they are concrete,
        the constructor's under `jit`.
    """
    options = dict(options or {})
    hyperparams = dict(hyperparams)
    _validate.check_param_groups(param_groups)
    _validate.check_not_traced(name, {**hyperparams, **options})
    if validate is not None:
        with _validate.torch_semantics(name, hyperparams):
            validate({**hyperparams, **options})
    if param_groups is not None:
        for group, values in param_groups.overrides.items():
            check_group_overrides(name, hyperparams, options, validate, group, values)
    defaults = {**hyperparams, **options, **dict(extra_defaults or {})}
    hyperparams, param_groups = _numeric_hyperparams(hyperparams, param_groups)
    definition = _Definition(
        name,
        rule,
        init_slots,
        hyperparams,
        options,
        param_groups,
        supports_complex,
        sparse_grads,
        complex_error,
        elementwise,
        validate,
        check_params,
        sparse_check,
    )
    return build_optimizer(definition, defaults)


def _numeric_hyperparams(
    hyperparams: dict[str, Any], groups: _groups.ParamGroups | None
) -> tuple[dict[str, Any], _groups.ParamGroups | None]:
    """1-element arrays as 0-d (torch's 1-element tensors act as scalars), in
    the defaults and in every group's overrides."""
    canonical = _validate.canonical_hyperparameter
    hyperparams = {k: canonical(v) for k, v in hyperparams.items()}
    if groups is None:
        return hyperparams, None
    overrides = {
        group: {k: canonical(v) if k in hyperparams else v for k, v in values.items()}
        for group, values in groups.overrides.items()
    }
    return hyperparams, _groups.ParamGroups(groups.labels, overrides)


def _check_hyperparams(definition: _Definition) -> None:
    """Every hyperparameter is numeric and has one shape in every group.

    Checked by `init` (torch accepts anything at construction and fails at
    its first step), naming the argument: `TypeError` for a non-number,
    `ValueError` for a group value of another shape.
    """
    name = definition.name
    for key, value in definition.hyperparams.items():
        _validate.check_hyperparameter(name, key, value)
        _validate.check_hyperparameter_shape(name, key, value)
    if definition.groups is None:
        return
    for group, values in definition.groups.overrides.items():
        where = f"{name} param group {group!r}"
        for key in [k for k in values if k in definition.hyperparams]:
            _validate.check_hyperparameter(where, key, values[key])
            shape = np.shape(values[key])
            expected = np.shape(definition.hyperparams[key])
            if shape != expected:
                raise ValueError(
                    f"{where}: {key} has shape {shape}; {name}'s {key} has "
                    f"shape {expected}"
                )


def check_group_overrides(
    name: str,
    hyperparams: Mapping[str, Any],
    options: Mapping[str, Any],
    validate: Callable[[Mapping[str, Any]], None] | None,
    group: str,
    values: Mapping[str, Any],
) -> None:
    """The constructor's checks of one group's overrides: known names, no
    tracers, and `validate` (torch's checks) on the group's full values."""
    known = {*hyperparams, *options}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"param group {group!r}: {name} has no hyperparameter "
            f"{unknown[0]!r}; known: {sorted(known)}"
        )
    _validate.check_not_traced(f"{name} param group {group!r}", values)
    if validate is not None:
        with _validate.torch_semantics(name, values):
            validate({**hyperparams, **options, **values})


def build_optimizer(definition: _Definition, defaults: Mapping[str, Any]) -> Optimizer:
    """The [`Optimizer`][funcopt.Optimizer] of a (validated) definition.

    Wrappers that change a rule (e.g.
    [`funcopt.precision_policy`][funcopt.precision_policy]) use it with
    `dataclasses.replace(opt.definition, rule=...)`.
    """
    step_fn = compiled_when_concrete(
        lambda params, grads, state, has_grad: _apply(
            definition, params, grads, state, has_grad
        ),
        lambda params, grads, state: check_step(
            definition, params, _per_leaf_grads(params, grads, state), state
        ),
    )
    opt = Optimizer(
        lambda params: _init(definition, params),
        lambda updates, state, params=None, *, has_grad=None, **extra_args: (
            updates_of_step(definition.name, step_fn, updates, state, params, has_grad)
        ),
    )
    opt._step_fn = step_fn
    opt.name = definition.name
    opt.defaults = dict(defaults)
    opt.param_groups = definition.groups
    opt.definition = definition
    return opt


# --------------------------------------------------------------------------
# init / step / update
# --------------------------------------------------------------------------


def _torch_index(definition: _Definition, params: PyTree) -> Callable[[int], list[int]]:
    """`torch_index(i)`: torch's `[group index, index within the group]` of
    trainable leaf `i` (torch numbers each group's params in order)."""
    _, group_of = _groups.resolve(definition.groups, params)
    seen: dict[int, int] = {}
    index = {}
    for i, g in enumerate(group_of):
        if g is not None:
            index[i] = [g, seen.get(g, 0)]
            seen[g] = seen.get(g, 0) + 1
    return index.__getitem__


def _check_params_hook(definition: _Definition, params: PyTree) -> None:
    if definition.check_params is not None:
        # torch's indices are needed only for the error: resolved on demand
        definition.check_params(params, lambda i: _torch_index(definition, params)(i))


def _check_complex(definition: _Definition, params: PyTree) -> None:
    if definition.supports_complex:
        return
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    bad = [
        i
        for i, (_, leaf) in enumerate(flat)
        if is_trainable(leaf) and jnp.iscomplexobj(leaf)
    ]
    if not bad:
        return
    paths = [jax.tree_util.keystr(flat[i][0]) for i in bad]
    if definition.complex_error is None:
        raise TypeError(
            f"params{paths[0]}: {definition.name} does not support complex parameters"
        )
    torch_index = _torch_index(definition, params)
    raise definition.complex_error(paths, [torch_index(i) for i in bad])


def _init(definition: _Definition, params: PyTree) -> OptState:
    _check_hyperparams(definition)
    if isinstance(params, _multi_tensor.FlatParams):
        return _multi_tensor.init_flat(definition, params)
    params = check_params(params)
    _check_params_hook(definition, params)
    _check_complex(definition, params)
    treedef: PyTreeDef
    leaves, treedef = jax.tree.flatten(params)
    names, group_of = _groups.resolve(definition.groups, params)
    values = [definition.group_values(n) for n in names]
    dtype = widest_float()
    hparams = {
        k: jnp.asarray([v[k] for v in values], dtype=dtype).reshape(
            (len(names), *np.shape(definition.hyperparams[k]))
        )
        for k in definition.hyperparams
    }
    layout = _multi_tensor.state_layout(definition, leaves, treedef, names, group_of)
    if layout is not None:
        slots = _multi_tensor.init_packed(definition, layout, leaves, values)
        return OptState(jnp.zeros(len(leaves), jnp.int32), hparams, slots)
    per_leaf = [
        {} if g is None else definition.init_slots(p, values[g])
        for p, g in zip(leaves, group_of)
    ]
    slot_names = list(dict.fromkeys(k for s in per_leaf for k in s))
    slots = {k: treedef.unflatten([s.get(k) for s in per_leaf]) for k in slot_names}
    return OptState(jnp.zeros(len(leaves), jnp.int32), hparams, slots)


def _check_state(
    definition: _Definition,
    state: Any,
    n_leaves: int,
    n_groups: int,
    params: PyTree = None,
):
    if not isinstance(state, OptState):
        raise TypeError(
            f"{definition.name} expects the state made by its init(), got "
            f"{type(state).__name__}"
        )
    if not isinstance(state.hparams, Mapping) or set(state.hparams) != set(
        definition.hyperparams
    ):
        held = sorted(state.hparams) if isinstance(state.hparams, Mapping) else None
        raise ValueError(
            f"this state was made by another optimizer: it holds hyperparameters "
            f"{held}, {definition.name} has {sorted(definition.hyperparams)}"
        )
    if np.ndim(state.step) != 1:
        raise ValueError(
            f"this state's step counts have shape {np.shape(state.step)}; "
            f"params have {n_leaves} leaves"
        )
    if np.shape(state.step) != (n_leaves,):
        detail = ""
        slots = [t for t in state.slots.values() if isinstance(t, dict | list | tuple)]
        if params is not None and slots:
            where = _tree.describe_structure_mismatch(params, slots[0], "the state")
            detail = f" ({where})"
        raise ValueError(
            f"this state was made for a param tree with {np.shape(state.step)[0]} "
            f"leaves; params have {n_leaves}{detail}"
        )
    expected = {k: (n_groups, *np.shape(v)) for k, v in definition.hyperparams.items()}
    _validate.check_state_hparams(definition.name, state.hparams, expected)


def _slot_spec(definition: _Definition, leaf: Any, group: str) -> dict:
    """`{slot: (shape, dtype)}` that `init` makes for a leaf like `leaf`
    in `group` (traced once per shape, dtype and group, then cached).
    """
    key = (tuple(leaf.shape), np.dtype(leaf.dtype), group)
    spec = definition.slot_specs.get(key)
    if spec is None:
        values = definition.group_values(group)
        shapes = jax.eval_shape(
            lambda p: definition.init_slots(p, values),
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
        )
        spec = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in shapes.items()}
        definition.slot_specs[key] = spec
    return spec


_ArraySpec = tuple[tuple[int, ...], np.dtype]


def _array_spec(x: Any) -> _ArraySpec | None:
    if not isinstance(x, jax.Array | np.ndarray):
        return None
    return tuple(x.shape), np.dtype(x.dtype)


def _check_slots(
    definition: _Definition,
    params: PyTree,
    leaves: list,
    names: list[str],
    group_of: list[int | None],
    state: OptState,
) -> dict[str, list]:
    """The state's buffers, leaf by leaf, checked against what `init` makes.

    Raises `ValueError` naming the first leaf whose buffers differ in name,
    shape or dtype: a state made by another optimizer, with other options,
    or for another param tree (`TypeError` for a buffer that is not an
    array). Runs at trace time (free under `jit`).
    """
    treedef: PyTreeDef = jax.tree.structure(params)
    layout = _multi_tensor.packed_layout(state)
    if layout is not None:
        return _check_packed_slots(
            definition, params, leaves, names, group_of, state, layout
        )
    slot_leaves = {}
    for k, t in state.slots.items():
        try:
            slot_leaves[k] = treedef.flatten_up_to(t)
        except (ValueError, TypeError) as e:
            detail = _tree.describe_structure_mismatch(params, t, repr(k))
            raise ValueError(
                f"this {definition.name} state was made for another param tree: "
                f"its buffer {k!r} does not have the structure of params ({detail})"
            ) from e
    _check_leaf_slots(
        definition, params, leaves, names, group_of, slot_leaves, range(len(leaves))
    )
    return slot_leaves


def _check_packed_slots(definition, params, leaves, names, group_of, state, layout):
    """`_check_slots` of a packed state: its layout is the params', each
    bucket holds the buffers `init` makes for its leaves, packed; the leaves
    outside the buckets are checked one by one. Returns the per-leaf buffers
    of those leaves (None for the buckets' leaves). A state that does not
    fit is refused with the per-leaf check's message, naming the first leaf
    whose buffers differ."""
    treedef: PyTreeDef = jax.tree.structure(params)
    name = definition.name
    if not all(
        isinstance(v, _multi_tensor.FlatParams) and v.layout == layout
        for v in state.slots.values()
    ):
        raise ValueError(
            f"this {name} state mixes packed buffers (FlatParams) with per-leaf "
            "ones: build it with init(), or pass state.unpacked()"
        )
    if layout.treedef != treedef:
        k = next(iter(state.slots))
        template = layout.treedef.unflatten(list(range(layout.n_leaves)))
        detail = _tree.describe_structure_mismatch(params, template, repr(k))
        raise ValueError(
            f"this {name} state was made for another param tree: its buffer "
            f"{k!r} does not have the structure of params ({detail})"
        )
    if not _packed_buffers_fit(definition, layout, leaves, group_of, state):
        # the per-leaf check's message names the first leaf that differs
        try:
            per_leaf = state.unpacked()
        except (ValueError, TypeError):  # buffers of other sizes than the layout's
            per_leaf = None
        if per_leaf is not None:
            _check_slots(definition, params, leaves, names, group_of, per_leaf)
        raise ValueError(
            f"this {name} state was made for params of other shapes, dtypes or "
            f"param groups, or with other options: its packed buffers do not "
            f"fit these params"
        )
    slot_leaves: dict[str, list] = {k: [None] * len(leaves) for k in state.slots}
    for k, v in state.slots.items():
        for i, x in zip(layout.outside, v.rest):
            slot_leaves[k][i] = x
    _check_leaf_slots(
        definition, params, leaves, names, group_of, slot_leaves, layout.outside
    )
    return slot_leaves


def _packed_buffers_fit(definition, layout, leaves, group_of, state) -> bool:
    """Whether `layout` is the params' (shapes, dtypes, groups) and each
    bucket holds, packed, the buffers `init` makes for its leaves."""
    if not _multi_tensor.describes(layout, leaves, group_of):
        return False
    specs = _multi_tensor.bucket_buffer_specs(definition, layout)
    for j, spec in enumerate(specs):
        held = {k: v.buffers[j] for k, v in state.slots.items()}
        held = {k: v for k, v in held.items() if v is not None}
        if set(held) != set(spec):
            return False
        if any(_array_spec(v) != spec[k] for k, v in held.items()):
            return False
    return True


def _check_leaf_slots(definition, params, leaves, names, group_of, slot_leaves, which):
    """The per-leaf buffers of the leaves `which` against what `init`
    makes for them (`_check_slots`)."""
    paths = None
    for i in which:
        p, g = leaves[i], group_of[i]
        own = {k: v[i] for k, v in slot_leaves.items() if v[i] is not None}
        if g is None:
            expected = {}
        else:
            expected = _slot_spec(definition, p, names[g])
        if set(own) == set(expected) and all(
            _array_spec(v) == expected[k] for k, v in own.items()
        ):
            continue
        paths = paths or leaf_paths(params)
        where = f"params{paths[i]}"
        if set(own) != set(expected):
            raise ValueError(
                f"{where}: this state holds buffers {sorted(own)} for it, "
                f"{definition.name} with these options makes {sorted(expected)}: "
                "the state was made by another optimizer, with other options "
                "or for another param tree"
            )
        for k, v in own.items():
            if not isinstance(v, jax.Array | np.ndarray):
                raise TypeError(
                    f"{where}: state buffer {k!r} must be an array, got "
                    f"{type(v).__name__}"
                )
            shape, dtype = cast(_ArraySpec, _array_spec(v))  # v is an array
            if (shape, dtype) != expected[k]:
                raise ValueError(
                    f"{where}: state buffer {k!r} is {dtype}{list(shape)}, "
                    f"{definition.name} makes {expected[k][1]}"
                    f"{list(expected[k][0])} for this {p.dtype}{list(p.shape)} "
                    "param: the state was made for another param tree or with "
                    "other options"
                )


def check_step(definition: _Definition, params: PyTree, grads: PyTree, state: Any):
    """Every trace-time check of `step(params, grads, state)`.

    Returns `(leaves, grad_leaves, names, group_of, slot_leaves)`.
    """
    params = check_params(params)
    _check_params_hook(definition, params)
    _check_complex(definition, params)
    leaves, grad_leaves = flatten_grads(params, grads)
    if not definition.sparse_grads:
        _check_dense(definition, params, grad_leaves)
    names, group_of = _groups.resolve(definition.groups, params)
    _check_state(definition, state, len(leaves), len(names), params)
    _check_sparse(definition, params, grad_leaves, names, group_of, state)
    slot_leaves = _check_slots(definition, params, leaves, names, group_of, state)
    return leaves, grad_leaves, names, group_of, slot_leaves


def _as_real(x: jax.Array) -> jax.Array:
    return jnp.stack([x.real, x.imag], axis=-1) if jnp.iscomplexobj(x) else x


def _as_complex(x: jax.Array, like: jax.Array) -> jax.Array:
    if not jnp.iscomplexobj(like):
        return x
    return jax.lax.complex(x[..., 0], x[..., 1]).astype(like.dtype)


def _check_dense(definition: _Definition, params: PyTree, grad_leaves: list) -> None:
    for i, g in enumerate(grad_leaves):
        if isinstance(g, jsparse.BCOO):
            raise RuntimeError(
                f"params{leaf_paths(params)[i]}: {_sparse_message(definition.name)}"
            )


def _check_sparse(
    definition: _Definition,
    params: PyTree,
    grad_leaves: list,
    names: list[str],
    group_of: list[int | None],
    state: OptState,
) -> None:
    """`definition.sparse_check` on the group of every BCOO gradient."""
    if definition.sparse_check is None:
        return
    for i, (g, group) in enumerate(zip(grad_leaves, group_of)):
        if not isinstance(g, jsparse.BCOO) or group is None:
            continue
        values = definition.group_values(names[group])
        for k, v in state.hparams.items():
            if not isinstance(v, jax.core.Tracer):
                values[k] = np.asarray(v[group])
        try:
            definition.sparse_check(values)
        except Exception as e:
            raise type(e)(f"params{leaf_paths(params)[i]}: {e}") from None


def _sparse_message(name: str) -> str:
    """torch's message for a sparse gradient; AdamW shares Adam's."""
    if name in ("Adam", "AdamW"):
        return (
            "Adam does not support sparse gradients, please consider SparseAdam instead"
        )
    return f"{name} does not support sparse gradients"


def _apply(definition, params, grads, state, has_grad):
    """`(new_params, new_state)`: torch's `optimizer.step()`."""
    from .optim import _fused_native

    if isinstance(params, _multi_tensor.FlatParams):
        return _multi_tensor.apply_flat(definition, params, grads, state, has_grad)
    grad_buffers = None
    if isinstance(grads, _multi_tensor.FlatParams):  # `TrainState`'s
        grads, has_grad, grad_buffers = _multi_tensor.unpack_step_grads(
            state, grads, has_grad
        )
    leaves, grad_leaves, names, group_of, slot_leaves = check_step(
        definition, params, grads, state
    )
    treedef = jax.tree.structure(params)
    values = [definition.group_values(n) for n in names]
    options = [definition.group_options(v) for v in values]
    mask = None if has_grad is None else treedef.flatten_up_to(has_grad)
    mask, grad_leaves = _fold_known_flags(mask, grad_leaves)

    new_leaves, increments = [], []
    # many leaves packed into one kernel per (group, dtype): the buckets of a
    # packed state, or of the per-step policy (`funcopt.flat.set_policy`)
    packed = {}
    layout = _multi_tensor.packed_layout(state)
    if layout is not None:
        # read before `kernels_on_packed_buckets` turns `update`'s JAX-rules
        # switch off: inside it every step looks like `opt.step`
        where_they_are = _fused_native.update_steps_buckets_where_they_are(grad_leaves)
        with _fused_native.kernels_on_packed_buckets():
            packed, bucket_buffers = _multi_tensor.apply_packed(
                definition, layout, leaves, grad_leaves, state, options, mask,
                grad_buffers, where_they_are,
            )  # fmt: skip
        # buckets that step leaf by leaf: their buffers unpacked, then packed
        per_leaf_buckets = {
            j
            for j, b in enumerate(layout.buckets)
            if j not in bucket_buffers
            and any(grad_leaves[i] is not None for i in b.leaves)
        }
        for j in per_leaf_buckets:
            own = _multi_tensor.unpack_bucket_slots(layout, j, state)
            for k, values in own.items():
                for i, v in zip(layout.buckets[j].leaves, values):
                    slot_leaves[k][i] = v
    elif definition.elementwise:
        # sparse (BCOO) gradients take the per-leaf path
        dense_grads = [None if isinstance(g, jsparse.BCOO) else g for g in grad_leaves]
        with _fused_native.kernels_on_packed_buckets():
            packed = _multi_tensor.apply_tree(
                definition, leaves, dense_grads, group_of, slot_leaves, state,
                options, mask,
            )  # fmt: skip
    new_slots = {k: list(v) for k, v in slot_leaves.items()}
    # each leaf reads its step count and its group's hyperparameters at
    # runtime indices, so that same-shaped leaves share one compiled kernel
    # (none needed when every leaf was packed)
    some_per_leaf = any(
        g is not None and i not in packed for i, g in enumerate(grad_leaves)
    )
    n_index = max(len(leaves), len(names)) if some_per_leaf else 0
    index = _compile.runtime_ints(range(n_index), state.step)
    # the counts after this step, read by the rules
    stepped = state.step + 1
    # one leaf's count, for its type only (inside `shard_map`, the mesh axes
    # the counts vary over: a program traced for an invariant count fails
    # there); its value is never read (sliced once, when first needed)
    count = None
    group_hparams: dict[int, dict[str, jax.Array]] = {}
    # leaves on the per-leaf path, by group and scalar math: computed once,
    # vectorised over their step counts
    by_scalars: dict[tuple, list[tuple[int, _compile.LeafProgram]]] = {}
    # dense leaves on the per-leaf path, by group
    dense: dict[int, list[int]] = {}
    owns = {}
    for i, (p, g, group) in enumerate(zip(leaves, grad_leaves, group_of)):
        if i in packed:
            new_p, new_own, inc = packed[i]
            new_leaves.append(new_p)
            for k, v in new_own.items():
                new_slots[k][i] = v
            increments.append(inc)
            continue
        new_leaves.append(p)
        if g is None or group is None:
            increments.append(False)
            continue
        if group not in group_hparams:
            group_hparams[group] = {
                k: _compile.take(v, index[group]) for k, v in state.hparams.items()
            }
        owns[i] = {k: v[i] for k, v in slot_leaves.items() if v[i] is not None}
        fn = _leaf_step(definition, names[group], options[group])
        if isinstance(g, jsparse.BCOO):
            step = _compile.take(stepped, index[i])
            new_leaves[i], new_own = fn(p, g, owns[i], step, group_hparams[group])
            _store_leaf(i, new_leaves, new_own, owns[i], new_slots, p, mask)
        else:
            dense.setdefault(group, []).append(i)
        increments.append(True if mask is None else mask[i])
    for group, members in dense.items():
        hparams = group_hparams[group]
        # many leaves in one native call where the rule has one (Adam, SGD)
        many = _many_leaves(definition, members, leaves, grad_leaves, owns,
                            stepped, hparams, options[group], mask)  # fmt: skip
        fn = _leaf_step(definition, names[group], options[group])
        for i in members:
            if i in many:  # `has_grad` applied by the call
                new_leaves[i], new_own = many[i]
                _store_leaf(i, new_leaves, new_own, owns[i], new_slots, leaves[i], None)
                continue
            if count is None:
                count = stepped[0]
            program = _compile.leaf_program(
                fn, leaves[i], grad_leaves[i], owns[i], count, hparams
            )
            by_scalars.setdefault(
                (group, program.scalars, program.small_own), []
            ).append((i, program))
    for (group, scalars, _), members in by_scalars.items():
        order = [i for i, _ in members]
        steps = _multi_tensor.take_leaves(stepped, order)
        small = [
            jnp.stack([jax.tree.leaves(owns[i])[k] for i in order])
            for k in members[0][1].small_own
        ]
        per_leaf, shared = scalars(steps, small, group_hparams[group])
        for rank, (i, program) in enumerate(members):
            p = leaves[i]
            new_leaves[i], new_own = program.arrays(
                per_leaf, index[rank], shared, p, grad_leaves[i], owns[i]
            )
            _store_leaf(i, new_leaves, new_own, owns[i], new_slots, p, mask)

    new_step = jnp.where(jnp.asarray(increments, dtype=bool), stepped, state.step)
    if layout is not None:
        slots = _multi_tensor.repack_slots(
            layout, state, bucket_buffers, new_slots, per_leaf_buckets
        )
    else:
        slots = {k: treedef.unflatten(v) for k, v in new_slots.items()}
    new_state = OptState(new_step, state.hparams, slots)
    return treedef.unflatten(new_leaves), new_state


def _per_leaf_grads(params, grads, state):
    """`grads` of a plain params tree per leaf, for the checks of an eager
    step: gradients packed in the layout of the state's packed buffers
    (`TrainState` keeps them so) as the shapes of their views (no copy)."""
    if isinstance(params, _multi_tensor.FlatParams) or not isinstance(
        grads, _multi_tensor.FlatParams
    ):
        return grads
    return jax.eval_shape(
        lambda g: _multi_tensor.unpack_step_grads(state, g, None)[0], grads
    )


def _fold_known_flags(mask, grad_leaves):
    """`(mask, grad_leaves)` with the `has_grad` flags known while tracing
    folded in (`_packing.known_flag`): a leaf known to have no gradient
    takes the gradient None (torch's `p.grad is None`: the same skip), a
    flag known true is dropped, and the mask is None where no flag is left
    for the run to read. `TrainState` sets its flags as constants of the
    train step's trace; read at run time, each would cost a select over the
    leaf's param and state and a copy of the buffers a kernel updates in
    place."""
    if mask is None:
        return None, grad_leaves
    known = [_packing.known_flag(m) for m in mask]
    grad_leaves = [None if k is False else g for k, g in zip(known, grad_leaves)]
    if all(k is not None for k in known):
        return None, grad_leaves
    return [m if k is None else k for m, k in zip(mask, known)], grad_leaves


def _many_leaves(definition, members, leaves, grad_leaves, owns, stepped, hparams,
                 options, mask) -> dict[int, tuple]:  # fmt: skip
    """The `(new_param, new_slots)` of the leaves `members` (one group's,
    dense) that the rule steps together in one native call (`rule.many`,
    `_fused_native._run_many`: Adam/AdamW, SGD, Adagrad, RMSprop), by leaf,
    a leaf whose `has_grad` (`mask`) is false keeping its values; the
    others take their own programs."""
    many = getattr(definition.rule, "many", None)
    if many is None or len(members) < 2:
        return {}
    steps = _multi_tensor.take_leaves(stepped, members).astype(widest_float())
    live = _packing.stack_flags(
        None if mask is None else [mask[i] for i in members], len(members)
    )
    out = many(
        [leaves[i] for i in members],
        [grad_leaves[i] for i in members],
        [owns[i] for i in members],
        steps,
        live,
        hparams,
        options,
    )
    return {members[rank]: v for rank, v in out.items()}


def _store_leaf(i, new_leaves, new_own, own, new_slots, p, mask) -> None:
    """Leaf `i`'s step result into `new_leaves`/`new_slots`, kept only
    where `mask` (`has_grad`) says the leaf has a gradient."""
    if mask is not None:
        new_leaves[i] = jnp.where(mask[i], new_leaves[i], p)
        new_own = {k: jnp.where(mask[i], v, own[k]) for k, v in new_own.items()}
    for k, v in new_own.items():
        new_slots[k][i] = v


# (rule, options, torch CPU block) -> the jitted one-leaf step: shared by every
# optimizer built with that rule and those options (see _leaf_step)
_LEAF_STEPS: dict = {}


def _leaf_step(definition: _Definition, group: str, options: dict[str, Any]):
    """The rule on one leaf, `(p, g, slots, step, hparams) -> (p, slots)`
    with `step` the count after this step, as one jitted function.

    Leaves of one shape, dtype and group share its trace: tracing the rule
    once instead of once per leaf is most of what a many-leaf step costs in
    Python, and its lowering is emitted once as a function that every such
    leaf calls (XLA inlines the calls; the arithmetic is the same ops).
    Outside `jit` a leaf's update runs as one compiled kernel instead of
    op by op. The cache key holds everything the rule reads at trace time
    beyond its arguments (jit's own key adds x64, dtype promotion and matmul
    precision): the rule, the group's options and `_math.trace_settings()`
    (the torch CPU loop that 16-bit rules mirror, the bit-exact float32
    mode). A new optimizer with the same rule and options reuses it;
    options that are not hashable are cached per optimizer.
    """
    settings = _math.trace_settings()
    cache: dict = _LEAF_STEPS
    key: tuple = (definition.rule, tuple(sorted(options.items())), settings)
    try:
        hash(key)
    except TypeError:
        cache, key = definition.leaf_steps, (group, settings)
    fn = cache.get(key)
    if fn is None:

        def leaf_step(p, g, own, step, hparams):
            new_p, new_own = definition.rule(
                _as_real(p),
                _as_real(g),
                {k: _as_real(v) for k, v in own.items()},
                step.astype(widest_float()),
                hparams,
                options,
            )
            new_own = {k: _as_complex(v, own[k]) for k, v in new_own.items()}
            return _as_complex(new_p, p), new_own

        fn = cache[key] = jax.jit(leaf_step)
    return fn


def updates_of_step(name, step_fn, grads, state, params, has_grad):
    """The optax protocol on a step: `(new_params - params, new_state)`, the
    step traced with the JAX rules (`_fused_native.jax_rules_only`), which
    XLA fuses with the subtraction and `optax.apply_updates`' addition,
    except on a plain tree's packed buckets (copied in and out or, on
    gradients the program computes, read where they are:
    `_fused_native.update_steps_buckets_where_they_are`; nothing to fuse),
    which keep the kernels."""
    if params is None:
        raise ValueError(
            f"funcopt.{name.lower()}'s update() needs params: call "
            "update(grads, state, params)"
        )
    from .optim import _fused_native

    # the kernels of packed buckets (`kernels_on_packed_buckets`) write the
    # new params over the gradients: the params stay live for `new - old`
    with _fused_native.jax_rules_only(), _fused_native.writing_over_gradients():
        new_params, new_state = step_fn(params, grads, state, has_grad)
    updates = jax.tree.map(
        lambda new, old: new - old if is_trainable(old) else jnp.zeros_like(old),
        new_params,
        params,
    )
    return updates, new_state


StepFn = Callable[[PyTree, PyTree, Any, Any], tuple[PyTree, Any]]


def _jit_argument(x: Any) -> bool:
    """Whether `x` is a concrete value `jit` takes as an argument: a JAX
    array, a Python number, or a NumPy array or scalar of numbers or bools
    (not of strings or objects)."""
    if isinstance(x, jax.core.Tracer):
        return False
    if isinstance(x, jax.Array | bool | int | float | complex):
        return True
    return isinstance(x, np.ndarray | np.generic) and (
        jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)
    )


def compiled_when_concrete(
    step_fn: StepFn, check: Callable[[PyTree, PyTree, Any], Any]
) -> StepFn:
    """`step_fn(params, grads, state, has_grad)`, compiled whole when called
    on concrete arrays (outside `jit`, `grad` or any other transformation).

    Un-jitted, a step would run its scalar and per-leaf programs one by one,
    and XLA compiles those into other machine code than the one program of
    `jax.jit(opt.step)`: the same formula, float32 results apart in the last
    bit (measured before this: 86 of the 206 float32 parity rows). Compiled
    whole, an eager step *is* the jitted step: the same bits (tested for
    every row of the parity table) and one compile instead of one per shape.

    `check(params, grads, state)` runs first on the concrete values: the
    errors only concrete values can raise (torch's checks of hyperparameter
    values) are raised eagerly, as torch raises them. Trees with leaves `jit`
    cannot take (strings, torch tensors, ...) take the uncompiled path and its
    errors. Non-trainable leaves come back as the very objects passed in.
    """

    def traced(settings, params, grads, state, has_grad):
        # `settings` (funcopt._math's trace-time switches and the packing
        # policy) key the cache
        del settings
        return step_fn(params, grads, state, has_grad)

    compiled = jax.jit(traced, static_argnums=0)

    def step(params, grads, state, has_grad):
        args = (params, grads, state, has_grad)
        if not all(_jit_argument(x) for x in jax.tree.leaves(args)):
            return step_fn(*args)
        check(params, grads, state)
        settings = (_math.trace_settings(), _multi_tensor.get_policy())
        new_params, new_state = compiled(settings, *args)
        kept = jax.tree.map(
            lambda new, old: new if is_trainable(old) else old, new_params, params
        )
        return kept, new_state

    return step
