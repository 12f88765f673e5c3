"""Tensor hyperparameters per parameter group, against live torch.

torch lets every param group hold its own `lr`: a Python float or a 0-d
tensor of its own dtype, whatever the constructor's (`Adam([{"params": a},
{"params": b, "lr": torch.tensor(0.01, dtype=torch.float64)}],
lr=torch.tensor(0.02))`), and a tensor's scalar math runs in its dtype. Each
row runs three groups: the constructor's `lr` (`default`) and two groups
with an `lr` of the other two kinds (`g1`, `g2`), so that every group's rule
must follow its own `lr`'s type.

float64 params: params within 1e-10 (x64). 16-bit params: params and state
bit for bit, with torch's CPU loop mirrored.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt._tree import is_trainable
from tests.parity.cases import FLAG_CASES, OPT_CASES
from tests.parity.noise_floor import assert_close
from tests.torch_ref import (
    OptCase,
    assert_same_bits,
    check_against_torch,
    correctly_rounded_torch_sqrt,
    from_torch,
    funcopt_kwargs,
    make_grads,
    make_params_16bit_for,
    make_params_for,
    run_funcopt_flagged,
    to_torch,
)

GROUPS = ("default", "g1", "g2")
STEPS = 12

# the rows whose optimizer takes a tensor lr, with their last (all flags)
# combination: every code path that reads a tensor lr
_ROWS = {c.name: c for c in OPT_CASES + FLAG_CASES}
ROWS = [
    "adam",
    "adam-tensor-lr",
    "adamw-tensor-lr",
    "adamax",
    "nadam-tensor-lr",
    "nadam-foreach",
    "radam",
    "radam-foreach-tensor-lr",
    "adagrad",
    "asgd",
    "asgd-foreach",
    "adafactor",
    "muon",
]
ROWS_16BIT = ["nadam-foreach", "radam", "asgd-foreach"]


def lr_kinds(value: float) -> dict:
    """`value` as a Python float and as float32 and float64 0-d tensors."""
    return {
        "float": value,
        "t32": torch.tensor(value),
        "t64": torch.tensor(value, dtype=torch.float64),
    }


def group_labels(params):
    """Trainable leaves in turn to "default", "g1", "g2"."""
    leaves, treedef = jax.tree.flatten(params)
    labels, j = [], 0
    for p in leaves:
        labels.append(GROUPS[j % 3] if is_trainable(p) else "default")
        j += is_trainable(p)
    return treedef.unflatten(labels)


def run_both(case, kwargs, first: str, params, grads):
    """torch and funcopt with the constructor's lr of kind `first` and the
    groups g1, g2 with an lr of each other kind; returns (ours, torch's
    params, torch's states, funcopt's state, labels)."""
    lr = kwargs.get("lr", inspect.signature(case.factory).parameters["lr"].default)
    lr = float(lr)
    kinds = [first] + [k for k in ("float", "t32", "t64") if k != first]
    group_lrs = {
        "g1": lr_kinds(0.37 * lr)[kinds[1]],
        "g2": lr_kinds(1.3 * lr)[kinds[2]],
    }
    kwargs = {**kwargs, "lr": lr_kinds(lr)[first]}
    labels = group_labels(params)
    leaves = jax.tree.leaves(params)
    flat_labels = [
        lab for p, lab in zip(leaves, jax.tree.leaves(labels)) if is_trainable(p)
    ]
    tparams = [to_torch(p).requires_grad_() for p in leaves if is_trainable(p)]
    if kwargs.get("differentiable"):
        tparams = [p.detach() for p in tparams]
    torch_groups = [
        {
            "params": [t for t, lab in zip(tparams, flat_labels) if lab == name],
            **({"lr": group_lrs[name]} if name in group_lrs else {}),
        }
        for name in GROUPS
    ]
    topt = case.torch_cls(torch_groups, **kwargs)
    opt = case.factory(
        **funcopt_kwargs(kwargs),
        param_groups=fo.param_groups(
            labels, {k: funcopt_kwargs({"lr": v}) for k, v in group_lrs.items()}
        ),
    )
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    step = jax.jit(opt.step)
    treedef = jax.tree.structure(params)
    for grads_t in grads:
        flat = treedef.flatten_up_to(grads_t)
        for tp, g in zip(tparams, [g for g, q in zip(flat, leaves) if is_trainable(q)]):
            tp.grad = None if g is None else to_torch(g)
        with correctly_rounded_torch_sqrt():  # its 0-d float32 roots
            topt.step()
        p, state = step(p, jax.tree.map(jnp.asarray, grads_t), state)
    np.testing.assert_array_equal(
        np.asarray(fo.get_lr(state), np.float64),
        [float(g["lr"]) for g in topt.param_groups],
    )
    ours = [np.asarray(x) for x in jax.tree.leaves(p) if is_trainable(x)]
    theirs = [from_torch(t) for t in tparams]
    return ours, theirs, [topt.state[t] for t in tparams], state, p, flat_labels


@pytest.mark.parametrize(
    "name,first",
    # Muon (slow to compile) once: its float64 tensor lr is a Python float
    [(n, f) for n in ROWS for f in ("float", "t32") if (n, f) != ("muon", "float")],
)
def test_group_lr_of_another_type_float64(name, first, x64):
    case = _ROWS[name]
    rng = np.random.default_rng(0)
    params = make_params_for(case, rng, np.float64)
    grads = make_grads(rng, params, STEPS, with_none=False)
    ours, theirs, *_, labels = run_both(case, case.combos()[-1], first, params, grads)
    for i, (a, e, lab) in enumerate(zip(ours, theirs, labels)):
        assert_close(a, e, 1e-10, 1e-12, f"{name}: param {i} (group {lab})")


@pytest.mark.parametrize("name", ROWS_16BIT)
def test_group_lr_of_another_type_16bit(name, x64, torch_cpu_loop):
    case = _ROWS[name]
    rng = np.random.default_rng(0)
    params = make_params_16bit_for(case, rng)
    grads = make_grads(rng, params, STEPS, with_none=False)
    ours, theirs, torch_states, state, p, labels = run_both(
        case, case.combos()[-1], "float", params, grads
    )
    for i, (a, e, lab) in enumerate(zip(ours, theirs, labels)):
        assert_same_bits(a, e, f"{name}: param {i} (group {lab})")
    leaves, treedef = jax.tree.flatten(params)
    for key, tree in state.unpacked().slots.items():
        flat = [
            s for s, q in zip(treedef.flatten_up_to(tree), leaves) if is_trainable(q)
        ]
        for i, (s, t) in enumerate(zip(flat, torch_states)):
            if key in t:
                assert_same_bits(s, from_torch(t[key]), f"{name}: param {i} {key}")


# --------------------------------------------------------------------------
# a 0-d tensor weight_decay (torch 2.13 accepts one in every optimizer)
# --------------------------------------------------------------------------
#
# Measured (torch 2.13 CPU, a tensor against a Python float of the same
# value): coupled decay (`grad.add(param, alpha=weight_decay)`, every
# optimizer with coupled decay) reads the tensor as its value: the same
# bits. Decoupled decay (`param.mul_(1 - lr * weight_decay)`: AdamW, Adam,
# NAdam and RAdam with `decoupled_weight_decay=True`, Adafactor, Muon) is
# tensor math in the promoted dtype of the tensors among `lr` and
# `weight_decay`: float32 for a float32 `weight_decay` and a float `lr`
# (float64 params: 2.8e-7 relative after 10 steps), float64 for a float64
# `weight_decay` and a float32 tensor `lr`; `_foreach_mul_` reads the
# tensor factor as its value where it rounds a Python float to a 16-bit
# param's dtype first (bfloat16, foreach: 7.7e-2 relative).

T32, T64 = torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64)


def _wd_case(name, torch_cls, factory, kwargs, tree=None):
    fixed = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    return OptCase(
        name,
        torch_cls,
        factory,
        grid={"weight_decay": [kwargs["weight_decay"]]},
        fixed=fixed,
        tree=tree,
        steps=STEPS,
    )


WD_CASES = [
    _wd_case("adamw", torch.optim.AdamW, fo.adamw, {"lr": 0.02, "weight_decay": T32}),
    _wd_case(
        "adamw-tensor-lr",
        torch.optim.AdamW,
        fo.adamw,
        {"lr": torch.tensor(0.02), "weight_decay": T64, "amsgrad": True},
    ),
    _wd_case(
        "adam-coupled",
        torch.optim.Adam,
        fo.adam,
        {"lr": 0.02, "weight_decay": T32, "maximize": True},
    ),
    _wd_case(
        "adam-decoupled-differentiable",
        torch.optim.Adam,
        fo.adam,
        {
            "lr": 0.02,
            "weight_decay": T32,
            "decoupled_weight_decay": True,
            "differentiable": True,
        },
    ),
    _wd_case(
        "nadam",
        torch.optim.NAdam,
        fo.nadam,
        {"lr": 0.02, "weight_decay": T32, "decoupled_weight_decay": True},
    ),
    _wd_case(
        "nadam-foreach",
        torch.optim.NAdam,
        fo.nadam,
        {
            "lr": 0.02,
            "weight_decay": T64,
            "decoupled_weight_decay": True,
            "foreach": True,
        },
    ),
    _wd_case(
        "radam-foreach",
        torch.optim.RAdam,
        fo.radam,
        {
            "lr": 0.02,
            "weight_decay": T32,
            "decoupled_weight_decay": True,
            "foreach": True,
        },
    ),
    _wd_case(
        "adafactor-foreach",
        torch.optim.Adafactor,
        fo.adafactor,
        {"lr": 0.3, "weight_decay": T64, "foreach": True, "eps": (1e-4, 1e-2)},
    ),
    _wd_case("adafactor", torch.optim.Adafactor, fo.adafactor, {"weight_decay": T32}),
    _wd_case(
        "muon",
        torch.optim.Muon,
        fo.muon,
        {"lr": 0.02, "weight_decay": T32},
        tree=_ROWS["muon"].tree,
    ),
    _wd_case(
        "sgd",
        torch.optim.SGD,
        fo.sgd,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": T32},
    ),
    _wd_case("adagrad", torch.optim.Adagrad, fo.adagrad, {"weight_decay": T32}),
]
WD_CASES_16BIT = ["adamw", "nadam-foreach", "radam-foreach", "adafactor-foreach"]


@pytest.mark.parametrize("case", WD_CASES, ids=[c.name for c in WD_CASES])
def test_tensor_weight_decay_float64(case, x64):
    rng = np.random.default_rng(0)
    params = make_params_for(case, rng, np.float64)
    grads = make_grads(rng, params, STEPS, with_none=True)
    kwargs = case.combos()[0]
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)

    def close(actual, expected, what):
        assert_close(actual, expected, 1e-10, 1e-12, f"{case.name}: {what}")

    check_against_torch(case, kwargs, params, grads, new_params, state, close, close)


@pytest.mark.parametrize(
    "case",
    [c for c in WD_CASES if c.name in WD_CASES_16BIT],
    ids=WD_CASES_16BIT,
)
def test_tensor_weight_decay_16bit(case, x64, torch_cpu_loop):
    rng = np.random.default_rng(0)
    params = make_params_16bit_for(case, rng)
    grads = make_grads(rng, params, STEPS, with_none=True)
    kwargs = case.combos()[0]
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    check_against_torch(case, kwargs, params, grads, new_params, state)


# --------------------------------------------------------------------------
# NAdam's float32 mu_product in float32's subnormal range
# --------------------------------------------------------------------------


def test_nadam_mu_product_keeps_subnormals(x64):
    """torch's `mu_product *= mu` (a 0-d float32 tensor) keeps subnormal
    results, which XLA's CPU backend flushes to zero: with `betas[0]=0.01`
    the product is subnormal from step 17 and stalls at the smallest
    subnormals; every step's `mu_product` bit for bit (x64, float32 params)."""
    kwargs = {"lr": 0.02, "betas": (0.01, 0.999), "momentum_decay": 0.3}
    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(5,)).astype(np.float32)}
    tp = torch.tensor(p["w"], requires_grad=True)
    topt = torch.optim.NAdam([tp], **kwargs)
    opt = fo.nadam(**kwargs)
    params = jax.tree.map(jnp.asarray, p)
    state = opt.init(params)
    step = jax.jit(opt.step)
    subnormal = 0
    for t in range(24):
        g = rng.normal(size=(5,)).astype(np.float32)
        tp.grad = torch.tensor(g)
        topt.step()
        params, state = step(params, {"w": jnp.asarray(g)}, state)
        expected = topt.state[tp]["mu_product"].numpy()
        ours = state.unpacked().slots["mu_product"]["w"]
        assert_same_bits(ours, expected, f"step {t + 1}")
        subnormal += bool(0 < abs(expected) < np.finfo(np.float32).tiny)
    assert subnormal >= 3  # the case reaches the subnormal range


def test_added_group_follows_its_tensor_lr(x64):
    """`add_param_group` with a float32 tensor lr under a float constructor
    lr (AdamW: the decoupled decay and the step size in float32)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5,)), rng.normal(size=(4,))
    ta, tb = (torch.tensor(x, requires_grad=True) for x in (a, b))
    topt = torch.optim.AdamW([ta], lr=0.02)
    opt = fo.adamw(lr=0.02)
    p = {"a": jnp.asarray(a)}
    state = opt.init(p)
    for t in range(6):
        if t == 3:
            topt.add_param_group({"params": [tb], "lr": torch.tensor(0.05)})
            opt, p, state = fo.add_param_group(
                opt, p, state, {"b": jnp.asarray(b)}, name="g1", lr=np.float32(0.05)
            )
        grads = {k: rng.normal(size=np.shape(v)) for k, v in p.items()}
        for k, tp in (("a", ta), ("b", tb)):
            tp.grad = torch.tensor(grads[k]) if k in grads else None
        with correctly_rounded_torch_sqrt():  # its 0-d float32 roots
            topt.step()
        p, state = opt.step(p, jax.tree.map(jnp.asarray, grads), state)
    for k, tp in (("a", ta), ("b", tb)):
        assert_close(p[k], tp.detach().numpy(), 1e-10, 1e-12, k)
