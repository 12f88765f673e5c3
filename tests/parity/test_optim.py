"""Every optimizer of the table against live torch, on the same gradients."""

import jax
import numpy as np
import pytest
import torch

from funcopt.optim.adam import adam
from tests.parity.cases import (
    OPT_PARAMS,
    OPT_PARAMS_16BIT,
    OPT_PARAMS_ALL_FLAGS,
    OPT_PARAMS_F32,
)
from tests.parity.noise_floor import assert_close
from tests.torch_ref import (
    NATIVE_DEFAULT_STEP,
    assert_same_bits,
    check_against_torch,
    make_grads,
    make_params_16bit_for,
    make_params_for,
    native_kernels,
    run_funcopt,
    run_funcopt_flagged,
    run_torch,
    run_torch_nudged,
    slot_leaves,
    step_counts,
    trainable_leaves,
)


def _compare(case, kwargs, dtype, jit, with_none, rtol, atol, seed=0, flagged=False):
    """funcopt against torch; ``flagged``: ``None`` gradients as ``has_grad``.

    Tolerances: ``rtol``/``atol``, or the noise floor of torch's nudged runs
    where that is larger (``tests/parity/noise_floor.py``).
    """
    rng = np.random.default_rng(seed)
    params = make_params_for(case, rng, dtype)
    grads = make_grads(rng, params, case.steps, with_none)
    expected, torch_state = run_torch(case, kwargs, params, grads)
    nudged = run_torch_nudged(case, kwargs, params, grads)
    if flagged:
        new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    else:
        new_params, state = run_funcopt(case, kwargs, params, grads, jit)
    for i, (a, e) in enumerate(zip(trainable_leaves(new_params), expected)):
        assert a.dtype == e.dtype, f"param {i}: dtype {a.dtype} != torch {e.dtype}"
        assert_close(a, e, rtol, atol, f"param {i}", [n[i] for n, _ in nudged])
    steps = step_counts(state, params)
    for i, torch_leaf_state in enumerate(torch_state):
        if not torch_leaf_state:
            # torch creates state lazily: a leaf without state never stepped
            # (or, like SGD without momentum, the optimizer keeps none)
            if any(slot_leaves(state, params, k)[i] is not None for k in state.slots):
                assert steps[i] == 0, f"param {i} never had a gradient in torch"
            continue
        for key, value in torch_leaf_state.items():
            if key == "step":
                assert steps[i] == int(value), f"param {i}: step"
                continue
            ours = slot_leaves(state, params, key)[i]
            floor_runs = [s[i][key].numpy() for _, s in nudged]
            what = f"param {i}: state {key}"
            assert_close(ours, value.numpy(), rtol, atol, what, floor_runs)
    # non-trainable leaves (the int leaf "frozen") are never touched
    for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        if not np.issubdtype(np.asarray(old).dtype, np.inexact):
            np.testing.assert_array_equal(new, old)


# Every flag combination, jitted. The None-gradient pattern (which also has
# steps where every leaf has a gradient) goes in as ``has_grad`` flags: the
# same semantics, one compile per row instead of one per pattern. ``None``
# leaves themselves run below, for every optimizer (jitted: an eager step is
# the jitted program, bit for bit, tests/parity/test_eager_jit.py).
@pytest.mark.parametrize("with_none", [True], ids=["none-grads"])
@pytest.mark.parametrize("case,kwargs", OPT_PARAMS)
def test_float64_parity(case, kwargs, with_none, x64):
    _compare(
        case, kwargs, np.float64, True, with_none, rtol=1e-10, atol=1e-12, flagged=True
    )


# The optimizers of NATIVE_DEFAULT_STEP run funcopt's native kernel by default
# on one CPU device (torch's bits, tests/test_native_fused.py); GPUs, TPUs,
# sharded steps and installs without a compiler run their JAX rule, proven
# here too: every other combination and the all-flags one, as for float32
@pytest.mark.parametrize(
    "case,kwargs",
    [p for p in OPT_PARAMS_F32 if p.values[0].name in NATIVE_DEFAULT_STEP],
)
def test_float64_parity_of_the_jax_rule(case, kwargs, x64):
    with native_kernels(False):
        _compare(
            case, kwargs, np.float64, True, True, rtol=1e-10, atol=1e-12, flagged=True
        )


@pytest.mark.parametrize("case,kwargs", OPT_PARAMS_F32)
def test_float32_parity(case, kwargs):
    assert not jax.config.jax_enable_x64
    _compare(
        case,
        kwargs,
        np.float32,
        True,
        True,
        rtol=case.f32_rtol,
        atol=case.f32_atol,
        flagged=True,
    )


@pytest.mark.parametrize("case,kwargs", OPT_PARAMS_ALL_FLAGS)
def test_none_gradient_leaves(case, kwargs, x64):
    _compare(case, kwargs, np.float64, True, True, rtol=1e-10, atol=1e-12)


# enough for RAdam's rectified branch (rho_t > 5 from step 6) and ASGD's
# averaging (t0=5) with the None-gradient pattern
STEPS_16BIT = 10


def _compare_bits(case, kwargs, seed=0):
    """Params, state and step counts bit for bit against torch."""
    rng = np.random.default_rng(seed)
    params = make_params_16bit_for(case, rng)
    grads = make_grads(rng, params, STEPS_16BIT, True)
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    check_against_torch(case, kwargs, params, grads, new_params, state)


# bfloat16 and float16 leaves (one tree) through torch's CPU path (foreach=None
# on CPU: the single-tensor loop), with torch's float64 scalar math (x64); see
# funcopt/_math.py for the per-op rounding
@pytest.mark.parametrize("case,kwargs", OPT_PARAMS_16BIT)
def test_16bit_parity_is_bit_exact(case, kwargs, x64, torch_cpu_loop):
    _compare_bits(case, kwargs)


def test_adam_capturable_is_the_differentiable_path(x64):
    """torch refuses `capturable=True` for CPU params (outside torch.compile),
    so it cannot be compared here; its branch is the one `differentiable`
    takes (`if capturable or differentiable:` in torch's Adam), and funcopt's
    `capturable=True` is that path: the same bits, unlike the default path."""
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(37,)).astype(np.float32)}
    grads = [{"w": rng.normal(size=(37,)).astype(np.float32)} for _ in range(20)]
    params_t = [torch.tensor(params["w"])]
    with pytest.raises(AssertionError, match="capturable=True"):
        opt_t = torch.optim.Adam(params_t, lr=0.5, capturable=True)
        params_t[0].grad = torch.tensor(grads[0]["w"])
        opt_t.step()
    results = {}
    for flags in ({}, {"capturable": True}, {"differentiable": True}):
        opt = adam(lr=0.5, **flags)
        p, state, step = params, opt.init(params), jax.jit(opt.step)
        for g in grads:
            p, state = step(p, g, state)
        results[tuple(flags)] = np.asarray(p["w"])
    assert_same_bits(results[("capturable",)], results[("differentiable",)], "w")
    assert not np.array_equal(results[("capturable",)], results[()])
