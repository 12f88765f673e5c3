"""Muon against live torch: a tensor `lr`, and eager steps equal to jitted ones.

The generic table (``cases_misc.py``) runs Muon's flag grid with Python-float
hyperparameters; these are the cases it does not reach.
"""

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import funcopt as fo
from tests.parity.cases_misc import muon_params
from tests.torch_ref import (
    OptCase,
    assert_same_bits,
    from_torch,
    make_grads,
    run_funcopt,
    run_torch,
    slot_leaves,
    trainable_leaves,
)

MUON = OptCase("muon", torch.optim.Muon, fo.muon, grid={}, tree=muon_params)


def _leaves_and_buffers(params, state):
    return trainable_leaves(params) + [
        np.asarray(b)
        for b in slot_leaves(state, params, "momentum_buffer")
        if b is not None
    ]


def _torch_leaves_and_buffers(expected, torch_state):
    return expected + [from_torch(s["momentum_buffer"]) for s in torch_state]


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tensor_lr_is_torchs_float32_arithmetic(
    dtype, adjust_lr_fn, x64, exact_float32
):
    """`lr=torch.tensor(0.02)`: torch computes `1 - lr*weight_decay` and the
    adjusted lr as float32 tensor ops; funcopt does with a float32 array lr
    (float64: to 1e-10, as the float64 table; float32: bit for bit)."""
    rng = np.random.default_rng(0)
    params = muon_params(rng, dtype)
    grads = make_grads(rng, params, 3, False)
    kwargs = {"weight_decay": 0.1, "adjust_lr_fn": adjust_lr_fn}
    expected, torch_state = run_torch(
        MUON, {**kwargs, "lr": torch.tensor(0.02)}, params, grads
    )
    lr = np.asarray(0.02, np.float32)
    new_params, state = run_funcopt(MUON, {**kwargs, "lr": lr}, params, grads, jit=True)
    ours = _leaves_and_buffers(new_params, state)
    theirs = _torch_leaves_and_buffers(expected, torch_state)
    for i, (a, e) in enumerate(zip(ours, theirs)):
        if dtype == np.float64:
            np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12, err_msg=str(i))
        else:
            assert_same_bits(a, e, f"leaf or buffer {i}")


@pytest.mark.parametrize(
    "dtype,with_x64",
    [(np.float32, False), (np.float32, True), (ml_dtypes.bfloat16, True)],
    ids=["float32", "float32-x64", "bfloat16-x64"],
)
def test_eager_steps_are_jitted_bits(dtype, with_x64, torch_cpu_loop):
    """Issue 16 item 6: with `ns_coefficients=(3.4, -4.7, 2.0)` one flipped
    rounding used to grow through Newton-Schulz; un-jitted and jitted steps
    give the same bits, and (bfloat16, x64) torch's."""
    rng = np.random.default_rng(1)
    params = muon_params(rng, np.dtype(dtype))
    grads = make_grads(rng, params, 5, False)
    kwargs = {"lr": 0.02, "momentum": 0.9, "ns_coefficients": (3.4, -4.7, 2.0)}
    with jax.enable_x64(with_x64):
        jitted = run_funcopt(MUON, kwargs, params, grads, jit=True)
        eager = run_funcopt(MUON, kwargs, params, grads, jit=False)
    for i, (a, e) in enumerate(
        zip(_leaves_and_buffers(*eager), _leaves_and_buffers(*jitted))
    ):
        assert_same_bits(a, e, f"eager vs jit, leaf or buffer {i}")
    if dtype == ml_dtypes.bfloat16:
        theirs = _torch_leaves_and_buffers(*run_torch(MUON, kwargs, params, grads))
        for i, (a, e) in enumerate(zip(_leaves_and_buffers(*jitted), theirs)):
            assert_same_bits(a, e, f"leaf or buffer {i}")
