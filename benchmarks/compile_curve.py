"""Compile time of one Adam step against leaf count: funcopt (two ways) and optax.

The curve of issue 15. Adam (`lr=1e-3`) on a plain dict of $n$ float32 leaves
of 1,000 elements each, $n$ = 10, 30, 100, 300, 1,000, 3,000, 10,000, three
implementations of the step, each jitted with the params and state donated:

- **funcopt default**: `jax.jit(opt.step)` on the dict, the path every user
  takes without opting into anything (`compile_time.measure`);
- **funcopt flat**: `opt.step` on the opt-in `funcopt.flat` layout (params,
  grads and state packed, as `bench_step.funcopt_flat` compiles it);
- **optax**: `tx.update` + `optax.apply_updates` (`bench_step.optax_train_step`).

Each time is the wall-clock seconds of trace + lower + XLA compile of the
jitted step (what its first call costs). Every (implementation, $n$) point
runs in a fresh Python process (this file with `--point IMPL N`), so no
point inherits another's traces or compiled kernels; one trivial `jit` warms
up the backend first. Points run interleaved by leaf count (for each $n$,
every implementation), so a busy moment of the machine falls on all alike.
A point still running `--limit-s` seconds after its process's imports and
warm-up (so: building the inputs, then trace + lower + compile) is killed,
recorded as timed out and drawn as an open marker at the limit; that
implementation's larger leaf counts are then skipped.

    .venv/bin/python benchmarks/compile_curve.py [--leaves 10 30 100 ...]
        [--limit-s 600] [--out DIR]
    .venv/bin/python benchmarks/compile_curve.py --redraw \
        benchmarks/results/compile_curve.json

Writes `benchmarks/results/compile_curve.{json,md,png}` (the JSON after every
point, so an interrupted run keeps what it measured) and prints the Markdown
table. Each point costs 2-3 s of process start and imports, then building
its inputs and the compile. On a 2-core Xeon the rows of 10, 30 and 100
leaves take about a minute together, 1,000 leaves half a minute (compiles of
5 s optax, 10 s default, 0.2 s flat); the full default curve is estimated at
10-15 minutes (optax and the default path grow faster than linearly: about
2 and 4 minutes at 10,000 leaves), at most `--limit-s` per point.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).parent / "results"
READY = "READY"
LEAVES = [10, 30, 100, 300, 1000, 3000, 10000]
IMPLS = {
    "optax": "optax (update + apply_updates)",
    "funcopt_default": "funcopt default: jit(opt.step) on the dict",
    "funcopt_flat": "funcopt flat (funcopt.flat layout)",
}


def point(impl: str, n_leaves: int) -> dict:
    """Seconds of trace + lower + compile of one implementation at `n_leaves`."""
    import jax

    jax.config.update("jax_enable_x64", False)
    from bench_step import funcopt_flat, optax_train_step
    from compile_time import OPTIMIZERS, SIZE, measure, tree

    jax.jit(lambda x: x + 1).lower(1.0).compile()  # backend start-up, not timed
    print(READY, flush=True)
    make_opt, make_tx = OPTIMIZERS["adam"]
    params = tree(n_leaves)
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    if impl == "optax":
        tx = make_tx()
        return measure(optax_train_step(tx), params, grads, tx.init(params))
    if impl == "funcopt_default":
        opt = make_opt()
        return measure(opt.step, params, grads, opt.init(params))
    if impl == "funcopt_flat":
        _, total_s, padded = funcopt_flat(make_opt, params)
        return {"total_s": total_s, "padding": padded / (n_leaves * SIZE) - 1}
    raise ValueError(f"unknown implementation {impl!r}")


def run_point(impl: str, n_leaves: int, limit_s: float) -> dict:
    """`point` in a fresh process, killed `limit_s` seconds after its imports.

    The child prints `READY` once imported and warmed up; the limit counts
    from there (building the inputs, then trace + lower + compile), so the
    few seconds of interpreter start and imports (torch, via bench_step) are
    not charged to it.
    """
    cmd = [sys.executable, __file__, "--point", impl, str(n_leaves)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        ready = proc.stdout.readline().strip() == READY
        start_s = time.perf_counter() - t0
        try:
            out, _ = proc.communicate(timeout=limit_s if ready else None)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"timed_out": True, "limit_s": limit_s, "start_s": start_s}
        wall_s = time.perf_counter() - t0
        if proc.returncode != 0 or not ready:
            err.seek(0)
            return {"error": err.read().strip()[-2000:], "wall_s": wall_s}
    times = {"start_s": start_s, "wall_s": wall_s}
    return {**json.loads(out.strip().splitlines()[-1]), **times}


def _cell(result: dict | None) -> str:
    if result is None or result.get("skipped"):
        return "—"
    if result.get("timed_out"):
        return f"> {result['limit_s']:g}"
    if "error" in result:
        return "error"
    return f"{result['total_s']:.2f}"


def _ratio(funcopt: dict | None, optax: dict | None) -> str:
    """funcopt / optax; a bound where one of them timed out."""
    if not funcopt or not optax or "error" in funcopt or "error" in optax:
        return "—"
    if funcopt.get("skipped") or optax.get("skipped"):
        return "—"
    f_out, o_out = funcopt.get("timed_out"), optax.get("timed_out")
    if f_out and o_out:
        return "—"
    if f_out:
        return f"> {funcopt['limit_s'] / optax['total_s']:.2f}x"
    if o_out:
        return f"< {funcopt['total_s'] / optax['limit_s']:.2f}x"
    return f"{funcopt['total_s'] / optax['total_s']:.2f}x"


def by_point(rows: list[dict]) -> dict:
    return {(r["impl"], r["leaves"]): r["result"] for r in rows}


def markdown(meta: dict, rows: list[dict]) -> str:
    got = by_point(rows)
    lines = [
        f"# Compile time of one Adam step against leaf count, {meta['machine']}",
        "",
        f"jax {meta['jax']}, optax {meta['optax']}, x64 off; float32 leaves of "
        f"{meta['leaf_size']} elements; seconds of trace + lower + compile of "
        "the jitted step (params and state donated), each point in a fresh "
        f"process; '> {meta['limit_s']:g}': over the limit, '—': skipped. "
        "Default path = `jax.jit(opt.step)` on a plain dict; flat = the opt-in "
        "`funcopt.flat` layout. Ratios are funcopt / optax.",
        "",
        "| leaves | optax s | funcopt default s | ratio | funcopt flat s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for n in meta["leaves"]:
        o = got.get(("optax", n))
        d = got.get(("funcopt_default", n))
        f = got.get(("funcopt_flat", n))
        lines.append(
            f"| {n} | {_cell(o)} | {_cell(d)} | {_ratio(d, o)} | {_cell(f)} "
            f"| {_ratio(f, o)} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(y: float, _pos=None) -> str:
    return f"{y:g}"


def _seconds_235(y: float, _pos=None) -> str:
    return _seconds(y) if f"{y:.0e}"[0] in "235" else ""


def plot(meta: dict, rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    got = by_point(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    limits = set()
    for k, (impl, label) in enumerate(IMPLS.items()):
        marker, color = "osD"[k], f"C{k}"
        done = [
            (n, got[impl, n]["total_s"])
            for n in meta["leaves"]
            if "total_s" in got.get((impl, n), {})
        ]
        xs, ys = zip(*done) if done else ((), ())
        ax.plot(xs, ys, marker=marker, color=color, label=label)
        out = [
            (n, got[impl, n]["limit_s"])
            for n in meta["leaves"]
            if got.get((impl, n), {}).get("timed_out")
        ]
        for n, limit in out:  # open marker at the limit, dashed from the last
            ax.plot([n], [limit], marker=marker, mfc="none", ms=9, color=color)
            if done:
                ax.plot([xs[-1], n], [ys[-1], limit], color=color, ls="--", lw=1)
            limits.add((n, limit))
    for n, limit in limits:
        ax.annotate(
            f"> {limit:g} s",
            (n, limit),
            textcoords="offset points",
            xytext=(8, -3),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(meta["leaves"], [f"{n:,}" for n in meta["leaves"]])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_seconds))
    low, high = ax.get_ylim()
    if high / low < 100:  # under two decades: label 2, 3 and 5 of each too
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_seconds_235))
    ax.margins(x=0.12)
    ax.set_xlabel(f"leaves (float32, {meta['leaf_size']} elements each)")
    ax.set_ylabel("trace + lower + compile, s")
    ax.set_title(
        "Adam step compile time (lower is better)\n"
        "default path = jax.jit(opt.step) on a plain dict",
        fontsize=10,
    )
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    fig.text(
        0.01,
        0.01,
        f"{meta['machine']}; jax {meta['jax']}, optax {meta['optax']}; "
        "each point in a fresh process",
        fontsize=7,
        color="gray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(meta: dict, rows: list[dict], out: pathlib.Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_curve.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    md = markdown(meta, rows)
    (out / "compile_curve.md").write_text(md)
    return md


def curve(leaves: list[int], limit_s: float, out: pathlib.Path) -> tuple:
    import jax
    import optax
    from bench_step import machine
    from compile_time import SIZE

    meta = {
        "machine": machine(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "x64": False,
        "optimizer": "adam(lr=1e-3)",
        "leaf_size": SIZE,
        "leaves": leaves,
        "limit_s": limit_s,
    }
    rows: list[dict] = []
    timed_out_at: dict[str, int] = {}
    for n in leaves:
        for impl in IMPLS:
            if impl in timed_out_at:
                result = {"skipped": True, "after_timeout_at": timed_out_at[impl]}
            else:
                result = run_point(impl, n, limit_s)
                if result.get("timed_out"):
                    timed_out_at[impl] = n
            rows.append({"impl": impl, "leaves": n, "result": result})
            print(json.dumps(rows[-1])[:400], flush=True)
            write(meta, rows, out)
    return meta, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=LEAVES)
    parser.add_argument(
        "--limit-s", type=float, default=600.0, help="wall limit of each point"
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument(
        "--redraw",
        type=pathlib.Path,
        metavar="JSON",
        help="rewrite the table and plot of a saved compile_curve.json, run nothing",
    )
    parser.add_argument(
        "--point", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]))), flush=True)
        return
    if args.redraw:
        saved = json.loads(args.redraw.read_text())
        meta, rows, out = saved["meta"], saved["rows"], args.redraw.parent
    else:
        meta, rows = curve(sorted(args.leaves), args.limit_s, args.out)
        out = args.out
    md = write(meta, rows, out)
    print(md)
    try:
        plot(meta, rows, out / "compile_curve.png")
    except ImportError:  # pragma: no cover - matplotlib is an examples extra
        print("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
