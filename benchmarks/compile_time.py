"""Compile time and program size of the step users write, against optax.

The path every user takes by default: ``jax.jit(opt.step)`` on a plain dict of
float32 leaves of 1,000 elements, params and state donated, next to optax's
``update`` + ``apply_updates`` for the same rule, in this one process. Times
are wall-clock seconds of trace + lower + XLA compile (what the first call of
a jitted step costs); "lowered lines" is the StableHLO text JAX hands to XLA,
"compiled instr." the instructions of XLA's optimized module.

    .venv/bin/python benchmarks/compile_time.py [--leaves 10 100 300 1000]
        [--all-leaves 100] [--only sgd adam ...] [--small-sizes 37 65 7 24 11]
        [--x64] [--out DIR] [--models]

Writes ``benchmarks/results/compile_time.{json,md}``: Adam at every leaf
count, then every optimizer at ``--all-leaves`` leaves (best of 3 compiles up
to 100 leaves), then every optimizer
on a small tree of odd-sized leaves (``--small-sizes``; best of 3, since
each compile is a tenth of a second), on the default path and with
``funcopt.flat.set_policy("never")`` (one program per leaf); with ``--models``,
a nanoGPT-shaped param tree: its jitted step's compile, its first un-jitted
step, and the compile of ``jax.grad`` through 20 unrolled Adam steps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_step import (
    funcopt_tree,
    machine,
    optax_step,
    optax_train_step,
    time_interleaved,
)

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


def fastest_compiles(make_opt, make_tx, params, repeats: int, per_leaf=False) -> dict:
    """`{"optax": ..., "funcopt": ..., "per_leaf": ...}`: the fastest of
    `repeats` compiles (interleaved, a new optimizer each) of optax's step
    (where `make_tx` is not None), funcopt's on the default path and, with
    `per_leaf`, on the per-leaf path (`funcopt.flat.set_policy("never")`)."""
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    paths = {"funcopt": contextlib.nullcontext}
    if per_leaf:
        paths["per_leaf"] = functools.partial(fo.flat.policy, "never")
    runs: dict[str, list] = {"optax": [], **{path: [] for path in paths}}
    for _ in range(repeats):
        if make_tx is not None:
            tx = make_tx()
            step = optax_train_step(tx)
            runs["optax"].append(measure(step, params, grads, tx.init(params)))
        for path, context in paths.items():
            with context():
                opt = make_opt()
                state = opt.init(params)
                runs[path].append(measure(opt.step, params, grads, state))
    return {
        path: min(found, key=lambda m: m["total_s"])
        for path, found in runs.items()
        if found
    }


def row(name: str, n_leaves: int) -> dict:
    make_opt, make_tx = OPTIMIZERS[name]
    # compiles of a fraction of a second move by tens of percent from one to
    # the next: the best of 3 up to 100 leaves
    repeats = 3 if n_leaves <= 100 else 1
    compiles = fastest_compiles(make_opt, make_tx, tree(n_leaves), repeats)
    return {"optimizer": name, "leaves": n_leaves} | compiles


def small_row(
    name: str, sizes: list[int], repeats: int = 3, step_time_s: float = 1.0
) -> dict:
    """`name` on a tree of float32 leaves of `sizes` elements: optax, the
    default path and the per-leaf path, each the best of `repeats`
    compiles, then their step times (medians, timed in alternating turns
    for about `step_time_s` each)."""
    make_opt, make_tx = OPTIMIZERS[name]
    params = {f"w{i}": jnp.full(n, 0.1, jnp.float32) for i, n in enumerate(sizes)}
    compiles = fastest_compiles(make_opt, make_tx, params, repeats, per_leaf=True)
    out = {"optimizer": name, "sizes": sizes} | compiles
    # step time, donated, the three interleaved (bench_step's samplers)
    samplers = {"funcopt": funcopt_tree(make_opt, params)[0]}
    with fo.flat.policy("never"):
        samplers["per_leaf"] = funcopt_tree(make_opt, params)[0]
    if make_tx is not None:
        samplers["optax"] = optax_step(make_tx, params, donate=True)[0]
    for key, seconds in time_interleaved(samplers, min_time=step_time_s).items():
        out[key]["step_us"] = seconds * 1e6
    return out


def gpt_params(d=64, vocab=512, ctx=64, layers=2) -> dict:
    """A nanoGPT-shaped param tree: 28 leaves (lm_head tied to wte)."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.02)

    def norm():
        return {"w": jnp.ones(d), "b": jnp.zeros(d)}

    def linear(n_in, n_out):
        return {"w": normal(n_in, n_out), "b": jnp.zeros(n_out)}

    params = {"wte": normal(vocab, d), "wpe": normal(ctx, d), "ln_f": norm()}
    for layer in range(layers):
        params[f"h{layer}"] = {
            "ln1": norm(),
            "attn": linear(d, 3 * d),
            "proj": linear(d, d),
            "ln2": norm(),
            "fc": linear(d, 4 * d),
            "fc2": linear(4 * d, d),
        }
    return params


def model_rows() -> list[dict]:
    """The issue-15 cases on a GPT param tree, seconds, funcopt and optax."""
    params = gpt_params()
    grads = jax.tree.map(lambda p: p * 0.01, params)

    def no_decay(p):
        return jax.tree.map(lambda x: "no_decay" if x.ndim < 2 else "default", p)

    opt = fo.adamw(
        lr=3e-4,
        weight_decay=0.1,
        param_groups=fo.param_groups(no_decay, {"no_decay": {"weight_decay": 0.0}}),
    )
    tx = optax.adamw(
        3e-4, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    )

    def first_eager_step(step, init):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, grads, init(params)))
        return time.perf_counter() - t0

    # first, while nothing of this tree's is traced or compiled in the process
    rows = [
        {
            "case": "GPT (28 leaves, AdamW, 2 groups): first un-jitted step",
            "optax": first_eager_step(optax_train_step(tx), tx.init),
            "funcopt": first_eager_step(opt.step, opt.init),
        },
        {
            "case": "GPT: jit(step) compile",
            "optax": measure(optax_train_step(tx), params, grads, tx.init(params))[
                "total_s"
            ],
            "funcopt": measure(opt.step, params, grads, opt.init(params))["total_s"],
        },
    ]
    target = jax.tree.map(lambda p: p * 0.5, params)

    def loss(p):
        pairs = zip(jax.tree.leaves(p), jax.tree.leaves(target))
        return sum(jnp.sum((a - b) ** 2) for a, b in pairs)

    def funcopt_unrolled(lr):
        o = fo.adam(lr=1e-3)
        p, s = params, fo.set_lr(o.init(params), lr)
        for _ in range(20):
            p, s = o.step(p, jax.grad(loss)(p), s)
        return loss(p)

    def optax_unrolled(lr):
        t = optax.adam(lr)
        p, s = params, t.init(params)
        for _ in range(20):
            u, s = t.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
        return loss(p)

    def grad_compile(f):
        t0 = time.perf_counter()
        jax.jit(jax.grad(f)).lower(1e-3).compile()
        return time.perf_counter() - t0

    rows.append(
        {
            "case": "GPT: jax.grad through 20 unrolled Adam steps, compile",
            "optax": grad_compile(optax_unrolled),
            "funcopt": grad_compile(funcopt_unrolled),
        }
    )
    return rows


def _small_cells(r: dict, key: str, fmt: str) -> str:
    """A small-tree row's `key` as two cells: "optax / funcopt / per leaf"
    and the last two's ratios to optax."""
    o = r["optax"][key] if "optax" in r else None
    f, p = r["funcopt"][key], r["per_leaf"][key]
    values = " / ".join("-" if v is None else format(v, fmt) for v in (o, f, p))
    ratios = "-" if o is None else f"{f / o:.2f}x / {p / o:.2f}x"
    return f"{values} | {ratios}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Compile time of `jax.jit(opt.step)` (default path), {meta['machine']}",
        "",
        f"jax {meta['jax']}, float32 leaves of {SIZE} elements, x64 "
        f"{'on' if meta['x64'] else 'off'}; seconds of trace + lower + compile "
        "(the best of 3 up to 100 leaves).",
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
    if meta.get("small"):
        sizes = ", ".join(map(str, meta["small"][0]["sizes"]))
        lines += [
            "",
            f"Small tree: leaves of {sizes} elements; best of 3. Per leaf: "
            '`funcopt.flat.set_policy("never")`.',
            "",
            "| optimizer | compile s: optax / funcopt / per leaf | ratios to optax "
            "| step us: optax / funcopt / per leaf | ratios to optax |",
            "|---|---|---|---|---|",
        ]
        for r in meta["small"]:
            compile_cells = _small_cells(r, "total_s", ".3f")
            step_cells = _small_cells(r, "step_us", ".1f")
            lines.append(f"| {r['optimizer']} | {compile_cells} | {step_cells} |")
    if meta.get("models"):
        lines += ["", "| model case | optax s | funcopt s | ratio |"]
        lines.append("|---|---|---|---|")
        for r in meta["models"]:
            o, f = r["optax"], r["funcopt"]
            lines.append(f"| {r['case']} | {o:.2f} | {f:.2f} | {f / o:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[10, 100, 300, 1000])
    parser.add_argument("--all-leaves", type=int, default=100)
    parser.add_argument(
        "--small-sizes", type=int, nargs="*", default=[37, 65, 7, 24, 11]
    )
    parser.add_argument("--x64", action="store_true")
    parser.add_argument("--only", nargs="*", help="optimizers of the all-leaves rows")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument(
        "--models", action="store_true", help="also the GPT cases (~2 minutes)"
    )
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.x64)
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
    if args.small_sizes:
        names = args.only if args.only is not None else OPTIMIZERS
        meta["small"] = [small_row(name, args.small_sizes) for name in names]
        print(json.dumps(meta["small"]), flush=True)
    if args.models:
        meta["models"] = model_rows()
        print(json.dumps(meta["models"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_time.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    (args.out / "compile_time.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
