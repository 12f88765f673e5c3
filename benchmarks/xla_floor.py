"""XLA's own compile time for a step that computes nothing, against leaf count.

The floor under every plain-pytree optimizer step: `jax.jit` of
`step(params, grads, state) -> (params, state)` that returns its inputs
unchanged, for a dict of $n$ float32 leaves of 1,000 elements and Adam's
state (optax's `adam`: two buffers per leaf), params and state donated as
in every step benchmark here. Whatever an optimizer computes, its jitted
step has these inputs and outputs, and XLA's CPU compiler pays for them:
some of its passes grow with the square of the number of buffers in and
out (profiled with `perf` at 10,000 leaves, jaxlib 0.10.2: layout
assignment's `AnyOperandBufferForwarded`, alias analysis's
`HloValue::ComputeUses`, copy insertion's aliased inputs and outputs, and
the StableHLO to HLO conversion). Next to it, optax's Adam compiled the
same way, up to `--optax-max` leaves (it takes minutes beyond).

    .venv/bin/python benchmarks/xla_floor.py [--leaves 10 100 1000 3000 10000]
        [--optax-max 1000] [--out DIR]

Writes `benchmarks/results/xla_floor.{json,md}` (seconds of trace + lower +
compile, one process, one compile per point).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import optax
from bench_step import machine, optax_train_step
from compile_time import measure, tree

RESULTS = pathlib.Path(__file__).parent / "results"


def nothing(params, grads, state):
    """A step that returns its params and state unchanged."""
    del grads
    return params, state


def row(n_leaves: int, with_optax: bool) -> dict:
    params = tree(n_leaves)
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    tx = optax.adam(1e-3)
    out = {
        "leaves": n_leaves,
        "floor_s": measure(nothing, params, grads, tx.init(params))["total_s"],
    }
    if with_optax:
        out["optax_s"] = measure(optax_train_step(tx), params, grads, tx.init(params))[
            "total_s"
        ]
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# XLA's compile floor against leaf count, {meta['machine']}",
        "",
        f"jax {meta['jax']}, optax {meta['optax']}; float32 leaves of 1,000 "
        "elements; seconds of trace + lower + compile of a step that returns "
        "its params and Adam state unchanged (donated), and of optax's Adam "
        "step ('—': not run).",
        "",
        "| leaves | step computing nothing s | optax adam s |",
        "|---|---|---|",
    ]
    for r in rows:
        optax_s = f"{r['optax_s']:.2f}" if "optax_s" in r else "—"
        lines.append(f"| {r['leaves']:,} | {r['floor_s']:.2f} | {optax_s} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--leaves", type=int, nargs="+", default=[10, 100, 1000, 3000, 10000]
    )
    ap.add_argument("--optax-max", type=int, default=1000)
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", False)
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # backend start-up, not timed
    meta = {"machine": machine(), "jax": jax.__version__, "optax": optax.__version__}
    rows = []
    for n in args.leaves:
        rows.append(row(n, n <= args.optax_max))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "xla_floor.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    md = markdown(meta, rows)
    (args.out / "xla_floor.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
