"""One step on one 10M-element float32 leaf: funcopt's native kernel vs its
JAX rule (`FUNCOPT_NATIVE=0`) vs optax vs torch.

`--dtype bfloat16` or `float16`: the `fused=True` optimizers (Adam, AdamW,
SGD, Adagrad) on 16-bit params and state, the only 16-bit steps the
kernels take (torch's fused kernels compute them in float32; its default
steps round each op to 16 bits, which the JAX rules mirror).

Adam, AdamW, SGD with momentum and Adagrad with `fused=True` (torch
`fused=True`), and the default step of RMSprop, Adamax, Adadelta, RAdam,
Rprop, NAdam and ASGD (torch has no fused kernel for them: its default,
`_single_tensor_*`, on CPU; optax has no ASGD); every JAX
step `jax.jit` with params and state donated. One process, the four
interleaved round by round (a busy machine slows all alike), each number the
median over the rounds of the mean step time of `--steps` steps. Run:
`python benchmarks/bench_native.py [--size N] [--rounds R] [--steps K]
[--only NAME ...] [--dtype float32|bfloat16|float16]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import torch
from bench_step import optax_train_step

import funcopt as fo
from funcopt.optim import _fused_native

OPTIMIZERS = {
    "Adam": (
        lambda: fo.adam(lr=1e-3, fused=True),
        lambda: optax.adam(1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    ),
    "AdamW": (
        lambda: fo.adamw(lr=1e-3, fused=True),
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    ),
    "SGD momentum": (
        lambda: fo.sgd(lr=1e-3, momentum=0.9, fused=True),
        lambda: optax.sgd(1e-3, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, fused=True),
    ),
    "Adagrad": (
        lambda: fo.adagrad(lr=1e-2, fused=True),
        lambda: optax.adagrad(1e-2),
        lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
    ),
    "RMSprop (default step)": (
        lambda: fo.rmsprop(lr=1e-2),
        lambda: optax.rmsprop(1e-2, decay=0.99, eps=1e-8),
        lambda p: torch.optim.RMSprop(p, lr=1e-2),
    ),
    "Adamax (default step)": (
        lambda: fo.adamax(lr=2e-3),
        lambda: optax.adamax(2e-3),
        lambda p: torch.optim.Adamax(p, lr=2e-3),
    ),
    "Adadelta (default step)": (
        lambda: fo.adadelta(lr=1.0),
        lambda: optax.adadelta(1.0, rho=0.9, eps=1e-6),
        lambda p: torch.optim.Adadelta(p, lr=1.0),
    ),
    "RAdam (default step)": (
        lambda: fo.radam(lr=1e-3),
        lambda: optax.radam(1e-3),
        lambda p: torch.optim.RAdam(p, lr=1e-3),
    ),
    "Rprop (default step)": (
        lambda: fo.rprop(lr=1e-2),
        lambda: optax.rprop(1e-2),
        lambda p: torch.optim.Rprop(p, lr=1e-2),
    ),
    "RMSprop centered, momentum (default step)": (
        lambda: fo.rmsprop(lr=1e-2, centered=True, momentum=0.9),
        lambda: optax.rmsprop(1e-2, decay=0.99, eps=1e-8, centered=True, momentum=0.9),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True, momentum=0.9),
    ),
    "NAdam (default step)": (
        lambda: fo.nadam(lr=2e-3),
        # optax's NAdam has no momentum_decay schedule: the same passes
        lambda: optax.nadam(2e-3),
        lambda p: torch.optim.NAdam(p, lr=2e-3),
    ),
    "ASGD (default step)": (
        lambda: fo.asgd(lr=1e-2),
        None,
        lambda p: torch.optim.ASGD(p, lr=1e-2),
    ),
}


def chained_run(step, params, grads, state):
    """A `run(k)` doing k chained `params, state = step(params, grads,
    state)` (donated), the carry kept between calls."""
    box = [params, state]

    def run(k):
        p, s = box
        for _ in range(k):
            p, s = step(p, grads, s)
        jax.block_until_ready(p)
        box[:] = [p, s]

    return run


# optimizers whose `fused=True` kernel takes 16-bit params
FUSED = ("Adam", "AdamW", "SGD momentum", "Adagrad")


def funcopt_runner(make, size: int, native: bool, dtype=jnp.float32):
    """A `run(k)` doing k donated jitted steps (compiled with the native
    switch as given: `jax.jit` does not retrace when it changes)."""
    _fused_native.set_native_fused(native)
    try:
        opt = make()
        params = {"w": jnp.ones(size, dtype)}
        grads = {"w": jnp.full(size, 1e-3, dtype)}
        state = opt.init(params)
        step = jax.jit(opt.step, donate_argnums=(0, 2))
        step = step.lower(params, grads, state).compile()
        hlo = step.as_text()
        assert ("custom_call_target" in hlo) == native, "wrong path compiled"
    finally:
        _fused_native.set_native_fused(True)
    return chained_run(step, params, grads, state)


def optax_runner(make, size: int, dtype=jnp.float32):
    tx = make()
    params = jnp.ones(size, dtype)
    grads = jnp.full(size, 1e-3, dtype)
    state = tx.init(params)

    step = jax.jit(optax_train_step(tx), donate_argnums=(0, 2))
    return chained_run(step, params, grads, state)


def torch_runner(make, size: int, dtype=torch.float32):
    p = torch.ones(size, dtype=dtype, requires_grad=True)
    p.grad = torch.full((size,), 1e-3, dtype=dtype)
    opt = make([p])

    def run(k):
        for _ in range(k):
            opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="optimizer names (first word)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16")
    )
    args = parser.parse_args()
    dtype, torch_dtype = jnp.dtype(args.dtype), getattr(torch, args.dtype)
    assert _fused_native.available(), (
        "build the kernels: python -m funcopt._native.build"
    )
    print(
        f"{args.size:,} {args.dtype} elements, median of {args.rounds} rounds of "
        f"{args.steps} steps, ms per step (torch threads: {torch.get_num_threads()})"
    )
    header = (
        "optimizer",
        "native",
        "JAX rule",
        "optax",
        "torch",
        "native/torch",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (make_fo, make_optax, make_torch) in OPTIMIZERS.items():
        if args.only and name.split()[0] not in args.only:
            continue
        if dtype != jnp.float32 and name not in FUSED:
            continue
        runners = {
            "native": funcopt_runner(make_fo, args.size, True, dtype),
            "jax": funcopt_runner(make_fo, args.size, False, dtype),
            "torch": torch_runner(make_torch, args.size, torch_dtype),
        }
        if make_optax is not None:
            runners["optax"] = optax_runner(make_optax, args.size, dtype)
        for run in runners.values():
            run(2)  # warm up
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for key, run in runners.items():
                t = time.perf_counter()
                run(args.steps)
                times[key].append((time.perf_counter() - t) / args.steps * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [
            f"{med[k]:.2f}" if k in med else "-"
            for k in ("native", "jax", "optax", "torch")
        ]
        ratio = f"{med['native'] / med['torch']:.2f}x"
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
        del runners


if __name__ == "__main__":
    main()
