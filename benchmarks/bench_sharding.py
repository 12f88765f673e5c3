"""Sharded Adam steps on 8 simulated CPU devices, and optimizer-state memory.

    python benchmarks/bench_sharding.py [--size 1024] [--layers 8] [--reps 10]

Prints a markdown table: for each layout, the time of one jitted
``opt.step`` (median) and the bytes of parameters and of Adam state held by
the most loaded device (from the arrays' addressable shards). The devices
are simulated on the host CPU, so the timings show the overhead of the
partitioned program, not a speed-up; the memory columns are exact.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import funcopt as fo  # noqa: E402
from funcopt import sharding as fs  # noqa: E402


def model(size: int, layers: int):
    rng = np.random.default_rng(0)
    params = {}
    for i in range(layers):
        params[f"layer{i}"] = {
            "w": rng.normal(size=(size, size)).astype(np.float32),
            "b": rng.normal(size=(size,)).astype(np.float32),
        }
    return params


def timed(fn, args, reps):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def mb(tree) -> float:
    per = fs.bytes_per_device(tree)
    return max(per.values()) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    assert jax.device_count() == 8
    np_params = model(args.size, args.layers)
    opt = fo.adam(lr=1e-3)
    auto = (AxisType.Auto, AxisType.Auto)
    dp = jax.make_mesh((8, 1), ("data", "model"), axis_types=auto)
    mp = jax.make_mesh((4, 2), ("data", "model"), axis_types=auto)

    def specs(mesh, model_sharded):
        def one(path, x):
            if not model_sharded:
                return NamedSharding(mesh, P())
            return NamedSharding(mesh, P(None, "model") if x.ndim == 2 else P("model"))

        return jax.tree_util.tree_map_with_path(one, np_params)

    rows = []
    # 1 device: the reference
    dev = jax.devices()[0]
    params = jax.device_put(np_params, dev)
    grads = jax.tree.map(lambda x: x * 1e-3, params)
    state = opt.init(params)
    t = timed(jax.jit(opt.step), (params, grads, state), args.reps)
    rows.append(("1 device", t, mb(params), mb(state)))

    layouts = [
        ("8 devices, data parallel (params, state replicated)", dp, False, None),
        ("8 devices, data parallel + ZeRO over data=8", dp, False, "data"),
        ("(4, 2) mesh, params and state model-sharded", mp, True, None),
        ("(4, 2) mesh, model-sharded + ZeRO over data=4", mp, True, "data"),
    ]
    for label, mesh, model_sharded, zero in layouts:
        sh = specs(mesh, model_sharded)
        params = jax.device_put(np_params, sh)
        grads = jax.device_put(jax.tree.map(lambda x: x * 1e-3, np_params), sh)
        state = fs.init(opt, params, zero_axis=zero)
        if zero:
            step = fs.zero_step(opt, params, zero_axis=zero)
        else:
            with fs.per_leaf():
                step = jax.jit(opt.step).lower(params, grads, state).compile()
        t = timed(step, (params, grads, state), args.reps)
        rows.append((label, t, mb(params), mb(state)))

    n = sum(x.size for x in jax.tree.leaves(np_params))
    print(
        f"Adam, {args.layers} layers of ({args.size}, {args.size}) + bias: "
        f"{n / 1e6:.1f}M float32 parameters; {jax.devices()[0].platform} x8 "
        "(simulated)\n"
    )
    print("| layout | step (ms) | params / device (MiB) | Adam state / device (MiB) |")
    print("|---|---:|---:|---:|")
    for label, t, p_mb, s_mb in rows:
        print(f"| {label} | {t * 1e3:.1f} | {p_mb:.1f} | {s_mb:.1f} |")


if __name__ == "__main__":
    main()
