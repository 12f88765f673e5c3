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
    # `--spread` reads the run's own file: the targets it missed, in order
    table = run_script("targets.py", "--spread", str(tmp_path / "targets.json"))
    listed = [line.split(" | ")[1] for line in table.splitlines()[2:] if line]
    all_rows = json.loads((tmp_path / "targets.json").read_text())["rows"]
    assert listed == [r["target"] for r in all_rows if not r["met"]]


def test_targets_spread_lists_each_target_some_run_missed(tmp_path):
    def target(name, value, met, floor=None, goal="<= 1.0x", **extra):
        seconds = goal.endswith(" s")
        return {"issue": 15, "target": name, "goal": goal, "met": met,
                "funcopt": value if seconds else 1.0,
                "ratio": None if seconds else value,
                "floor_ratio": None if seconds else floor, **extra}  # fmt: skip

    first = [
        target("met in both", 0.9, True),
        target("missed in both", 1.2, False, floor=0.25),
        target("missed first", 1.05, False),
        target("in seconds", 13.7, False, goal="<= 2.0 s", floor_s=6.5),
        target("stopped", None, False, goal="<= 2.0 s", note="stopped at 150 s"),
    ]
    second = [
        target("met in both", 0.8, True),
        target("missed in both", 1.1, False, floor=0.3),
        target("missed first", 0.95, True),
        target("second run only", 1.3, False),
    ]
    files = []
    for k, rows in enumerate((first, second)):
        files.append(tmp_path / f"run{k}.json")
        files[-1].write_text(json.dumps({"meta": {}, "rows": rows}))
    table = run_script("targets.py", "--spread", *map(str, files))
    lines = {x.split(" | ")[1]: x for x in table.splitlines()[2:] if x}
    assert list(lines) == [
        "missed in both", "missed first", "in seconds", "stopped", "second run only"
    ]  # fmt: skip
    assert lines["missed in both"].endswith(
        "| 1.200* / 1.100* | 0.250 / 0.300 | <= 1.0x | 0 of 2 |"
    )
    assert lines["missed first"].endswith(
        "| 1.050* / 0.950 | - / - | <= 1.0x | 1 of 2 |"
    )
    assert lines["in seconds"].endswith(
        "| 13.7 s* / - | 6.5 s / - | <= 2.0 s | 0 of 1 |"
    )
    assert "| stopped at 150 s* / - |" in lines["stopped"]
    assert lines["second run only"].endswith(
        "| - / 1.300* | - / - | <= 1.0x | 0 of 1 |"
    )


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
