"""How far funcopt drifts from torch in float32 over 1,000 steps.

torch does its per-step scalar math (bias corrections, step sizes) in Python
float64; JAX without x64 does it in float32, and XLA's and torch's CPU
kernels round (FMA) differently. This script runs torch float32, torch
float64 and funcopt float32 (x64 off, as users run JAX) on the same float32
gradients and prints the max absolute parameter differences (params ~ N(0,1)).
The yardstick is torch's own float32 error against float64.

    python benchmarks/float32_drift.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

import funcopt as fo

CASES = {
    "sgd(momentum=0.9)": (torch.optim.SGD, fo.sgd, dict(lr=1e-2, momentum=0.9)),
    "adam": (torch.optim.Adam, fo.adam, dict(lr=1e-3)),
    "adamw": (torch.optim.AdamW, fo.adamw, dict(lr=1e-3)),
}


def run_torch(torch_cls, kwargs, p0, grads, dtype):
    p = torch.tensor(p0.astype(dtype), requires_grad=True)
    opt = torch_cls([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g.astype(dtype))
        opt.step()
    return p.detach().numpy().astype(np.float64)


def run_funcopt(factory, kwargs, p0, grads):
    opt = factory(**kwargs)
    params = jnp.asarray(p0)
    state = opt.init(params)
    step = jax.jit(opt.step)
    for g in grads:
        params, state = step(params, jnp.asarray(g), state)
    return np.asarray(params).astype(np.float64)


def main(steps: int = 1000, n: int = 4096, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=n).astype(np.float32)
    grads = rng.normal(size=(steps, n)).astype(np.float32)
    print(f"float32, {steps} steps, {n} params: max |difference|")
    cols = ("funcopt vs torch", "torch f32 vs f64", "funcopt f32 vs torch f64")
    print(f"{'optimizer':<20}" + "".join(f"{c:>26}" for c in cols))
    for name, (torch_cls, factory, kwargs) in CASES.items():
        ref64 = run_torch(torch_cls, kwargs, p0, grads, np.float64)
        torch32 = run_torch(torch_cls, kwargs, p0, grads, np.float32)
        ours32 = run_funcopt(factory, kwargs, p0, grads)
        diffs = [ours32 - torch32, torch32 - ref64, ours32 - ref64]
        print(f"{name:<20}" + "".join(f"{np.abs(d).max():>26.1e}" for d in diffs))


if __name__ == "__main__":
    main()
