"""Shared test setup.

The torch CPU loop that 16-bit parity mirrors is measured once per worker,
by the tests that need it (:func:`torch_cpu_loop`).

x64 stays off, as users run JAX; float64 tests enter ``jax.enable_x64(True)``
through the ``x64`` fixture. Strict dtype promotion turns any accidental
float64 promotion of a float32 parameter into an error.
"""

import jax
import pytest

import funcopt as fo
from funcopt.torch_interop import measure_torch_cpu_block

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def torch_cpu_loop():
    """For tests that compare 16-bit steps with torch: round as the torch on
    this machine. Its CPU loop's block (32 on x86 AVX2/AVX-512, none under
    ATEN_CPU_CAPABILITY=default) is measured, not assumed, once per worker;
    if it cannot be measured, only the tests that use this fixture error."""
    fo.precision.set_torch_cpu_block(measure_torch_cpu_block())


@pytest.fixture
def exact_float32():
    """funcopt's bit-exact float32 mode (off by default) inside the test."""
    fo.precision.set_exact_float32(True)
    try:
        yield
    finally:
        fo.precision.set_exact_float32(False)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
