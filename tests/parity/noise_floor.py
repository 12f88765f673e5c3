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
run is the quantity's **noise floor**, and funcopt must sit within
``NOISE_MULTIPLE`` times it, or within the fixed tolerance, whichever is
larger. For well-conditioned quantities the floor is ~1e-16 relative and the
fixed tolerance decides (nothing is loosened); where the problem amplifies
last-bit noise the floor says by how much, on the machine the test runs on.

Two guards keep this from hiding a wrong formula:

* a floor above ``MAX_RELATIVE_FLOOR`` of the quantity's scale fails the test:
  the case is too ill-conditioned to prove anything and must be replaced by a
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

from collections.abc import Sequence

import jax
import numpy as np

NOISE_MULTIPLE = 16
NUDGED_RUNS = 2
# beyond this (relative to the quantity's scale) a case cannot prove a formula
MAX_RELATIVE_FLOOR = {np.dtype(np.float64): 1e-7, np.dtype(np.float32): 1e-2}


def nudge_array(x, rng: np.random.Generator) -> np.ndarray:
    """A floating array with every element one ulp up or down, at random."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
        return x
    up = rng.random(x.shape) < 0.5
    nudged = np.where(up, np.nextafter(x, np.inf), np.nextafter(x, -np.inf))
    return nudged.astype(x.dtype)


def nudge(tree, rng: np.random.Generator):
    """:func:`nudge_array` on every floating leaf; ``None`` and ints kept."""
    return jax.tree.map(lambda x: nudge_array(x, rng), tree)


def noise_floor(expected, nudged: Sequence) -> float:
    """The largest absolute difference between torch and its nudged runs."""
    expected = np.asarray(expected, np.float64)
    diffs = [np.abs(np.asarray(n, np.float64) - expected) for n in nudged]
    return max((float(np.nanmax(d, initial=0.0)) for d in diffs), default=0.0)


def assert_close(actual, expected, rtol, atol, what, nudged: Sequence = ()):
    """``actual`` within the fixed tolerance of torch's ``expected``, or within
    ``NOISE_MULTIPLE`` times the noise floor of torch's ``nudged`` runs."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    floor = noise_floor(expected, nudged)
    if NOISE_MULTIPLE * floor > atol:  # the floor widens the tolerance: guard it
        scale = float(np.nanmax(np.abs(expected.astype(np.float64)), initial=0.0))
        limit = MAX_RELATIVE_FLOOR.get(expected.dtype, 1e-2) * scale
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
