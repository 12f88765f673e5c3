"""The two-process ``jax.distributed`` example trains like a single process."""

import pathlib
import re
import subprocess
import sys

from tests._subprocess import HANG_GUARD_S

ROOT = pathlib.Path(__file__).parent.parent


def test_two_processes_match_single_process():
    out = subprocess.run(
        [
            sys.executable,
            "examples/multihost_data_parallel.py",
            "--timeout",
            str(HANG_GUARD_S - 100),  # the example's own limit fires first
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # both workers ran, each seeing 2 local of 4 global devices
    assert len(re.findall(r"process [01]/2: 2 local of 4 devices", out.stdout)) == 2
    lines = re.findall(
        r"vs 1 process x (\d) device\(s\): .* allclose: (\w+)", out.stdout
    )
    assert sorted(lines) == [("1", "True"), ("4", "True")]
