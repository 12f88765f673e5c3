"""`funcopt._reductions`: torch's float32 CPU norms and means, bit for bit,
against the torch at hand (its AVX-512 or AVX2 build), and the norms against
torch's `ATEN_CPU_CAPABILITY=default` build, which has no FMA, in a child
process.

The sizes walk every branch of torch's order: a last dimension under 4, under
8 (the block of 4 and the fused tail), whole 8-lane blocks with and without a
tail; a mean's scalar path (under 8 elements), its vector path with and
without `row_sum`'s four partial sums, and `multi_row_sum`'s cascade through
levels 1, 2 and 3 (blocks of 16 items of 32 elements: 512, 8,192 and 131,072
elements)."""

import os

import jax
import numpy as np
import pytest
import torch

from funcopt import _reductions
from tests._subprocess import run_pytest_child
from tests.torch_ref import assert_same_bits

CHILD = "FUNCOPT_TEST_REDUCTIONS_CHILD"

SHAPES = [(), (1,), (3,), (6,), (8,), (15,), (37,), (3, 2), (5, 13), (7, 1),
          (37, 1), (3, 37, 1), (1, 5), (2, 3, 4), (4, 24), (33, 17), (9, 70),
          (600, 3)]  # fmt: skip
MEAN_ROWS = [1, 3, 6, 8, 13, 40, 613, 9000, 140_000]


def _data(rng: np.random.Generator, shape, trial: int = 0) -> np.ndarray:
    """Normal values (even trials), where every term counts and the order of
    a sum shows in its bits, or values over many binades (odd trials)."""
    scale = 2.0 ** rng.integers(-20, 20, size=shape) if trial % 2 else 1.0
    return np.asarray(rng.normal(size=shape) * scale, dtype=np.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norm_is_torchs(shape, x64, torch_cpu_loop):
    rng = np.random.default_rng(0)
    norm = jax.jit(_reductions.norm, static_argnums=1)
    for trial in range(16):
        x = _data(rng, shape, trial)
        t = torch.from_numpy(x)
        assert_same_bits(norm(x, None), t.norm(2), f"norm, trial {trial}")
        for axis in (-1, -2) if len(shape) >= 2 else ():
            expected = torch.norm(t, dim=axis, keepdim=True)
            assert_same_bits(
                norm(x, axis), expected, f"norm(dim={axis}), trial {trial}"
            )


@pytest.mark.parametrize("rows", MEAN_ROWS)
def test_mean_is_torchs(rows, x64, torch_cpu_loop):
    """Over the rows of a column, as Adafactor's `row_var.mean(dim=-2)`:
    columns side by side ([16, rows, 1]), as a 3-D parameter's are."""
    rng = np.random.default_rng(rows)
    x = np.abs(_data(rng, (16, rows, 1)))
    expected = torch.from_numpy(x).mean(dim=-2, keepdim=True)
    assert_same_bits(
        jax.jit(_reductions.mean, static_argnums=1)(x, -2), expected, "mean"
    )


@pytest.mark.parametrize(
    "shape,axis", [((), None), ((1,), None), ((1, 1), None), ((3, 1), -1), ((1, 4), -2)]
)
@pytest.mark.parametrize("exact", [True, False], ids=["x64", "float32"])
def test_norm_over_single_elements_is_abs(shape, axis, exact):
    """torch's `norm` over dimensions of size 1 is `abs(x)`: nothing squared,
    so 1e20 (whose square overflows float32) and 1e-30 (whose square
    underflows) keep their values, in Adafactor's `_norm` in every mode."""
    from funcopt.optim.adafactor import _norm

    x = np.resize(np.array([1e20, -1e-30, 3.0], np.float32), shape)
    t = torch.from_numpy(x)
    kwargs = {} if axis is None else {"dim": axis, "keepdim": True}
    expected = torch.norm(t, **kwargs)
    with jax.enable_x64(exact):
        assert_same_bits(jax.jit(_norm, static_argnums=1)(x, axis), expected, "norm")
        if exact:
            assert_same_bits(_reductions.norm(x, axis), expected, "exact norm")


def test_only_a_contiguous_axis_is_averaged(x64):
    with pytest.raises(ValueError, match="not contiguous"):
        _reductions.mean(np.ones((3, 2), np.float32), -2)
    with pytest.raises(ValueError, match="axis must be None, -1 or -2"):
        _reductions.norm(np.ones((3, 2, 2), np.float32), 0)


@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="runs in the parent only")
def test_in_torchs_default_build():
    """torch without vectorised kernels or FMA (`torch_cpu_block()` None):
    the same 8-lane order, the tail's multiply-adds rounded twice (the norms;
    a mean has no multiply-add, and measured the same in every build)."""
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__]
    args += ["-k", "norm_is_torchs"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", CHILD: "1"}
    probe = (
        "import torch\nassert torch.backends.cpu.get_cpu_capability() == "
        "'DEFAULT', torch.backends.cpu.get_cpu_capability()"
    )
    assert run_pytest_child(args, env, probe=probe) == len(SHAPES)


def test_adafactor_exact_steps_match(x64, torch_cpu_loop, exact_float32):
    """Adafactor's exact float32 step (funcopt's bit-exact mode) on leaves
    whose norms take each path above: a column (its `dim=-2` norm takes the
    last-dimension path), single elements, a 3-D leaf, a wide matrix; 20
    steps with a missing gradient, all flags set, every buffer against
    torch's."""
    from tests.parity.cases import OPT_CASES
    from tests.torch_ref import check_against_torch, make_grads, run_funcopt_flagged

    case = next(c for c in OPT_CASES if c.name == "adafactor")
    rng = np.random.default_rng(1)
    shapes = {"col": (37, 1), "cols": (3, 37, 1), "one": (1, 1), "row": (1, 9),
              "wide": (40, 70), "s": ()}  # fmt: skip
    params = {k: _data(rng, s) for k, s in shapes.items()}
    kwargs = case.combos()[-1]
    grads = make_grads(rng, params, 20, True)
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    check_against_torch(case, kwargs, params, grads, new_params, state)
