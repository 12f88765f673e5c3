"""funcopt.add_param_group against live torch's `optimizer.add_param_group`.

A torch module with two submodules (`body`, `head`): the optimizer trains
`body` for a few steps with `head` frozen, then `head` joins as a new
parameter group with its own hyperparameters and every parameter trains a few
more steps, with a scheduler built after the group was added. funcopt does
the same with `fo.add_param_group`; parameters and the full optimizer state
(`torch_interop.state_dict` against torch's `state_dict()`: every group key,
every state entry) must match torch after every step (float64: 1e-10
relative). Right after the call, old leaves and groups must be bit for bit
what they were and new leaves what `init` makes. Gradients are torch's own
(`loss.backward()` on the torch module), fed to both libraries.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
import funcopt.torch_interop as fti
from funcopt import lr_scheduler as S

PRE, POST = 3, 3
F64 = dict(rtol=1e-10, atol=1e-13)
F32 = dict(rtol=1e-5, atol=1e-6)

# name: (torch class, funcopt factory, constructor kwargs, new group overrides)
OPTS = {
    "adam": (
        torch.optim.Adam,
        fo.adam,
        dict(lr=0.05, weight_decay=0.01, amsgrad=True),
        dict(lr=0.01, betas=(0.8, 0.99)),
    ),
    "sgd": (
        torch.optim.SGD,
        fo.sgd,
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(lr=0.01, momentum=0.5),
    ),
    "rmsprop": (
        torch.optim.RMSprop,
        fo.rmsprop,
        dict(lr=0.01, centered=True, momentum=0.3),
        dict(lr=0.02, alpha=0.9, weight_decay=0.1),
    ),
}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
        )
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _model(dtype):
    torch.manual_seed(0)
    return Net().to(dtype)


def _backward(model, step):
    """torch's gradients of a loss at `step` (set on `model`'s parameters),
    as `{dotted name: array}` of the parameters that have one."""
    gen = torch.Generator().manual_seed(100 + step)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 4, generator=gen, dtype=dtype)
    y = torch.randn(8, 2, generator=gen, dtype=dtype)
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    return {
        n: p.grad.detach().numpy().copy()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def _grads_like(params, grads, rename=None):
    """`grads` (dotted torch names) in the structure of `params`."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [".".join(str(k.key) for k in path) for path, _ in paths]
    if rename:
        names = [rename.get(n, n) for n in names]
    return jax.tree.structure(params).unflatten([jnp.asarray(grads[n]) for n in names])


def _assert_params(params, model, tol, rename=None):
    ours = fti.params_to_module_state_dict(params)
    theirs = dict(model.named_parameters())
    for n, v in ours.items():
        t = theirs[(rename or {}).get(n, n)].detach().numpy()
        assert v.dtype == torch.from_numpy(t).dtype, n
        np.testing.assert_allclose(v.numpy(), t, err_msg=n, **tol)


def _assert_value(what, a, b, tol):
    if isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)) and len(a) == len(b), what
        for j, (x, y) in enumerate(zip(a, b)):
            _assert_value(f"{what}[{j}]", x, y, tol)
    elif isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), f"{what}: {type(a)}"
        assert a.dtype == b.dtype and a.shape == b.shape, (what, a, b)
        np.testing.assert_allclose(a.numpy(), b.numpy(), err_msg=what, **tol)
    elif isinstance(b, float):
        np.testing.assert_allclose(a, b, err_msg=what, **tol)
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def _assert_state_dict(ours, theirs, tol):
    """Every group key and value, every state entry (torch's ids)."""
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for g, (a, b) in enumerate(zip(ours["param_groups"], theirs["param_groups"])):
        if "param_names" not in b:  # torch built from bare tensors
            a = {k: v for k, v in a.items() if k != "param_names"}
        assert set(a) == set(b), f"group {g}: {sorted(set(a) ^ set(b))}"
        for k in b:
            _assert_value(f"group {g} {k}", a[k], b[k], tol)
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for pid, entry in theirs["state"].items():
        assert set(ours["state"][pid]) == set(entry), pid
        for k, v in entry.items():
            _assert_value(f"state {pid} {k}", ours["state"][pid][k], v, tol)


def _by_path(tree):
    return {
        jax.tree_util.keystr(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _check_extension(params, state, opt2, params2, state2):
    """Old leaves and groups bit for bit as they were; new ones as init makes."""
    init = opt2.init(params2).unpacked()
    state, state2 = state.unpacked(), state2.unpacked()
    old_paths = _by_path(params)
    paths = list(_by_path(params2))
    assert set(old_paths) <= set(paths)
    old_index = {p: i for i, p in enumerate(old_paths)}
    for i, path in enumerate(paths):
        ref, j = (state, old_index[path]) if path in old_index else (init, i)
        assert int(state2.step[i]) == int(ref.step[j]), path
        for k in set(state2.slots) | set(ref.slots):
            ours = _by_path(state2.slots.get(k)).get(path)
            theirs = _by_path(ref.slots.get(k)).get(path) if k in ref.slots else None
            assert (ours is None) == (theirs is None), (path, k)
            if ours is not None:
                assert _bits_equal(ours, theirs), (path, k)
    n_old = len(fo.get_lr(state))
    for k, v in state2.hparams.items():
        assert v.shape[0] == n_old + 1, k
        assert _bits_equal(v[:n_old], state.hparams[k]), k
        assert _bits_equal(v[n_old:], init.hparams[k][n_old:]), k


def _lrs(topt):
    return [g["lr"] for g in topt.param_groups]


def _run(name, dtype, tol, labels=None, layout="ordered"):
    """`PRE` steps on the body, add the head, `POST` steps on everything.

    `labels`: None (no param_groups), "fn" or "tree" (a "no_decay" group of
    the body's biases, as a label function or a label tree). `layout`:
    "ordered" (OrderedDicts in torch's registration order, the new key
    last) or "sorted" (plain dicts, the new key "a_head" flattening
    *before* the old ones: funcopt must reorder, ids come from `names=`).
    """
    tcls, factory, kwargs, group = OPTS[name]
    model = _model(dtype)
    model.head.requires_grad_(False)
    body = model.body
    if labels is None:
        topt = tcls(body.parameters(), **kwargs)
    else:
        weights = [p for n, p in body.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in body.named_parameters() if n.endswith("bias")]
        topt = tcls(
            [{"params": weights}, {"params": biases, "weight_decay": 0.0}], **kwargs
        )

    full = fti.module_state_dict_to_params(dict(model.named_parameters()))
    new_key = "head" if layout == "ordered" else "a_head"
    rename = {} if layout == "ordered" else {"a_head.weight": "head.weight",
                                             "a_head.bias": "head.bias"}  # fmt: skip
    if layout == "ordered":
        params = collections.OrderedDict(body=full["body"])
    else:
        params = {"body": _plain(full["body"])}
    body_names = [f"body.{n}" for n, _ in body.named_parameters()]
    names = None if layout == "ordered" else body_names

    if labels is not None:

        def label_fn(p):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "no_decay" if path[-1].key == "bias" else "default", p
            )

        label_arg = label_fn if labels == "fn" else label_fn(params)
        groups = fo.param_groups(label_arg, {"no_decay": {"weight_decay": 0.0}})
        opt = factory(**kwargs, param_groups=groups)
    else:
        opt = factory(**kwargs)
    state = opt.init(params)
    step = jax.jit(opt.step)
    for t in range(PRE):
        grads = _backward(model, t)
        topt.step()
        params, state = step(params, _grads_like(params, grads), state)
        if t == 1:  # the current lrs (not the constructor's) must survive
            new_lrs = [0.5 * lr for lr in _lrs(topt)]
            for g, lr in zip(topt.param_groups, new_lrs):
                g["lr"] = lr
            state = fo.set_lr(state, new_lrs)
        _assert_params(params, model, tol)
        _assert_state_dict(
            fti.state_dict(opt, state, params, names=names), topt.state_dict(), tol
        )

    # progressive unfreezing: the head joins as a new group
    model.head.requires_grad_(True)
    topt.add_param_group({"params": model.head.parameters(), **group})
    head = fti.module_state_dict_to_params(dict(model.head.named_parameters()))
    new_params = (
        collections.OrderedDict({new_key: head})
        if layout == "ordered"
        else {new_key: _plain(head)}
    )
    opt2, params2, state2 = fo.add_param_group(
        opt, params, state, new_params, name="head", **group
    )
    _check_extension(params, state, opt2, params2, state2)
    assert type(params2) is type(params)
    np.testing.assert_allclose(fo.get_lr(state2), _lrs(topt), rtol=tol["rtol"])
    if names is not None:
        names = [*body_names, "a_head.weight", "a_head.bias"]
    _assert_state_dict(
        fti.state_dict(opt2, state2, params2, names=names), topt.state_dict(), tol
    )

    # a scheduler built afterwards sees every group
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
    sched = S.step_lr(step_size=2, gamma=0.5)
    state2, sched_state = sched.init(state2)
    step2 = jax.jit(opt2.step)
    for t in range(PRE, PRE + POST):
        grads = _backward(model, t)
        topt.step()
        tsched.step()
        params2, state2 = step2(params2, _grads_like(params2, grads, rename), state2)
        state2, sched_state = sched.step(state2, sched_state)
        _assert_params(params2, model, tol, rename)
        ours = fti.state_dict(
            opt2, state2, params2, sched=sched, sched_state=sched_state, names=names
        )
        _assert_state_dict(ours, topt.state_dict(), tol)
    np.testing.assert_allclose(fo.get_lr(state2), _lrs(topt), rtol=tol["rtol"])
    return opt2, params2, state2


def _plain(tree):
    """OrderedDicts as plain dicts (which JAX flattens in sorted key order)."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


# --------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTS))
def test_add_group_parity(name, x64):
    _run(name, torch.float64, F64)


@pytest.mark.parametrize("labels", ["fn", "tree"])
def test_add_group_to_grouped_optimizer(labels, x64):
    opt2, params2, _ = _run("adam", torch.float64, F64, labels=labels)
    # old leaves keep their groups, the new ones are "head"
    names, group_of = fo._groups.resolve(opt2.param_groups, params2)
    assert names == ["default", "no_decay", "head"]
    by_name = dict(zip(fti.param_names(params2), group_of))
    assert by_name == {"body.0.weight": 0, "body.0.bias": 1, "body.2.weight": 0,
                       "body.2.bias": 1, "head.weight": 2, "head.bias": 2}  # fmt: skip


def test_new_keys_flattening_first(x64):
    """Plain dicts: the new leaves sort before the old ones in the state's
    arrays, while torch's ids (and funcopt's groups) put them last."""
    _run("adam", torch.float64, F64, layout="sorted")


def test_float32():
    _run("adam", torch.float32, F32)


def test_empty_group_then_another(x64):
    """torch accepts `add_param_group({"params": []})` (an empty group); so
    does funcopt, and a second call adds one more group after it."""
    tcls, factory, kwargs, group = OPTS["sgd"]
    model = _model(torch.float64)
    topt = tcls(model.body.parameters(), **kwargs)
    full = fti.module_state_dict_to_params(dict(model.named_parameters()))
    params = collections.OrderedDict(body=full["body"])
    opt = factory(**kwargs)
    state = opt.init(params)
    params, state = opt.step(params, _grads_like(params, _backward(model, 0)), state)
    topt.step()

    topt.add_param_group({"params": [], "lr": 0.3})
    opt, params2, state2 = fo.add_param_group(
        opt, params, state, collections.OrderedDict(), name="empty", lr=0.3
    )
    _check_extension(params, state, opt, params2, state2)
    params = params2
    topt.add_param_group({"params": model.head.parameters(), **group})
    new = collections.OrderedDict(head=full["head"])
    opt, params, state = fo.add_param_group(
        opt, params2, state2, new, name="head", **group
    )
    assert fo.get_lr(state) == _lrs(topt)
    for t in range(1, 3):
        grads = _backward(model, t)
        topt.step()
        params, state = jax.jit(opt.step)(params, _grads_like(params, grads), state)
        _assert_params(params, model, F64)
        _assert_state_dict(fti.state_dict(opt, state, params), topt.state_dict(), F64)


def test_lists_concatenate(x64):
    """A list of arrays (torch's list of tensors): new leaves are appended."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(s) for s in [(3,), (2, 2), (4,)])
    ta, tb, tc = (torch.tensor(x, requires_grad=True) for x in (a, b, c))
    topt = torch.optim.Adam([ta, tb], lr=0.1)
    opt = fo.adam(lr=0.1)
    params = [jnp.asarray(a), jnp.asarray(b)]
    state = opt.init(params)
    for t in range(4):
        if t == 2:
            topt.add_param_group({"params": [tc], "lr": 0.2, "maximize": True})
            opt, params, state = fo.add_param_group(
                opt, params, state, [jnp.asarray(c)], name="c", lr=0.2, maximize=True
            )
        ts = [ta, tb, tc][: len(params)]
        gs = [rng.standard_normal(x.shape) for x in ts]
        for x, g in zip(ts, gs):
            x.grad = torch.tensor(g)
        topt.step()
        params, state = opt.step(params, [jnp.asarray(g) for g in gs], state)
        for p, x in zip(params, ts):
            np.testing.assert_allclose(p, x.detach().numpy(), **F64)
    assert isinstance(params, list)
    _assert_state_dict(fti.state_dict(opt, state, params), topt.state_dict(), F64)


def test_precision_policy_kept(x64):
    opt = fo.precision_policy(fo.adam(), slot_dtypes={"exp_avg": jnp.float32})
    params = {"w": jnp.ones(3)}
    opt2, params2, state2 = fo.add_param_group(
        opt, params, opt.init(params), {"v": jnp.ones(2)}, name="v"
    )
    assert state2.unpacked().slots["exp_avg"]["v"].dtype == jnp.float32
    assert state2.unpacked().slots["exp_avg_sq"]["v"].dtype == jnp.float64
    assert opt2.policy == opt.policy
    grads = jax.tree.map(jnp.ones_like, params2)
    _, state3 = jax.jit(opt2.step)(params2, grads, state2)
    assert state3.unpacked().slots["exp_avg"]["v"].dtype == jnp.float32


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def _small():
    opt = fo.adam(lr=0.1)
    params = {"w": jnp.ones(3, jnp.float32)}
    return opt, params, opt.init(params)


def test_colliding_keys_are_torchs_duplicate_error():
    model = _model(torch.float32)
    topt = torch.optim.Adam(model.body.parameters())
    with pytest.raises(ValueError) as theirs:
        topt.add_param_group({"params": [model.body[0].weight]})
    opt, params, state = _small()
    params = {**params, "b": jnp.ones(2, jnp.float32)}
    state = opt.init(params)
    with pytest.raises(ValueError) as ours:
        fo.add_param_group(
            opt, params, state, {"w": jnp.ones(3), "b": jnp.ones(2)}, name="x"
        )
    assert str(ours.value).startswith(str(theirs.value))
    assert "['w', 'b']" in str(ours.value)


@pytest.mark.parametrize(
    "name, override",
    [
        ("adam", dict(lr=-1.0)),
        ("adam", dict(betas=(0.9, 1.5))),
        ("adam", dict(eps=-1e-8)),
        ("adam", dict(eps="tiny")),  # TypeError from torch's comparison
        ("sgd", dict(momentum=0.0)),  # nesterov without momentum
        ("sgd", dict(weight_decay=-0.1)),
        ("rmsprop", dict(alpha=-0.5)),
    ],
)
def test_bad_values_raise_torchs_constructor_error(name, override):
    """torch's add_param_group checks no values; its constructor does, and
    funcopt checks a new group as its constructor checks groups."""
    tcls, factory, kwargs, _ = OPTS[name]
    with pytest.raises(Exception) as theirs:
        tcls([torch.zeros(2, requires_grad=True)], **{**kwargs, **override})
    opt = factory(**kwargs)
    params = {"w": jnp.ones(3)}
    with pytest.raises(type(theirs.value)) as ours:
        fo.add_param_group(opt, params, opt.init(params), {"v": jnp.ones(2)},
                           name="v", **override)  # fmt: skip
    assert str(ours.value) == str(theirs.value)


def test_unknown_hyperparameter():
    opt, params, state = _small()
    with pytest.raises(ValueError, match="Adam has no hyperparameter 'momentum'"):
        fo.add_param_group(opt, params, state, {"v": jnp.ones(2)}, name="v",
                           momentum=0.9)  # fmt: skip


def test_non_numeric_value():
    """A value torch's constructor lets through but that is no number: the
    check funcopt runs on every group (torch fails in its first step)."""
    opt = fo.sgd(lr=0.1)
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match="param group 'v': dampening must be a real"):
        fo.add_param_group(opt, params, opt.init(params), {"v": jnp.ones(2)},
                           name="v", dampening="x")  # fmt: skip


@pytest.mark.parametrize("group", ["default", "no_decay"])
def test_existing_group_name(group):
    labels = {"w": "no_decay", "b": "default"}
    opt = fo.adam(
        param_groups=fo.param_groups(labels, {"no_decay": {"weight_decay": 0.0}})
    )
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=f"named '{group}' already exists"):
        fo.add_param_group(opt, params, opt.init(params), {"v": jnp.ones(2)},
                           name=group)  # fmt: skip


def test_lbfgs_refuses_like_torch():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        torch.optim.LBFGS([{"params": [a]}, {"params": [b]}])
    opt = fo.lbfgs()
    params = {"a": jnp.zeros(2)}
    with pytest.raises(ValueError) as ours:
        fo.add_param_group(opt, params, opt.init(params), {"b": jnp.zeros(3)},
                           name="b")  # fmt: skip
    assert str(ours.value) == str(theirs.value)


def test_other_bad_calls():
    opt, params, state = _small()
    new = {"v": jnp.ones(2)}
    with pytest.raises(TypeError, match="both be dicts"):
        fo.add_param_group(opt, params, state, [jnp.ones(2)], name="v")
    with pytest.raises(TypeError, match="names must be strings"):
        fo.add_param_group(opt, params, state, new, name=3)
    with pytest.raises(TypeError, match="made by funcopt.make_optimizer"):
        fo.add_param_group(fo.skip_nonfinite(opt), params, state, new, name="v")
    other = {"w": jnp.ones(3, jnp.float32), "u": jnp.ones(1, jnp.float32)}
    with pytest.raises(ValueError):  # a state for other params
        fo.add_param_group(opt, other, state, new, name="v")
    # nothing was mutated
    assert list(params) == ["w"] and opt.param_groups is None
