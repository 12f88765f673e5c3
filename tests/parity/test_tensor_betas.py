"""Adam and AdamW with Tensor `betas` against live torch, on the same gradients.

torch keeps tensor betas as tensors: `exp_avg.lerp_(grad, 1 - beta1)` takes a
weight computed in the param's dtype, `1 - beta2`, `beta ** step` and the bias
corrections are tensor ops in the betas' dtype, and `lr / bias_correction1`
is `bias_correction1.reciprocal() * lr` (torch 2.13,
`torch.optim.adam._single_tensor_adam`, the default CPU path). float32 betas
round differently from the Python floats `(0.9, 0.999)` from the first step.

float64 params: params and buffers within 1e-10. float32
params (x64 and the bit-exact float32 mode): every buffer bit for bit; the
params within the parity table's float32 tolerance, and bit for bit in a
child process whose MKL rounds float32 `sqrt` correctly (see
`tests/parity/test_float32_bits.py`).
"""

import os

import numpy as np
import pytest
import torch

import funcopt as fo
from tests.parity.test_float32_bits import odd_sized_params
from tests.torch_ref import (
    OptCase,
    assert_same_bits,
    check_against_torch,
    correctly_rounded_torch_sqrt,
    funcopt_kwargs,
    make_grads,
    make_params,
    run_funcopt,
    run_funcopt_flagged,
    run_with_correctly_rounded_sqrt,
)

STEPS = 5
EAGER_STEPS = 2
# set in the child process whose torch rounds float32 `sqrt` correctly
SQRT_CHILD = "FUNCOPT_TEST_TENSOR_BETAS_SQRT"

ADAM = OptCase("adam", torch.optim.Adam, fo.adam, grid={}, steps=STEPS)
ADAMW = OptCase("adamw", torch.optim.AdamW, fo.adamw, grid={}, steps=STEPS)

# (id, case, kwargs, betas, dtype of a tensor lr or None); every flag that
# changes Adam's arithmetic appears in some row; betas under 0.5 take lerp's
# other branch and an inexact float32 `1 - beta2`
ROWS = [
    ("adam", ADAM, {"lr": 0.02}, (0.9, 0.999), None),
    (
        "adam-amsgrad-maximize-wd-lr32",
        ADAM,
        {"lr": 0.02, "amsgrad": True, "maximize": True, "weight_decay": 0.1},
        (0.8, 0.95),
        torch.float32,
    ),
    (
        "adam-decoupled-differentiable-lr32",
        ADAM,
        {
            "lr": 0.02,
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
            "differentiable": True,
        },
        (0.9, 0.999),
        torch.float32,
    ),
    (
        "adamw-amsgrad-maximize-differentiable-lr64",
        ADAMW,
        {"lr": 0.02, "amsgrad": True, "maximize": True, "differentiable": True},
        (0.85, 0.99),
        torch.float64,
    ),
    ("adamw-small-betas", ADAMW, {"lr": 0.02, "weight_decay": 0.3}, (0.3, 0.4), None),
]


def _torch_kwargs(row, betas_dtype) -> dict:
    _, _, kwargs, betas, lr_dtype = row
    kwargs = dict(kwargs)
    kwargs["betas"] = tuple(torch.tensor(b, dtype=betas_dtype) for b in betas)
    if lr_dtype is not None:
        kwargs["lr"] = torch.tensor(kwargs["lr"], dtype=lr_dtype)
    return kwargs


BETAS = {"betas32": torch.float32, "betas64": torch.float64}


def _rows(picks):
    """`(row, betas dtype)` params for `(index into ROWS, "betas32"/"betas64")`."""
    return [
        pytest.param(ROWS[i], BETAS[name], id=f"{ROWS[i][0]}-{name}")
        for i, name in picks
    ]


# every row with float32 betas; float64 betas where they change the path's
# arithmetic differently (the default path; the differentiable one, whose
# scalar math they move to float64); the small betas' inexact `1 - beta2`
# shows in float64 params only
FLOAT64_ROWS = [(i, "betas32") for i in range(len(ROWS))] + [(0, "betas64")]
FLOAT32_ROWS = [(i, "betas32") for i in range(4)] + [(i, "betas64") for i in (0, 2, 3)]
# in this process (the child runs FLOAT32_ROWS)
FLOAT32_HERE = [(0, "betas64")]


def _close(rtol, atol):
    def same(a, e, what):
        assert a.dtype == e.dtype, what
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)

    return same


@pytest.mark.parametrize("row,betas_dtype", _rows(FLOAT64_ROWS))
def test_float64_params(row, betas_dtype, x64):
    """Jitted (`None` gradients as `has_grad`; the first row eagerly too):
    params and buffers within 1e-10 (float32 betas move them by about 1e-7
    relative; float64 betas by an ulp, which the float32 rows show)."""
    case, kwargs = row[1], _torch_kwargs(row, betas_dtype)
    rng = np.random.default_rng(0)
    params = make_params(rng, np.float64)
    grads = make_grads(rng, params, STEPS, True)
    same = _close(1e-10, 1e-12)
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    check_against_torch(case, kwargs, params, grads, new_params, state, same, same)
    if row is not ROWS[0] or betas_dtype != torch.float32:
        return
    first = grads[:EAGER_STEPS]
    new_params, state = run_funcopt(case, kwargs, params, first, jit=False)
    check_against_torch(case, kwargs, params, first, new_params, state, same, same)


@pytest.mark.parametrize(
    "row,betas_dtype",
    _rows(FLOAT32_ROWS if os.environ.get(SQRT_CHILD) else FLOAT32_HERE),
)
def test_float32_params(row, betas_dtype, x64, torch_cpu_loop, exact_float32):
    """Jitted (the first row eagerly too), leaves sized for torch's vectorised
    blocks and scalar tails: buffers bit for bit; params too where torch's
    float32 `sqrt` is correctly rounded (`FLOAT32_ROWS`, in the child process
    of the next test), else within the parity table's float32 tolerance."""
    case, kwargs = row[1], _torch_kwargs(row, betas_dtype)
    rng = np.random.default_rng(0)
    params = odd_sized_params(rng, np.float32)
    grads = make_grads(rng, params, STEPS, True)
    same = assert_same_bits if os.environ.get(SQRT_CHILD) else _close(1e-5, 1e-6)
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    check_against_torch(case, kwargs, params, grads, new_params, state, same)
    if row is not ROWS[0] or betas_dtype != torch.float32:
        return
    first = grads[:EAGER_STEPS]
    new_params, state = run_funcopt(case, kwargs, params, first, jit=False)
    check_against_torch(case, kwargs, params, first, new_params, state, same)


def test_float32_params_are_bit_exact_where_torchs_sqrt_is_correctly_rounded():
    """`test_float32_params` in a child process whose torch takes correctly
    rounded float32 roots (`torch_ref.correctly_rounded_torch_sqrt`, checked
    by its probe): params bit for bit too. The `tensor ** 0.5` of torch's
    default path is replaced too: MKL's 0-d root of `bias_correction2` is
    1 ulp high at step 2 of beta2 = 0.95 on an AMD EPYC, which moves a few
    param elements of the amsgrad row (never a buffer) by an ulp."""
    k = "test_float32_params and not bit_exact"
    passed = run_with_correctly_rounded_sqrt(__file__, k, SQRT_CHILD)
    assert passed == len(FLOAT32_ROWS)


def test_state_dict_round_trip_keeps_tensor_betas(x64):
    """torch's state dict (betas as 0-d tensors) loads into funcopt, which
    steps on as torch does; funcopt's export holds tensors of the betas'
    dtype again, and torch loads it and steps on to the same numbers."""
    import jax
    import jax.numpy as jnp

    from funcopt import torch_interop

    row = ROWS[0]
    kwargs = _torch_kwargs(row, torch.float32)
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(5,))}
    grads = [{"w": rng.normal(size=(5,))} for _ in range(4)]

    def torch_steps(tparam, opt, gs):
        for g in gs:
            tparam.grad = torch.tensor(g["w"])
            with correctly_rounded_torch_sqrt():  # its 0-d float32 roots
                opt.step()

    tparam = torch.tensor(params["w"]).requires_grad_()
    topt = torch.optim.Adam([tparam], **kwargs)
    torch_steps(tparam, topt, grads[:2])
    assert all(
        isinstance(b, torch.Tensor)
        for b in topt.state_dict()["param_groups"][0]["betas"]
    )
    opt = fo.adam(**funcopt_kwargs(kwargs))
    ours = {"w": jnp.asarray(tparam.detach().numpy().copy())}
    state = torch_interop.load_state_dict(opt, ours, topt.state_dict())
    for g in grads[2:]:
        ours, state = opt.step(ours, jax.tree.map(jnp.asarray, g), state)
    torch_steps(tparam, topt, grads[2:])
    np.testing.assert_allclose(ours["w"], tparam.detach().numpy(), rtol=1e-10)

    exported = torch_interop.state_dict(opt, state, ours)
    betas = exported["param_groups"][0]["betas"]
    assert [(type(b), b.dtype, b.shape) for b in betas] == [
        (torch.Tensor, torch.float32, torch.Size([]))
    ] * 2
    tparam2 = torch.tensor(np.asarray(ours["w"])).requires_grad_()
    topt2 = torch.optim.Adam([tparam2], **kwargs)
    topt2.load_state_dict(exported)
    torch_steps(tparam, topt, grads[:1])
    torch_steps(tparam2, topt2, grads[:1])
    np.testing.assert_allclose(
        tparam2.detach().numpy(), tparam.detach().numpy(), rtol=1e-10
    )
