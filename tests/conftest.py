"""Shared test setup.

The torch CPU loop that 16-bit parity mirrors is measured once per worker,
by the tests that need it (:func:`torch_cpu_loop`).

x64 stays off, as users run JAX; float64 tests enter ``jax.enable_x64(True)``
through the ``x64`` fixture. Strict dtype promotion turns any accidental
float64 promotion of a float32 parameter into an error.
"""

import os
import sys

import jax
import pytest
import torch

import funcopt as fo
from funcopt.torch_interop import measure_torch_cpu_block

jax.config.update("jax_numpy_dtype_promotion", "strict")

# One torch intra-op thread per test worker. The suite's tensors are far below
# torch's 32,768-element parallel grain, so a second thread computes nothing,
# but two xdist workers' OpenMP pools spinning beside XLA's oversubscribe the
# cores (torch's Newton-Schulz on a 4x4 bf16 Muon matrix: 0.05 ms alone, ~18 ms
# in the busy suite). No result depends on it: torch's fused kernels split whole
# cache lines per thread and their scalar tail is each tensor's last elements.
torch.set_num_threads(1)


def _run_dir(config):
    """The run's base temp directory, common to its xdist workers (a new one
    each run): where they share the 8-device report of
    ``tests/test_sharding.py`` and compiled XLA programs."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """One XLA compilation cache per run, shared by its xdist workers.

    Rows that trace to the same program (one optimizer and flags on other
    hyperparameter values, which live in the state; the same program in both
    workers) compile it once: a later compile loads the executable the first
    one wrote, the same machine code, so no result changes. The cache starts
    empty each run (the run's temp directory); its size limit turns on JAX's
    file lock between the workers. Child processes do not use it.
    """
    cache = _run_dir(config) / "jax_compilation_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 1 << 34)


def pytest_collection_finish(session):
    """Start the 8-device subprocess of ``tests/test_sharding.py`` as soon as
    a test that reads its report is selected: it runs (~80 s) while the
    workers run other tests."""
    if any(
        item.path.name == "test_sharding.py" and "report" in item.fixturenames
        for item in session.items
    ):
        from tests import test_sharding

        test_sharding.start_sharded_checks(_run_dir(session.config))


def pytest_sessionfinish(session):
    """A process that started that subprocess publishes its report before
    it exits, whether or not it ran a test that reads it."""
    test_sharding = sys.modules.get("tests.test_sharding")
    if test_sharding is not None and test_sharding._CHILD:
        test_sharding.publish_sharded_checks(_run_dir(session.config))


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
