"""PyTorch interop: `optimizer.state_dict()`, scheduler states and module weights.

Needs the `torch` extra; torch is imported inside the functions only, so
`import funcopt` never imports it. Import this module explicitly:

```python
import funcopt.torch_interop as fti

sd = fti.state_dict(opt, state, params)          # -> torch_opt.load_state_dict(sd)
state = fti.load_state_dict(opt, params, torch_opt.state_dict())
ssd = fti.scheduler_state_dict(sched, sched_state, state)
sched_state = fti.load_scheduler_state_dict(sched, state, torch_sched.state_dict(),
                                            torch_opt.state_dict())
```

**Parameter order (torch's integer ids).** Torch numbers parameters 0, 1, ...
walking `optimizer.param_groups` in order and each group's `params` in
the order it got them: for `torch.optim.X(model.parameters())`, the
module's registration order. funcopt's order is: groups in
[`funcopt.get_lr`][funcopt.get_lr] order (the `"default"` group first, then
the `param_groups` overrides in dict order); within a group, the
*trainable* (floating-point) leaves in `jax.tree.leaves(params)` order.
[`module_state_dict_to_params`][funcopt.torch_interop.module_state_dict_to_params]
builds params whose leaves are in torch's registration order (nested
`OrderedDict`s), so the two agree; a plain `dict` built by hand flattens in
sorted key order, and then `names=` (torch's order as the tree's dotted leaf
names) on export and import says which leaf is which id. Exports write each
group's `param_names`; imports match by them when present. A torch optimizer
with several groups corresponds to funcopt groups of the same members.
[`param_names`][funcopt.torch_interop.param_names] lists the leaves as dotted
names; [`torch_param_groups`][funcopt.torch_interop.torch_param_groups]
builds the matching torch groups from a module.

**State.** Exported entries follow torch's lazy creation: a parameter has an
entry once it has had a gradient (`state.step > 0`); Adagrad's state is
eager (every parameter, `step = 0` included); SGD keeps only
`momentum_buffer`, and only in groups built with `momentum != 0`.
`step` is a 0-dim tensor of torch's scalar dtype (float32, float64 under a
float64 default dtype), a Python `int` for SparseAdam; SGD and Muon keep
none. NAdam's `mu_product` and ASGD's `eta`/`mu` are 0-dim float32
tensors; buffers have the parameter's dtype and shape (Adafactor's
`row_var`/`col_var` torch's keepdim shapes). Entries are listed in id
order (torch lists them in creation order; `load_state_dict` does not care).

**Hyperparameters.** Every key of torch's `param_groups` is written,
`foreach`/`fused`/`capturable`/`differentiable` included, with the
*current* values held in the state (so a scheduler's lr is exported). A
value equal to the optimizer's Python argument after rounding to the state's
dtype is written as that Python value (float32 states do not perturb
`lr=0.1`). Scheduler-added keys (`initial_lr`, `max_lr`, `min_lr`,
`max_momentum`, `base_momentum`, `swa_lr`) are added when
`state_dict` gets the scheduler and its state.

On import, numeric hyperparameters come from the torch groups, as torch's
`load_state_dict` takes them; static options (`maximize`, `amsgrad`,
`nesterov`, `centered`, `decoupled_weight_decay`, LBFGS's
`max_iter`/`history_size`/..., and torch's `foreach`, `differentiable` and
`capturable` where funcopt takes the step they select: `capturable` for
Adam, AdamW, Adamax, RAdam, NAdam and ASGD) select code paths in funcopt
and must equal the funcopt optimizer's, else `ValueError` names the key
and both values. The other torch-only switches and scheduler keys are
ignored.
SGD and Muon keep no step count in torch; an imported parameter with state
gets `step = 1` (funcopt only tests "has a buffer"), without state 0.

**Module weights.**
[`module_state_dict_to_params`][funcopt.torch_interop.module_state_dict_to_params] turns
`model.state_dict()` (or `dict(model.named_parameters())`) into nested
dicts split at the dots: `"encoder.0.weight"` becomes
`params["encoder"]["0"]["weight"]` (every key a string, list indices
too). Arrays keep torch's layout: `nn.Linear`'s `weight` is `(out,
in)`, so the JAX forward pass is `x @ w.T + b`. Transposing to JAX's
`(in, out)` convention is the user's choice; keep torch's layout when
matching torch, since Muon's shape scale and Adafactor's row/column factors
depend on it.
[`params_to_module_state_dict`][funcopt.torch_interop.params_to_module_state_dict] is
the inverse (any pytree; its key path joined with dots). Buffers (`running_mean`,
`num_batches_tracked`) come along with `state_dict()`; float buffers are then trainable
leaves for funcopt, so pass `named_parameters()` to build the tree an optimizer sees.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _groups, _multi_tensor, _validate
from ._tree import is_trainable

# the keys schedulers add to torch's param_groups
SCHEDULER_GROUP_KEYS = (
    "initial_lr",
    "max_lr",
    "min_lr",
    "max_momentum",
    "base_momentum",
    "swa_lr",
)
_NO_STEP = ("SGD", "Muon")  # torch keeps no per-parameter step
_EAGER = ("Adagrad",)  # state exists from construction
_FLOAT32_SCALARS = ("mu_product", "eta", "mu")  # 0-dim float32 tensors in torch
_LBFGS_STATIC = ("max_iter", "max_eval", "history_size", "line_search_fn")


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test dependency
        raise ImportError(
            "funcopt.torch_interop needs PyTorch: pip install 'funcopt[torch]'"
        ) from e
    return torch


def _scalar_dtype():
    """torch's `_get_scalar_dtype()`: the dtype of `state["step"]`."""
    torch = _torch()
    if torch.get_default_dtype() == torch.float64:
        return torch.float64
    return torch.float32


def _to_tensor(x: Any):
    torch = _torch()
    return torch.from_numpy(np.array(x, copy=True))


def _to_numpy(x: Any) -> np.ndarray:
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().resolve_conj().numpy()
    return np.asarray(x)


def _as_float(x: Any) -> float:
    return float(_to_numpy(x))


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_names(params: Any) -> list[str]:
    """Dotted names of the trainable leaves of `params`, in funcopt's (and
    the exported state dict's) parameter order within one group."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if is_trainable(leaf):
            out.append(".".join(_key_name(k) for k in path))
    return out


def torch_param_groups(opt: Any, params: Any, module: Any) -> list[dict[str, Any]]:
    """torch `param_groups` for `module` that match funcopt's ids:
    `[{"params": [module.get_parameter(name), ...]}, ...]` in group order,
    with each group's overrides (so `torch.optim.X(groups, **defaults)`
    builds the equivalent torch optimizer)."""
    names = param_names(params)
    layout = _layout(opt, params)
    groups = []
    for g, gname in enumerate(layout.names):
        members = [names[layout.trainable.index(i)] for i in layout.members[g]]
        overrides = {}
        if opt.param_groups is not None:
            overrides = dict(opt.param_groups.overrides.get(gname, {}))
        groups.append(
            {"params": [module.get_parameter(n) for n in members], **overrides}
        )
    return groups


class _Layout:
    """Groups and torch ids of the trainable leaves of `params`.

    Torch numbers parameters walking its groups in order, each group's
    params in the order they were given. `order` (dotted leaf names, e.g.
    `[n for n, _ in model.named_parameters()]`) sets that order within each
    funcopt group; by default it is the leaves' flattening order.
    """

    def __init__(self, definition_groups, params, order=None, source="names"):
        paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        self.leaves, self.treedef = jax.tree.flatten(params)
        self.names, self.group_of = _groups.resolve(definition_groups, params)
        self.trainable = [i for i, p in enumerate(self.leaves) if is_trainable(p)]
        self.leaf_names = [".".join(_key_name(k) for k in p) for p, _ in paths_leaves]
        self.members = [
            [i for i in self.trainable if self.group_of[i] == g]
            for g in range(len(self.names))
        ]
        if order is not None:
            trainable = [self.leaf_names[i] for i in self.trainable]
            rank = _order_rank(order, trainable, source)
            self.members = [
                sorted(m, key=lambda i: rank[self.leaf_names[i]]) for m in self.members
            ]
        self.id_of = {}
        for group in self.members:
            for i in group:
                self.id_of[i] = len(self.id_of)
        self.paths = [jax.tree_util.keystr(p) for p, _ in paths_leaves]

    def group_names(self, g: int) -> list[str]:
        """Dotted names of group `g`'s parameters, in torch id order."""
        return [self.leaf_names[i] for i in self.members[g]]

    def order_hint(self) -> str:
        ids = [self.leaf_names[i] for m in self.members for i in m]
        return (
            f"funcopt numbered the parameters {_short(ids)}; torch numbers them in "
            "the order its optimizer got them (model.parameters(): registration "
            "order). Build params with module_state_dict_to_params(dict("
            "model.named_parameters())), whose leaves are in that order, or pass "
            "names=[n for n, _ in model.named_parameters()]"
        )


def _short(names: list[str], keep: int = 8) -> str:
    shown = ", ".join(names[:keep])
    return f"[{shown}{', ...' if len(names) > keep else ''}]"


def _order_rank(order: Any, trainable_names: list[str], source: str) -> dict[str, int]:
    """`{name: position}` of `order`, which must list every trainable leaf once."""
    order = [str(n) for n in order]
    counts = collections.Counter(order)
    seen = set(counts)
    repeated = sorted(n for n, c in counts.items() if c > 1)
    missing = sorted(set(trainable_names) - seen)
    unknown = sorted(seen - set(trainable_names))
    if repeated or missing or unknown:
        raise ValueError(
            f"{source} must list every trainable leaf of params once, by its "
            f"dotted name: missing {missing}, not in params {unknown}, repeated "
            f"{repeated}; params' trainable leaves are {_short(trainable_names)}"
        )
    return {n: r for r, n in enumerate(order)}


def _layout(opt, params, order=None, source="names") -> _Layout:
    return _Layout(opt.param_groups, params, order, source)


def _py_value(value: np.ndarray, config: Any) -> Any:
    """A hyperparameter from the state as a Python value (`config` when it
    rounds to the same value: keeps `0.1` exact in float32 states).
    """
    value = np.asarray(value)
    if config is not None:
        try:
            cfg = np.asarray(
                [math.nan if c is None else c for c in config]
                if isinstance(config, (tuple, list))
                else config,
                dtype=value.dtype,
            )
            if cfg.shape == value.shape and np.array_equal(cfg, value, equal_nan=True):
                return config
        except (TypeError, ValueError):
            pass
    if value.ndim == 0:
        return float(value)
    return tuple(float(v) for v in value)


def _as_tensors(value: Any, config: Any) -> Any:
    """A hyperparameter as torch holds it: a tensor (of the config's dtype)
    where the config gave an array (a tensor `lr` or `betas`), else `value`."""
    if isinstance(config, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(_as_tensors(v, c) for v, c in zip(value, config))
    if _validate.is_array(config):
        config = np.asarray(config)
        return _torch().tensor(np.asarray(value, config.dtype).reshape(config.shape))
    return value


def _decode_adafactor_eps(value: Any) -> Any:
    if isinstance(value, tuple) and value and value[0] is not None:
        if isinstance(value[0], float) and math.isnan(value[0]):
            return (None, *value[1:])
    return value


def _encode(value: Any) -> Any:
    """A torch group value as what funcopt's hparams hold (None -> NaN)."""
    if isinstance(value, (tuple, list)):
        return [math.nan if v is None else _as_float(v) for v in value]
    return _as_float(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _torch_keys(cls) -> set[str]:
    """The param_group keys of a torch optimizer class (its arguments)."""
    sig = inspect.signature(cls.__init__)
    keys = {k for k in sig.parameters if k not in ("self", "params")}
    if cls.__name__ == "AdamW":
        keys.add("decoupled_weight_decay")
    return keys


def _guess_torch_class(keys: set[str]) -> str | None:
    torch = _torch()
    best, score = None, 0.0
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        if cls is torch.optim.Optimizer:
            continue
        ref = _torch_keys(cls)
        jaccard = len(ref & keys) / max(1, len(ref | keys))
        if jaccard > score:
            best, score = name, jaccard
    return best if score > 0.5 else None


def _check_groups(opt_name: str, expected: set[str], groups: list) -> None:
    for g, group in enumerate(groups):
        got = set(group) - {"params", "param_names", *SCHEDULER_GROUP_KEYS}
        if got == expected:
            continue
        guess = _guess_torch_class(got)
        origin = f" (it looks like torch.optim.{guess}'s)" if guess else ""
        raise ValueError(
            f"this state dict is not a torch.optim.{opt_name} state dict{origin}: "
            f"param_groups[{g}] is missing {sorted(expected - got)} and has "
            f"unexpected keys {sorted(got - expected)}"
        )


def _check_group_sizes(layout: _Layout, groups: list) -> None:
    n_torch = sum(len(g["params"]) for g in groups)
    if len(groups) != len(layout.names):
        raise ValueError(
            f"the torch state dict has {len(groups)} parameter groups, the funcopt "
            f"optimizer {len(layout.names)} ({layout.names})"
        )
    if n_torch != len(layout.trainable):
        raise ValueError(
            f"the torch state dict has {n_torch} parameters, params has "
            f"{len(layout.trainable)} trainable leaves"
        )
    for g, (group, members) in enumerate(zip(groups, layout.members)):
        if len(group["params"]) != len(members):
            raise ValueError(
                f"param_groups[{g}] has {len(group['params'])} parameters in the "
                f"torch state dict, {len(members)} in funcopt's group "
                f"{layout.names[g]!r}"
            )


def _unwrap_train_state(state: Any, params: Any) -> tuple[Any, Any]:
    """`(optimizer state, params)` from a state or a TrainState."""
    from .train_state import TrainState

    if isinstance(state, TrainState):
        return state.opt_state, state.params if params is None else params
    if params is None:
        raise TypeError(
            "state_dict needs params (the tree the state belongs to) unless "
            "state is a TrainState"
        )
    return state, params


def _torch_order(groups: list, names: Any) -> tuple[Any, str]:
    """The parameter order to match ids by, and where it came from: the
    state dict's `param_names` when every group has them (they must agree
    with `names`), else `names`."""
    if groups and all("param_names" in g for g in groups):
        saved = [str(n) for g in groups for n in g["param_names"]]
        if names is not None and [str(n) for n in names] != saved:
            raise ValueError(
                "names differs from the param_names of the torch state dict: "
                f"{_short([str(n) for n in names])} vs {_short(saved)}"
            )
        return saved, "the param_names of the torch state dict"
    return names, "names"


def _check_group_names(layout: _Layout, groups: list) -> None:
    for g, group in enumerate(groups):
        if "param_names" not in group:
            continue
        theirs, ours = list(map(str, group["param_names"])), layout.group_names(g)
        if sorted(theirs) != sorted(ours):
            raise ValueError(
                f"param_groups[{g}] holds {_short(theirs)} in the torch state "
                f"dict and {_short(ours)} in funcopt's group {layout.names[g]!r}"
            )


def _state_entry(states: Mapping, pid: Any) -> Any:
    if pid in states:
        return states[pid]
    if str(pid) in states:  # after a JSON round trip
        return states[str(pid)]
    return None


# --------------------------------------------------------------------------
# scheduler keys in param_groups
# --------------------------------------------------------------------------


def _children(sched, s):
    return list(zip(sched.schedulers, s.schedulers))


def _scheduler_group_keys(sched: Any, s: Any) -> dict[str, np.ndarray]:
    """The keys torch's schedulers write into param_groups, per group."""
    keys: dict[str, np.ndarray] = {}

    def visit(sched, s):
        name = sched.name
        if name in ("ChainedScheduler", "SequentialLR"):
            for c, cs in _children(sched, s):
                visit(c, cs)
            return
        if name == "ReduceLROnPlateau":
            return
        if name == "OneCycleLR":
            keys["initial_lr"] = np.asarray(s.initial_lrs)  # overwritten
            keys["max_lr"] = np.asarray(s.max_lrs)
            keys["min_lr"] = np.asarray(s.min_lrs)
        else:
            keys.setdefault("initial_lr", np.asarray(s.base_lrs))
        if name in ("CyclicLR", "OneCycleLR") and sched.cycle_momentum:
            keys["max_momentum"] = np.asarray(s.max_momentums)
            keys["base_momentum"] = np.asarray(s.base_momentums)
        if name == "SWALR":
            keys["swa_lr"] = np.asarray(s.swa_lrs)

    visit(sched, s)
    return keys


# --------------------------------------------------------------------------
# optimizers: export
# --------------------------------------------------------------------------


def state_dict(
    opt: Any,
    state: Any,
    params: Any = None,
    *,
    sched: Any = None,
    sched_state: Any = None,
    names: Any = None,
) -> dict[str, Any]:
    """`torch_optimizer.state_dict()` of the equivalent torch optimizer.

    Args:
      opt: the funcopt optimizer (`fo.adam(...)`, `fo.lbfgs(...)`, ...).
      state: its state (`OptState` / `LBFGSState`), or a
        [`TrainState`][funcopt.TrainState] (its `opt_state`, and its
        `params` when `params` is not given).
      params: the parameters the state belongs to (for the ids and groups).
      sched: optionally a funcopt scheduler (with `sched_state`): the keys
        torch's schedulers add to `param_groups` (`initial_lr`, ...) are
        written too, so a torch scheduler can resume with `last_epoch >= 0`
        or through its own `load_state_dict`.
      sched_state: the state of `sched`.
      names: torch's parameter order as dotted leaf names, e.g.
        `[n for n, _ in model.named_parameters()]`, when the leaves of
        `params` are in another order (a tree built by hand: JAX flattens
        dicts in sorted key order). Not needed for params from
        [`module_state_dict_to_params`][funcopt.torch_interop.module_state_dict_to_params].

    Returns `{"state": {id: {...}}, "param_groups": [...]}` with torch
    tensors, accepted by `torch_optimizer.load_state_dict` (module doc); each
    group lists its parameters' dotted names under `"param_names"`, as
    torch writes them for an optimizer built from `named_parameters()`.
    """
    state, params = _unwrap_train_state(state, params)
    if opt.name == "LBFGS":
        out = _lbfgs_state_dict(opt, state, params, names)
    else:
        out = _state_dict(opt, state, params, names)
    if sched is not None:
        for key, values in _scheduler_group_keys(sched, sched_state).items():
            for g, group in enumerate(out["param_groups"]):
                group[key] = float(values[g])
    return out


def _state_dict(opt, state, params, names):
    torch = _torch()
    definition = opt.definition
    layout = _layout(opt, params, names)
    if set(state.hparams) != set(definition.hyperparams):
        raise ValueError(
            f"this state was made by another optimizer: it holds hyperparameters "
            f"{sorted(state.hparams)}, {opt.name} has {sorted(definition.hyperparams)}"
        )
    if state.step.shape != (len(layout.leaves),):
        raise ValueError(
            f"this state was made for a param tree with {state.step.shape[0]} "
            f"leaves; params have {len(layout.leaves)}"
        )
    param_groups = []
    for g, gname in enumerate(layout.names):
        values = definition.group_values(gname)
        group = {k: v for k, v in opt.defaults.items()}
        group.update({k: v for k, v in values.items() if k in definition.options})
        for k in definition.hyperparams:
            value = _py_value(np.asarray(state.hparams[k][g]), values[k])
            group[k] = _as_tensors(value, values[k])
        if opt.name == "Adafactor":
            group["eps"] = _decode_adafactor_eps(tuple(group["eps"]))
        group["params"] = [layout.id_of[i] for i in layout.members[g]]
        group["param_names"] = layout.group_names(g)
        param_groups.append(group)

    steps = np.asarray(state.step)
    slots = {
        k: layout.treedef.flatten_up_to(t) for k, t in state.unpacked().slots.items()
    }
    out_state = {}
    for group in layout.members:
        for i in group:
            has = steps[i] > 0 or opt.name in _EAGER
            own = {k: v[i] for k, v in slots.items() if v[i] is not None}
            if opt.name in _NO_STEP and not own:
                has = False
            if not has:
                continue
            entry = {}
            if opt.name == "SparseAdam":
                entry["step"] = int(steps[i])
            elif opt.name not in _NO_STEP:
                entry["step"] = torch.tensor(float(steps[i]), dtype=_scalar_dtype())
            for k, v in own.items():
                entry[k] = _to_tensor(v)
            out_state[layout.id_of[i]] = entry
    return {"state": out_state, "param_groups": param_groups}


# --------------------------------------------------------------------------
# optimizers: import
# --------------------------------------------------------------------------


def load_state_dict(
    opt: Any, params: Any, torch_state_dict: Mapping, *, names: Any = None
) -> Any:
    """A funcopt state from `torch_optimizer.state_dict()`.

    The torch optimizer must be the equivalent of `opt` on `params`: the
    same class, the same number of groups with the same sizes, the same
    static options. Hyperparameters (`lr`, ...) come from the state dict, as
    torch's `load_state_dict` takes them. Buffers are cast to the
    parameter's dtype (torch does the same) and must have its shape.

    Parameters are matched by name when the state dict has torch's
    `param_names` (an optimizer built from `model.named_parameters()`, or
    one that loaded a funcopt export); otherwise by id, in the order
    `names` gives (`[n for n, _ in model.named_parameters()]` for an
    optimizer built from `model.parameters()`), by default the leaves'
    flattening order (module doc). Raises `ValueError` naming what differs,
    and both orders when shapes show that they differ.

    `params` may be a [`TrainState`][funcopt.TrainState]: the result is then
    that TrainState with the loaded `opt_state`, ready to resume.
    """
    from .train_state import TrainState

    if isinstance(params, TrainState):
        loaded = load_state_dict(opt, params.params, torch_state_dict, names=names)
        return dataclasses.replace(params, opt_state=loaded)
    sd = torch_state_dict
    if not isinstance(sd, Mapping) or "param_groups" not in sd or "state" not in sd:
        raise TypeError(
            "expected torch_optimizer.state_dict(): a dict with 'state' and "
            f"'param_groups', got {type(sd).__name__}"
        )
    if opt.name == "LBFGS":
        return _lbfgs_load(opt, params, sd, names)
    definition = opt.definition
    groups = list(sd["param_groups"])
    _check_groups(opt.name, set(opt.defaults), groups)
    order, source = _torch_order(groups, names)
    layout = _layout(opt, params, order, source)
    _check_group_sizes(layout, groups)
    _check_group_names(layout, groups)
    state0 = opt.init(params).unpacked()

    hparams = {}
    for g, (group, gname) in enumerate(zip(groups, layout.names)):
        values = definition.group_values(gname)
        for k in definition.options:
            if not _same(group[k], values[k]):
                raise ValueError(
                    f"param_groups[{g}][{k!r}] is {group[k]!r} in the torch state "
                    f"dict and {values[k]!r} in the funcopt optimizer; static "
                    f"options must match (build funcopt.{opt.name.lower()} with "
                    f"{k}={group[k]!r})"
                )
    for k, old in state0.hparams.items():
        rows = [np.asarray(_encode(group[k]), np.float64) for group in groups]
        new = np.stack(rows).reshape(old.shape)
        hparams[k] = jnp.asarray(new, dtype=old.dtype)

    torch_ids = [pid for group in groups for pid in group["params"]]
    steps = np.zeros(len(layout.leaves), np.int32)
    slots = {k: list(layout.treedef.flatten_up_to(t)) for k, t in state0.slots.items()}
    for i, pid in layout.id_of.items():
        entry = _state_entry(sd["state"], torch_ids[pid])
        if not entry:
            continue
        own = [k for k in slots if slots[k][i] is not None]
        allowed = set(own) | ({"step"} if opt.name not in _NO_STEP else set())
        unknown = sorted(set(entry) - allowed)
        missing = sorted(set(own) - set(entry))
        where = f"parameter {pid} (params{layout.paths[i]})"
        if unknown or (missing and opt.name not in _NO_STEP):
            raise ValueError(
                f"{where}: the torch state has keys {sorted(entry)}; this "
                f"funcopt.{opt.name.lower()} keeps {sorted(allowed)} for it "
                f"(missing {missing}, unexpected {unknown})"
            )
        if opt.name in _NO_STEP:
            steps[i] = 1 if entry else 0
        else:
            steps[i] = int(round(_as_float(entry["step"])))
        for k in own:
            if k not in entry:
                continue
            ref = slots[k][i]
            value = _to_numpy(entry[k])
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{where}: {k!r} has shape {tuple(value.shape)} in the torch "
                    f"state dict, funcopt expects {tuple(ref.shape)}. "
                    + layout.order_hint()
                )
            slots[k][i] = jnp.asarray(value.astype(ref.dtype))
    state = state0._replace(
        step=jnp.asarray(steps),
        hparams=hparams,
        slots={k: layout.treedef.unflatten(v) for k, v in slots.items()},
    )
    # in the layout init makes (packed buffers by default)
    return _multi_tensor.pack_state(definition, params, state)


# --------------------------------------------------------------------------
# LBFGS
# --------------------------------------------------------------------------


def _lbfgs_state_dict(opt, state, params, names):
    torch = _torch()
    layout = _Layout(opt.param_groups, params)
    _check_lbfgs_order(layout, names)
    group = dict(opt.defaults)
    if opt.param_groups is not None:
        group.update(opt.param_groups.overrides.get(layout.names[0], {}))
    for k, v in state.hparams.items():
        group[k] = _py_value(np.asarray(v[0]), group[k])
    group["params"] = list(range(len(layout.trainable)))
    group["param_names"] = layout.group_names(0)
    out_state = {}
    func_evals, n_iter = int(state.func_evals), int(state.n_iter)
    if func_evals > 0 and layout.trainable:
        entry: dict[str, Any] = {"func_evals": func_evals, "n_iter": n_iter}
        if n_iter > 0:
            h = state.old_dirs.shape[0]
            count, start = int(state.history_count), int(state.history_start)
            rows = [(start + j) % h for j in range(count)]
            old_dirs, old_stps = np.asarray(state.old_dirs), np.asarray(state.old_stps)
            ro = np.asarray(state.ro)
            entry.update(
                d=_to_tensor(state.d),
                t=float(state.t),
                old_dirs=[_to_tensor(old_dirs[r]) for r in rows],
                old_stps=[_to_tensor(old_stps[r]) for r in rows],
                ro=[_to_tensor(ro[r]) for r in rows],
                H_diag=_to_tensor(state.H_diag),
                prev_flat_grad=_to_tensor(state.prev_flat_grad),
                prev_loss=float(state.prev_loss),
            )
        out_state[0] = entry
    del torch
    return {"state": out_state, "param_groups": [group]}


def _check_lbfgs_order(layout: _Layout, order: Any) -> None:
    """LBFGS's state is flat vectors laid out in parameter order: another
    torch order would need them permuted, which is not done."""
    ours = layout.group_names(0) if layout.members else []
    if order is not None and [str(n) for n in order] != ours:
        raise ValueError(
            "LBFGS keeps flat vectors in parameter order, so the torch order must "
            f"be the leaves' flattening order {_short(ours)}; got "
            f"{_short([str(n) for n in order])}. Build params in torch's order "
            "(module_state_dict_to_params(dict(model.named_parameters())))"
        )


def _lbfgs_load(opt, params, sd, names):
    groups = list(sd["param_groups"])
    _check_groups("LBFGS", set(opt.defaults), groups)
    layout = _Layout(opt.param_groups, params)
    _check_group_sizes(layout, groups)
    _check_lbfgs_order(layout, _torch_order(groups, names)[0])
    state0 = opt.init(params)
    group = groups[0]
    ours = dict(opt.defaults)
    if opt.param_groups is not None:
        ours.update(opt.param_groups.overrides.get(layout.names[0], {}))
    for k in _LBFGS_STATIC:
        if not _same(group[k], ours[k]):
            raise ValueError(
                f"param_groups[0][{k!r}] is {group[k]!r} in the torch state dict "
                f"and {ours[k]!r} in the funcopt optimizer; they must match "
                f"(build funcopt.lbfgs with {k}={group[k]!r})"
            )
    hparams = {
        k: jnp.asarray([_as_float(group[k])], dtype=v.dtype)
        for k, v in state0.hparams.items()
    }
    state = state0._replace(hparams=hparams)
    entry = _state_entry(sd["state"], group["params"][0]) if group["params"] else None
    if not entry:
        return state
    vdt = state0.d.dtype
    n = state0.d.shape[0]
    h = state0.old_dirs.shape[0]

    def vec(x, what):
        v = _to_numpy(x).astype(vdt).reshape(-1)
        if v.shape != (n,):
            raise ValueError(
                f"LBFGS state {what!r} has {v.size} entries in the torch state "
                f"dict; the flat vector of params has {n}"
            )
        return v

    state = state._replace(
        func_evals=jnp.asarray(int(entry.get("func_evals", 0)), jnp.int32),
        n_iter=jnp.asarray(int(entry.get("n_iter", 0)), jnp.int32),
    )
    if entry.get("d") is None:
        return state
    old_dirs = list(entry.get("old_dirs") or [])
    old_stps = list(entry.get("old_stps") or [])
    ro = list(entry.get("ro") or [])
    if len(old_dirs) > h:
        raise ValueError(
            f"the torch LBFGS history holds {len(old_dirs)} pairs; history_size is {h}"
        )
    dirs = np.zeros((h, n), vdt)
    stps = np.zeros((h, n), vdt)
    ros = np.zeros((h,), vdt)
    for j, (y, s, r) in enumerate(zip(old_dirs, old_stps, ro)):
        dirs[j], stps[j], ros[j] = vec(y, "old_dirs"), vec(s, "old_stps"), _as_float(r)
    prev = entry.get("prev_flat_grad")
    sdt = state0.t.dtype
    return state._replace(
        d=jnp.asarray(vec(entry["d"], "d")),
        t=jnp.asarray(_as_float(entry.get("t", 0.0)), sdt),
        prev_flat_grad=jnp.asarray(
            np.zeros(n, vdt) if prev is None else vec(prev, "prev_flat_grad")
        ),
        prev_loss=jnp.asarray(_as_float(entry.get("prev_loss", 0.0)), sdt),
        H_diag=jnp.asarray(_as_float(entry.get("H_diag", 1.0)), vdt),
        old_dirs=jnp.asarray(dirs),
        old_stps=jnp.asarray(stps),
        ro=jnp.asarray(ros),
        history_count=jnp.asarray(len(old_dirs), jnp.int32),
        history_start=jnp.asarray(0, jnp.int32),
    )


# --------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------

# funcopt attribute -> torch state_dict key, per scheduler: the configuration
# torch keeps in its state_dict (compared on import, written on export)
_CONFIG = {
    "StepLR": ("step_size", "gamma"),
    "MultiStepLR": ("milestones", "gamma"),
    "ConstantLR": ("factor", "total_iters"),
    "LinearLR": ("start_factor", "end_factor", "total_iters"),
    "ExponentialLR": ("gamma",),
    "PolynomialLR": ("total_iters", "power"),
    "CosineAnnealingLR": ("T_max", "eta_min"),
    "CosineAnnealingWarmRestarts": ("T_0", "T_mult", "eta_min"),
    "CyclicLR": ("total_size", "step_ratio", "mode", "gamma", "scale_mode"),
    "OneCycleLR": ("total_steps",),
    "SWALR": ("anneal_epochs",),
    "ReduceLROnPlateau": (
        "mode",
        "factor",
        "patience",
        "threshold",
        "threshold_mode",
        "cooldown",
        "eps",
    ),
}
_PHASE_KEYS = {
    "initial": "initial_lr",
    "max": "max_lr",
    "min": "min_lr",
    "max_m": "max_momentum",
    "base_m": "base_momentum",
}


# keys a torch scheduler may hold besides what funcopt exports
_BENIGN_KEYS = {
    "use_beta1",
    "base_momentums",
    "max_momentums",
    "_scale_fn_custom",
    "_scale_fn_ref",
    "lr_lambdas",
    "default_min_lr",
    "mode_worse",
    "_last_lr",
    "_is_initial",
    "_get_lr_called_within_step",
    "verbose",
}


def _plain(x: float) -> Any:
    return int(x) if float(x).is_integer() else float(x)


def _floats(x: Any) -> list[float]:
    return [float(v) for v in np.asarray(x).reshape(-1)]


def scheduler_state_dict(sched: Any, sched_state: Any, state: Any) -> dict[str, Any]:
    """`torch_scheduler.state_dict()` of the equivalent torch scheduler.

    `state` is the optimizer state the scheduler drives (its lrs are
    `_last_lr`). The dict holds torch's step counters (`last_epoch`,
    `_step_count`), `base_lrs`, the scheduler's own state (`T_cur`,
    `best`, ...) and its configuration keys; the per-group keys torch keeps
    in `param_groups` (`initial_lr`, OneCycleLR's `max_lr`, ...) go into
    the optimizer's dict: pass `sched=, sched_state=` to
    [`state_dict`][funcopt.torch_interop.state_dict]. Composite schedulers nest their
    children under `_schedulers`; a child's `_last_lr` is written as the current lrs
    (torch's is the lr that child last computed; it is only reported, never used).
    """
    from ._hparams import get_hparam

    lrs = [float(x) for x in get_hparam(state, "lr")]
    momentum_kind = "betas"
    try:
        get_hparam(state, "betas")
    except KeyError:
        momentum_kind = "momentum"
    return _sched_export(sched, sched_state, lrs, momentum_kind)


def _sched_export(sched, s, lrs, momentum_kind):
    name = sched.name
    if name == "ChainedScheduler":
        return {
            "_last_lr": list(lrs),
            "_schedulers": [
                _sched_export(c, cs, lrs, momentum_kind)
                for c, cs in _children(sched, s)
            ],
        }
    if name == "SequentialLR":
        return {
            "_milestones": list(sched.milestones),
            "last_epoch": int(s.last_epoch),
            "_last_lr": list(lrs),
            "_schedulers": [
                _sched_export(c, cs, lrs, momentum_kind)
                for c, cs in _children(sched, s)
            ],
        }
    out = {k: getattr(sched, k) for k in _CONFIG.get(name, ())}
    if name == "ReduceLROnPlateau":
        min_lr = sched.min_lr
        out.update(
            last_epoch=int(s.last_epoch),
            best=float(s.best),
            num_bad_epochs=int(s.num_bad_epochs),
            cooldown_counter=int(s.cooldown_counter),
            min_lrs=_floats(s.min_lrs),
            default_min_lr=None if isinstance(min_lr, (list, tuple)) else min_lr,
            mode_worse=sched.mode_worse,
            _last_lr=list(lrs),
        )
        return out
    if name == "MultiStepLR":
        out["milestones"] = collections.Counter(sched.milestones)
    out.update(
        base_lrs=_floats(s.base_lrs),
        last_epoch=int(s.last_epoch),
        _step_count=int(s.step_count),
        _is_initial=False,
        _get_lr_called_within_step=False,
        _last_lr=list(lrs),
    )
    if name in ("LambdaLR", "MultiplicativeLR"):
        out["lr_lambdas"] = [None] * len(lrs)
    elif name == "CosineAnnealingWarmRestarts":
        out.update(T_cur=_plain(s.T_cur), T_i=_plain(s.T_i))
    elif name == "CyclicLR":
        out.update(
            max_lrs=_floats(s.max_lrs),
            cycle_momentum=sched.cycle_momentum,
            _scale_fn_custom=None,
        )
        if sched.cycle_momentum:
            out.update(
                use_beta1=momentum_kind == "betas",
                base_momentums=_floats(s.base_momentums),
                max_momentums=_floats(s.max_momentums),
            )
    elif name == "OneCycleLR":
        out.update(
            _anneal_func_type=sched.anneal_strategy,
            cycle_momentum=sched.cycle_momentum,
            _schedule_phases=[
                {
                    "end_step": end,
                    "start_lr": _PHASE_KEYS[lr0],
                    "end_lr": _PHASE_KEYS[lr1],
                    "start_momentum": _PHASE_KEYS[m0],
                    "end_momentum": _PHASE_KEYS[m1],
                }
                for end, lr0, lr1, m0, m1 in sched.phases
            ],
        )
        if sched.cycle_momentum:
            out["use_beta1"] = momentum_kind == "betas"
    elif name == "SWALR":
        out["_anneal_strategy"] = sched.anneal_strategy
    return out


def load_scheduler_state_dict(
    sched: Any,
    state: Any,
    torch_scheduler_state_dict: Mapping,
    torch_optimizer_state_dict: Mapping | None = None,
) -> Any:
    """A funcopt `sched_state` from `torch_scheduler.state_dict()`.

    `state` is the funcopt optimizer state (already loaded with
    [`load_state_dict`][funcopt.torch_interop.load_state_dict]); `sched` must be built
    with the torch scheduler's arguments (configuration keys present in the dict are
    compared; a difference raises `ValueError`). OneCycleLR and SWALR keep
    per-group values in torch's `param_groups`: pass
    `torch_optimizer.state_dict()` as `torch_optimizer_state_dict`.
    """
    _, template = sched.init(state)
    groups = None
    if torch_optimizer_state_dict is not None:
        groups = list(torch_optimizer_state_dict["param_groups"])
    return _sched_import(sched, template, dict(torch_scheduler_state_dict), groups)


def _require(sd: Mapping, keys, name: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(
            f"this is not a torch {name} state dict: it lacks {missing} "
            f"(it has {sorted(sd)})"
        )


def _group_key(groups, key, name, like):
    if groups is None:
        raise ValueError(
            f"{name} keeps {key!r} in the optimizer's param_groups: pass "
            "torch_optimizer.state_dict() as torch_optimizer_state_dict"
        )
    if any(key not in g for g in groups):
        raise ValueError(f"the torch optimizer's param_groups lack {key!r} ({name})")
    return jnp.asarray([_as_float(g[key]) for g in groups], like.dtype)


def _sched_import(sched, t, sd, groups):
    name = sched.name
    if name in ("ChainedScheduler", "SequentialLR"):
        _require(sd, ["_schedulers"], name)
        children = sd["_schedulers"]
        if len(children) != len(sched.schedulers):
            raise ValueError(
                f"the torch {name} has {len(children)} schedulers, the funcopt one "
                f"{len(sched.schedulers)}"
            )
        states = tuple(
            _sched_import(c, cs, dict(csd), groups)
            for c, cs, csd in zip(sched.schedulers, t.schedulers, children)
        )
        if name == "SequentialLR":
            _require(sd, ["_milestones", "last_epoch"], name)
            if list(sd["_milestones"]) != list(sched.milestones):
                raise ValueError(
                    f"SequentialLR milestones differ: torch {list(sd['_milestones'])}"
                    f", funcopt {list(sched.milestones)}"
                )
            return t._replace(
                last_epoch=jnp.asarray(int(sd["last_epoch"]), jnp.int32),
                schedulers=states,
            )
        return t._replace(schedulers=states)

    config = _CONFIG.get(name, ())
    n_groups = (t.min_lrs if name == "ReduceLROnPlateau" else t.base_lrs).shape[0]
    known = set(_sched_export(sched, t, [0.0] * n_groups, "momentum"))
    unexpected = sorted(set(sd) - known - _BENIGN_KEYS)
    if unexpected:
        raise ValueError(
            f"this is not a torch {name} state dict: it has {unexpected}, which "
            f"{name} does not keep (it has {sorted(sd)})"
        )
    if name == "ReduceLROnPlateau":
        _require(sd, ["best", "num_bad_epochs", "cooldown_counter", *config], name)
    elif name == "CosineAnnealingWarmRestarts":
        _require(sd, ["T_cur", "T_i", "base_lrs", "last_epoch", *config], name)
    else:
        _require(sd, ["base_lrs", "last_epoch", "_step_count", *config], name)
    for k in config:
        ours = getattr(sched, k)
        theirs = sd[k]
        if k == "milestones":
            ours, theirs = collections.Counter(ours), collections.Counter(theirs)
        if not _same(theirs, ours):
            raise ValueError(
                f"{name} {k!r} differs: {theirs!r} in the torch state dict, "
                f"{ours!r} in the funcopt scheduler"
            )

    def arr(x, like):
        return jnp.asarray(np.asarray(x, np.float64), like.dtype).reshape(like.shape)

    def i32(x):
        return jnp.asarray(int(x), jnp.int32)

    if name == "ReduceLROnPlateau":
        return t._replace(
            last_epoch=i32(sd["last_epoch"]),
            best=arr(float(sd["best"]), t.best),
            num_bad_epochs=i32(sd["num_bad_epochs"]),
            cooldown_counter=i32(sd["cooldown_counter"]),
            min_lrs=arr([float(x) for x in sd["min_lrs"]], t.min_lrs),
        )
    n = t.base_lrs.shape[0]
    if len(sd["base_lrs"]) != n:
        raise ValueError(
            f"the torch {name} has {len(sd['base_lrs'])} base_lrs, the funcopt "
            f"state {n} parameter groups"
        )
    new = dict(
        last_epoch=i32(sd["last_epoch"]),
        step_count=i32(sd.get("_step_count", 0)),
        base_lrs=arr([float(x) for x in sd["base_lrs"]], t.base_lrs),
    )
    if name == "CosineAnnealingWarmRestarts":
        new.update(
            T_cur=arr(float(sd["T_cur"]), t.T_cur), T_i=arr(float(sd["T_i"]), t.T_i)
        )
    elif name == "CyclicLR":
        new["max_lrs"] = arr([float(x) for x in sd["max_lrs"]], t.max_lrs)
        if sched.cycle_momentum:
            new["base_momentums"] = arr(sd["base_momentums"], t.base_momentums)
            new["max_momentums"] = arr(sd["max_momentums"], t.max_momentums)
    elif name == "OneCycleLR":
        like = t.base_lrs
        new.update(
            initial_lrs=_group_key(groups, "initial_lr", name, like),
            max_lrs=_group_key(groups, "max_lr", name, like),
            min_lrs=_group_key(groups, "min_lr", name, like),
        )
        if sched.cycle_momentum:
            new["base_momentums"] = _group_key(groups, "base_momentum", name, like)
            new["max_momentums"] = _group_key(groups, "max_momentum", name, like)
    elif name == "SWALR":
        new["swa_lrs"] = _group_key(groups, "swa_lr", name, t.base_lrs)
    return t._replace(**new)


# --------------------------------------------------------------------------
# module weights
# --------------------------------------------------------------------------


def module_state_dict_to_params(
    module_state_dict: Mapping,
) -> collections.OrderedDict[str, Any]:
    """`model.state_dict()` (name -> tensor) as nested dicts of JAX arrays,
    in torch's order.

    `"encoder.0.weight"` becomes `params["encoder"]["0"]["weight"]`;
    layouts and dtypes are kept (float64 needs `jax_enable_x64`; without it
    JAX stores float32). See the module doc for `nn.Linear`'s `(out, in)`.

    The dicts are `collections.OrderedDict`s in the order of
    `module_state_dict`, which JAX flattens in that order (a plain `dict`
    flattens in sorted key order): for `dict(model.named_parameters())`,
    `jax.tree.leaves(params)` and [`param_names`][funcopt.torch_interop.param_names]
    follow torch's registration order, so funcopt's parameter ids are those
    of `torch.optim.X(model.parameters())`.

    **Tied weights.** Entries that are the same tensor (nanoGPT's
    `lm_head.weight` is `transformer.wte.weight`; `model.state_dict()` lists
    both names, `named_parameters()` only the first) become ONE leaf, under
    the first name: gradients through both uses add up in it, as they do in
    torch's shared parameter. [`tied_names`][funcopt.torch_interop.tied_names]
    lists the dropped aliases; pass them to
    [`params_to_module_state_dict`][funcopt.torch_interop.params_to_module_state_dict]
    to write every name back for `model.load_state_dict`.
    """
    aliases = tied_names(module_state_dict)
    out: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for name, value in module_state_dict.items():
        if name in aliases:
            continue
        parts = str(name).split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, collections.OrderedDict())
            if not isinstance(child, collections.OrderedDict):
                raise ValueError(
                    f"{name!r}: {part!r} is both a tensor and a module prefix"
                )
            node = child
        if parts[-1] in node:
            raise ValueError(f"{name!r}: also a module prefix of other entries")
        node[parts[-1]] = jnp.asarray(_to_numpy(value))
    return out


def params_to_module_state_dict(
    params: Any, tied: Mapping[str, str] | None = None
) -> collections.OrderedDict:
    """A pytree of arrays as `{dotted name: torch.Tensor}` for
    `model.load_state_dict` (the inverse of
    [`module_state_dict_to_params`][funcopt.torch_interop.module_state_dict_to_params];
    any pytree, its key path joined with dots).

    `tied` (`{alias: name}`, from [`tied_names`][funcopt.torch_interop.tied_names])
    adds each tied alias as the same tensor as its name, so a module with
    tied weights loads with `strict=True`.
    """
    out = collections.OrderedDict()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[".".join(_key_name(k) for k in path)] = _to_tensor(leaf)
    for alias, name in (tied or {}).items():
        if name not in out:
            raise ValueError(f"tied alias {alias!r}: params has no leaf {name!r}")
        out[alias] = out[name]
    return out


def tied_names(module_state_dict: Mapping) -> dict[str, str]:
    """`{alias: first name}` for the entries of `model.state_dict()` that are
    the same tensor as an earlier entry (tied weights: the same storage,
    offset, shape, strides and dtype), e.g.
    `{"lm_head.weight": "transformer.wte.weight"}` for nanoGPT."""
    first: dict[Any, str] = {}
    aliases = {}
    for name, value in module_state_dict.items():
        key = _tensor_identity(value)
        if key is None:
            continue
        if key in first:
            aliases[str(name)] = first[key]
        else:
            first[key] = str(name)
    return aliases


def _tensor_identity(value: Any) -> Any:
    """What makes two torch tensors the same tensor; None for other arrays
    and for tensors without elements (which share no data)."""
    if type(value).__module__.split(".")[0] != "torch" or not hasattr(
        value, "untyped_storage"
    ):
        return None
    if value.numel() == 0:
        return None
    return (
        value.untyped_storage().data_ptr(),
        value.storage_offset(),
        tuple(value.shape),
        tuple(value.stride()),
        value.dtype,
    )


def _loop_rounding(size: int, trials: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per element of a `size`-element 16-bit `x.add(o, alpha=a)`: did it
    ever round as torch's vectorised loop alone, and as its scalar loop alone
    (`alpha*o` rounded to 16 bits first)?
    """
    torch = _torch()
    rng = np.random.default_rng(0)
    alpha = 0.1234567
    vectorised = np.zeros(size, bool)
    scalar = np.zeros(size, bool)
    for _ in range(trials):
        x, o = (
            torch.tensor(rng.normal(size=size), dtype=torch.float32).to(dtype)
            for _ in range(2)
        )
        out = x.add(o, alpha=alpha).float().numpy()
        a = torch.tensor(alpha, dtype=dtype).float()
        once = (x.float() + a * o.float()).to(dtype).float().numpy()
        twice = (x.float() + (a * o.float()).to(dtype).float()).to(dtype)
        twice = twice.float().numpy()
        vectorised |= (out == once) & (out != twice)
        scalar |= (out == twice) & (out != once)
    return vectorised, scalar


def _scalar_loop_start(size: int, trials: int, dtype) -> int | None:
    """Where torch's scalar loop starts in a `size`-element 16-bit op:
    `size` if it never ran, `None` if no element ever rounded as the
    vectorised loop does (there is none)."""
    vectorised, scalar = _loop_rounding(size, trials, dtype)
    if not vectorised.any():
        return None
    start = int(np.argmax(scalar)) if scalar.any() else size
    if vectorised[start:].any():
        raise RuntimeError(
            f"torch's {dtype} add(alpha=) does not split into vectorised blocks "
            f"and a scalar tail at {size} elements"
        )
    return start


def measure_torch_cpu_block(trials: int = 256) -> int | None:
    """The block size of this process's torch CPU loop for 16-bit tensors.

    torch runs a 16-bit elementwise op in vectorised blocks and the last
    elements in a scalar loop, and the two round `add(other, alpha=)`
    differently. This runs that op on random data and finds where the scalar
    loop starts: 32 on x86 with AVX2 or AVX-512, `None` when torch runs no
    vectorised loop (`ATEN_CPU_CAPABILITY=default`). Pass the result to
    [`funcopt.precision.set_torch_cpu_block`][funcopt.precision.set_torch_cpu_block] so
    bfloat16/float16 steps round as that torch does. Raises `RuntimeError` if the
    rounding does not split into power-of-two blocks (up to 4096) and a tail, the same
    for bfloat16 and float16.
    """
    torch = _torch()
    blocks = set()
    for dtype in (torch.bfloat16, torch.float16):
        # 4095 elements: a power-of-two block leaves a tail of block - 1; an
        # odd second size checks the block found
        start = _scalar_loop_start(4095, trials, dtype)
        block = None if start is None else 4096 - start
        expected = None if block is None else 999 - 999 % block
        if _scalar_loop_start(999, trials, dtype) != expected:
            raise RuntimeError(
                f"torch's {dtype} CPU loop: blocks of {block} at 4095 elements, "
                "not at 999"
            )
        blocks.add(block)
    if len(blocks) != 1:
        raise RuntimeError(f"torch's 16-bit CPU loops disagree: blocks {blocks}")
    return blocks.pop()


# --------------------------------------------------------------------------
# torch.amp.GradScaler state dicts
# --------------------------------------------------------------------------


def grad_scaler_state_dict(scaler: Any, state: Any) -> dict[str, Any]:
    """`torch_scaler.state_dict()` of a
    [`funcopt.amp.GradScaler`][funcopt.amp.GradScaler].

    `{"scale": float, "growth_factor": ..., "backoff_factor": ...,
    "growth_interval": int, "_growth_tracker": int}` from the scaler's
    arguments and its [`GradScalerState`][funcopt.amp.GradScalerState], which
    `torch.amp.GradScaler(...).load_state_dict` accepts; `{}` for a disabled
    scaler, as torch writes. Does not need torch.
    """
    from .amp import GradScaler, _check_state

    if not isinstance(scaler, GradScaler):
        raise TypeError(
            f"grad_scaler_state_dict expects a funcopt.amp.GradScaler, got "
            f"{type(scaler).__name__}"
        )
    _check_state(state)
    if not scaler.enabled:
        return {}
    return {
        "scale": float(np.asarray(state.scale, np.float32)),
        "growth_factor": scaler.growth_factor,
        "backoff_factor": scaler.backoff_factor,
        "growth_interval": scaler.growth_interval,
        "_growth_tracker": int(np.asarray(state.growth_tracker)),
    }


def load_grad_scaler_state_dict(scaler: Any, state_dict: Mapping[str, Any]) -> Any:
    """`torch_scaler.load_state_dict(sd)` for a
    [`funcopt.amp.GradScaler`][funcopt.amp.GradScaler].

    Returns `(scaler, state)`: like torch's `load_state_dict`, the dict's
    `growth_factor`, `backoff_factor` and `growth_interval` replace the
    scaler's (they are static configuration here, so the scaler returned is a
    new one when they differ; like torch, they are not validated again), and
    `scale` (rounded to float32) and `_growth_tracker` (int32) make the state.
    A disabled scaler ignores the dict (torch's no-op) and returns
    `(scaler, scaler.init())`. Does not need torch.

    Raises:
      RuntimeError: an empty dict for an enabled scaler (torch's "The source
        state dict is empty, possibly because it was saved from a disabled
        instance of GradScaler."), or a value that overflows float32/int32.
      KeyError: a missing key, as in torch.
    """
    from .amp import GradScaler, GradScalerState, _float32_fill

    if not isinstance(scaler, GradScaler):
        raise TypeError(
            f"load_grad_scaler_state_dict expects a funcopt.amp.GradScaler, got "
            f"{type(scaler).__name__}"
        )
    if not scaler.enabled:
        return scaler, scaler.init()
    if len(state_dict) == 0:
        raise RuntimeError(
            "The source state dict is empty, possibly because it was saved "
            "from a disabled instance of GradScaler."
        )
    scale = _float32_fill(state_dict["scale"])
    tracker = int(state_dict["_growth_tracker"])
    if not -(2**31) <= tracker < 2**31:
        raise RuntimeError("value cannot be converted to type int without overflow")
    new = object.__new__(GradScaler)  # torch does not validate loaded values
    for field in dataclasses.fields(GradScaler):
        object.__setattr__(new, field.name, getattr(scaler, field.name))
    object.__setattr__(new, "init_scale", state_dict["scale"])
    for key in ("growth_factor", "backoff_factor", "growth_interval"):
        object.__setattr__(new, key, state_dict[key])
    return new, GradScalerState(
        scale=jnp.asarray(scale, jnp.float32),
        growth_tracker=jnp.asarray(tracker, jnp.int32),
    )


__all__ = [
    "SCHEDULER_GROUP_KEYS",
    "averaged_model_state_dict",
    "grad_scaler_state_dict",
    "load_averaged_model_state_dict",
    "load_grad_scaler_state_dict",
    "load_scheduler_state_dict",
    "load_state_dict",
    "measure_torch_cpu_block",
    "module_state_dict_to_params",
    "param_names",
    "params_to_module_state_dict",
    "scheduler_state_dict",
    "state_dict",
    "tied_names",
    "torch_param_groups",
]


# --------------------------------------------------------------------------
# torch.optim.swa_utils.AveragedModel state dicts
# --------------------------------------------------------------------------

_SWA_PREFIX = "module."


def _swa_leaf_names(tree: Any, names: Any, what: str) -> list[str]:
    """The dotted names of every leaf of `tree` (given, or its key paths)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if names is None:
        return [".".join(_key_name(k) for k in path) for path in paths]
    names = [str(n) for n in names]
    if len(names) != len(paths):
        raise ValueError(
            f"{what}: {len(names)} names for the {len(paths)} leaves of the "
            "averaged model's tree"
        )
    return names


def _swa_names(swa: Any, param_names: Any, buffer_names: Any, fn: str):
    from .swa_utils import AveragedModel

    if not isinstance(swa, AveragedModel):
        raise TypeError(
            f"{fn} expects a funcopt.swa_utils.AveragedModel, got {type(swa).__name__}"
        )
    p = _swa_leaf_names(swa.params, param_names, "param_names")
    b = _swa_leaf_names(swa.buffers, buffer_names, "buffer_names")
    counts = collections.Counter(p + b)
    dup = sorted(n for n, c in counts.items() if c > 1)
    if dup:
        raise ValueError(f"{fn}: names used twice in params and buffers: {dup}")
    return p, b


def averaged_model_state_dict(
    swa: Any,
    *,
    param_names: Any = None,
    buffer_names: Any = None,
    tied: Mapping[str, str] | None = None,
) -> collections.OrderedDict[str, Any]:
    """`torch_swa.state_dict()` of a funcopt
    [`AveragedModel`][funcopt.swa_utils.AveragedModel], for
    `torch.optim.swa_utils.AveragedModel(model).load_state_dict`.

    torch's `AveragedModel` is a module holding a deep copy of the model as
    `module` and one buffer, so its state dict is `n_averaged` (a 0-dim
    `int64` tensor) and `module.<name>` for every parameter and (persistent)
    buffer of the model, whatever `use_buffers` is: with `use_buffers=True`
    the buffers are averaged, with `False` they are the model's at the last
    update; either way they are `swa.buffers`. The averaging functions and
    `use_buffers` are not saved (as in torch): the torch `AveragedModel` that
    loads the dict must be built with the same ones for the averages to go on
    the same.

    The names are the leaves' key paths joined with dots, so trees built by
    [`module_state_dict_to_params`][funcopt.torch_interop.module_state_dict_to_params]
    from `named_parameters()` and `named_buffers()` give the model's names;
    for other trees (lists in `parameters()` order, say) pass `param_names`
    and `buffer_names`: the dotted name of each leaf of `swa.params` and
    `swa.buffers`, in `jax.tree.leaves` order. `tied` (`{alias: name}` from
    [`tied_names`][funcopt.torch_interop.tied_names] of the model's
    `state_dict()`, without the `module.` prefix) writes tied weights under
    each alias too, as torch's state dict lists them.

    Keys come in the order `n_averaged`, parameters, buffers, aliases (torch
    lists a module's parameters and buffers module by module;
    `load_state_dict` matches by key). Values are tensors of the arrays'
    dtypes (float64 needs `jax_enable_x64`).
    """
    torch = _torch()
    p_names, b_names = _swa_names(
        swa, param_names, buffer_names, "averaged_model_state_dict"
    )
    out: collections.OrderedDict[str, Any] = collections.OrderedDict()
    out["n_averaged"] = torch.tensor(int(np.asarray(swa.n_averaged)), dtype=torch.long)
    leaves = jax.tree.leaves(swa.params) + jax.tree.leaves(swa.buffers)
    for name, leaf in zip(p_names + b_names, leaves):
        out[_SWA_PREFIX + name] = _to_tensor(leaf)
    for alias, name in (tied or {}).items():
        if _SWA_PREFIX + name not in out:
            raise ValueError(
                f"tied alias {alias!r}: the averaged model has no {name!r}"
            )
        out[_SWA_PREFIX + alias] = out[_SWA_PREFIX + name]
    return out


def load_averaged_model_state_dict(
    swa: Any,
    state_dict: Mapping[str, Any],
    *,
    param_names: Any = None,
    buffer_names: Any = None,
    strict: bool = True,
) -> Any:
    """`swa.load_state_dict(torch_swa.state_dict())` for a funcopt
    [`AveragedModel`][funcopt.swa_utils.AveragedModel]: a new one with the
    dict's values.

    `swa` gives everything the dict does not hold: the trees' structure,
    dtypes and devices, the averaging functions and `use_buffers` (build it
    with [`averaged_model`][funcopt.swa_utils.averaged_model] as the torch
    `AveragedModel` was built). Each leaf named `name` (see
    [`averaged_model_state_dict`][funcopt.torch_interop.averaged_model_state_dict]
    for the names, `param_names` and `buffer_names`) takes `module.<name>`,
    cast to the leaf's dtype as torch's `copy_` does; `n_averaged` takes
    `n_averaged`. Entries that are tied aliases of another entry (the same
    tensor, see [`tied_names`][funcopt.torch_interop.tied_names]) are not
    expected to have a leaf of their own.

    ```python
    params = fti.module_state_dict_to_params(dict(model.named_parameters()))
    buffers = fti.module_state_dict_to_params(dict(model.named_buffers()))
    ema = fo.swa_utils.averaged_model(
        params, buffers, multi_avg_fn=fo.swa_utils.get_ema_multi_avg_fn(0.999))
    ema = fti.load_averaged_model_state_dict(ema, torch_ema.state_dict())
    ```

    Raises `ValueError` for a shape mismatch and, with `strict` (torch's
    default), for keys the averaged model lacks or does not have (torch's
    "Missing key(s)" / "Unexpected key(s)"). With `strict=False` those are
    ignored and missing leaves keep `swa`'s values. The dict holds every
    buffer of the module, so an averaged model built without `buffers`
    loads it only with `strict=False`.
    """
    p_names, b_names = _swa_names(
        swa, param_names, buffer_names, "load_averaged_model_state_dict"
    )
    aliases = tied_names(state_dict)
    used = {"n_averaged"}
    missing: list[str] = []
    mismatched: list[str] = []

    def fill(tree: Any, names: list[str]) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        new = []
        for name, leaf in zip(names, leaves):
            key = _SWA_PREFIX + name
            if key not in state_dict:
                missing.append(key)
                new.append(leaf)
                continue
            used.add(key)
            value = _to_numpy(state_dict[key])
            if value.shape != leaf.shape:
                mismatched.append(
                    f"{key}: shape {tuple(value.shape)} in the state dict, "
                    f"{tuple(leaf.shape)} in the averaged model"
                )
                new.append(leaf)
                continue
            array = jnp.asarray(value.astype(leaf.dtype))
            if isinstance(leaf, jax.Array):
                array = jax.device_put(array, leaf.sharding)
            new.append(array)
        return jax.tree.unflatten(treedef, new)

    params = fill(swa.params, p_names)
    buffers = fill(swa.buffers, b_names)
    n_averaged = swa.n_averaged
    if "n_averaged" in state_dict:
        n_averaged = jnp.asarray(
            int(_to_numpy(state_dict["n_averaged"])), jnp.asarray(n_averaged).dtype
        )
    else:
        missing.insert(0, "n_averaged")
    unexpected = [
        str(k)
        for k in state_dict
        if k not in used and not (k in aliases and aliases[k] in used)
    ]
    errors = []
    if mismatched:
        errors.append("size mismatch: " + "; ".join(mismatched))
    if strict and missing:
        errors.append(f"missing key(s): {missing}")
    if strict and unexpected:
        hint = ""
        if swa.buffers is None and any(k.startswith(_SWA_PREFIX) for k in unexpected):
            hint = (
                " (torch's state dict holds every buffer of the module: pass the "
                "model's buffers to averaged_model, or strict=False)"
            )
        errors.append(f"unexpected key(s): {unexpected}{hint}")
    if errors:
        raise ValueError("load_averaged_model_state_dict: " + "; ".join(errors))
    return dataclasses.replace(
        swa, params=params, buffers=buffers, n_averaged=n_averaged
    )
