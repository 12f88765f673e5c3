"""The parity table: one row per torch optimizer, each with its flag grid.

Adding an optimizer means adding one ``OptCase`` (and its bad arguments as
``ErrorCase`` rows); every generic test (parity in float64 and float32, jit
and eager, ``None`` gradients, errors, signatures) runs over this table.
Families live in ``cases_*.py`` beside this file.
"""

import numpy as np
import torch

import funcopt as fo
from tests.parity import cases_adaptive, cases_ecosystem, cases_misc
from tests.torch_ref import ErrorCase, OptCase

# Adam's flag grid (the default path's row and the fused kernel's)
_ADAM_GRID = {
    "weight_decay": [0.0, 0.1],
    "amsgrad": [False, True],
    "maximize": [False, True],
    "decoupled_weight_decay": [False, True],
}
_ADAM_FIXED = {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6}


def _adam_decay_valid(kw):
    """Decoupled weight decay only with a weight decay to decouple."""
    return kw["weight_decay"] or not kw["decoupled_weight_decay"]


CORE_CASES = [
    OptCase(
        "sgd",
        torch.optim.SGD,
        fo.sgd,
        grid={
            "momentum": [0.0, 0.9],
            "dampening": [0.0, 0.3],
            "nesterov": [False, True],
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
        },
        fixed={"lr": 0.05},
        valid=lambda kw: (
            not kw["nesterov"] or (kw["momentum"] > 0 and kw["dampening"] == 0)
        ),
    ),
    OptCase(
        "adam",
        torch.optim.Adam,
        fo.adam,
        grid=_ADAM_GRID,
        fixed=_ADAM_FIXED,
        valid=_adam_decay_valid,
    ),
    OptCase(
        "adamw",
        torch.optim.AdamW,
        fo.adamw,
        grid={
            "weight_decay": [1e-2, 0.3],
            "amsgrad": [False, True],
            "maximize": [False, True],
        },
        fixed={"lr": 0.02},
    ),
]

CORE_ERRORS = [
    ErrorCase("sgd", torch.optim.SGD, fo.sgd, kw)
    for kw in [
        {"lr": -0.1},
        {"momentum": -0.5},
        {"weight_decay": -1e-4},
        {"nesterov": True},
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        {"fused": True, "differentiable": True},
        {"fused": True, "foreach": True},
        # torch checks fused after the values
        {"lr": -0.1, "fused": True, "foreach": True},
        {"nesterov": True, "fused": True, "differentiable": True},
        # a fused flag without a truth value: torch's RuntimeError, after
        # the value checks
        {"fused": torch.ones(3)},
        {"lr": -0.1, "fused": torch.ones(3)},
        {"lr": torch.tensor([0.1, 0.2])},
        {"momentum": torch.tensor([0.9, 0.8])},
    ]
] + [
    ErrorCase(name, cls, factory, kw)
    for name, cls, factory in [
        ("adam", torch.optim.Adam, fo.adam),
        ("adamw", torch.optim.AdamW, fo.adamw),
    ]
    for kw in [
        {"lr": -1e-3},
        {"lr": float("nan")},
        {"eps": -1e-8},
        {"betas": (1.0, 0.999)},
        {"betas": (0.9, -0.1)},
        {"betas": (0, 0.999)},  # torch: both floats or both tensors
        {"weight_decay": -0.1},
        {"fused": True, "differentiable": True},
        {"fused": True, "foreach": True},
        {"lr": -1e-3, "fused": True, "differentiable": True},
        {"fused": torch.ones(3)},
        {"eps": float("nan")},
        {"weight_decay": float("nan")},
        {"betas": (float("nan"), 0.999)},
        {"lr": torch.tensor([1e-3, 1e-2])},
        {"lr": torch.tensor(1e-3), "foreach": True},
        {"betas": (torch.tensor(0.9), torch.tensor(0.999)), "foreach": True},
        {"betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.999))},
        {"betas": (torch.tensor(0.9), torch.tensor([0.999, 0.99]))},
        {"eps": torch.tensor([1e-8, 1e-6])},
    ]
]


# torch's flag paths that change numbers (benchmarks/results/flag_paths.md),
# compared with torch run with the same flag; kept out of OPT_CASES (one row
# per optimizer for the generic tests), added to the parity lists below
def _one_leaf(rng, dtype) -> dict:
    """One trainable leaf of 15 elements: torch's fused SGD refuses a group
    where a param's first gradient comes after the others' (TypeError), which
    the None-gradient pattern does to a second leaf. float32: one 8-element
    vector and a 7-element scalar tail; float64 12 and 3; 16-bit: tail only
    (torch 2.13's vectorised 16-bit loop never stores the param, see sgd.py)."""
    return {
        "frozen": np.arange(2, dtype=np.int32),
        "w": rng.normal(size=(3, 5)).astype(dtype),
    }


FLAG_CASES = (
    [
        # torch's fused CPU kernel (torch._fused_sgd_)
        OptCase(
            "sgd-fused",
            torch.optim.SGD,
            fo.sgd,
            grid=CORE_CASES[0].grid,
            fixed={"lr": 0.05, "fused": True},
            valid=CORE_CASES[0].valid,
            tree=_one_leaf,
        ),
        OptCase(
            "adam-differentiable",
            torch.optim.Adam,
            fo.adam,
            grid={
                "weight_decay": [0.0, 0.1],
                "amsgrad": [False, True],
                "decoupled_weight_decay": [False, True],
            },
            fixed={
                "lr": 0.02,
                "betas": (0.8, 0.95),
                "eps": 1e-6,
                "differentiable": True,
            },
            valid=lambda kw: kw["weight_decay"] or not kw["decoupled_weight_decay"],
        ),
        OptCase(
            "adamw-differentiable",
            torch.optim.AdamW,
            fo.adamw,
            grid={"amsgrad": [False, True], "maximize": [False, True]},
            fixed={"lr": 0.02, "weight_decay": 0.3, "differentiable": True},
        ),
        # a tensor lr (float32, torch's default dtype): torch's scalar math with
        # it runs in float32, in the default and the differentiable path
        OptCase(
            "adam-tensor-lr",
            torch.optim.Adam,
            fo.adam,
            grid={
                "weight_decay": [0.0, 0.1],
                "decoupled_weight_decay": [False, True],
                "differentiable": [False, True],
            },
            fixed={"lr": torch.tensor(0.02), "betas": (0.8, 0.95), "eps": 1e-6},
            valid=lambda kw: kw["weight_decay"] or not kw["decoupled_weight_decay"],
        ),
        OptCase(
            "adamw-tensor-lr",
            torch.optim.AdamW,
            fo.adamw,
            grid={"differentiable": [False, True]},
            fixed={"lr": torch.tensor(0.02), "weight_decay": 0.3},
        ),
        # torch's fused CPU kernel (torch._fused_adam_, _fused_adamw_)
        OptCase(
            "adam-fused",
            torch.optim.Adam,
            fo.adam,
            grid=_ADAM_GRID,
            fixed={**_ADAM_FIXED, "fused": True},
            valid=_adam_decay_valid,
        ),
        # betas[0] < 0.5: the kernel's lerp takes its other branch; a tensor lr
        # reaches the kernel as its value
        OptCase(
            "adamw-fused",
            torch.optim.AdamW,
            fo.adamw,
            grid={"amsgrad": [False, True], "lr": [0.02, torch.tensor(0.02)]},
            fixed={
                "betas": (0.3, 0.9),
                "weight_decay": 0.3,
                "maximize": True,
                "fused": True,
            },
        ),
    ]
    + cases_adaptive.FLAG_CASES
    + cases_misc.FLAG_CASES
)

OPT_CASES = CORE_CASES + cases_adaptive.CASES + cases_misc.CASES + cases_ecosystem.CASES
ERROR_CASES = (
    CORE_ERRORS + cases_adaptive.ERRORS + cases_misc.ERRORS + cases_ecosystem.ERRORS
)

OPT_PARAMS = [p for case in OPT_CASES + FLAG_CASES for p in case.params()]
# One combination per optimizer, all flags on.
OPT_PARAMS_ALL_FLAGS = [case.params()[-1] for case in OPT_CASES]
# float64 runs prove the formula for every combination; float32 runs prove the
# dtype handling, for which every other combination (and the all-flags one) is
# enough
OPT_PARAMS_F32 = [
    p
    for case in OPT_CASES + FLAG_CASES
    for i, p in enumerate(case.params())
    if i % 2 == 0 or i == len(case.params()) - 1
]
ERROR_PARAMS = [case.param() for case in ERROR_CASES]

# 16-bit runs (bfloat16 and float16, bit for bit against torch's CPU kernels)
# prove the per-op rounding: each torch.optim row's all-flags combination, or
# the one below where that leaves a rounding path untested (and, for SGD,
# both: nesterov needs dampening == 0)
_PICK_16BIT = {
    "sgd": lambda kw: kw["nesterov"] and kw["weight_decay"] and not kw["maximize"],
    # coupled weight decay (adamw covers the decoupled one)
    "adam": lambda kw: (
        kw["weight_decay"] and kw["amsgrad"] and not kw["decoupled_weight_decay"]
    ),
    "adam-fused": lambda kw: (
        kw["weight_decay"] and kw["amsgrad"] and not kw["decoupled_weight_decay"]
    ),
    # eps1=None: finfo(param dtype).eps
    "adafactor": lambda kw: kw["eps"][0] is None and kw["weight_decay"] > 0,
    # a float64 tensor lr too (the last row's is float32): a 0-d tensor's
    # value meets 16-bit tensors unrounded, unlike a Python float's
    "adafactor-foreach-tensor-lr": lambda kw: (
        kw["lr"].dtype == torch.float64 and kw["weight_decay"] > 0
    ),
    "radam-foreach-tensor-lr": lambda kw: (
        kw["lr"].dtype == torch.float64 and kw["decoupled_weight_decay"]
    ),
    # without nesterov the update aliases the bf16 buffer (see muon.py)
    "muon": lambda kw: not kw["nesterov"] and kw["weight_decay"] > 0,
}


def _params_16bit(case):
    if case.name == "sgd-fused":
        # the harness's 16-bit tree has two leaves and a late first gradient,
        # which torch's fused SGD refuses: test_fused_sgd_adagrad.py
        return []
    params = case.params()
    if case.name not in _PICK_16BIT:
        return [params[-1]]
    pick = next(i for i, kw in enumerate(case.combos()) if _PICK_16BIT[case.name](kw))
    both = case.name in (
        "sgd",
        "adafactor-foreach-tensor-lr",
        "radam-foreach-tensor-lr",
    )
    return [params[pick], params[-1]] if both else [params[pick]]


OPT_PARAMS_16BIT = [
    p
    for case in OPT_CASES + FLAG_CASES
    if case.torch_cls.__module__.startswith("torch.optim")
    for p in _params_16bit(case)
]
