"""SGD's and Adagrad's `fused=True` against torch's fused CPU kernels
(`torch._fused_sgd_`, `torch._fused_adagrad_`), beyond the parity rows
(`sgd-fused` in cases.py, `adagrad-fused` in cases_adaptive.py).

torch's fused SGD refuses a param group where one param's first gradient
comes after the others' (`TypeError`: its momentum buffers are created for
the whole group at once), so the momentum rows here start with a gradient
for every leaf; the None-gradient pattern runs from the second step on.
"""

from fractions import Fraction

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt.optim.adagrad import _fused_decay
from tests.torch_ref import (
    OptCase,
    check_against_torch,
    check_packed_against_torch,
    make_grads,
    run_funcopt,
    run_funcopt_flagged,
    to_torch,
)

SGD = OptCase("sgd-fused", torch.optim.SGD, fo.sgd, grid={})
# all flags on, and nesterov (which needs dampening 0)
SGD_FLAGS = [
    dict(momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1),
]
SGD_IDS = ["dampening", "nesterov"]


def _grads(rng, params, steps):
    """`make_grads` with `None` leaves, every leaf with a gradient at step 1."""
    grads = make_grads(rng, params, steps, True)
    grads[0] = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
    return grads


def _check(kwargs, params, grads, eager_steps=0):
    kwargs = {"lr": 0.05, "fused": True, **kwargs}
    new_params, state = run_funcopt_flagged(SGD, kwargs, params, grads)
    check_against_torch(SGD, kwargs, params, grads, new_params, state)
    if eager_steps:
        first = grads[:eager_steps]
        new_params, state = run_funcopt(SGD, kwargs, params, first, jit=False)
        check_against_torch(SGD, kwargs, params, first, new_params, state)


@pytest.mark.parametrize("kwargs", SGD_FLAGS, ids=SGD_IDS)
def test_sgd_float32_is_bit_exact(kwargs, x64, exact_float32):
    """float32 leaves of 37, 65, 7, 24 and 1 elements: the kernel's 8-wide
    vectorised loop and its scalar tail (which contracts the momentum
    update differently), jitted over 20 steps and eagerly for 3."""
    rng = np.random.default_rng(0)
    shapes = {"a": (37,), "b": (5, 13), "c": (7,), "d": (2, 3, 4), "e": ()}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    _check(kwargs, params, _grads(rng, params, 20), eager_steps=3)


@pytest.mark.parametrize("kwargs", SGD_FLAGS, ids=SGD_IDS)
def test_sgd_16bit_is_bit_exact(kwargs, x64):
    """bfloat16 and float16 leaves shorter than the kernel's 16-element
    vectors (its scalar loop only, see the next test): float32 math rounded
    at each store."""
    rng = np.random.default_rng(0)
    params = {
        name: {
            "a": rng.normal(size=(15,)).astype(dtype),
            "b": rng.normal(size=(3, 4)).astype(dtype),
            "c": np.asarray(rng.normal(), dtype=dtype),
        }
        for name, dtype in [("bf16", ml_dtypes.bfloat16), ("f16", np.float16)]
    }
    _check(kwargs, params, _grads(rng, params, 10))


def test_torch_16bit_vectorised_loop_leaves_the_param_unchanged():
    """A pin of torch 2.13's bug (pytorch/pytorch#191763, fixed after 2.13):
    its fused SGD's 16-bit vectorised loop never stores the param, so a
    bfloat16 param of 16 elements does not move at all. funcopt updates
    every element as torch's scalar loop does. When this fails, torch is
    fixed: compare funcopt's 16-bit rows on longer leaves and update the
    docstring of `funcopt.sgd`."""
    rng = np.random.default_rng(0)
    p = rng.normal(size=(16,)).astype(ml_dtypes.bfloat16)
    g = rng.normal(size=(16,)).astype(ml_dtypes.bfloat16)
    tp = to_torch(p).requires_grad_()
    tp.grad = to_torch(g)
    torch.optim.SGD([tp], lr=0.5, fused=True).step()
    assert torch.equal(tp.detach(), to_torch(p))
    opt = fo.sgd(lr=0.5, fused=True)
    new, _ = opt.step({"w": p}, {"w": g}, opt.init({"w": p}))
    assert (np.asarray(new["w"]) != p).all()


ADAGRAD = OptCase("adagrad-fused", torch.optim.Adagrad, fo.adagrad, grid={})


def test_adagrad_float32_is_bit_exact(x64, exact_float32):
    """float32, all flags, on this AVX-512 machine too: the fused kernel's
    square root is the hardware instruction (correctly rounded), unlike
    torch's default path (MKL's `vsSqrt`, see test_float32_bits.py). Leaves
    of 37, 65, 7, 24 and 1 elements (vectorised loop and scalar tail),
    jitted over 20 steps with None gradients (a leaf's first one late), and
    eagerly for 3; a tensor `lr` (its value reaches the kernel)."""
    kwargs = dict(
        lr=torch.tensor(0.1),
        lr_decay=0.1,
        weight_decay=0.1,
        initial_accumulator_value=0.5,
        eps=1e-3,
        maximize=True,
        fused=True,
    )
    rng = np.random.default_rng(0)
    shapes = {"a": (37,), "b": (5, 13), "c": (7,), "d": (2, 3, 4), "e": ()}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = make_grads(rng, params, 20, True)
    new_params, state = run_funcopt_flagged(ADAGRAD, kwargs, params, grads)
    check_against_torch(ADAGRAD, kwargs, params, grads, new_params, state)
    new_params, state = run_funcopt(ADAGRAD, kwargs, params, grads[:3], jit=False)
    check_against_torch(ADAGRAD, kwargs, params, grads[:3], new_params, state)


@pytest.mark.parametrize(
    "case,kwargs,dtype",
    [
        (SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1), "float32"),
        (ADAGRAD, dict(lr=0.1, lr_decay=0.1, weight_decay=0.1), "bfloat16"),
    ],
    ids=["sgd-float32", "adagrad-bfloat16"],
)
def test_packed_leaves_keep_each_leafs_scalar_tail(
    case, kwargs, dtype, x64, exact_float32
):
    """`funcopt.flat` (leaves packed into rows of one buffer): the scalar
    tail of each leaf found in the packed rows, torch's bits as per leaf."""
    kwargs = {**kwargs, "fused": True}
    check_packed_against_torch(case, kwargs, np.dtype(dtype), steps=6)


def test_adagrad_decay_is_one_fused_multiply_add(x64):
    """The kernel's `1.0 + (step - 1.0) * lr_decay` in C++ `double`, which
    GCC contracts: the correctly rounded fused multiply-add, exactly, for
    every step count here (a product rounded first differs at 0.1% to 13%
    of them)."""
    steps = np.arange(1, 3001, dtype=np.float64)
    for decay in [0.1, 0.37, 1e-3, 0.7]:
        got = np.asarray(jax.jit(_fused_decay)(steps, np.float64(decay)))
        want = [float(Fraction(int(t) - 1) * Fraction(decay) + 1) for t in steps]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "cls,factory",
    [(torch.optim.SGD, fo.sgd), (torch.optim.Adagrad, fo.adagrad)],
    ids=["sgd", "adagrad"],
)
def test_complex_params_raise_torchs_error(cls, factory):
    """torch's fused kernels take real floating-point params only: torch
    raises at its first step, funcopt when the state is made."""
    p = np.array([1 + 2j, 3 - 1j], dtype=np.complex64)
    tp = torch.tensor(p, requires_grad=True)
    tp.grad = torch.ones_like(tp)
    with pytest.raises(RuntimeError) as expected:
        cls([tp], lr=0.1, fused=True).step()
    with pytest.raises(RuntimeError) as got:
        factory(lr=0.1, fused=True).init({"w": p})
    assert str(got.value) == str(expected.value)
