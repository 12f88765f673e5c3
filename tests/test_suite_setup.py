"""The suite's own setup (tests/conftest.py), kept from regressing silently.

A size-limited JAX compilation cache rescans its whole directory under a lock
shared by the xdist workers on every write: the suite then took 50 minutes
instead of 21 on a 2-core machine, with no test failing.
"""

import os

import jax

from tests._subprocess import CACHE_DIR_ENV


def test_compilation_cache_has_no_size_limit():
    """No limit: no eviction scan and no file lock around reads and writes."""
    assert jax.config.jax_compilation_cache_max_size == -1


def test_each_test_process_has_its_own_cache_directory():
    cache = jax.config.jax_compilation_cache_dir
    assert cache, "no compilation cache configured"
    if os.environ.get(CACHE_DIR_ENV):  # a child pytest writes its worker's
        assert cache == os.environ[CACHE_DIR_ENV]
    else:  # named after the process's xdist worker (gw0, gw1, ...)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        assert os.path.basename(cache).endswith(f"_{worker}"), cache
