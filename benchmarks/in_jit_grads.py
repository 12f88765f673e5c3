"""A training step whose gradients come from `jax.grad` inside the same `jit`.

`targets.py` times `jit(opt.step)` with the gradients passed in, and
`TrainState`, whose gradients are buffers carried from step to step. Most
training loops are written as one jitted function instead,

    def train_step(params, opt_state, x):
        grads = jax.grad(loss)(params, x)
        return opt.step(params, grads, opt_state)

and there the gradients are matmul outputs computed in the step. This
script times that step on a 10-layer tanh MLP (1024 x 1024 weights, 10.5M
float32 params, batch 64), AdamW, params and state donated, against
optax's `update` + `apply_updates` and `fo.TrainState`, implementations
timed in interleaved turns in one process (`bench_step.time_interleaved`).
A fourth row forces that step's kernels to update the params in place
(`_fused_native.keeping_gradients`, what `opt.step` did there before it
wrote the new params over gradients computed in the step). It reports
each compiled step's temporary buffer (XLA's `memory_analysis`)
and how many param-sized copies XLA put in it. A second model is one leaf of
`--leaf` float32 elements under `targets.squared_distance`, a loss whose
gradient is elementwise in the params (optax fuses it into its update).

`--xla-region-analysis` runs the same rows again in a child process with
`XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true`, XLA CPU's
copy insertion with its region analysis, and prints both tables.

    .venv/bin/python benchmarks/in_jit_grads.py [--xla-region-analysis]
        [--layers 10] [--width 1024] [--leaf 10000000] [--min-time 3]
        [--out DIR]

Writes `benchmarks/results/in_jit_grads.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_step import chain_sampler, machine, optax_train_step, time_interleaved
from targets import compiled, copy, squared_distance

import funcopt as fo
from funcopt.optim import _fused_native

RESULTS = pathlib.Path(__file__).parent / "results"
REGION_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"
BATCH = 64


def mlp(layers: int, width: int):
    """(params, batch, loss): `layers` tanh layers of `width` x `width`."""
    rng = np.random.default_rng(0)
    params = {
        f"w{i}": jnp.asarray(0.01 * rng.standard_normal((width, width), np.float32))
        for i in range(layers)
    }
    x = jnp.asarray(rng.standard_normal((BATCH, width), np.float32))

    def loss(params, x):
        h = x
        for i in range(layers):
            h = jnp.tanh(h @ params[f"w{i}"])
        return jnp.mean(h**2)

    return params, x, loss


def one_leaf(size: int):
    """(params, target, loss): one leaf, an elementwise gradient."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(size, np.float32))}
    return params, jax.tree.map(lambda p: p * 0.5, params), squared_distance


def steps(params, loss) -> dict:
    """implementation -> (step(carry, x) -> carry, carry)."""
    opt = fo.adamw(lr=1e-3)
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    update = optax_train_step(tx)

    def funcopt_step(carry, x):
        p, s = carry
        return opt.step(p, jax.grad(loss)(p, x), s)

    def in_place_step(carry, x):
        # the new params written over the params, as before funcopt wrote
        # them over gradients computed in the step
        with _fused_native.keeping_gradients():
            return funcopt_step(carry, x)

    def optax_step(carry, x):
        p, s = carry
        return update(p, jax.grad(loss)(p, x), s)

    def train_state_step(ts, x):
        ts, _ = ts.zero_grad().backward(loss, x)
        return ts.step()

    return {
        "jit(grad + opt.step)": (funcopt_step, (params, opt.init(params))),
        "jit(grad + opt.step), in place": (in_place_step, (params, opt.init(params))),
        "fo.TrainState": (train_state_step, fo.TrainState.create(params, opt)),
        "optax": (optax_step, (params, tx.init(params))),
    }


def param_copies(hlo: str, params) -> int:
    """How many `copy` instructions of a param's shape the program runs."""
    shape = ",".join(map(str, next(iter(params.values())).shape))
    layout = ",".join(map(str, reversed(range(len(shape.split(","))))))
    return hlo.count(f"f32[{shape}]{{{layout}}} copy(")


def measure(layers: int, width: int, leaf: int, min_time: float) -> list[dict]:
    models = {
        f"MLP, {layers} x {width}x{width}": mlp(layers, width),
        f"1 leaf of {leaf:,}, elementwise": one_leaf(leaf),
    }
    rows = []
    for model, (params, x, loss) in models.items():
        rows += measure_model(model, params, x, loss, min_time)
    return rows


def measure_model(model, params, x, loss, min_time: float) -> list[dict]:
    samplers, rows = {}, []
    for name, (step, carry) in steps(params, loss).items():
        program, seconds = compiled(step, carry, x)
        rows.append(
            {
                "model": model,
                "impl": name,
                "compile_s": seconds,
                "temp_mb": program.memory_analysis().temp_size_in_bytes / 1e6,
                "param_copies": param_copies(program.as_text(), params),
            }
        )
        samplers[name] = chain_sampler(program, copy(carry), x)
    ms = time_interleaved(samplers, min_time)
    for row in rows:
        row["step_ms"] = 1e3 * ms[row["impl"]]
        row["ratio"] = ms[row["impl"]] / ms["optax"]
    return rows


def markdown(runs: dict, meta: dict) -> str:
    lines = [
        "# In-jit gradients: one jitted train step",
        "",
        f"{meta['machine']}; jax {meta['jax']}, optax {meta['optax']}. "
        f"{meta['layers']}-layer tanh MLP, {meta['width']} x {meta['width']} "
        f"weights ({meta['params']:,} float32 params), batch {BATCH}; one leaf "
        "under a squared distance; AdamW, params and state donated. ratio: "
        "step time / optax's in the same run.",
        "",
        "| XLA flags | model | implementation | step ms | ratio | compile s "
        "| temp MB | param copies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for flags, rows in runs.items():
        for r in rows:
            lines.append(
                f"| {flags} | {r['model']} | {r['impl']} | {r['step_ms']:.3g} | "
                f"{r['ratio']:.2f} | {r['compile_s']:.2f} | {r['temp_mb']:.3g} | "
                f"{r['param_copies']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--leaf", type=int, default=10_000_000)
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--xla-region-analysis", action="store_true")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    rows = measure(args.layers, args.width, args.leaf, args.min_time)
    if args.rows_only:  # the child of --xla-region-analysis
        print(json.dumps(rows))
        return
    runs = {"default": rows}
    if args.xla_region_analysis:
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
               f"{REGION_FLAG}".strip()}  # fmt: skip
        child = [sys.executable, __file__, "--rows-only", "--layers",
                 str(args.layers), "--width", str(args.width), "--leaf",
                 str(args.leaf), "--min-time", str(args.min_time)]  # fmt: skip
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
        runs[f"`{REGION_FLAG}`"] = json.loads(out.stdout.splitlines()[-1])
    meta = {
        "machine": machine(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "layers": args.layers,
        "width": args.width,
        "params": args.layers * args.width**2,
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "in_jit_grads.json").write_text(
        json.dumps({"meta": meta, "runs": runs}, indent=1)
    )
    table = markdown(runs, meta)
    (out_dir / "in_jit_grads.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
