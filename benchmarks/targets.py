"""Every speed target of issues 15 (fast by default) and 19 (native fused
kernels), measured, with its ratio and whether it is met.

Issue 15 is the default path: `jax.jit` of a step on a plain dict of float32
leaves, against optax's twin in the same process, three ways a user writes
it (`opt.step`; `optax.chain(optax.clip_by_global_norm(1.0), fo.adamw())`
with `update` + `apply_updates`; `fo.TrainState`'s `zero_grad`, `backward`,
`step`). Issue 19 is `fused=True` on the native CPU kernels against torch's
`fused=True` and the machine's streaming roofline. Every program is jitted
with its carry (params, state) donated; compile seconds are trace + lower +
XLA compile; step times are medians of implementations timed in alternating
turns (`bench_step.time_interleaved`), so a busy moment falls on all alike,
each over `PLACEMENTS` copies of its buffers stepped in turn
(`bench_step.across_placements`: a step's time depends on where its buffers
lie).

    .venv/bin/python benchmarks/targets.py [--quick] [--skip-big] [--out DIR]
    .venv/bin/python benchmarks/targets.py --spread RUN.json [RUN.json ...]

Writes `benchmarks/results/targets.{json,md}` and prints the table;
`--spread` prints, from several runs' `targets.json`, each target some run
missed, with its ratio and floor in every run.
`--smoke` runs every measurement on tiny sizes (the test of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import torch
from bench_step import (
    OPTIMIZERS,
    across_placements,
    bandwidth,
    chain_sampler,
    machine,
    make_tree,
    optax_train_step,
    time_interleaved,
    torch_step,
)
from compile_time import model_rows

import funcopt as fo

RESULTS = pathlib.Path(__file__).parent / "results"

# leaves -> the most funcopt's compile may take, as a multiple of optax's
COMPILE_RATIO = {10: 1.0, 100: 1.0, 300: 0.2, 1_000: 0.2}
# 10,000 leaves: at most this many seconds (absolute; optax takes minutes)
BIG_LEAVES, BIG_SECONDS = 10_000, 2.0
# step-time cases (leaf sizes) -> the most funcopt may take, times optax's
STEP_RATIO = {
    "1 leaf, 1M": ([1_000_000], 1.0),
    "1 leaf, 10M": ([10_000_000], 1.0),
    # issue 15's mixed tree: 50 matrices 1024x192 and 50 vectors of 192
    "100 mixed leaves, 10M": ([1024 * 192, 192] * 50, 1.0),
    "1,000 leaves x 1,000": ([1_000] * 1_000, 0.5),
}
# native fused kernels (issue 19): one 10M leaf against torch fused and the
# roofline; many leaves against torch fused and funcopt's default path
FUSED = {"adam": fo.adam, "adamw": fo.adamw, "sgd": fo.sgd}
FUSED_RATIO = 1.1
# copies of each program's buffers timed in turn (`bench_step.across_placements`)
PLACEMENTS = 4
SMOKE_SIZES = {"compile": [3], "big": 5, "step": [1_000], "fused": [1_000]}


def squared_distance(params, target):
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(target))
    return sum(jnp.sum((p - t) ** 2) for p, t in pairs)


def paths(params) -> dict:
    """path -> {implementation: (step(carry, x) -> carry, carry, x)}: the same
    step as funcopt's user and optax's user write it, and its floor: the
    same program without the optimizer (the params in and out and the grads
    in; optax's clip and `apply_updates`; the loss gradient and
    `p - lr * g`), the part of the reference no optimizer can make faster.
    No optimizer state is in a floor: how many arrays an optimizer keeps
    its state in is the optimizer's (funcopt packs small leaves' state)."""
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    clip = optax.clip_by_global_norm(1.0)

    def transform(tx):
        step = optax_train_step(tx)
        carry = (params, tx.init(params))
        return (lambda c, g: step(c[0], g, c[1])), carry, grads

    opt = fo.adam(lr=1e-3)

    def funcopt_train_step(ts, target):
        ts, _ = ts.zero_grad().backward(squared_distance, target)
        return ts.step()

    tx = optax.adamw(1e-3, weight_decay=1e-2)

    def optax_grad_step(carry, target):
        p, s = carry
        updates, s = tx.update(jax.grad(squared_distance)(p, target), s, p)
        return optax.apply_updates(p, updates), s

    def grad_only_step(carry, target):
        p, s = carry
        g = jax.grad(squared_distance)(p, target)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), s

    target = jax.tree.map(lambda p: p * 0.5, params)
    return {
        "jit(fo.adam().step)": {
            "funcopt": (
                lambda c, g: opt.step(c[0], g, c[1]),
                (params, opt.init(params)),
                grads,
            ),
            "optax": transform(optax.adam(1e-3)),
            "floor": (lambda c, g: c, params, grads),
        },
        "optax.chain(clip, fo.adamw())": {
            "funcopt": transform(optax.chain(clip, fo.adamw(lr=1e-3))),
            "optax": transform(optax.chain(clip, tx)),
            "floor": transform(clip),
        },
        "fo.TrainState(fo.adamw())": {
            "funcopt": (
                funcopt_train_step,
                fo.TrainState.create(params, fo.adamw(lr=1e-3)),
                target,
            ),
            "optax": (optax_grad_step, (params, tx.init(params)), target),
            "floor": (grad_only_step, (params, ()), target),
        },
    }


def compiled(step, carry, x):
    """(the compiled step, trace + lower + compile seconds), carry donated."""
    t0 = time.perf_counter()
    out = jax.jit(step, donate_argnums=0).lower(carry, x).compile()
    return out, time.perf_counter() - t0


def copy(tree):
    return jax.tree.map(lambda v: jnp.copy(v) if isinstance(v, jax.Array) else v, tree)


def placed(program, carry, x) -> Callable[[], float]:
    """A sampler of `program` stepping `PLACEMENTS` copies of `carry` and
    `x` in turn (`bench_step.across_placements`)."""
    return across_placements(
        chain_sampler(program, copy(carry), copy(x)) for _ in range(PLACEMENTS)
    )


def row(issue, target, funcopt, reference, goal, *, absolute=False, floor=None):
    """One target: `funcopt / reference <= goal` (or `funcopt <= goal`);
    `floor`: the time of the program without the optimizer (`paths`),
    whose ratio to the reference is the lowest any optimizer can reach."""
    ratio = None if reference is None or funcopt is None else funcopt / reference
    value = funcopt if absolute else ratio
    return {
        "issue": issue,
        "target": target,
        "funcopt": funcopt,
        "reference": reference,
        "ratio": ratio,
        "floor_ratio": None if floor is None or not reference else floor / reference,
        "goal": f"<= {goal} s" if absolute else f"<= {goal}x",
        "met": value is not None and value <= goal,
    }


def report(rows: list[dict], *new: dict) -> None:
    """`new` appended to `rows` and printed as soon as measured."""
    rows += new
    print(*new, sep="\n", flush=True)


def compile_rows(leaves: list[int]) -> list[dict]:
    rows = []
    # warm-up: the first trace in a process pays one-time costs (imports,
    # caches) that are no part of either implementation's compile
    for impls in paths(make_tree([7])).values():
        for args in impls.values():
            compiled(*args)
    for n in leaves:
        for path, impls in paths(make_tree([1_000] * n)).items():
            seconds = {k: compiled(*args)[1] for k, args in impls.items()}
            goal = COMPILE_RATIO.get(n, 1.0)
            report(rows, row(15, f"compile, {path}, {n} leaves x 1,000",
                             seconds["funcopt"], seconds["optax"], goal,
                             floor=seconds["floor"]))  # fmt: skip
    return rows


def big_compile_row(timeout: float, leaves: int = BIG_LEAVES) -> dict:
    """`jit(opt.step)` compile at `leaves` leaves, and its floor (the
    params donated and returned untouched, the grads passed in); each in a
    child process stopped at `timeout` seconds, imports and tree building
    included (then reported as that bound)."""
    seconds = {
        program: _big_compile_seconds(program, timeout, leaves)
        for program in ("funcopt", "floor")
    }

    def said(s):
        if isinstance(s, str):
            return s
        return f"stopped at {timeout:.0f} s" if s is None else f"{s:.3g} s"

    r = row(15, f"compile, jit(fo.adam().step), {leaves:,} leaves x 1,000",
            seconds["funcopt"] if isinstance(seconds["funcopt"], float) else None,
            None, BIG_SECONDS, absolute=True)  # fmt: skip
    r["note"] = f"{said(seconds['funcopt'])}; floor {said(seconds['floor'])}"
    r["floor_s"] = seconds["floor"] if isinstance(seconds["floor"], float) else None
    return r


def _big_compile_seconds(
    program: str, timeout: float, leaves: int
) -> float | str | None:
    """Compile seconds of `program` at `leaves` leaves in a child
    process: funcopt's step or its floor (`paths`: a step that returns its
    donated params untouched, the least any step on them compiles in); None
    where stopped at `timeout`, "failed (...)" where the child failed (the
    run goes on)."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks');"
        "import targets as t;"
        f"p = t.make_tree([1_000] * {leaves});"
        "impls = t.paths(p)['jit(fo.adam().step)'];"
        f"print(t.compiled(*impls[{program!r}])[1])"
    )
    root = pathlib.Path(__file__).parent.parent
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return f"failed ({last[0][:120]})"
    return float(out.stdout.split()[-1])


def step_rows(cases: dict, min_time: float) -> list[dict]:
    rows = []
    for case, (sizes, goal) in cases.items():
        for path, impls in paths(make_tree(sizes)).items():
            samplers = {}
            for k, (step, carry, x) in impls.items():
                program, _ = compiled(step, carry, x)
                samplers[k] = placed(program, carry, x)
            ms = {k: 1e3 * t for k, t in time_interleaved(samplers, min_time).items()}
            report(rows, row(15, f"step ms, {path}, {case}",
                             ms["funcopt"], ms["optax"], goal,
                             floor=ms["floor"]))  # fmt: skip
    return rows


@contextlib.contextmanager
def without_native_code():
    """funcopt as it runs without its native library while a block runs
    (`FUNCOPT_NATIVE=0`, read at `init` and at trace time): the pure JAX
    rules, per-leaf state."""
    old = os.environ.get("FUNCOPT_NATIVE")
    os.environ["FUNCOPT_NATIVE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FUNCOPT_NATIVE"]
        else:
            os.environ["FUNCOPT_NATIVE"] = old


def fused_rows(one_leaf: int, many: dict, min_time: float) -> list[dict]:
    """Issue 19: `fused=True` (native kernels) against torch `fused=True`, the
    roofline (one leaf) and the XLA path (many leaves: the same step as
    funcopt runs without its library, `without_native_code`); many leaves'
    floor: the jitted program without the optimizer (the params in and
    out, the grads in), JAX's cost of a call on that many arrays."""
    assert fo.precision.native_fused(), "build the kernels: make venv"
    bw = max(bandwidth().values())
    rows = []
    cases = {f"1 leaf, {one_leaf:,}": [one_leaf], **many}
    for name, make in FUSED.items():
        kwargs = {"lr": 1e-3, **({"momentum": 0.9} if name == "sgd" else {})}
        _, _, (torch_cls, torch_kwargs), bytes_per_param = OPTIMIZERS[name]
        for case, sizes in cases.items():
            params = make_tree(sizes)
            grads = jax.tree.map(lambda p: p * 1e-3, params)
            samplers = {}
            for label, native in (("native", True), ("xla", False)):
                opt = make(**kwargs, fused=True)
                with contextlib.nullcontext() if native else without_native_code():
                    carry = (copy(params), opt.init(params))
                    program, _ = compiled(
                        lambda c, g, o=opt: o.step(c[0], g, c[1]), carry, grads
                    )
                samplers[label] = placed(program, carry, grads)
            samplers["torch"] = across_placements(
                torch_step(torch_cls, torch_kwargs, sizes, "fused")[0]
                for _ in range(PLACEMENTS)
            )
            if len(sizes) > 1:  # the program without the optimizer (`paths`)
                floor, _ = compiled(lambda c, g: c, copy(params), grads)
                samplers["floor"] = placed(floor, params, grads)
            ms = {k: 1e3 * t for k, t in time_interleaved(samplers, min_time).items()}
            target = f"step ms, fused=True {name}, {case}"
            if len(sizes) == 1:
                roofline = 1e3 * bytes_per_param * sum(sizes) / bw
                report(rows,
                       row(19, f"{target} vs torch fused", ms["native"],
                           ms["torch"], FUSED_RATIO),
                       row(19, f"{target} vs roofline", ms["native"],
                           roofline, FUSED_RATIO))  # fmt: skip
            else:
                report(rows,
                       row(19, f"{target} vs torch fused", ms["native"],
                           ms["torch"], 1.0, floor=ms["floor"]),
                       row(19, f"{target} vs XLA path", ms["native"],
                           ms["xla"], 1.0, floor=ms["floor"]))  # fmt: skip
    return rows


def eager_and_grad_rows() -> list[dict]:
    """The first un-jitted step and `jax.grad` through 20 unrolled steps
    (`compile_time.model_rows`, a GPT param tree): no slower than optax."""
    return [
        row(15, r["case"], r["funcopt"], r["optax"], 1.0)
        for r in model_rows()
        if "compile" not in r["case"] or "grad" in r["case"]
    ]


def markdown(meta: dict, rows: list[dict]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3g}"

    lines = [
        f"# Speed targets, {meta['machine']}",
        "",
        ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f". {sum(r['met'] for r in rows)} of {len(rows)} met.",
        "",
        "floor: the ratio of the same program without the optimizer (issue 15"
        " rows, see `paths`; issue 19's many-leaf rows: the params in and out"
        " and the grads in), the lowest any optimizer can reach.",
        "",
        "| issue | target | funcopt | reference | ratio | floor | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = f" ({r['note']})" if "note" in r else ""
        met = ("yes" if r["met"] else "no") + note
        lines.append(
            f"| #{r['issue']} | {r['target']} | {f(r['funcopt'])} | "
            f"{f(r['reference'])} | {f(r['ratio'])} | {f(r['floor_ratio'])} | "
            f"{r['goal']} | {met} |"
        )
    return "\n".join(lines) + "\n"


def spread(runs: list[dict]) -> str:
    """Markdown: each target that some of `runs` (the contents of their
    `targets.json`, in order) did not meet, in the order they first appear,
    with its ratio (seconds for a goal in seconds, or the run's note where
    it has no value) and floor in every run (`-` where the run lacks the
    target), `*` where that run missed it, and in how many of the runs that
    measured it it was met. Tells a target missed in every run from one
    that run-to-run noise moves across its goal."""

    def in_seconds(r) -> bool:
        return r["goal"].endswith(" s")

    def value(r) -> str:
        if r is None:
            return "-"
        v = r["funcopt"] if in_seconds(r) else r["ratio"]
        if v is None:
            shown = r.get("note", "-")
        else:
            shown = f"{v:.3g} s" if in_seconds(r) else f"{v:.3f}"
        return shown + ("" if r["met"] else "*")

    def floor(r) -> str:
        if r is None:
            return "-"
        if in_seconds(r):
            return "-" if r.get("floor_s") is None else f"{r['floor_s']:.3g} s"
        return "-" if r["floor_ratio"] is None else f"{r['floor_ratio']:.3f}"

    by_run = [{r["target"]: r for r in run["rows"]} for run in runs]
    targets = list(dict.fromkeys(t for run in by_run for t in run))
    lines = [
        "| issue | target | per run | floor per run | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for target in targets:
        rows = [run.get(target) for run in by_run]
        measured = [r for r in rows if r is not None]
        if all(r["met"] for r in measured):
            continue
        last = measured[-1]
        lines.append(
            f"| #{last['issue']} | {target} | {' / '.join(map(value, rows))} | "
            f"{' / '.join(map(floor, rows))} | {last['goal']} | "
            f"{sum(r['met'] for r in measured)} of {len(measured)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing loops")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    ap.add_argument(
        "--skip-big", action="store_true", help=f"no {BIG_LEAVES:,}-leaf compile"
    )
    ap.add_argument("--big-timeout", type=float, default=150.0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--fused-only", action="store_true", help="issue 19's rows only (printed)"
    )
    ap.add_argument(
        "--spread",
        nargs="+",
        metavar="JSON",
        help="print the targets some of these runs' targets.json missed, run by run",
    )
    args = ap.parse_args()
    if args.spread:
        print(spread([json.loads(pathlib.Path(f).read_text()) for f in args.spread]))
        return
    min_time = 0.05 if args.smoke else 0.25 if args.quick else 0.6
    if args.smoke:
        leaves = SMOKE_SIZES["compile"]
        cases = {"smoke": (SMOKE_SIZES["step"], 1.0)}
        one_leaf, many = SMOKE_SIZES["fused"][0], {"3 leaves": [100] * 3}
    else:
        leaves, cases = list(COMPILE_RATIO), STEP_RATIO
        one_leaf = 10_000_000
        many = {
            "100 leaves, 10M": [100_000] * 100,
            "1,000 leaves x 1,000": [1_000] * 1_000,
        }
    meta = {
        "machine": machine(),
        "versions": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "funcopt": fo.__version__,
        },
    }
    if args.fused_only:
        fused_rows(one_leaf, many, min_time)
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = compile_rows(leaves)
    # the files are rewritten after each part, so a stopped run keeps its rows
    save(out, meta, rows)
    if not args.skip_big:
        big = SMOKE_SIZES["big"] if args.smoke else BIG_LEAVES
        report(rows, big_compile_row(args.big_timeout, big))
    rows += step_rows(cases, min_time)
    save(out, meta, rows)
    if not args.smoke:
        report(rows, *eager_and_grad_rows())
    rows += fused_rows(one_leaf, many, min_time)
    print(save(out, meta, rows))


def save(out: pathlib.Path, meta: dict, rows: list[dict]) -> str:
    """`targets.{json,md}` in `out` from the rows measured so far; returns
    the Markdown."""
    (out / "targets.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    md = markdown(meta, rows)
    (out / "targets.md").write_text(md)
    return md


if __name__ == "__main__":
    main()
