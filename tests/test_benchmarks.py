"""The README's benchmark command runs and writes its tables (no timing checks)."""

import json
import pathlib
import re
import subprocess
import sys

from tests._subprocess import HANG_GUARD_S

ROOT = pathlib.Path(__file__).parent.parent


def run_script(script: str, *args: str, timeout: float = HANG_GUARD_S) -> str:
    """`python benchmarks/<script> <args>` from the repository root; its
    stdout (the test fails with its stderr if it exits non-zero)."""
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_bench_step_writes_json_markdown_and_summary(tmp_path):
    run_script(
        "bench_step.py",
        "--quick",
        "--opts",
        "sgd",
        "--cases",
        "0",
        "--out",
        str(tmp_path),
    )
    saved = json.loads((tmp_path / "bench_step.json").read_text())
    (row,) = saved["rows"]
    assert (row["optimizer"], row["case"]) == ("sgd", "1 leaf, 1M")
    for key in ("funcopt_flat_ms", "funcopt_tree_ms", "optax_donate_ms"):
        assert row[key] > 0, key
    assert row["torch_foreach_ms"] > 0 and row["torch_fused_ms"] > 0
    assert row["funcopt_state_bytes_per_param"] == row["torch_state_bytes_per_param"]
    markdown = (tmp_path / "bench_step.md").read_text()
    assert "| sgd | 1 leaf, 1M |" in markdown
    summary = run_script(
        "bench_step.py", "--summarize", str(tmp_path / "bench_step.json")
    )
    assert "| 1 leaf, 1M |" in summary and summary.strip() in markdown


def test_compile_time_writes_json_and_markdown(tmp_path):
    run_script("compile_time.py", "--leaves", "3", "--all-leaves", "2",
               "--only", "sgd", "asgd", "--out", str(tmp_path))  # fmt: skip
    rows = json.loads((tmp_path / "compile_time.json").read_text())["rows"]
    assert [(r["optimizer"], r["leaves"]) for r in rows] == [
        ("adam", 3),
        ("sgd", 2),
        ("asgd", 2),
    ]
    assert rows[0]["optax"]["total_s"] > 0 and rows[0]["funcopt"]["total_s"] > 0
    assert "optax" not in rows[2]  # optax has no ASGD
    small = json.loads((tmp_path / "compile_time.json").read_text())["meta"]["small"]
    assert [r["optimizer"] for r in small] == ["sgd", "asgd"]
    assert small[0]["sizes"] == [37, 65, 7, 24, 11] and "optax" not in small[1]
    assert small[0]["optax"]["step_us"] > 0 and small[1]["per_leaf"]["step_us"] > 0
    markdown = (tmp_path / "compile_time.md").read_text()
    assert "| adam | 3 |" in markdown and "| asgd | 2 | - |" in markdown
    assert "| asgd | - / " in markdown  # the small tree's row


def test_compile_curve_writes_json_table_and_plot(tmp_path):
    """Every implementation's point runs (each in its own process) and lands
    in the JSON, the table and the plot."""
    run_script("compile_curve.py", "--leaves", "3", "--limit-s", str(HANG_GUARD_S),
               "--out", str(tmp_path), timeout=HANG_GUARD_S * 4)  # fmt: skip
    rows = json.loads((tmp_path / "compile_curve.json").read_text())["rows"]
    assert sorted((r["impl"], r["leaves"]) for r in rows) == sorted(
        (impl, n) for impl in ("optax", "funcopt_default", "funcopt_flat") for n in (3,)
    )
    assert all(r["result"]["total_s"] > 0 for r in rows)
    assert "| 3 |" in (tmp_path / "compile_curve.md").read_text()
    assert (tmp_path / "compile_curve.png").stat().st_size > 0


def test_targets_writes_every_kind_of_target(tmp_path):
    run_script("targets.py", "--smoke", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "targets.json").read_text())["rows"]
    targets = [r["target"] for r in rows]
    for path in ("jit(fo.adam().step)", "optax.chain(clip", "fo.TrainState"):
        assert any(t.startswith(f"compile, {path}") for t in targets), path
        assert any(t.startswith(f"step ms, {path}") for t in targets), path
    for name in ("adam", "adamw", "sgd"):
        assert any(f"fused=True {name}," in t and "roofline" in t for t in targets)
        # many leaves: against the XLA path (FUNCOPT_NATIVE=0), issue 19's words
        assert any(f"fused=True {name}," in t and "XLA path" in t for t in targets)
    # the many-leaf compile: seconds, with its floor in its note
    (big,) = [r for r in rows if r["goal"].endswith(" s")]
    assert big["target"].startswith("compile, jit(fo.adam().step), 5 leaves")
    assert big["met"] == (big["funcopt"] <= float(big["goal"][3:-2]))
    assert re.fullmatch(r"\S+ s; floor \S+ s", big["note"])
    rows.remove(big)
    assert all(r["funcopt"] > 0 and r["reference"] > 0 for r in rows)
    assert all(r["met"] == (r["ratio"] <= float(r["goal"][3:-1])) for r in rows)
    # issue 15's compile and step rows say the ratio of the program without
    # the optimizer (the floor no optimizer can go under)
    paths = [r for r in rows if r["issue"] == 15]
    assert paths and all(r["floor_ratio"] > 0 for r in paths)
    markdown = (tmp_path / "targets.md").read_text()
    assert f"of {len(rows) + 1} met." in markdown
    check_spread(tmp_path / "targets.json", tmp_path)


def check_spread(first: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """`targets.py --spread` on a run and a copy where one target it met is
    missed and one it missed is met: each target some run missed, once, with
    its value in both runs and how many met it."""
    run = json.loads(first.read_text())
    rows = run["rows"]
    ratio_rows = [r for r in rows if r["ratio"] is not None]
    (flipped_to_miss, flipped_to_meet) = ratio_rows[0], ratio_rows[-1]
    rows_2 = []
    for r in rows:
        r = dict(r)
        if r["target"] in (flipped_to_miss["target"], flipped_to_meet["target"]):
            r["met"] = r["target"] != flipped_to_miss["target"]
            r["ratio"] = 0.5 if r["met"] else 9.0
        rows_2.append(r)
    second = tmp_path / "second.json"
    second.write_text(json.dumps({**run, "rows": rows_2}))
    table = run_script("targets.py", "--spread", str(first), str(second))
    listed = [line.split(" | ")[1] for line in table.splitlines()[2:] if line]
    missed = {r["target"] for r in rows if not r["met"]}
    missed_2 = {r["target"] for r in rows_2 if not r["met"]}
    assert listed == [r["target"] for r in rows if r["target"] in missed | missed_2]
    line = next(x for x in table.splitlines() if flipped_to_miss["target"] in x)
    met_first = 1 if flipped_to_miss["met"] else 0
    assert line.endswith(f"| {met_first} of 2 |") and " / 9.00* |" in line
    if not flipped_to_meet["met"]:  # else met in both runs: not listed (above)
        line = next(x for x in table.splitlines() if flipped_to_meet["target"] in x)
        assert line.endswith("| 1 of 2 |") and " / 0.50 |" in line


def test_xla_floor_writes_json_and_markdown(tmp_path):
    run_script("xla_floor.py", "--leaves", "2", "5", "--optax-max", "2",
               "--out", str(tmp_path))  # fmt: skip
    rows = json.loads((tmp_path / "xla_floor.json").read_text())["rows"]
    assert [r["leaves"] for r in rows] == [2, 5]
    assert rows[0]["floor_s"] > 0 and rows[0]["optax_s"] > 0
    assert "optax_s" not in rows[1]
    markdown = (tmp_path / "xla_floor.md").read_text()
    assert "| 2 |" in markdown and "| 5 |" in markdown and "| — |" in markdown


def test_in_jit_grads_writes_both_flag_runs(tmp_path):
    """The default run and the region-analysis child: every implementation,
    its step time, temporary buffer and param copies."""
    run_script("in_jit_grads.py", "--layers", "2", "--width", "64", "--leaf", "100",
               "--min-time", "0.05", "--xla-region-analysis",
               "--out", str(tmp_path))  # fmt: skip
    runs = json.loads((tmp_path / "in_jit_grads.json").read_text())["runs"]
    assert len(runs) == 2
    for rows in runs.values():
        impls = [r["impl"] for r in rows]
        assert (
            impls
            == [
                "jit(grad + opt.step)",
                "jit(grad + opt.step), in place",
                "fo.TrainState",
                "optax",
            ]
            * 2
        )
        assert len({r["model"] for r in rows}) == 2
        for r in rows:  # every measure of every row
            assert r["step_ms"] > 0 and r["compile_s"] > 0, r
            assert isinstance(r["param_copies"], int) and r["temp_mb"] >= 0, r
    markdown = (tmp_path / "in_jit_grads.md").read_text()
    assert "| default | MLP, 2 x 64x64 | optax |" in markdown
    assert "region_analysis" in markdown


def test_across_placements_runs_each_placement_in_turn(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_step import across_placements

    calls = []

    def sampler(i):
        def sample():
            calls.append(i)
            return float(i)

        return sample

    sample = across_placements(sampler(i) for i in range(3))
    assert calls == [0, 1, 2]  # each placement warmed once
    assert [sample() for _ in range(6)] == [1.0, 2.0, 0.0, 1.0, 2.0, 0.0]
