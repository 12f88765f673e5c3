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
from tests._subprocess import CACHE_DIR_ENV

jax.config.update("jax_numpy_dtype_promotion", "strict")

# One torch intra-op thread per test worker. The suite's tensors are far below
# torch's 32,768-element parallel grain, so a second thread computes nothing,
# but two xdist workers' OpenMP pools spinning beside XLA's oversubscribe the
# cores (torch's Newton-Schulz on a 4x4 bf16 Muon matrix: 0.05 ms alone, ~18 ms
# in the busy suite). No result depends on it: torch's fused kernels split whole
# cache lines per thread and their scalar tail is each tensor's last elements.
torch.set_num_threads(1)

# torch warns once per process, at its first sparse tensor, that its sparse
# invariant checks are implicitly off; tests that turn warnings into errors
# (tests/parity/test_sparse_grads.py) would fail where they make that first
# tensor. Off, explicitly: the behaviour the warning describes, without it.
torch.sparse.check_sparse_tensor_invariants.disable()


def _run_dir(config):
    """The run's base temp directory, common to its xdist workers (a new one
    each run): where they share the 8-device report of
    ``tests/test_sharding.py`` and keep their compilation caches."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """One XLA compilation cache per test process, new each run.

    Rows that trace to the same program (one optimizer and flags on other
    hyperparameter values, which live in the state) compile it once: a later
    compile loads the executable the first one wrote, the same machine code,
    so no result changes (tests/parity/test_optim.py: 347 s without the
    cache, 279 s with it, 2 workers).

    The cache has no size limit, on purpose. With a limit, JAX takes a file
    lock around every read and write and, on every write, globs and stats the
    whole directory to decide what to evict: a cost that grows with the
    entries written so far (the suite writes ~5,600, at ~0.55 s a write by
    its end; 6.9 s at 30,000), so a suite-long cache grows quadratically and
    each write stalls the other worker on the lock. Without the limit there
    is no lock, so each xdist worker writes its own directory and a reader
    never sees a half-written entry. A child pytest
    (``tests/_subprocess.run_pytest_child``) runs while its worker waits for
    it, so it shares the worker's directory (passed in ``CACHE_DIR_ENV``);
    script children do not use a cache.
    """
    cache = os.environ.get(CACHE_DIR_ENV)  # set for a child pytest
    if cache is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        cache = str(_run_dir(config) / f"jax_compilation_cache_{worker}")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
