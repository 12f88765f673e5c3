"""Optimizer-step benchmark: funcopt vs optax vs torch, against the roofline.

One process; every jitted step is compiled first (compile time reported
separately) and warmed up; steps are chained (``p, s = step(p, g, s)``) with
the params and state donated, and each step is timed to completion (median
reported; on GPU, chains of 10 steps and one sync, for JAX and torch alike).
All implementations of a case are timed in alternating turns, so a busy
moment of the machine falls on all of them alike.
The machine's streaming bandwidth is measured (a large host or device copy
and a donated JAX ``x + 1``; the faster counts) and each case's roofline is
``bytes moved per step / bandwidth`` (Adam: read p, g, m, v and write p, m,
v: 28 bytes per float32 parameter).

funcopt runs two ways: ``flat`` (params, grads and state live packed,
:mod:`funcopt.flat`; the grads of the model's views land packed) and
``tree`` (``opt.step`` on the params tree, the default ``auto`` policy).

    .venv/bin/python benchmarks/bench_step.py            # the README table
    .venv/bin/python benchmarks/bench_step.py --quick    # fewer steps
    python benchmarks/bench_step.py --device cuda       # JAX GPU vs torch CUDA

Writes ``benchmarks/results/bench_step{,_gpu}.{json,md,png}``; the ``.md``
ends with the README's summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import funcopt as fo
import funcopt.flat as ff

RESULTS = pathlib.Path(__file__).parent / "results"

# name -> (leaf sizes)
CASES = {
    "1 leaf, 1M": [1_000_000],
    "1 leaf, 10M": [10_000_000],
    "100 leaves, 10M": [100_000] * 100,
    "2,000 leaves x 1,000": [1_000] * 2_000,
    "10,000 tiny leaves": None,  # sizes 1..64, seeded
}

# optimizer -> (funcopt, optax, torch class + kwargs, bytes per f32 param)
OPTIMIZERS = {
    "adam": (
        lambda: fo.adam(lr=1e-3),
        lambda: optax.adam(1e-3),
        (torch.optim.Adam, {"lr": 1e-3}),
        28,
    ),
    "adamw": (
        lambda: fo.adamw(lr=1e-3),
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
        (torch.optim.AdamW, {"lr": 1e-3}),
        28,
    ),
    "sgd": (
        lambda: fo.sgd(lr=1e-2, momentum=0.9),
        lambda: optax.sgd(1e-2, momentum=0.9),
        (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
        20,
    ),
    "rmsprop": (
        lambda: fo.rmsprop(lr=1e-2),
        lambda: optax.rmsprop(1e-2, decay=0.99, eps=1e-8),
        (torch.optim.RMSprop, {"lr": 1e-2}),
        20,
    ),
}


def case_sizes(name: str) -> list[int]:
    sizes = CASES[name]
    if sizes is None:
        sizes = np.random.default_rng(0).integers(1, 65, size=10_000).tolist()
    return sizes


def make_tree(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"p{i:05d}": jnp.asarray(rng.standard_normal(s, dtype=np.float32))
        for i, s in enumerate(sizes)
    }


# --------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------


# Steps per timed sample. CPU: 1 (each step timed to completion). GPU: a
# chain of steps, then one sync, so the per-call dispatch overlaps the
# previous step's kernels as in a training loop (and torch gets the same).
STEPS_PER_SAMPLE = 1


def chain_sampler(step, carry, grads):
    """A function timing ``STEPS_PER_SAMPLE`` chained ``carry = step(carry, grads)``.

    It returns seconds per step; the carry (donated params and state) lives
    in the closure between calls.
    """
    cell = [carry]

    def sample():
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_SAMPLE):
            cell[0] = step(cell[0], grads)
        jax.block_until_ready(cell[0])
        return (time.perf_counter() - t0) / STEPS_PER_SAMPLE

    return sample


def across_placements(samplers):
    """One sampler that runs ``samplers`` in turn, a call each: the same
    program on copies of its buffers at other addresses (placements).

    A step's time depends on where its buffers lie: four copies of one
    carry, stepped by one compiled chain of ``optax.clip_by_global_norm``
    and ``fo.adamw`` on one 1M leaf, timed interleaved in one process, took
    0.77, 0.83, 0.92 and 1.00 ms (optax's four: 0.83-0.92 ms; 2-core AMD
    EPYC). Measured on one placement each, two implementations' ratio
    moved between 1.0x and 1.4x from run to run; the median over samples
    of several placements takes them all in. Each sampler runs once here
    (its first run touches fresh pages).
    """
    samplers = list(samplers)
    for sample in samplers:
        sample()
    turn = [0]

    def sample():
        turn[0] = (turn[0] + 1) % len(samplers)
        return samplers[turn[0]]()

    return sample


def step_sampler(compiled, params, grads, state):
    """:func:`chain_sampler` of a compiled ``step(params, grads, state)``."""
    return chain_sampler(lambda c, g: compiled(c[0], g, c[1]), (params, state), grads)


def optax_train_step(tx):
    """``step(params, grads, state)`` of an optax transform: update, apply."""

    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def time_interleaved(samplers, min_time, turns=6, max_samples=240):
    """Median seconds per step of each sampler, timed in alternating turns.

    Each implementation of a case runs for about ``min_time`` seconds in
    all, in ``turns`` round-robin turns (at least one sample per turn):
    slow drifts of a shared machine (other processes, clock frequency,
    memory placement) then fall on all of them alike instead of on
    whichever ran during the busy moment, and their ratios are fair.
    """
    for sample in samplers.values():  # warm-up (first runs touch fresh pages)
        sample()
        sample()
    times = {name: [] for name in samplers}
    for _ in range(turns):
        for name, sample in samplers.items():
            end = time.perf_counter() + min_time / turns
            times[name].append(sample())
            while time.perf_counter() < end and len(times[name]) < max_samples:
                times[name].append(sample())
    return {name: statistics.median(t) for name, t in times.items()}


def compile_jax(fn, donate, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def funcopt_flat(make_opt, params):
    """(sampler, compile s, padded elements) of the step on funcopt.flat's layout."""
    opt = make_opt()
    layout = ff.layout(params, opt)
    fparams = layout.pack(params)
    fgrads = layout.pack(jax.tree.map(lambda p: p * 1e-3, params))
    state = opt.init(fparams)
    compiled, ct = compile_jax(opt.step, (0, 2), fparams, fgrads, state)
    sampler = step_sampler(compiled, fparams, fgrads, state)
    padded = sum(b.n_rows * b.width for b in layout.buckets)
    return sampler, ct, padded


def funcopt_tree(make_opt, params):
    """(sampler, compile s) of ``opt.step`` on the params tree."""
    opt = make_opt()
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    params = jax.tree.map(jnp.copy, params)
    state = opt.init(params)
    compiled, ct = compile_jax(opt.step, (0, 2), params, grads, state)
    sampler = step_sampler(compiled, params, grads, state)
    return sampler, ct


def optax_step(make_tx, params, donate):
    """(sampler, compile s) of optax's update + apply_updates, jitted."""
    tx = make_tx()
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    params = jax.tree.map(jnp.copy, params)
    state = tx.init(params)
    step = optax_train_step(tx)
    compiled, ct = compile_jax(step, (0, 2) if donate else (), params, grads, state)
    sampler = step_sampler(compiled, params, grads, state)
    return sampler, ct


def torch_step(cls, kwargs, sizes, mode, device="cpu"):
    """(sampler, state bytes/param) of torch's ``opt.step()``.

    ``mode``: "foreach" or "fused" (that flag True), "single" (foreach=False).
    Raises TypeError or RuntimeError where torch has no such implementation.
    """
    rng = np.random.default_rng(0)
    ps = [
        torch.tensor(rng.standard_normal(s, dtype=np.float32), device=device)
        for s in sizes
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for p in ps:
        p.requires_grad_(True)
        p.grad = p.detach() * 1e-3
    flags = {"foreach": False} if mode == "single" else {mode: True}
    opt = cls(ps, **kwargs, **flags)

    def sample():
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(STEPS_PER_SAMPLE):
                opt.step()
        sync()
        return (time.perf_counter() - t0) / STEPS_PER_SAMPLE

    sample()  # creates the state
    state_bytes = sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for k, v in st.items()
        if k != "step" and torch.is_tensor(v)
    )
    return sample, state_bytes / sum(sizes)


def funcopt_state_bytes(make_opt, sizes):
    params = make_tree(sizes)
    state = make_opt().init(params)
    n = sum(jax.tree.leaves(jax.tree.map(lambda x: x.size, params)))
    return sum(x.nbytes for x in jax.tree.leaves(state.slots)) / n


def bandwidth(nbytes=400_000_000, device="cpu"):
    """Streaming bandwidth in bytes/s: best of a host (numpy) or torch CUDA
    copy and a JAX ``x + 1`` on the default device."""
    n = nbytes // 4
    if device == "cuda":
        src = torch.ones(n, device="cuda")
        dst = torch.empty_like(src)

        def copy():
            dst.copy_(src)
            torch.cuda.synchronize()

        copy()
    else:
        src = np.ones(n, np.float32)
        dst = np.empty_like(src)

        def copy():
            np.copyto(dst, src)

    best_copy = min(_timeit(copy) for _ in range(5))
    f = jax.jit(lambda x: x + 1, donate_argnums=0)
    x = jnp.ones(n, jnp.float32)
    x = f(x).block_until_ready()
    best_jax = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best_jax = min(best_jax, time.perf_counter() - t0)
    return {
        "copy": 2 * nbytes / best_copy,
        "jax_add_donated": 2 * nbytes / best_jax,
    }


def _timeit(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing loops")
    ap.add_argument("--opts", default=",".join(OPTIMIZERS))
    ap.add_argument("--cases", default=None, help="comma-separated case indices")
    ap.add_argument(
        "--optax-max-leaves",
        type=int,
        default=2_000,
        help="skip optax above this many leaves (its compile grows superlinearly)",
    )
    ap.add_argument(
        "--tree-max-leaves",
        type=int,
        default=100,
        help="time funcopt's default (tree) path up to this many leaves",
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--summarize",
        metavar="JSON",
        help="print the README summary of a saved bench_step*.json and exit",
    )
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: JAX on its default GPU, torch on cuda (files *_gpu.*)",
    )
    args = ap.parse_args()
    if args.summarize:
        saved = json.loads(pathlib.Path(args.summarize).read_text())
        print(summary(saved["meta"], saved["rows"]))
        return
    if args.device == "cuda":
        global STEPS_PER_SAMPLE
        STEPS_PER_SAMPLE = 10
    if args.device == "cuda" and jax.default_backend() != "gpu":
        raise SystemExit(
            f"--device cuda needs a JAX GPU backend, not {jax.default_backend()}"
        )
    min_time = 0.25 if args.quick else 0.6
    names = list(CASES)
    if args.cases:
        names = [names[int(i)] for i in args.cases.split(",")]
    opts = args.opts.split(",")

    bw = bandwidth(device=args.device)
    bw_best = max(bw.values())
    print(
        f"bandwidth: {args.device} copy {bw['copy'] / 1e9:.1f} GB/s, "
        f"jax x+1 {bw['jax_add_donated'] / 1e9:.1f} GB/s"
    )
    rows = []
    for opt_name in opts:
        make_fo, make_tx, (tcls, tkw), bpp = OPTIMIZERS[opt_name]
        for case in names:
            sizes = case_sizes(case)
            n = sum(sizes)
            params = make_tree(sizes)
            row = {"optimizer": opt_name, "case": case, "leaves": len(sizes), "n": n}
            row["roofline_ms"] = 1e3 * bpp * n / bw_best
            samplers = {}
            sampler, ct, padded = funcopt_flat(make_fo, params)
            samplers["funcopt_flat"] = sampler
            row.update(funcopt_flat_compile_s=ct, flat_padding=padded / n - 1)
            row.update(funcopt_tree_ms=None, funcopt_tree_compile_s=None)
            if len(sizes) <= args.tree_max_leaves:  # the per-leaf path
                samplers["funcopt_tree"], ct = funcopt_tree(make_fo, params)
                row["funcopt_tree_compile_s"] = ct
            big_optax = len(sizes) > args.optax_max_leaves
            # optax's non-donated step only for adam (the baseline)
            optax_modes = [True] + ([False] if opt_name == "adam" else [])
            if opt_name != "adam" and len(sizes) >= 2_000:
                big_optax = True  # its 20-30 s compile, once (adam) is enough
            for donate in optax_modes:
                key = "optax_donate" if donate else "optax"
                row[f"{key}_ms"] = row[f"{key}_compile_s"] = None
                if not big_optax:
                    samplers[key], ct = optax_step(make_tx, params, donate)
                    row[f"{key}_compile_s"] = ct
            for mode in ("foreach", "fused"):
                row[f"torch_{mode}_ms"] = None
                try:
                    samplers[f"torch_{mode}"], sb = torch_step(
                        tcls, tkw, sizes, mode, args.device
                    )
                except (TypeError, RuntimeError):
                    pass  # no fused kernel (RMSprop): torch's best is foreach
            for name, t in time_interleaved(samplers, min_time).items():
                row[f"{name}_ms"] = 1e3 * t
            del samplers
            row["torch_state_bytes_per_param"] = sb
            row["funcopt_state_bytes_per_param"] = funcopt_state_bytes(
                make_fo, sizes[:100]
            )
            best = min(x for x in (row["funcopt_flat_ms"], row["funcopt_tree_ms"]) if x)
            row["best_funcopt_ms"] = best
            if row.get("optax_donate_ms"):
                row["ratio_optax"] = best / row["optax_donate_ms"]
            row["ratio_torch_fused"] = best / (
                row["torch_fused_ms"] or row["torch_foreach_ms"]
            )
            row["ratio_roofline"] = best / row["roofline_ms"]
            rows.append(row)
            print(_fmt_row(row), flush=True)
            del params

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine(args.device),
        "bandwidth_bytes_per_s": bw,
        "versions": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "funcopt": fo.__version__,
        },
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    stem = "bench_step" + ("_gpu" if args.device == "cuda" else "")
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    md = markdown(meta, rows) + "\n" + summary(meta, rows)
    (out / f"{stem}.md").write_text(md)
    print(md)
    try:
        plot(rows, out / f"{stem}.png")
    except ImportError:  # pragma: no cover - matplotlib is an examples extra
        print("matplotlib missing: no plot")


def machine(device="cpu") -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (JAX: {jax.devices()[0].device_kind})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def _fmt_row(r) -> str:
    return (
        f"{r['optimizer']:8s} {r['case']:22s} flat {r['funcopt_flat_ms']:8.2f} ms "
        f"(compile {r['funcopt_flat_compile_s']:.2f} s)  tree "
        f"{_f(r['funcopt_tree_ms'])} ms "
        f"(compile {_f(r['funcopt_tree_compile_s'])} s)  "
        f"optax {_f(r.get('optax_ms'))}/{_f(r.get('optax_donate_ms'))} ms "
        f"(compile {_f(r.get('optax_donate_compile_s'))} s)  torch foreach "
        f"{r['torch_foreach_ms']:.2f} fused {_f(r['torch_fused_ms'])}  roofline "
        f"{r['roofline_ms']:.2f}"
    )


def markdown(meta, rows) -> str:
    bw = meta["bandwidth_bytes_per_s"]
    lines = [
        f"Machine: {meta['machine']}; streaming bandwidth "
        f"{max(bw.values()) / 1e9:.1f} GB/s (copy "
        f"{bw['copy'] / 1e9:.1f}, JAX x+1 {bw['jax_add_donated'] / 1e9:.1f}); "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ". Median ms per step, params and state donated; compile in s.",
        "",
        "| optimizer | case | funcopt flat | funcopt tree | optax jit "
        "| optax jit+donate | torch foreach | torch fused | roofline "
        "| funcopt/optax | funcopt/torch fused | funcopt/roofline "
        "| compile funcopt flat / tree / optax |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['case']} | {r['funcopt_flat_ms']:.2f} "
            f"| {_f(r['funcopt_tree_ms'])} | {_f(r.get('optax_ms'))} "
            f"| {_f(r.get('optax_donate_ms'))} | {r['torch_foreach_ms']:.2f} "
            f"| {_f(r['torch_fused_ms'])} | {r['roofline_ms']:.2f} "
            f"| {_f(r.get('ratio_optax'))} | {r['ratio_torch_fused']:.2f} "
            f"| {r['ratio_roofline']:.2f} | {r['funcopt_flat_compile_s']:.2f} / "
            f"{_f(r['funcopt_tree_compile_s'])} / "
            f"{_f(r.get('optax_donate_compile_s'))} |"
        )
    lines += ["", "State memory, bytes per parameter (float32):", ""]
    lines += ["| optimizer | funcopt | torch |", "|---|---|---|"]
    seen = set()
    for r in rows:
        if r["optimizer"] in seen:
            continue
        seen.add(r["optimizer"])
        lines.append(
            f"| {r['optimizer']} | {r['funcopt_state_bytes_per_param']:.0f} "
            f"| {r['torch_state_bytes_per_param']:.0f} |"
        )
    lines.append("")
    lines.append(
        "Ratios use the faster funcopt column (flat or tree). 'funcopt flat': "
        "funcopt.flat layout (padding adds "
        + ", ".join(
            f"{100 * r['flat_padding']:.1f}%"
            for r in rows
            if r["optimizer"] == rows[0]["optimizer"]
        )
        + " of elements per case); 'funcopt tree': opt.step on the params "
        "tree, the default path (— above --tree-max-leaves). optax is skipped "
        "(—) where its "
        "compile takes minutes."
    )
    return "\n".join(lines) + "\n"


def summary(meta, rows) -> str:
    """The README's compact table: per case and optimizer, best funcopt /
    optax donated / torch fused (foreach where torch has no fused kernel)."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    by_key = {(r["case"], r["optimizer"]): r for r in rows}
    lines = [
        f"{meta['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ". ms per step: funcopt / optax (jit+donate) / torch fused "
        "(* foreach); funcopt compile in s.",
        "",
        "| case | " + " | ".join(opts) + " | funcopt compile |",
        "|---|" + "---|" * (len(opts) + 1),
    ]
    for case in cases:
        cells, compile_s = [], []
        for o in opts:
            r = by_key.get((case, o))
            if r is None:
                cells.append("—")
                continue
            fused = r["torch_fused_ms"]
            torch_cell = _f(fused) if fused else _f(r["torch_foreach_ms"]) + "*"
            cells.append(
                f"{_f(r['best_funcopt_ms'])} / {_f(r.get('optax_donate_ms'))} "
                f"/ {torch_cell}"
            )
            compile_s.append(r["funcopt_flat_compile_s"])
        lines.append(
            f"| {case} | "
            + " | ".join(cells)
            + f" | {min(compile_s):.2f}–{max(compile_s):.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=False)
    for ax, key, title in zip(
        axes,
        ["ratio_optax", "ratio_torch_fused", "ratio_roofline"],
        ["funcopt / optax (donated)", "funcopt / torch fused", "funcopt / roofline"],
    ):
        width = 0.8 / len(opts)
        for k, o in enumerate(opts):
            vals = []
            for c in cases:
                r = next(
                    (r for r in rows if r["case"] == c and r["optimizer"] == o), {}
                )
                vals.append(r.get(key) or np.nan)
            ax.bar(np.arange(len(cases)) + k * width, vals, width, label=o)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
        ax.set_xticklabels(cases, rotation=25, ha="right", fontsize=8)
        ax.set_title(title + " (lower is better)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
