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


def _run(script, *args):
    return subprocess.run(
        [sys.executable, f"examples/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_hypergradient_example_lowers_validation_loss(tmp_path):
    plot = tmp_path / "hyper.png"
    out = _run("hypergradient_lr.py", "--outer-steps", "6", "--plot", str(plot))
    losses = [float(v) for v in re.findall(r"val loss after \d+ steps (\S+)", out)]
    assert losses[-1] < losses[0]  # the hypergradient steps improve the lr
    assert plot.stat().st_size > 0


def test_muon_adamw_example_trains(tmp_path):
    plot = tmp_path / "mix.png"
    out = _run("muon_adamw_groups.py", "--steps", "60", "--plot", str(plot))
    losses = [float(v) for v in re.findall(r"loss (\S+)  lr", out)]
    assert losses[-1] < losses[0]
    assert plot.stat().st_size > 0


def test_port_torch_model_hands_over_exactly():
    """Registration order, BatchNorm statistics, tied head: funcopt's run
    handed to a torch optimizer built from `model.parameters()` continues
    equal to the uninterrupted torch run."""
    out = _run("port_torch_model.py", "--steps", "8")
    diffs = [float(v) for v in re.findall(r"hand-over: (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-10, out
