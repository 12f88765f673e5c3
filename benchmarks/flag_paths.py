"""Which of torch's execution flags change the numbers, on CPU in float32.

torch's optimizers take `foreach`, `fused`, `capturable` and
`differentiable`, and accept tensor hyperparameters (`lr=torch.tensor(0.01)`).
They are meant as execution switches, but some run other arithmetic than the
default CPU path (the single-tensor loop with Python-float scalar math), so
the bits change. This script runs torch alone: every optimizer that has a
flag, float32 parameters (leaves of odd sizes, so that torch's vectorised
loops have scalar tails), 1,000 steps of fixed random gradients, each flag
path against the default path, and reports "same bits" or the max ulp and max
relative difference of the parameters. `capturable=True` on CPU parameters
raises outside `torch.compile`; the table records what torch raised.

    python benchmarks/flag_paths.py [--steps 1000] [--out PATH.md]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import time

import numpy as np
import torch

# (torch class, kwargs): weight decay on where the optimizer has it, so that
# every term of the rule runs; lr is the value a tensor lr takes
OPTIMIZERS = {
    "Adam": (torch.optim.Adam, dict(lr=1e-3, weight_decay=0.1)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    "NAdam": (torch.optim.NAdam, dict(lr=2e-3, weight_decay=0.1)),
    "RAdam": (torch.optim.RAdam, dict(lr=1e-3, weight_decay=0.1)),
    "Adamax": (torch.optim.Adamax, dict(lr=2e-3, weight_decay=0.1)),
    "ASGD": (torch.optim.ASGD, dict(lr=1e-2, t0=100.0, weight_decay=0.1)),
    "SGD": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, weight_decay=0.1)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-3, weight_decay=0.1)),
    "Adadelta": (torch.optim.Adadelta, dict(lr=1.0, weight_decay=0.1)),
    "Rprop": (torch.optim.Rprop, dict(lr=1e-2)),
    "Adafactor": (torch.optim.Adafactor, dict(lr=1e-2, weight_decay=0.1)),
    "Muon": (torch.optim.Muon, dict(lr=1e-3, weight_decay=0.1)),
}

# path name -> (extra kwargs, the flag torch must take, torch's default dtype)
PATHS = {
    "foreach=True": ({"foreach": True}, "foreach", torch.float32),
    "fused=True": ({"fused": True}, "fused", torch.float32),
    "differentiable=True": ({"differentiable": True}, "differentiable", torch.float32),
    "differentiable=True, default dtype float64": (
        {"differentiable": True},
        "differentiable",
        torch.float64,
    ),
    "capturable=True": ({"capturable": True}, "capturable", torch.float32),
    "lr=tensor(float32)": ({"lr": "tensor"}, None, torch.float32),
}

# odd sizes: torch's float32 CPU loops run 8- or 16-wide vectors with scalar
# tails; a 0-d leaf; Muon takes 2-d params only
SHAPES = [(37,), (5, 7), (), (130,)]
SHAPES_2D = [(5, 7), (13, 11)]


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_problem(name: str, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = SHAPES_2D if name == "Muon" else SHAPES
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [
        [rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(steps)
    ]
    return params, grads


def run(cls, kwargs, params, grads) -> list[np.ndarray]:
    """torch's float32 params after the steps (no autograd on the params,
    so that the differentiable path's in-place ops are allowed)."""
    tparams = [torch.tensor(p) for p in params]
    opt = cls(tparams, **kwargs)
    for step_grads in grads:
        for p, g in zip(tparams, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy().copy() for p in tparams]


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 bits as integers ordered like the floats (ulp distance)."""
    i = x.view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def compare(actual: list[np.ndarray], expected: list[np.ndarray]) -> str:
    a = np.concatenate([x.reshape(-1) for x in actual])
    e = np.concatenate([x.reshape(-1) for x in expected])
    if np.array_equal(a.view(np.int32), e.view(np.int32)):
        return "same bits"
    ulp = np.abs(_ordered(a) - _ordered(e)).max()
    rel = (np.abs(a.astype(np.float64) - e) / np.maximum(np.abs(e), 1e-30)).max()
    differ = int((a.view(np.int32) != e.view(np.int32)).sum())
    return f"{ulp} ulp, {rel:.1e} rel ({differ}/{a.size} differ)"


def path_result(name: str, path: str, params, grads, baseline) -> str:
    cls, kwargs = OPTIMIZERS[name]
    extra, flag, dtype = PATHS[path]
    if flag is not None and flag not in inspect.signature(cls.__init__).parameters:
        return "no such flag"
    kw = dict(kwargs)
    for k, v in extra.items():
        kw[k] = torch.tensor(kwargs["lr"], dtype=torch.float32) if v == "tensor" else v
    with default_dtype(dtype):
        try:
            result = run(cls, kw, params, grads)
        except Exception as e:  # torch refuses this path: record why
            message = str(e).splitlines()[0] if str(e) else ""
            if "supported device" in message:
                message = "CPU is not a capturable device"
            return f"raises {type(e).__name__} ({message[:60]})"
    return compare(result, baseline)


def main(steps: int, out: str | None) -> None:
    start = time.perf_counter()
    rows = {}
    for name, (cls, kwargs) in OPTIMIZERS.items():
        t0 = time.perf_counter()
        params, grads = make_problem(name, steps)
        baseline = run(cls, kwargs, params, grads)
        rows[name] = {p: path_result(name, p, params, grads, baseline) for p in PATHS}
        print(f"{name} ({time.perf_counter() - t0:.1f} s)", rows[name], flush=True)
    elapsed = time.perf_counter() - start
    header = "| optimizer | " + " | ".join(f"`{p}`" for p in PATHS) + " |"
    lines = [
        f"# torch flag paths against the default CPU path (float32, {steps} steps)",
        "",
        f"torch {torch.__version__}, float32 params of shapes {SHAPES} "
        f"(Muon: {SHAPES_2D}), random gradients; `python "
        "benchmarks/flag_paths.py`. Default path: torch's CPU default "
        "(`foreach=None`, the single-tensor loop, Python-float scalar math). "
        "A difference is max ulp and max relative difference of the final "
        f"params (and how many elements differ). {elapsed:.0f} s.",
        "",
        header,
        "|" + "---|" * (len(PATHS) + 1),
    ]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(cells.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/flag_paths.md")
    args = parser.parse_args()
    main(args.steps, args.out)
