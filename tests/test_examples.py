"""The examples run, and the digits example agrees with torch in float64."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_digits_side_by_side_float64(tmp_path):
    plot = tmp_path / "digits.png"
    out = subprocess.run(
        [
            sys.executable,
            "examples/digits_side_by_side.py",
            "--float64",
            "--epochs",
            "2",
            "--plot",
            str(plot),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    max_rel = float(re.search(r"max relative loss difference .*: (\S+)", out).group(1))
    assert max_rel < 1e-9
    assert plot.stat().st_size > 0
