"""How close to torch is close enough: fixed tolerances, widened only by a
measured noise floor.

Every parity comparison asserts ``|funcopt - torch| <= atol + rtol*|torch|``
with tight fixed tolerances (float64: ``rtol=1e-10``, float32: the row's
``f32_rtol``). That is a proof of the formula when the compared quantity is
well conditioned: a last-bit difference in an input moves it by a few ulps.

It is not when a reduction feeds a cancellation, a division or a branch:
L-BFGS's ``ro = 1 / y·s`` after ``y·s`` cancels, Muon's Newton-Schulz
matmuls, Prodigy's ``d`` estimate from the signed sum ``<g, x0 - x>``. torch
(its BLAS kernel for this CPU: MKL or OpenBLAS, AVX2 or AVX-512) and XLA sum
in different orders, so their last bits differ, and the problem multiplies
that difference by its condition number. A tolerance tuned on one machine is
then that machine's luck: on an AMD EPYC one L-BFGS ``ro`` differed by
2.27e-10 relative (Intel: 1.1e-10), with the same code.

So the tolerance of each compared quantity comes from a measurement: torch is
run again, ``NUDGED_RUNS`` times, with its inputs (start parameters, every
gradient, every closure loss) moved by one ulp in a random direction
(:func:`nudge`); that is the size of the difference a different summation
order makes. The largest difference between those runs and the plain torch
run, over the quantity's elements, is its **noise floor**, and funcopt must
sit within ``max(atol, NOISE_MULTIPLE * floor) + rtol * |torch|`` of torch
(:func:`assert_close`). For well-conditioned quantities the floor is ~1e-16
relative and the fixed tolerance decides (nothing is loosened); where the
problem amplifies last-bit noise the floor says by how much, on the machine
the test runs on.

Two guards keep this from hiding a wrong formula:

* a floor that widens the tolerance must stay below ``MAX_RELATIVE_FLOOR`` of
  the quantity's scale (float64: 2e-9, so the widest tolerance, 3.2e-8, is
  still below float32 rounding), or the test fails: the case is too
  ill-conditioned to prove anything and must be replaced by a
  better-conditioned one;
* discrete outcomes (L-BFGS's iteration and evaluation counts, history
  length) must be the same in the nudged runs as in the plain one, or the case
  sits on a branch's edge (a tolerance test, a line-search condition) and
  fails as ill-posed; funcopt must then match them exactly.

Measured on an Intel Xeon (AVX-512), and again restricted to AVX2
(``ATEN_CPU_CAPABILITY=avx2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``,
``XLA_FLAGS=--xla_cpu_max_isa=AVX2``), where the old fixed 1e-10 failed an
L-BFGS step size ``t`` (3.2e-10 relative):

* L-BFGS table: floors up to 2.2e-10 of a quantity's scale, and
  ``|funcopt - torch|`` at most 3.9 times the floor (AVX2: 3.1) wherever it
  exceeds 1e-11; ``NOISE_MULTIPLE = 16`` leaves a 4x margin and widens the
  widest tolerance to 3.6e-9 relative.
* optimizer table, float64: floors at most 3.4e-14 relative, differences at
  most 7.8e-15; the fixed 1e-10 decides everywhere (nothing loosened).
* optimizer table, float32: floors at most 7.5e-6 relative, the row's fixed
  tolerance decides; the largest difference uses 0.34 of it, identically on
  both instruction sets (it comes from torch's float64 scalar math, not from
  summation order).
* L-BFGS, float32 (``tests/parity/test_lbfgs.py``'s float32 cases and
  optim_db's float32 rows, 10 nudged runs): fixed ``rtol=1e-5``; floors at
  most 5.4e-6 of a quantity's scale (AVX2: the same), ``|funcopt - torch|``
  at most 1.3 times the floor where the floor decides. The float32 guard
  (1e-4, ~1.7e3 ulps) is what decides which float32 L-BFGS problems prove
  anything: Rosenbrock past two calls, small learning rates (``y = g_new -
  g_old`` cancels: ``ro`` moves by 1.2e-4 at ``lr=0.01``) and runs that
  converge to float32's resolution are left out.

What needs no floor: sums of non-negative terms (norms for clipping, LAMB's
trust ratio, Adafactor's row and column means of squares) have a relative
error below ``n*u`` in any order, so their fixed tolerances bound every
summation order; scheduler thresholds (ReduceLROnPlateau) compare the same
float64 metrics in both libraries; the 200-step MLP of
``tests/test_end_to_end.py`` (matmuls, clipping, AdamW) differs by at most
3e-15 relative, 4e-5 of its fixed tolerance, on both instruction sets; 16-bit
rows are bit-exact by design, with
torch's CPU loop measured on the machine (see ``tests/torch_ref.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import numpy as np

NOISE_MULTIPLE = 16
NUDGED_RUNS = 2
# The largest floor, relative to the quantity's scale, that may widen a
# tolerance: ~10x the largest measured (float64 2.2e-10, float32 7.5e-6), and
# for float64 low enough that 16x it stays below float32's rounding (6e-8), so
# a float32 leak in a float64 path cannot hide behind a floor.
MAX_RELATIVE_FLOOR = {
    np.dtype(np.float64): 2e-9,
    np.dtype(np.complex128): 2e-9,
    np.dtype(np.float32): 1e-4,
    np.dtype(np.complex64): 1e-4,
}


def nudged_rngs() -> Iterator[np.random.Generator]:
    """One generator per nudged run (fixed seeds: the suite is deterministic)."""
    return (np.random.default_rng(1000 + run) for run in range(NUDGED_RUNS))


def _nudge_real(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    up = rng.random(x.shape) < 0.5
    nudged = np.where(up, np.nextafter(x, np.inf), np.nextafter(x, -np.inf))
    # zeros (a subnormal is no nudge, and would flip a sign test) and
    # non-finite values stay as they are
    return np.where(np.isfinite(x) & (x != 0), nudged, x).astype(x.dtype)


def nudge_array(x, rng: np.random.Generator) -> np.ndarray:
    """A float (or complex) array with every finite non-zero element (real and
    imaginary part) one ulp up or down, at random; other dtypes as they are."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.complexfloating):
        return _nudge_real(x.real, rng) + 1j * _nudge_real(x.imag, rng)
    if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
        return x  # 16-bit rows are bit-exact: no floor
    return _nudge_real(x, rng)


def nudge(tree, rng: np.random.Generator):
    """:func:`nudge_array` on every array leaf; ``None`` leaves kept."""
    return jax.tree.map(lambda x: nudge_array(x, rng), tree)


def noise_floor(expected, nudged: Sequence) -> float:
    """The largest ``|torch - nudged torch|`` over the array and the runs.

    One number per quantity, not per element: an element's own difference can
    vanish by chance in two runs, the array's largest cannot. Non-finite
    elements (where a quantity is inf or NaN in torch) take no part.
    """
    expected = np.asarray(expected)
    floor = 0.0
    for run in nudged:
        diff = np.abs(np.asarray(run) - expected)
        floor = max(floor, float(np.max(diff[np.isfinite(diff)], initial=0.0)))
    return floor


def assert_close(actual, expected, rtol, atol, what, nudged: Sequence = (), dtype=None):
    """``|actual - expected| <= max(atol, NOISE_MULTIPLE * floor) + rtol*|expected|``
    elementwise, ``floor`` the :func:`noise_floor` of torch's ``nudged`` runs
    (none: the fixed tolerance alone).

    Where the floor widens ``atol`` it must stay below ``MAX_RELATIVE_FLOOR``
    (of ``dtype``, the precision the quantity was computed in; default
    ``expected``'s) of the quantity's largest finite magnitude, or the case is
    too ill-conditioned to prove a formula and fails.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    floor = noise_floor(expected, nudged)
    if NOISE_MULTIPLE * floor > atol:
        magnitudes = np.abs(expected)
        scale = float(np.max(magnitudes[np.isfinite(magnitudes)], initial=0.0))
        guard = expected.dtype if dtype is None else np.dtype(dtype)
        limit = MAX_RELATIVE_FLOOR[guard] * scale
        assert floor <= limit, (
            f"{what}: torch itself moves by {floor:.3g} (scale {scale:.3g}) when "
            "its inputs move by one ulp: too ill-conditioned to prove a formula"
        )
    np.testing.assert_allclose(
        actual,
        expected,
        rtol=rtol,
        atol=max(atol, NOISE_MULTIPLE * floor),
        err_msg=f"{what} (noise floor {floor:.3g})",
    )
