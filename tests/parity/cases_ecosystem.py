"""Parity rows for the ecosystem optimizers (:mod:`funcopt.contrib`): see cases.py.

Each row's ``torch_cls`` is the live reference class from its PyPI package
(versions pinned in ``constraints.txt``). Optimizer-wide flags of a reference
(its ``self.`` attributes, e.g. pytorch-optimizer's ``maximize``) are
``fixed`` per row rather than in the grid, so that the two-group test only
varies what the reference keeps per group. Schedule-free's train/eval switch
and Prodigy's global ``d`` have their own tests in ``test_ecosystem.py``.
"""

import dataclasses

import lion_pytorch
import numpy as np
import prodigyopt
import pytorch_optimizer
import schedulefree

from funcopt import contrib
from tests.torch_ref import ErrorCase, OptCase, make_small_params


def _in_train_mode(cls):
    """``cls`` whose ``step`` first calls ``train()`` (schedule-free's contract).

    The generic harness only constructs and steps; schedule-free refuses to
    step in eval mode, its state at construction. ``train()`` before any
    ``z`` exists moves nothing and is idempotent afterwards, so this is the
    reference's own training loop. ``__init__`` (and so its signature) is
    inherited unchanged.
    """

    def step(self, closure=None):
        self.train()
        return cls.step(self, closure)

    return type(cls.__name__, (cls,), {"step": step})


def no_scalar_params(rng, dtype) -> dict:
    """make_params without its 0-d leaf: pytorch-optimizer's global-norm clip
    multiplies each gradient in place by a shape-[1] tensor, which torch
    refuses for a 0-d gradient (a reference limitation)."""
    return {
        "b": rng.normal(size=(3,)).astype(dtype),
        "frozen": np.arange(2, dtype=np.int32),
        "nested": {"k": rng.normal(size=(2, 2, 2)).astype(dtype)},
        "w": rng.normal(size=(4, 3)).astype(dtype),
    }


@dataclasses.dataclass(frozen=True)
class SharedLrCase(OptCase):
    """A row whose reference refuses group lrs other than the largest and 0.

    ``prodigyopt.Prodigy.step`` raises ``RuntimeError`` when param groups have
    different nonzero lrs. The two-group test honours ``shared_group_lr``: it
    keeps both groups' lr equal (varying the other hyperparameters) and, mid
    run, sets the second group's lr to 0, the reference's way to freeze a
    group (which still steps with its old moments).
    """

    shared_group_lr: bool = True


AdamWScheduleFree = _in_train_mode(schedulefree.AdamWScheduleFree)
SGDScheduleFree = _in_train_mode(schedulefree.SGDScheduleFree)

CASES = [
    OptCase(
        "lion",
        lion_pytorch.Lion,
        contrib.lion,
        grid={"weight_decay": [0.0, 0.1], "betas": [(0.9, 0.99), (0.95, 0.98)]},
        fixed={"lr": 0.01},
    ),
    OptCase(
        "lion-decoupled",
        lion_pytorch.Lion,
        contrib.lion,
        grid={"weight_decay": [1e-4, 3e-4]},
        fixed={"lr": 0.01, "decoupled_weight_decay": True},
    ),
    OptCase(
        "schedulefree_adamw",
        AdamWScheduleFree,
        contrib.adamw_schedule_free,
        grid={
            "weight_decay": [0.0, 0.1],
            "warmup_steps": [7],  # steps before and after the warm-up end
            "r": [0.0, 0.5],
            "weight_lr_power": [2.0, 0.0],
        },
        fixed={"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6},
    ),
    OptCase(
        "schedulefree_sgd",
        SGDScheduleFree,
        contrib.sgd_schedule_free,
        grid={
            "weight_decay": [0.0, 0.1],
            "warmup_steps": [7],
            "r": [0.0, 0.5],
            "momentum": [0.9, 0.5],
        },
        fixed={"lr": 0.05},
    ),
    OptCase(
        "adan",
        pytorch_optimizer.Adan,
        contrib.adan,
        grid={
            "weight_decay": [0.0, 0.05],
            "weight_decouple": [False, True],
        },
        fixed={"lr": 0.01},
    ),
    OptCase(
        "adan-maximize-clip",
        pytorch_optimizer.Adan,
        contrib.adan,
        grid={"weight_decay": [0.0, 0.05], "weight_decouple": [False, True]},
        # clip factor 1 (norms < 100): the reference takes a float32 sqrt that
        # is not correctly rounded (1 ulp off in ~1% of values), see adan.py
        fixed={"lr": 0.01, "maximize": True, "max_grad_norm": 100.0},
        tree=no_scalar_params,
    ),
]

CASES += [
    OptCase(
        "lamb",
        pytorch_optimizer.Lamb,
        contrib.lamb,
        grid={
            "weight_decay": [0.0, 0.05],
            "weight_decouple": [True, False],
            "fixed_decay": [False, True],
            "grad_averaging": [True, False],
            "adam": [False, True],
        },
        fixed={"lr": 0.01},
        valid=lambda kw: kw["weight_decouple"] or not kw["fixed_decay"],
        # measured (seed 0, every combination): 1.6e-5 abs / 3.2e-5 rel at
        # worst, with adam=True (no trust ratio); the float32 drift of the
        # step size 1/(1 - beta1**t), which the reference takes in float64
        f32_rtol=1e-4,
        f32_atol=3e-5,
    ),
    OptCase(
        "lamb-rectify",
        pytorch_optimizer.Lamb,
        contrib.lamb,
        grid={"weight_decay": [0.0, 0.05], "adam": [False, True]},
        fixed={"lr": 0.01, "rectify": True, "betas": (0.9, 0.9)},
    ),
    OptCase(
        "lamb-rectify-sgd-maximize-prenorm",
        pytorch_optimizer.Lamb,
        contrib.lamb,
        grid={"weight_decay": [0.0, 0.05], "rectify": [False, True]},
        fixed={
            "lr": 0.01,
            "degenerated_to_sgd": True,
            "maximize": True,
            "pre_norm": True,
            "max_grad_norm": 100.0,  # factor 1: see adan-maximize-clip
            "betas": (0.9, 0.9),
        },
        tree=no_scalar_params,
    ),
]

CASES += [
    SharedLrCase(
        "prodigy",
        prodigyopt.Prodigy,
        contrib.prodigy,
        grid={
            "weight_decay": [0.0, 0.1],
            "safeguard_warmup": [False, True],
            "beta3": [None, 0.95],
            "eps": [1e-8, 1e-6],
        },
        fixed={"d0": 1e-4},
        tree=make_small_params,
    ),
    SharedLrCase(
        "prodigy-coupled-biascorr",
        prodigyopt.Prodigy,
        contrib.prodigy,
        grid={
            "weight_decay": [0.0, 0.1],
            "betas": [(0.9, 0.999), (0.0, 0.99)],
            "safeguard_warmup": [False, True],
        },
        fixed={"decouple": False, "use_bias_correction": True, "d0": 1e-4},
        tree=make_small_params,
    ),
    SharedLrCase(
        "prodigy-growth-slice",
        prodigyopt.Prodigy,
        contrib.prodigy,
        grid={
            "slice_p": [1, 3],
            "growth_rate": [float("inf"), 1.02],
            "d_coef": [1.0, 2.0],
            "d0": [1e-6, 1e-3],
        },
        fixed={"lr": 0.5, "weight_decay": 0.05, "use_bias_correction": True},
        tree=make_small_params,
    ),
]

ERRORS = (
    [
        ErrorCase("lion", lion_pytorch.Lion, contrib.lion, kw)
        for kw in [
            {"lr": 0.0},
            {"lr": -1.0},
            {"betas": (1.5, 0.9)},
            {"betas": (0.9, -1)},
            {"lr": float("nan")},
            {"betas": (0.9, float("nan"))},
        ]
    ]
    + [
        ErrorCase(
            "schedulefree_sgd",
            schedulefree.SGDScheduleFree,
            contrib.sgd_schedule_free,
            kw,
        )
        for kw in [
            {"lr": -0.1},
            {"weight_decay": -0.1},
            {"momentum": 0.0},
            {"momentum": 1.0},
        ]
    ]
    + [
        ErrorCase("adan", pytorch_optimizer.Adan, contrib.adan, kw)
        for kw in [
            {"lr": -0.1},
            {"betas": (1.0, 0.9, 0.9)},
            {"betas": (0.9, 1.0, 0.9)},
            {"betas": (0.9, 0.9, 1.1)},
            {"weight_decay": -0.1},
            {"max_grad_norm": -1.0},
            {"eps": -1e-8},
        ]
    ]
    + [
        ErrorCase("lamb", pytorch_optimizer.Lamb, contrib.lamb, kw)
        for kw in [
            {"lr": -0.1},
            {"betas": (1.0, 0.9)},
            {"betas": (0.9, 1.0)},
            {"weight_decay": -0.1},
            {"max_grad_norm": -1.0},
            {"eps": -1e-8},
        ]
    ]
    + [
        ErrorCase("prodigy", prodigyopt.Prodigy, contrib.prodigy, kw)
        for kw in [
            {"d0": 0.0},
            {"lr": 0.0},
            {"lr": -1.0},
            {"eps": 0.0},
            {"betas": (1.0, 0.9)},
            {"betas": (-0.1, 0.9)},
            {"betas": (0.9, 1.0)},
            {"d0": -1.0, "lr": -1.0},
            {"d0": float("nan")},
            {"eps": float("nan")},
        ]
    ]
)
