"""`funcopt._reductions`: torch's float32 CPU norms and means, bit for bit,
against the torch at hand (the AVX-512/AVX2 builds here, and torch's
`ATEN_CPU_CAPABILITY=default` build, which has no FMA, in a child process).

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

CHILD = "FUNCOPT_TEST_REDUCTIONS_CHILD"

SHAPES = [(), (1,), (3,), (6,), (8,), (15,), (37,), (3, 2), (5, 13), (7, 1),
          (2, 3, 4), (4, 24), (33, 17), (9, 70), (600, 3)]  # fmt: skip
MEAN_ROWS = [1, 3, 6, 8, 13, 40, 613, 9000, 140_000]


def _data(rng: np.random.Generator, shape) -> np.ndarray:
    """Values over many binades, so that the order of a sum shows in its bits."""
    scale = 2.0 ** rng.integers(-20, 20, size=shape)
    return np.asarray(rng.normal(size=shape) * scale, dtype=np.float32)


def _same_bits(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype == np.float32, what
    differ = actual.view(np.uint32) != expected.view(np.uint32)
    assert not differ.any(), f"{what}: {differ.sum()} of {differ.size} differ"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norm_is_torchs(shape, x64, torch_cpu_loop):
    rng = np.random.default_rng(0)
    norm = jax.jit(_reductions.norm, static_argnums=1)
    for trial in range(8):
        x = _data(rng, shape)
        t = torch.from_numpy(x)
        _same_bits(norm(x, None), t.norm(2), f"norm, trial {trial}")
        for axis in (-1, -2) if len(shape) >= 2 else ():
            expected = torch.norm(t, dim=axis, keepdim=True)
            _same_bits(norm(x, axis), expected, f"norm(dim={axis}), trial {trial}")


@pytest.mark.parametrize("rows", MEAN_ROWS)
def test_mean_is_torchs(rows, x64, torch_cpu_loop):
    """Over the rows of a column, as Adafactor's `row_var.mean(dim=-2)`:
    columns side by side ([16, rows, 1]), as a 3-D parameter's are."""
    rng = np.random.default_rng(rows)
    x = np.abs(_data(rng, (16, rows, 1)))
    expected = torch.from_numpy(x).mean(dim=-2, keepdim=True)
    _same_bits(jax.jit(_reductions.mean, static_argnums=1)(x, -2), expected, "mean")


def test_only_a_contiguous_axis_is_averaged(x64):
    with pytest.raises(ValueError, match="not contiguous"):
        _reductions.mean(np.ones((3, 2), np.float32), -2)
    with pytest.raises(ValueError, match="axis must be None, -1 or -2"):
        _reductions.norm(np.ones((3, 2, 2), np.float32), 0)


@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="runs in the parent only")
def test_in_torchs_default_build():
    """torch without vectorised kernels or FMA (`torch_cpu_block()` None):
    the same 8-lane order, the tail's multiply-adds rounded twice."""
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__, "-k", "torchs"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", CHILD: "1"}
    probe = (
        "import torch\nassert torch.backends.cpu.get_cpu_capability() == "
        "'DEFAULT', torch.backends.cpu.get_cpu_capability()"
    )
    assert run_pytest_child(args, env, probe=probe) == len(SHAPES) + len(MEAN_ROWS)
