"""Compile time and program size of the step users write, against optax.

The path every user takes by default: ``jax.jit(opt.step)`` on a plain dict of
float32 leaves of 1,000 elements, params and state donated, next to optax's
``update`` + ``apply_updates`` for the same rule, in this one process. Times
are wall-clock seconds of trace + lower + XLA compile (what the first call of
a jitted step costs); "lowered lines" is the StableHLO text JAX hands to XLA,
"compiled instr." the instructions of XLA's optimized module.

    .venv/bin/python benchmarks/compile_time.py [--leaves 10 100 300 1000]
        [--all-leaves 100] [--only sgd adam ...] [--x64] [--out DIR]

Writes ``benchmarks/results/compile_time.{json,md}``: Adam at every leaf
count, then every optimizer at ``--all-leaves`` leaves.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import optax

import funcopt as fo

RESULTS = pathlib.Path(__file__).parent / "results"
SIZE = 1000

# funcopt optimizer, its optax counterpart (None: optax has none)
OPTIMIZERS = {
    "sgd": (lambda: fo.sgd(lr=1e-2, momentum=0.9), lambda: optax.sgd(1e-2, 0.9)),
    "adam": (lambda: fo.adam(lr=1e-3), lambda: optax.adam(1e-3)),
    "adamw": (lambda: fo.adamw(lr=1e-3), lambda: optax.adamw(1e-3)),
    "adamax": (lambda: fo.adamax(lr=1e-3), lambda: optax.adamax(1e-3)),
    "nadam": (lambda: fo.nadam(lr=1e-3), lambda: optax.nadam(1e-3)),
    "radam": (lambda: fo.radam(lr=1e-3), lambda: optax.radam(1e-3)),
    "rmsprop": (lambda: fo.rmsprop(lr=1e-3), lambda: optax.rmsprop(1e-3)),
    "adagrad": (lambda: fo.adagrad(lr=1e-2), lambda: optax.adagrad(1e-2)),
    "adadelta": (lambda: fo.adadelta(lr=1.0), lambda: optax.adadelta(1.0)),
    "rprop": (lambda: fo.rprop(lr=1e-2), lambda: optax.rprop(1e-2)),
    "asgd": (lambda: fo.asgd(lr=1e-2), None),
    "adafactor": (lambda: fo.adafactor(lr=1e-2), lambda: optax.adafactor(1e-2)),
}


def tree(n_leaves: int) -> dict:
    return {f"w{i:05d}": jnp.full(SIZE, 0.1, jnp.float32) for i in range(n_leaves)}


def measure(step, params, grads, state) -> dict:
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 2)).lower(params, grads, state)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "total_s": t2 - t0,
        "lowered_lines": len(lowered.as_text().splitlines()),
        "compiled_instructions": compiled.as_text().count("\n  %"),
    }


def optax_step(tx):
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def row(name: str, n_leaves: int) -> dict:
    make_opt, make_tx = OPTIMIZERS[name]
    params = tree(n_leaves)
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    out = {"optimizer": name, "leaves": n_leaves}
    if make_tx is not None:
        tx = make_tx()
        out["optax"] = measure(optax_step(tx), params, grads, tx.init(params))
    opt = make_opt()
    out["funcopt"] = measure(opt.step, params, grads, opt.init(params))
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Compile time of `jax.jit(opt.step)` (default path), {meta['machine']}",
        "",
        f"jax {meta['jax']}, float32 leaves of {SIZE} elements, x64 "
        f"{'on' if meta['x64'] else 'off'}; seconds of trace + lower + compile.",
        "",
        "| optimizer | leaves | optax s | funcopt s | ratio | lowered lines "
        "optax / funcopt | compiled instr. optax / funcopt |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, o = r["funcopt"], r.get("optax")
        if o is None:
            lines.append(
                f"| {r['optimizer']} | {r['leaves']} | - | {f['total_s']:.2f} | - | "
                f"- / {f['lowered_lines']} | - / {f['compiled_instructions']} |"
            )
            continue
        lines.append(
            f"| {r['optimizer']} | {r['leaves']} | {o['total_s']:.2f} | "
            f"{f['total_s']:.2f} | {f['total_s'] / o['total_s']:.2f}x | "
            f"{o['lowered_lines']} / {f['lowered_lines']} | "
            f"{o['compiled_instructions']} / {f['compiled_instructions']} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[10, 100, 300, 1000])
    parser.add_argument("--all-leaves", type=int, default=100)
    parser.add_argument("--x64", action="store_true")
    parser.add_argument("--only", nargs="*", help="optimizers of the all-leaves rows")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.x64)
    from bench_step import machine

    rows = []
    for n in args.leaves:
        rows.append(row("adam", n))
        print(json.dumps(rows[-1]), flush=True)
    for name in args.only if args.only is not None else OPTIMIZERS:
        if name == "adam" and args.all_leaves in args.leaves:
            continue
        rows.append(row(name, args.all_leaves))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": machine(), "jax": jax.__version__, "x64": args.x64}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_time.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    (args.out / "compile_time.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
