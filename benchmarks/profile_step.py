"""Where a CPU optimizer step's time goes, and which XLA CPU options change it.

Two measurements, both for one 10M-parameter float32 leaf:

1. **Memory traffic of the compiled program.** XLA's cost analysis of the
   compiled, donated step gives the bytes each fusion reads and writes; an
   elementwise step is memory-bound, so bytes per parameter and the number
   of full-size loop fusions (passes over memory) explain its time. The ideal
   is torch's ``fused=True`` kernel: one pass that reads params, grads and
   state once and writes params and state once (Adam: 28 bytes/param). By default
   XLA's CPU backend does not fuse loops with several outputs, so a step that
   updates k buffers is at least k passes; each pass re-reads what it needs.
2. **Every elementwise optimizer** (``--audit``, also part of the default
   run): passes, copies and bytes per parameter of its compiled step, its
   state bytes per parameter next to torch's, and its step time next to
   torch's fastest CPU implementation (single-tensor, foreach or fused).
3. **XLA CPU options.** The same steps (funcopt and optax, donated) timed in
   one subprocess per ``XLA_FLAGS`` setting (XLA reads the flags once per
   process), next to torch fused and foreach in this process.

    .venv/bin/python benchmarks/profile_step.py [--audit]

Writes ``benchmarks/results/profile_audit.{json,md}`` (2.) and
``benchmarks/results/profile_step.{json,md}`` (1. and 3.).

It measures XLA's programs, the JAX rules: ``FUNCOPT_NATIVE=0`` is set here
(children inherit it), since Adam, AdamW, SGD, Adagrad, RMSprop, Adamax,
Adadelta, RAdam and Rprop otherwise run funcopt's native kernel on one CPU device
(``bench_step.py`` times that).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import torch

# XLA's programs (the JAX rules), not the native kernels: read at the first
# step, inherited by the XLA_FLAGS children
os.environ.setdefault("FUNCOPT_NATIVE", "0")
from bench_step import optax_train_step, step_sampler, time_interleaved, torch_step

import funcopt as fo
import funcopt.flat as ff

RESULTS = pathlib.Path(__file__).parent / "results"
N = 10_000_000

# XLA_FLAGS variants tried; fast math breaks torch parity and is listed only
# as the bound on what arithmetic shortcuts could buy.
XLA_OPTIONS = [
    "",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_prefer_vector_width=128",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_copy_insertion_use_region_analysis=true",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_enable_fast_math=true",
    # a CPU backend option, not a flag: XLA's multi-output fusion pass
    "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion",
]

# optimizer -> (funcopt, optax, torch class and kwargs, ideal bytes/param)
SPECS = {
    "adam": (
        lambda: fo.adam(lr=1e-3),
        lambda: optax.adam(1e-3),
        ("Adam", {"lr": 1e-3}),
        28,
    ),
    "adamw": (
        lambda: fo.adamw(lr=1e-3),
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
        ("AdamW", {"lr": 1e-3}),
        28,
    ),
    "sgd": (
        lambda: fo.sgd(lr=1e-2, momentum=0.9),
        lambda: optax.sgd(1e-2, momentum=0.9),
        ("SGD", {"lr": 1e-2, "momentum": 0.9}),
        20,
    ),
    "rmsprop": (
        lambda: fo.rmsprop(lr=1e-2),
        lambda: optax.rmsprop(1e-2, decay=0.99, eps=1e-8),
        ("RMSprop", {"lr": 1e-2}),
        20,
    ),
}


# optimizer -> (funcopt, torch class and kwargs); defaults unless noted
AUDIT = {
    "sgd": (lambda: fo.sgd(lr=1e-2), ("SGD", {"lr": 1e-2})),
    "sgd(momentum)": (
        lambda: fo.sgd(lr=1e-2, momentum=0.9),
        ("SGD", {"lr": 1e-2, "momentum": 0.9}),
    ),
    "adam": (fo.adam, ("Adam", {})),
    "adam(amsgrad)": (lambda: fo.adam(amsgrad=True), ("Adam", {"amsgrad": True})),
    "adamw": (fo.adamw, ("AdamW", {})),
    "adamax": (fo.adamax, ("Adamax", {})),
    "nadam": (fo.nadam, ("NAdam", {})),
    "radam": (fo.radam, ("RAdam", {})),
    "rmsprop": (fo.rmsprop, ("RMSprop", {})),
    "rmsprop(centered, momentum)": (
        lambda: fo.rmsprop(centered=True, momentum=0.9),
        ("RMSprop", {"centered": True, "momentum": 0.9}),
    ),
    "adagrad": (fo.adagrad, ("Adagrad", {})),
    "adadelta": (fo.adadelta, ("Adadelta", {})),
    "asgd": (fo.asgd, ("ASGD", {})),
    "rprop": (fo.rprop, ("Rprop", {})),
}


def audit(min_time: float) -> dict:
    """Compiled passes, state bytes and step time of every AUDIT optimizer.

    funcopt and torch's three CPU implementations are timed in alternating
    turns (``bench_step.time_interleaved``).
    """
    out = {}
    for name, (make_fo, (cls_name, kwargs)) in AUDIT.items():
        opt = make_fo()
        compiled, params, grads, state = _compiled_step(opt.step, opt.init)
        full_size = [x for x in jax.tree.leaves(state) if x.size >= N]
        row = {
            "buffers": len(full_size),
            "state_bytes_per_param": sum(x.nbytes for x in full_size) / N,
            **_passes(compiled),
        }
        samplers = {"funcopt": step_sampler(compiled, params, grads, state)}
        del full_size, params, state
        cls = getattr(torch.optim, cls_name)
        for mode in ("single", "foreach", "fused"):
            try:
                samplers[mode], row["torch_state_bytes_per_param"] = torch_step(
                    cls, kwargs, [N], mode
                )
            except (TypeError, RuntimeError):
                continue  # no such implementation of this optimizer
        times = time_interleaved(samplers, min_time)
        row["ms"] = 1e3 * times.pop("funcopt")
        row["torch_mode"] = min(times, key=times.get)
        row["torch_ms"] = 1e3 * times[row["torch_mode"]]
        out[name] = row
        del samplers, compiled
        print(f"audit {name}: done", flush=True)
    return out


def _compiled_step(step, init, pack=lambda tree: tree):
    """The donated step compiled for one N-element leaf, and its inputs."""
    params = pack({"w": jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32)})
    grads = pack({"w": jnp.full((N,), 1e-3, jnp.float32)})
    state = init(params)
    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, grads, state)
    return compiled.compile(), params, grads, state


def _passes(compiled) -> dict:
    """Bytes per param (XLA's cost analysis), full-size fusions and copies."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = compiled.as_text()
    entry = hlo[hlo.index("ENTRY") :]
    return {
        "bytes_per_param": cost["bytes accessed"] / N,
        "passes": _count_full_size(entry, "fusion"),
        "copies": _count_full_size(entry, "copy"),
    }


def audit_markdown(rows: dict) -> str:
    lines = [
        "Every elementwise optimizer, one 10M float32 leaf, torch's default "
        "arguments, params and state donated. Passes = full-size loop fusions "
        "(at least buffers + 1 without multi-output fusion); bytes = XLA's "
        "cost analysis of the compiled step; state = bytes per parameter; "
        "torch = its fastest CPU implementation of single-tensor, foreach "
        "and fused. XLA_FLAGS: " + (os.environ.get("XLA_FLAGS") or "(none)") + ".",
        "",
        "| optimizer | buffers | passes | copies | bytes/param "
        "| state funcopt / torch | funcopt ms | torch ms | funcopt/torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['buffers']} | {r['passes']} | {r['copies']} "
            f"| {r['bytes_per_param']:.0f} "
            f"| {r['state_bytes_per_param']:.0f} / "
            f"{r['torch_state_bytes_per_param']:.0f} "
            f"| {r['ms']:.2f} | {r['torch_ms']:.2f} ({r['torch_mode']}) "
            f"| {r['ms'] / r['torch_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _child(opts: list[str], min_time: float) -> dict:
    """Runs in the subprocess: compile and time each step under XLA_FLAGS."""

    def compiled_step(kind, make):
        if kind == "optax":
            tx = make()
            return _compiled_step(optax_train_step(tx), tx.init)
        opt = make()
        if kind == "funcopt tree":
            return _compiled_step(opt.step, opt.init)
        params = {"w": jnp.zeros((N,), jnp.float32)}
        layout = ff.layout(params, opt)
        return _compiled_step(opt.step, opt.init, pack=layout.pack)

    out = {}
    for name in opts:
        make_fo, make_optax, _, _ = SPECS[name]
        samplers = {}
        for kind, make in (
            ("funcopt tree", make_fo),
            ("funcopt flat", make_fo),
            ("optax", make_optax),
        ):
            compiled, p, g, s = compiled_step(kind, make)
            out[f"{name}|{kind}"] = _passes(compiled)
            samplers[kind] = step_sampler(compiled, p, g, s)
            del p, s, compiled
        for kind, t in time_interleaved(samplers, min_time).items():
            out[f"{name}|{kind}"]["ms"] = 1e3 * t
        del samplers
    return out


def _count_full_size(hlo_entry: str, op: str) -> int:
    """Instructions ``op`` with a float32 result (or tuple element) of ~N elements.

    A multi-output fusion, ``(f32[N], f32[N]) fusion(...)``, is one pass.
    """
    count = 0
    for result in re.findall(rf"= (\(?[^=]*?\)?) {op}\(", hlo_entry):
        sizes = [_size(dims) for dims in re.findall(r"f32\[([0-9,]+)\]", result)]
        count += any(size >= N // 2 for size in sizes)
    return count


def _size(dims: str) -> int:
    size = 1
    for d in dims.split(","):
        size *= int(d)
    return size


def _torch_times(opts: list[str], min_time: float) -> dict:
    out = {}
    for name in opts:
        cls_name, kwargs = SPECS[name][2]
        samplers = {}
        for mode in ("foreach", "fused"):
            out[f"{name}|torch {mode}"] = None
            try:
                samplers[mode], _ = torch_step(
                    getattr(torch.optim, cls_name), kwargs, [N], mode
                )
            except (TypeError, RuntimeError):
                continue
        for mode, t in time_interleaved(samplers, min_time).items():
            out[f"{name}|torch {mode}"] = 1e3 * t
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opts", default=",".join(SPECS))
    ap.add_argument(
        "--min-time", type=float, default=0.5, help="seconds timed per implementation"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--audit", action="store_true", help="only the every-optimizer audit"
    )
    ap.add_argument("--suffix", default="", help="appended to the audit's file names")
    args = ap.parse_args()
    opts = args.opts.split(",")
    if args.child:
        print(json.dumps(_child(opts, args.min_time)))
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = audit(args.min_time)
    stem = "profile_audit" + args.suffix
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{stem}.md").write_text(audit_markdown(rows))
    print(audit_markdown(rows))
    if args.audit:
        return

    by_flag = {}
    for flags in XLA_OPTIONS:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "--opts", args.opts]
            + ["--min-time", str(args.min_time)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{flags or '(default)'}: failed: {last[:160]}", flush=True)
            by_flag[flags] = None
            continue
        by_flag[flags] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{flags or '(default)'}: done", flush=True)
    torch_ms = _torch_times(opts, args.min_time)

    md = markdown(opts, by_flag, torch_ms)
    (out / "profile_step.json").write_text(
        json.dumps({"xla": by_flag, "torch": torch_ms}, indent=1)
    )
    (out / "profile_step.md").write_text(md)
    print(md)


def markdown(opts, by_flag, torch_ms) -> str:
    default = by_flag[""]
    lines = [
        "Compiled step, one 10M float32 leaf, params and state donated "
        "(XLA cost analysis; passes = full-size loop fusions):",
        "",
        "| optimizer | ideal bytes/param (one pass) | funcopt tree | funcopt flat "
        "| optax | torch fused ms | torch foreach ms |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(d):
        return (
            f"{d['bytes_per_param']:.0f} B, {d['passes']} passes, "
            f"{d['copies']} copies, {d['ms']:.2f} ms"
        )

    for name in opts:
        fused, foreach = (
            torch_ms[f"{name}|torch fused"],
            torch_ms[f"{name}|torch foreach"],
        )
        lines.append(
            f"| {name} | {SPECS[name][3]} | {cell(default[f'{name}|funcopt tree'])} "
            f"| {cell(default[f'{name}|funcopt flat'])} "
            f"| {cell(default[f'{name}|optax'])} "
            f"| {'—' if fused is None else f'{fused:.2f}'} | {foreach:.2f} |"
        )
    lines += [
        "",
        "Step time (ms) under XLA_FLAGS, funcopt tree / optax:",
        "",
        "| XLA_FLAGS | " + " | ".join(opts) + " |",
        "|---|" + "---|" * len(opts),
    ]
    for flags, res in by_flag.items():
        row = [f"`{flags}`" if flags else "(default)"]
        for name in opts:
            if res is None:
                row.append("rejected")
            else:
                row.append(
                    f"{res[f'{name}|funcopt tree']['ms']:.2f} / "
                    f"{res[f'{name}|optax']['ms']:.2f}"
                )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
