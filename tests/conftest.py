"""Shared test setup.

x64 stays off, as users run JAX; float64 tests enter ``jax.enable_x64(True)``
through the ``x64`` fixture. Strict dtype promotion turns any accidental
float64 promotion of a float32 parameter into an error.
"""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
