"""Parity rows: see cases.py.

Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta, Rprop and ASGD: one row
each, with a flag grid that turns every switch on and off.
"""

import torch

from funcopt.optim.adadelta import adadelta
from funcopt.optim.adagrad import adagrad
from funcopt.optim.adamax import adamax
from funcopt.optim.asgd import asgd
from funcopt.optim.nadam import nadam
from funcopt.optim.radam import radam
from funcopt.optim.rmsprop import rmsprop
from funcopt.optim.rprop import rprop
from tests.torch_ref import ErrorCase, OptCase

# the weight-decay grid of the Adam family (coupled and decoupled), with
# and without `maximize`
_DECAY = {"weight_decay": [0.0, 0.1], "decoupled_weight_decay": [False, True]}
_DECAY_MAXIMIZE = {**_DECAY, "maximize": [False, True]}


def _decay_needs_wd(kw):
    return kw["weight_decay"] or not kw["decoupled_weight_decay"]


CASES = [
    OptCase(
        "adamax",
        torch.optim.Adamax,
        adamax,
        grid={"weight_decay": [0.0, 0.1], "maximize": [False, True]},
        fixed={"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6},
    ),
    OptCase(
        "nadam",
        torch.optim.NAdam,
        nadam,
        grid={
            "momentum_decay": [4e-3, 0.3],
            "weight_decay": [0.0, 0.1],
            "decoupled_weight_decay": [False, True],
            "maximize": [False, True],
        },
        fixed={"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6},
        valid=_decay_needs_wd,
    ),
    OptCase(
        "radam",
        torch.optim.RAdam,
        radam,
        # beta2=0.99: rho_t <= 5 for the first steps, > 5 afterwards
        grid=dict(_DECAY_MAXIMIZE),
        fixed={"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-6},
        valid=_decay_needs_wd,
    ),
    OptCase(
        "rmsprop",
        torch.optim.RMSprop,
        rmsprop,
        grid={
            "momentum": [0.0, 0.9],
            "centered": [False, True],
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
        },
        fixed={"lr": 0.01, "alpha": 0.9},
    ),
    OptCase(
        "adagrad",
        torch.optim.Adagrad,
        adagrad,
        grid={
            "lr_decay": [0.0, 0.1],
            "initial_accumulator_value": [0.0, 0.5],
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
        },
        fixed={"lr": 0.1},
    ),
    OptCase(
        "adadelta",
        torch.optim.Adadelta,
        adadelta,
        grid={
            "rho": [0.9, 0.5],
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
        },
        fixed={"lr": 1.0},
    ),
    OptCase(
        "rprop",
        torch.optim.Rprop,
        rprop,
        grid={
            "etas": [(0.5, 1.2), (0.3, 1.7)],
            "step_sizes": [(1e-6, 50), (1e-3, 0.05)],
            "maximize": [False, True],
        },
        fixed={"lr": 0.01},
    ),
    OptCase(
        "asgd",
        torch.optim.ASGD,
        asgd,
        # t0=5: mu != 1 (averaging proper) from the 7th step of each param
        grid={
            "t0": [1e6, 5.0],
            "lambd": [1e-4, 0.1],
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
        },
        fixed={"lr": 0.05, "alpha": 0.75},
    ),
]

# torch's flag paths that change numbers (see cases.FLAG_CASES)
FLAG_CASES = [
    OptCase(
        "nadam-differentiable",
        torch.optim.NAdam,
        nadam,
        grid=dict(_DECAY_MAXIMIZE),
        fixed={
            "lr": 0.02,
            "betas": (0.8, 0.95),
            "eps": 1e-6,
            "momentum_decay": 0.3,
            "differentiable": True,
        },
        valid=_decay_needs_wd,
    ),
    # a float32 tensor lr: torch's scalar math with it runs in float32
    OptCase(
        "nadam-tensor-lr",
        torch.optim.NAdam,
        nadam,
        grid={**_DECAY, "differentiable": [False, True]},
        fixed={
            "lr": torch.tensor(0.02),
            "betas": (0.8, 0.95),
            "eps": 1e-6,
            "momentum_decay": 0.3,
        },
        valid=_decay_needs_wd,
    ),
    # torch's `_multi_tensor_nadam`: sqrt(v) / sqrt(1 - beta2^t), and a
    # tensor lr read as a Python float
    OptCase(
        "nadam-foreach",
        torch.optim.NAdam,
        nadam,
        grid={**_DECAY, "lr": [0.02, torch.tensor(0.02)]},
        fixed={
            "betas": (0.8, 0.95),
            "eps": 1e-6,
            "momentum_decay": 0.3,
            "maximize": True,
            "foreach": True,
        },
        valid=_decay_needs_wd,
    ),
    # torch's `_multi_tensor_asgd`: the decay folded into the gradient, ax
    # always averaged, the next eta in float32 tensor ops on the step
    OptCase(
        "asgd-foreach",
        torch.optim.ASGD,
        asgd,
        grid={
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
            "lr": [0.05, torch.tensor(0.05)],
        },
        fixed={"alpha": 0.75, "t0": 5.0, "lambd": 0.1, "foreach": True},
    ),
    # torch's `_multi_tensor_radam`: one factor 1 / ((sqrt(v) + eps) / s) + u
    OptCase(
        "radam-foreach",
        torch.optim.RAdam,
        radam,
        grid=dict(_DECAY_MAXIMIZE),
        fixed={"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-6, "foreach": True},
        valid=_decay_needs_wd,
    ),
    # torch's `_multi_tensor_radam` with a 0-d tensor lr: its step sizes
    # are tensor ops in lr's dtype
    OptCase(
        "radam-foreach-tensor-lr",
        torch.optim.RAdam,
        radam,
        grid={
            **_DECAY_MAXIMIZE,
            "lr": [torch.tensor(0.02, dtype=torch.float64), torch.tensor(0.02)],
        },
        fixed={"betas": (0.9, 0.99), "eps": 1e-6, "foreach": True},
        valid=_decay_needs_wd,
    ),
    OptCase(
        "adamax-tensor-lr",
        torch.optim.Adamax,
        adamax,
        grid={"weight_decay": [0.0, 0.1], "maximize": [False, True]},
        fixed={"lr": torch.tensor(0.02), "betas": (0.8, 0.95), "eps": 1e-6},
    ),
    # torch's capturable step (accelerators only: run on CPU with torch's
    # device check lifted, `tests/torch_ref.capturable_on_cpu`)
    OptCase(
        "adamax-capturable",
        torch.optim.Adamax,
        adamax,
        grid={
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
            "lr": [0.02, torch.tensor(0.02, dtype=torch.float64)],
        },
        fixed={"betas": (0.8, 0.95), "eps": 1e-6, "capturable": True},
    ),
    OptCase(
        "radam-capturable",
        torch.optim.RAdam,
        radam,
        # beta2=0.99: rho_t <= 5 for the first steps, > 5 afterwards
        grid={**_DECAY_MAXIMIZE, "lr": [0.02, torch.tensor(0.02)]},
        fixed={"betas": (0.9, 0.99), "eps": 1e-6, "capturable": True},
        valid=_decay_needs_wd,
    ),
    # torch's `_multi_tensor_radam` capturable branch: its step sizes 0-d
    # float32 tensors (a float64 tensor lr promotes their products)
    OptCase(
        "radam-foreach-capturable",
        torch.optim.RAdam,
        radam,
        grid={
            **_DECAY_MAXIMIZE,
            "lr": [0.02, torch.tensor(0.02), torch.tensor(0.02, dtype=torch.float64)],
        },
        fixed={"betas": (0.9, 0.99), "eps": 1e-6, "foreach": True, "capturable": True},
        valid=_decay_needs_wd,
    ),
    OptCase(
        "nadam-capturable",
        torch.optim.NAdam,
        nadam,
        grid={
            "weight_decay": [0.0, 0.1],
            "decoupled_weight_decay": [False, True],
            "lr": [0.02, torch.tensor(0.02), torch.tensor(0.02, dtype=torch.float64)],
        },
        fixed={
            "betas": (0.8, 0.95),
            "eps": 1e-6,
            "momentum_decay": 0.3,
            "maximize": True,
            "capturable": True,
        },
        valid=_decay_needs_wd,
    ),
    # torch's `_multi_tensor_nadam` capturable branch: one addcdiv of
    # a * grad + b * exp_avg, its scalars 0-d float32 tensors
    OptCase(
        "nadam-foreach-capturable",
        torch.optim.NAdam,
        nadam,
        grid={
            **_DECAY_MAXIMIZE,
            "lr": [0.02, torch.tensor(0.02), torch.tensor(0.02, dtype=torch.float64)],
        },
        fixed={
            "betas": (0.8, 0.95),
            "eps": 1e-6,
            "momentum_decay": 0.3,
            "foreach": True,
            "capturable": True,
        },
        valid=_decay_needs_wd,
    ),
    OptCase(
        "asgd-capturable",
        torch.optim.ASGD,
        asgd,
        grid={
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
            "lr": [0.05, torch.tensor(0.05)],
        },
        fixed={"lambd": 0.01, "alpha": 0.75, "t0": 3.0, "capturable": True},
    ),
    # torch's `_multi_tensor_asgd` capturable branch: the next eta and mu in
    # float32 tensor ops, lr a separate factor
    OptCase(
        "asgd-foreach-capturable",
        torch.optim.ASGD,
        asgd,
        grid={
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
            "lr": [0.05, torch.tensor(0.05), torch.tensor(0.05, dtype=torch.float64)],
        },
        fixed={
            "lambd": 0.01,
            "alpha": 0.75,
            "t0": 3.0,
            "foreach": True,
            "capturable": True,
        },
    ),
    OptCase(
        "adagrad-tensor-lr",
        torch.optim.Adagrad,
        adagrad,
        grid={"lr_decay": [0.0, 0.1], "maximize": [False, True]},
        fixed={"lr": torch.tensor(0.1), "weight_decay": 0.1},
    ),
    # torch's fused CPU kernel (torch._fused_adagrad_): a tensor lr reaches it
    # as its value
    OptCase(
        "adagrad-fused",
        torch.optim.Adagrad,
        adagrad,
        grid={
            "lr_decay": [0.0, 0.1],
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
            "lr": [0.1, torch.tensor(0.1)],
        },
        fixed={"initial_accumulator_value": 0.5, "eps": 1e-3, "fused": True},
    ),
    OptCase(
        "asgd-tensor-lr",
        torch.optim.ASGD,
        asgd,
        grid={"lambd": [1e-4, 0.1], "weight_decay": [0.0, 0.1]},
        fixed={"lr": torch.tensor(0.05), "alpha": 0.75, "t0": 5.0},
    ),
]

_ADAM_LIKE_ERRORS = [
    {"lr": -1e-3},
    {"lr": float("nan")},
    {"eps": -1e-8},
    {"betas": (1.0, 0.999)},
    {"betas": (-0.1, 0.999)},
    {"betas": (0.9, 1.0)},
    {"weight_decay": -0.1},
    {"eps": float("nan")},
    {"lr": torch.tensor([1e-3, 1e-2])},
]

ERRORS = (
    [
        ErrorCase(name, cls, factory, kw)
        for name, cls, factory in [
            ("adamax", torch.optim.Adamax, adamax),
            ("nadam", torch.optim.NAdam, nadam),
            ("radam", torch.optim.RAdam, radam),
        ]
        for kw in _ADAM_LIKE_ERRORS
    ]
    + [
        ErrorCase("nadam", torch.optim.NAdam, nadam, {"momentum_decay": -1e-3}),
        ErrorCase("nadam", torch.optim.NAdam, nadam, {"momentum_decay": float("nan")}),
    ]
    + [
        ErrorCase("rmsprop", torch.optim.RMSprop, rmsprop, kw)
        for kw in [
            {"lr": -0.01},
            {"lr": float("nan")},
            {"eps": -1e-8},
            {"momentum": -0.9},
            {"weight_decay": -0.1},
            {"alpha": -0.5},
            {"alpha": float("nan")},
            {"lr": torch.tensor([0.01, 0.02])},
        ]
    ]
    + [
        ErrorCase("adagrad", torch.optim.Adagrad, adagrad, kw)
        for kw in [
            {"lr": -0.01},
            {"fused": torch.ones(3)},
            {"lr_decay": -0.1, "fused": torch.ones(3)},
            {"lr": float("nan")},
            {"lr_decay": -0.1},
            {"weight_decay": -0.1},
            {"initial_accumulator_value": -0.1},
            {"eps": -1e-10},
            {"fused": True, "differentiable": True},
            {"fused": True, "foreach": True},
            {"lr": -0.01, "fused": True, "differentiable": True},
            {"lr": torch.tensor([0.01, 0.02])},
        ]
    ]
    + [
        ErrorCase("adadelta", torch.optim.Adadelta, adadelta, kw)
        for kw in [
            {"lr": -1.0},
            {"lr": float("nan")},
            {"rho": -0.1},
            {"rho": 1.1},
            {"rho": float("nan")},
            {"eps": -1e-6},
            {"weight_decay": -0.1},
            {"lr": torch.tensor([1.0, 2.0])},
        ]
    ]
    + [
        ErrorCase("rprop", torch.optim.Rprop, rprop, kw)
        for kw in [
            {"lr": -0.01},
            {"lr": float("nan")},
            {"etas": (0.0, 1.2)},
            {"etas": (1.0, 1.2)},
            {"etas": (0.5, 1.0)},
            {"etas": (0.5, float("nan"))},
            {"lr": torch.tensor([0.01, 0.02])},
            {"etas": (float("nan"), 1.2)},
        ]
    ]
    + [
        ErrorCase("asgd", torch.optim.ASGD, asgd, kw)
        for kw in [
            {"lr": -0.01},
            {"lr": float("nan")},
            {"weight_decay": -0.1},
            {"lr": torch.tensor([0.01, 0.02])},
            {"weight_decay": float("nan")},
        ]
    ]
)
