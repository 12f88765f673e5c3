"""float32 bit-exactness against torch's default CPU path, per optimizer.

Runs every optimizer of the parity table (``tests/parity/cases*.py``; one
flag combination per row, the all-flags one, and the rows' other combinations
with ``--all-combos``) in float32 on the same gradients through torch (its
default CPU path: ``foreach=None`` on CPU is the single-tensor loop) and
through funcopt, jitted and eagerly, with x64 on (torch's float64 scalar math)
and off (float32 scalar math). The leaves have odd sizes, so that torch's
vectorised blocks and scalar tails both run: 37, 65 (5x13), 7 and 24 (2x3x4)
elements; Muon gets 2-D leaves of those sizes.

Per optimizer and mode it reports the first step at which any parameter,
buffer or step count differs from torch in any bit, and the largest
difference in ulp (units in the last place of float32) over every parameter
and buffer, over the first 10 steps and over all steps (where values near
zero make ulp counts large once differences compound); and whether eager
and jitted funcopt agree bit for bit (over the first ``--eager-steps``).
Writes ``benchmarks/results/float32_bits.md``.

    python benchmarks/float32_bits.py [--steps 1000] [--out PATH] [--all-combos]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import funcopt as fo  # noqa: E402
from funcopt._tree import is_trainable  # noqa: E402
from tests.parity.cases import FLAG_CASES, OPT_CASES  # noqa: E402

# torch's fused CPU kernels, compared with torch run with `fused=True`
FUSED_CASES = [case for case in FLAG_CASES if case.name.endswith("-fused")]
from tests.torch_ref import funcopt_kwargs, slot_leaves, step_counts  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# column group -> (x64, funcopt's bit-exact float32 mode)
MODES = {"x64 exact": (True, True), "x64": (True, False), "no x64": (False, False)}
# the "ulp@10" column: the largest difference over the first steps, before
# differences compound
EARLY = 10

NOTES = [
    "*x64 exact*: x64 and `fo.precision.set_exact_float32(True)`: funcopt's "
    "float32 helpers round every torch op as torch's CPU "
    "kernel does (`funcopt/_math.py`); *x64*: the default float32 program "
    "with float64 scalar math. Adam, AdamW, SGD, Adagrad, RMSprop, Adamax, "
    "Adadelta, RAdam, Rprop, NAdam and ASGD (and every "
    "`-fused` row) run funcopt's native kernel on one CPU device in all three "
    "modes (torch's default or fused step op by op in C++, scalar math in "
    "double), hence the same numbers in each. The rows that still differ "
    "take a square root: torch's float32 `sqrt` on CPU is MKL's `vsSqrt` "
    "(`VML_HA`), not correctly rounded (about 0.6% of roots 1 ulp off on an "
    "Intel AVX-512 machine, 16-21% on an AMD EPYC), XLA's and the kernel's "
    "are: Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad, Adadelta, "
    "schedule-free AdamW, Adan, LAMB, Prodigy. Adan's clip, LAMB and "
    "Prodigy also sum (norms, means) in another order. Adafactor's norms and "
    "means follow torch's order in the exact mode (`funcopt/_reductions.py`) "
    "and its roots are the `sqrt` instruction, as torch's `rsqrt` and `norm` "
    "take them. Muon's first "
    "difference is a bfloat16 rounding inside Newton-Schulz (a norm or "
    "matmul sum). Without x64 the JAX rules' scalar math "
    "(bias corrections, step sizes) is float32, and XLA contracts multiplies "
    "and adds where its fusion puts them.",
    "",
    "A difference near zero counts many ulp (the ulp shrinks with the value), "
    "so once the runs have drifted apart the max over 1,000 steps is large; "
    "*ulp@10* is the size of the first differences. *eager == jit*: an "
    "un-jitted step runs the jitted step's program (`_core."
    "compiled_when_concrete`), so a NO here would be a bug. The `-fused` rows "
    "never differ: torch's fused kernels take the hardware (correctly "
    "rounded) square root.",
]


def make_tree(rng: np.random.Generator, case) -> dict:
    """Leaves of 37, 65, 7 and 24 elements (2-D for Muon's rule)."""
    if case.name == "muon":
        shapes = {"a": (1, 37), "b": (13, 5), "c": (7, 1), "d": (4, 6)}
    else:
        shapes = {"a": (37,), "b": (5, 13), "c": (7,), "d": (2, 3, 4)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in float32 ulp (as ordered integers; NaN vs NaN is 0)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)

    def ordered(x):
        i = x.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    d = np.abs(ordered(a) - ordered(b))
    return np.where(np.isnan(a) & np.isnan(b), 0, d)


def run_torch(case, kwargs, params, grads):
    """Per step: ``{(leaf, name): array}`` (params and float buffers) and
    the step counts (empty where torch keeps none)."""
    tparams = [torch.tensor(p).requires_grad_() for p in params.values()]
    opt = case.torch_cls(tparams, **kwargs)
    trace, counts = [], []
    for g in grads:
        for tp, gi in zip(tparams, g.values()):
            tp.grad = torch.tensor(gi)
        opt.step()
        arrays = {
            (i, "param"): p.detach().numpy().copy() for i, p in enumerate(tparams)
        }
        steps = []
        for i, p in enumerate(tparams):
            for key, value in opt.state[p].items():
                if key == "step":
                    steps.append(int(value))
                elif isinstance(value, torch.Tensor) and value.is_floating_point():
                    arrays[i, key] = value.detach().numpy().copy()
        trace.append(arrays)
        counts.append(steps)
    return trace, counts


def run_funcopt(case, kwargs, params, grads, keys, jit: bool):
    """As `run_torch`, for the ``keys`` torch has."""
    opt = case.factory(**funcopt_kwargs(kwargs))
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    step = jax.jit(opt.step) if jit else opt.step
    # each step's params and slots, fetched once per step
    snapshots = []
    for g in grads:
        p, state = step(p, jax.tree.map(jnp.asarray, g), state)
        snapshots.append(jax.device_get((p, state)))
    trace, counts = [], []
    for p, state in snapshots:
        leaves = [x for x in jax.tree.leaves(p) if is_trainable(x)]
        arrays = {}
        for i, key in keys:
            if key == "param":
                leaf = leaves[i]
            else:
                # a buffer funcopt does not keep (a reference's diagnostics)
                leaf = slot_leaves(state, p, key)[i] if key in state.slots else None
            arrays[i, key] = None if leaf is None else np.asarray(leaf)
        trace.append(arrays)
        counts.append(step_counts(state, p))
    return trace, counts


def _ulps_per_step(trace, ref) -> np.ndarray:
    """The largest ulp difference at each step, over the arrays torch has
    (for arrays that exist at every step; others step by step)."""
    worst = np.zeros(len(ref), np.int64)
    keys = {k for arrays in ref for k in arrays}
    for k in keys:
        steps = [t for t in range(len(ref)) if k in ref[t] and trace[t][k] is not None]
        if not steps:
            continue
        ours = np.stack([np.asarray(trace[t][k], np.float32) for t in steps])
        theirs = np.stack([np.asarray(ref[t][k], np.float32) for t in steps])
        d = ulp_distance(ours, theirs).reshape(len(steps), -1).max(axis=1, initial=0)
        worst[steps] = np.maximum(worst[steps], d)
    return worst


def compare(ours, theirs, upto: int):
    """(first differing step, 1-based, or None; max ulp over the first
    ``upto`` steps; max ulp over all steps)."""
    (trace, counts), (ref, ref_counts) = ours, theirs
    ulps = _ulps_per_step(trace, ref)
    bad_count = [bool(rc) and c != rc for c, rc in zip(counts, ref_counts)]
    differs = np.nonzero((ulps > 0) | np.asarray(bad_count, bool))[0]
    first = int(differs[0]) + 1 if differs.size else None
    return first, int(ulps[:upto].max(initial=0)), int(ulps.max(initial=0))


def same_bits(a, b) -> bool:
    """Whether two funcopt runs (of `b`'s length) agree bit for bit."""
    (trace, counts), (other, other_counts) = a, b
    n = len(other)
    return not _ulps_per_step(trace[:n], other).any() and list(counts[:n]) == list(
        other_counts
    )


def measure(case, kwargs, steps: int, eager_steps: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = make_tree(rng, case)
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(steps)
    ]
    ref = run_torch(case, kwargs, params, grads)
    keys = sorted({k for arrays in ref[0] for k in arrays})
    row = {}
    for mode, (x64, exact) in MODES.items():
        fo.precision.set_exact_float32(exact)
        try:
            with jax.enable_x64(x64):
                jitted = run_funcopt(case, kwargs, params, grads, keys, jit=True)
                eager = run_funcopt(
                    case, kwargs, params, grads[:eager_steps], keys, jit=False
                )
        finally:
            fo.precision.set_exact_float32(False)
        first, early, worst = compare(jitted, ref, EARLY)
        row[mode] = {
            "first": first,
            "early": early,
            "ulp": worst,
            "eager_eq": same_bits(jitted, eager),
        }
    return row


def _fmt(cell: dict) -> str:
    first = "never" if cell["first"] is None else str(cell["first"])
    eager = "yes" if cell["eager_eq"] else "NO"
    return f"{first} | {cell['early']} | {cell['ulp']} | {eager}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "float32_bits.md")
    parser.add_argument("--eager-steps", type=int, default=20)
    parser.add_argument("--all-combos", action="store_true")
    parser.add_argument("--only", nargs="*", help="row names to run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    lines = [
        "# float32: funcopt against torch's default CPU path, bit for bit",
        "",
        "The `-fused` rows run torch and funcopt with `fused=True` (torch's "
        "fused CPU kernel).",
        "",
        f"`python benchmarks/float32_bits.py` ({args.steps} steps, leaves of 37, "
        "65, 7 and 24 float32 elements, torch "
        f"{torch.__version__}, jax {jax.__version__}). *first*: the first step "
        "at which a parameter, buffer or step count differs from torch in any "
        "bit (`never`: bit-identical for every step); *ulp*: the largest "
        "difference over all parameters, buffers and steps; *eager == jit*: "
        f"un-jitted `opt.step` gives the jitted step's bits (first "
        f"{args.eager_steps} steps); *ulp@{EARLY}*: the largest difference over "
        f"the first {EARLY} steps.",
        "",
        "| optimizer | flags | "
        + " | ".join(
            f"{mode}: first | ulp@{EARLY} | ulp | eager == jit" for mode in MODES
        )
        + " |",
        "|---|---|" + "---|---|---|---|" * len(MODES),
    ]
    for case in OPT_CASES + FUSED_CASES:
        if args.only and case.name not in args.only:
            continue
        combos = case.combos() if args.all_combos else case.combos()[-1:]
        for kwargs in combos:
            flags = ", ".join(
                f"{k}={v}" for k, v in kwargs.items() if k not in case.fixed
            )
            row = measure(case, kwargs, args.steps, args.eager_steps)
            cells = " | ".join(_fmt(row[mode]) for mode in MODES)
            line = f"| {case.name} | {flags} | {cells} |"
            print(line, flush=True)
            lines.append(line)
    lines += ["", *NOTES, "", f"Runtime: {time.perf_counter() - start:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
