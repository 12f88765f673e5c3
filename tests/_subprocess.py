"""Child processes of the test suite: one hang guard, one way to run pytest.

Tests that run a script in a fresh Python process (the 8-device sharding
checks, the two-process `jax.distributed` example, the benchmark command,
a checkpoint writer killed mid-save, the child pytests of
`run_pytest_child`) pass `timeout=HANG_GUARD_S`. It is not
a speed check: it only turns a hung child into a failure instead of a CI run
that never ends. The slowest child, `tests/_sharded_checks.py`, takes about
100 s on a quiet 2-core machine and over 300 s with the other core busy;
1,500 s is far above any busy-machine run and still well inside CI's limit.
"""

import pathlib
import re
import subprocess
import sys

import jax

HANG_GUARD_S = 1500
# the calling test process's XLA compilation cache, for a child pytest
# (tests/conftest.py: one directory per process, no lock)
CACHE_DIR_ENV = "FUNCOPT_TEST_JAX_CACHE_DIR"
ROOT = pathlib.Path(__file__).resolve().parents[1]
# what a failed child's assertion shows: its output's end (failures, summary)
_TAIL = 6000


def run_pytest_child(args: list[str], env: dict[str, str], probe: str | None = None):
    """Run `pytest.main(args)` in a fresh Python process with `env`, in
    the repository root; return how many tests passed (at least one).

    `probe` (Python source) runs first in that same process: a check that
    the process is the environment its rows claim (its assertion fails the
    child before any row runs). One process for probe and rows: a second
    would import torch and JAX again. The child fails the calling test when
    the probe or any row fails, or when it runs past `HANG_GUARD_S`.
    """
    cache = jax.config.jax_compilation_cache_dir
    if cache:  # the child runs while this process waits: one writer at a time
        env = {**env, CACHE_DIR_ENV: cache}
    code = f"import sys\n{probe or ''}\nimport pytest\nsys.exit(pytest.main({args!r}))"
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    output = child.stdout[-_TAIL:] + child.stderr[-_TAIL:]
    assert child.returncode == 0, output
    passed = re.search(r"\b(\d+) passed", child.stdout)
    assert passed and int(passed.group(1)) > 0, output
    return int(passed.group(1))
