"""Parameter groups for every optimizer of the parity table, against live torch.

Each ``OptCase`` is split into two groups, ``"default"`` (the optimizer's own
arguments) and ``"g1"``, which differs in ``lr`` *and* in every other argument
where the case's first and last flag combinations differ (weight decay,
momentum, amsgrad, ...). torch gets the same two groups as
``[{"params": default_leaves}, {"params": g1_leaves, **overrides}]``. A
``SharedLrCase`` (Prodigy) keeps the lrs equal and sets g1's lr to 0 mid run
instead: its reference allows no other lr per group. An
optimizer that torch refuses to group (LBFGS) must refuse with torch's error.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt._tree import is_trainable
from tests.parity.cases import OPT_CASES
from tests.parity.noise_floor import assert_close
from tests.torch_ref import make_grads, make_params, make_params_for

SET_LR_AT = 12


def split_labels(params):
    """Every other trainable leaf goes to "g1"; the rest stay "default"."""
    leaves, treedef = jax.tree.flatten(params)
    labels, j = [], 0
    for p in leaves:
        if is_trainable(p):
            labels.append("g1" if j % 2 else "default")
            j += 1
        else:
            labels.append("default")
    return treedef.unflatten(labels)


def two_groups(case):
    """(constructor kwargs, overrides of group g1) for a case."""
    combos = case.combos()
    base, other = combos[0], combos[-1]
    overrides = {k: v for k, v in other.items() if base.get(k) != v}
    if not overrides:
        for k in ("weight_decay", "momentum", "maximize"):
            if k in inspect.signature(case.factory).parameters:
                default = inspect.signature(case.factory).parameters[k].default
                value = base.get(k, default)
                overrides[k] = (not value) if isinstance(value, bool) else 0.05
                break
    assert overrides, f"{case.name}: no second hyperparameter to vary per group"
    if getattr(case, "shared_group_lr", False):
        # the reference refuses different nonzero group lrs (SharedLrCase)
        return base, overrides
    lr = base.get("lr", inspect.signature(case.factory).parameters["lr"].default)
    overrides["lr"] = lr * 0.37
    return base, overrides


def torch_groups(params, tparams, labels, overrides):
    flat = [lab for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
            if is_trainable(p)]  # fmt: skip
    default = [t for t, lab in zip(tparams, flat) if lab == "default"]
    g1 = [t for t, lab in zip(tparams, flat) if lab == "g1"]
    return [{"params": default}, {"params": g1, **overrides}]


def to_torch(params):
    return [
        torch.tensor(np.array(p), requires_grad=True)
        for p in jax.tree.leaves(params)
        if is_trainable(p)
    ]


def torch_lrs(opt):
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("case", OPT_CASES, ids=[c.name for c in OPT_CASES])
def test_two_groups_parity(case, x64):
    rng = np.random.default_rng(0)
    params = make_params_for(case, rng, np.float64)
    labels = split_labels(params)
    kwargs, overrides = two_groups(case)
    tparams = to_torch(params)
    groups = torch_groups(params, tparams, labels, overrides)
    try:
        topt = case.torch_cls(groups, **kwargs)
    except Exception as torch_err:  # torch refuses groups: so must funcopt
        with pytest.raises(type(torch_err)) as ours:
            opt = case.factory(
                **kwargs, param_groups=fo.param_groups(labels, {"g1": overrides})
            )
            opt.init(jax.tree.map(jnp.asarray, params))
        assert str(ours.value) == str(torch_err)
        return

    opt = case.factory(
        **kwargs, param_groups=fo.param_groups(labels, {"g1": overrides})
    )
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    np.testing.assert_allclose(fo.get_lr(state), torch_lrs(topt), rtol=1e-15)
    step = jax.jit(opt.step)
    steps = max(case.steps, 25)
    grads_seq = make_grads(rng, params, steps, with_none=True)
    treedef = jax.tree.structure(params)
    for t, grads in enumerate(grads_seq):
        if t == SET_LR_AT:  # param_groups[i]["lr"] = x mid-run
            new_lrs = [0.5 * lr for lr in torch_lrs(topt)]
            if getattr(case, "shared_group_lr", False):
                new_lrs[1] = 0.0  # the only other lr such a reference allows
            else:
                new_lrs[1] = 1.7 * new_lrs[1]
            for g, lr in zip(topt.param_groups, new_lrs):
                g["lr"] = lr
            state = fo.set_lr(state, new_lrs)
            np.testing.assert_allclose(fo.get_lr(state), torch_lrs(topt), rtol=1e-15)
        flat = treedef.flatten_up_to(grads)
        train_grads = [
            g for g, q in zip(flat, jax.tree.leaves(params)) if is_trainable(q)
        ]
        for tp, g in zip(tparams, train_grads):
            tp.grad = None if g is None else torch.tensor(np.array(g))
        topt.step()
        p, state = step(p, jax.tree.map(jnp.asarray, grads), state)
    ours = [np.asarray(x) for x in jax.tree.leaves(p) if is_trainable(x)]
    for i, (a, e) in enumerate(zip(ours, tparams)):
        assert_close(a, e.detach().numpy(), 1e-10, 1e-12, f"{case.name} param {i}")
    np.testing.assert_allclose(fo.get_lr(state), torch_lrs(topt), rtol=1e-15)


# --------------------------------------------------------------------------
# group semantics (funcopt/_groups.py), with SGD and Adam
# --------------------------------------------------------------------------


def _run_sgd(params, labels, overrides, torch_group_list, steps=5, **kw):
    opt = fo.sgd(param_groups=fo.param_groups(labels, overrides), **kw)
    topt = torch.optim.SGD(torch_group_list, **kw)
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    assert [float(x) for x in fo.get_lr(state)] == torch_lrs(topt)
    rng = np.random.default_rng(1)
    tparams = [t for g in torch_group_list for t in g["params"]]
    for grads in make_grads(rng, params, steps, with_none=False):
        trainable = [g for g in jax.tree.leaves(grads)]
        by_id = dict(zip(_ids(params), trainable))
        for t in tparams:
            t.grad = torch.tensor(by_id[t._leaf_index])
        topt.step()
        p, state = opt.step(p, jax.tree.map(jnp.asarray, grads), state)
    return p, state, topt


def _ids(params):
    return [i for i, x in enumerate(jax.tree.leaves(params)) if is_trainable(x)]


def _tensors(params):
    out = []
    for i, x in enumerate(jax.tree.leaves(params)):
        if is_trainable(x):
            t = torch.tensor(np.array(x), requires_grad=True)
            t._leaf_index = i
            out.append(t)
    return out


def _check(p, topt):
    leaves = jax.tree.leaves(p)
    for g in topt.param_groups:
        for t in g["params"]:
            np.testing.assert_allclose(leaves[t._leaf_index], t.detach().numpy(),
                                       rtol=1e-12)  # fmt: skip


def test_group_order_is_dict_order_after_default(x64):
    params = make_params(np.random.default_rng(0), np.float64)
    # trainable leaves: b, nested.k, nested.s, w
    labels = {"b": "z", "frozen": "default", "nested": {"k": "default", "s": "a"},
              "w": "z"}  # fmt: skip
    ts = _tensors(params)
    b, k, s, w = ts
    overrides = {"z": {"lr": 0.2, "momentum": 0.5}, "a": {"lr": 0.03}}
    groups = [{"params": [k]}, {"params": [b, w], **overrides["z"]},
              {"params": [s], **overrides["a"]}]  # fmt: skip
    p, state, topt = _run_sgd(params, labels, overrides, groups, lr=0.1)
    assert [float(x) for x in fo.get_lr(state)] == [0.1, 0.2, 0.03]
    assert [float(x) for x in fo.get_hparam(state, "momentum")] == [0.0, 0.5, 0.0]
    _check(p, topt)


def test_default_group_omitted_when_unused(x64):
    """No trainable leaf labelled "default": torch has no such group either."""
    params = make_params(np.random.default_rng(0), np.float64)
    labels = {"b": "x", "frozen": "default", "nested": {"k": "y", "s": "y"}, "w": "x"}
    b, k, s, w = _tensors(params)
    overrides = {"x": {"lr": 0.2}, "y": {"weight_decay": 0.1}}
    groups = [{"params": [b, w], "lr": 0.2}, {"params": [k, s], "weight_decay": 0.1}]
    p, state, topt = _run_sgd(params, labels, overrides, groups, lr=0.1)
    assert len(fo.get_lr(state)) == 2
    _check(p, topt)


def test_default_overrides_apply_to_default_leaves(x64):
    """An override named "default" changes the default group's values."""
    params = make_params(np.random.default_rng(0), np.float64)
    labels = jax.tree.map(lambda _: "default", params)
    ts = _tensors(params)
    overrides = {"default": {"lr": 0.3, "momentum": 0.9}}
    groups = [{"params": ts, "lr": 0.3, "momentum": 0.9}]
    p, state, topt = _run_sgd(params, labels, overrides, groups, lr=0.1)
    assert [float(x) for x in fo.get_lr(state)] == [0.3]
    _check(p, topt)


def test_empty_group_is_kept(x64):
    """A group no leaf uses still has its lr, like torch's empty param group."""
    params = make_params(np.random.default_rng(0), np.float64)
    labels = jax.tree.map(lambda _: "default", params)
    ts = _tensors(params)
    overrides = {"unused": {"lr": 0.5}}
    groups = [{"params": ts}, {"params": [], "lr": 0.5}]
    p, state, topt = _run_sgd(params, labels, overrides, groups, lr=0.1)
    assert [float(x) for x in fo.get_lr(state)] == torch_lrs(topt)
    _check(p, topt)


def test_label_function(x64):
    """labels may be a function of the params (no weight decay on vectors)."""
    params = make_params(np.random.default_rng(0), np.float64)

    def label_fn(tree):
        return jax.tree.map(lambda x: "no_decay" if np.ndim(x) <= 1 else "default",
                            tree)  # fmt: skip

    b, k, s, w = _tensors(params)
    overrides = {"no_decay": {"weight_decay": 0.0}}
    groups = [{"params": [k, w]}, {"params": [b, s], "weight_decay": 0.0}]
    p, state, topt = _run_sgd(params, label_fn, overrides, groups, lr=0.1,
                              weight_decay=0.2, momentum=0.9)  # fmt: skip
    _check(p, topt)


def test_unknown_label_raises():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    opt = fo.adam(param_groups=fo.param_groups({"a": "default", "b": "nope"},
                                               {"g1": {"lr": 0.1}}))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"\['b'\].*unknown parameter group label 'nope'"
    ):
        opt.init(params)


def test_unknown_hyperparameter_raises():
    with pytest.raises(
        ValueError, match="param group 'g1': Adam has no hyperparameter 'momentum'"
    ):
        fo.adam(param_groups=fo.param_groups(lambda p: p, {"g1": {"momentum": 0.9}}))


def test_labels_structure_mismatch_raises():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    opt = fo.sgd(param_groups=fo.param_groups({"a": "default"}, {}))
    with pytest.raises(ValueError, match="structure of params"):
        opt.init(params)


def test_bad_overrides_types_raise():
    with pytest.raises(TypeError, match="dict of dicts"):
        fo.param_groups(lambda p: p, [("g1", {"lr": 0.1})])
    with pytest.raises(TypeError, match="must be strings"):
        fo.param_groups(lambda p: p, {1: {"lr": 0.1}})
    with pytest.raises(TypeError, match="overrides must be a dict"):
        fo.param_groups(lambda p: p, {"g1": 0.1})


def test_set_lr_per_group_length_checked():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    opt = fo.sgd(param_groups=fo.param_groups({"a": "default", "b": "g1"},
                                              {"g1": {"lr": 0.5}}))  # fmt: skip
    state = opt.init(params)
    with pytest.raises(ValueError, match="got 3 values for 2 parameter groups"):
        fo.set_lr(state, [0.1, 0.2, 0.3])
    state = fo.set_lr(state, [0.1, 0.2])
    assert [float(x) for x in fo.get_lr(state)] == pytest.approx([0.1, 0.2])
    state = fo.set_lr(state, 0.05)  # one value for every group
    assert [float(x) for x in fo.get_lr(state)] == pytest.approx([0.05, 0.05])
