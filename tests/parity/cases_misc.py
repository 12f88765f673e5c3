"""Parity rows: see cases.py.

Adafactor and Muon run through the generic table; SparseAdam takes sparse
gradients, so its parity lives in ``test_sparse_adam.py`` and only its bad
arguments are here.
"""

import numpy as np
import torch

from funcopt.optim.adafactor import adafactor
from funcopt.optim.lbfgs import lbfgs
from funcopt.optim.muon import muon
from funcopt.optim.sparse_adam import sparse_adam
from tests.torch_ref import ErrorCase, OptCase


def muon_params(rng: np.random.Generator, dtype) -> dict:
    """2-D leaves only (Muon's rule): tall, wide, square, plus a frozen int leaf."""
    return {
        "frozen": np.arange(3, dtype=np.int32),
        "square": rng.normal(size=(4, 4)).astype(dtype),
        "tall": rng.normal(size=(7, 3)).astype(dtype),
        "vector_like": rng.normal(size=(1, 5)).astype(dtype),
        "wide": rng.normal(size=(3, 8)).astype(dtype),
    }


def one_per_group(rng: np.random.Generator, dtype) -> dict:
    """One leaf per torch foreach group (dtype, and 2-D or more or not).

    With a tensor `lr`, torch's `_multi_tensor_adafactor` raises a
    `TypeError` where a group's step counts straddle `1/sqrt(t) < lr`
    (`_foreach_mul_` gets a list of tensors and floats); one leaf per group
    keeps the None-gradient pattern's unequal counts. "k" is one 16-bit CPU
    block and a tail, "s" only a tail (see `make_params_16bit`).
    """
    return {
        "frozen": np.arange(2, dtype=np.int32),
        "k": rng.normal(size=(5, 10)).astype(dtype),
        "s": np.asarray(rng.normal(), dtype=dtype),
    }


CASES = [
    # the default tree has 0-D, 1-D, 2-D and 3-D leaves
    OptCase(
        "adafactor",
        torch.optim.Adafactor,
        adafactor,
        grid={
            "eps": [(None, 1e-3), (1e-4, 1e-2)],
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
            "beta2_decay": [-0.8, -0.5],
            "d": [1.0, 1.5],
        },
        # lr above 1/sqrt(t) for the first steps, so both sides of the min act
        fixed={"lr": 0.3},
        valid=lambda kw: kw["beta2_decay"] == -0.8 or kw["d"] == 1.0,
        # measured (3 seeds, every combination): 4.1e-6 abs at worst
        f32_rtol=1e-5,
        f32_atol=1e-6,
    ),
    OptCase(
        "muon",
        torch.optim.Muon,
        muon,
        grid={
            "nesterov": [False, True],
            "adjust_lr_fn": [None, "original", "match_rms_adamw"],
            "weight_decay": [0.0, 0.1],
        },
        fixed={"lr": 0.02, "momentum": 0.9},
        tree=muon_params,
        # measured (3 seeds, every combination): 1.4e-6 abs at worst; the
        # bf16 Newton-Schulz matches torch bit for bit in float64
        f32_rtol=1e-5,
        f32_atol=5e-6,
    ),
]

# torch's flag paths that change numbers (see cases.FLAG_CASES)
FLAG_CASES = [
    # torch's `_multi_tensor_adafactor`: the update scaled in place
    # (`_foreach_mul_`), then added; eps1 given (with eps1=None torch's
    # foreach takes the first dtype group's finfo eps for every dtype)
    OptCase(
        "adafactor-foreach",
        torch.optim.Adafactor,
        adafactor,
        grid={"weight_decay": [0.0, 0.1], "maximize": [False, True]},
        fixed={"lr": 0.3, "eps": (1e-4, 1e-2), "beta2_decay": -0.5, "foreach": True},
        f32_rtol=1e-5,
        f32_atol=1e-6,
    ),
    # a float32 tensor lr: rho_t = min(lr, 1/sqrt(t)) is the tensor until
    # 1/sqrt(t) < lr (t >= 12 here), and alpha, the decay factor and the
    # step size are float32 tensor ops
    OptCase(
        "adafactor-tensor-lr",
        torch.optim.Adafactor,
        adafactor,
        grid={"weight_decay": [0.0, 0.1], "maximize": [False, True]},
        fixed={"lr": torch.tensor(0.3), "eps": (1e-4, 1e-2), "beta2_decay": -0.5},
        f32_rtol=1e-5,
        f32_atol=1e-6,
    ),
    # both: torch's `_multi_tensor_adafactor` with a 0-d tensor lr (float32,
    # and float64, whose scalar math is Python-float math)
    OptCase(
        "adafactor-foreach-tensor-lr",
        torch.optim.Adafactor,
        adafactor,
        grid={
            "weight_decay": [0.0, 0.1],
            "maximize": [False, True],
            "lr": [torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.3)],
        },
        fixed={"eps": (1e-4, 1e-2), "beta2_decay": -0.5, "foreach": True},
        tree=one_per_group,
        f32_rtol=1e-5,
        f32_atol=1e-6,
    ),
]

ERRORS = (
    [
        ErrorCase("adafactor", torch.optim.Adafactor, adafactor, kw)
        for kw in [
            {"lr": -0.1},
            {"lr": float("nan")},
            {"beta2_decay": 0.5},
            {"eps": (-1e-30, 1e-3)},
            {"eps": (None, -1e-3)},
            {"eps": (float("nan"), 1e-3)},
            {"d": 0.5},
            {"weight_decay": -0.1},
            {"lr": torch.tensor([0.1, 0.2])},
            {"d": float("nan")},
            {"beta2_decay": float("nan")},
        ]
    ]
    + [
        ErrorCase("muon", torch.optim.Muon, muon, kw)
        for kw in [
            {"lr": -0.1},
            {"lr": float("nan")},
            {"momentum": -0.5},
            {"weight_decay": -0.1},
            {"adjust_lr_fn": "sqrt"},
            {"lr": torch.tensor([0.1, 0.2])},
            {"momentum": float("nan")},
            {"adjust_lr_fn": "Original"},
        ]
    ]
    + [
        ErrorCase("sparse_adam", torch.optim.SparseAdam, sparse_adam, kw)
        for kw in [
            {"lr": 0.0},
            {"lr": -1e-3},
            {"eps": 0.0},
            {"betas": (1.0, 0.999)},
            {"betas": (0.9, -0.1)},
            {"lr": torch.tensor([0.1, 0.2])},
            {"lr": float("nan")},
            {"eps": float("nan")},
        ]
    ]
    + [
        ErrorCase("lbfgs", torch.optim.LBFGS, lbfgs, kw)
        for kw in [
            {"lr": -1.0},
            {"lr": float("nan")},
            {"lr": torch.tensor([1.0, 2.0])},
        ]
    ]
)
