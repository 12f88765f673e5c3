"""Where a CPU optimizer step's time goes, and which XLA CPU options change it.

Two measurements, both for one 10M-parameter float32 leaf:

1. **Memory traffic of the compiled program.** XLA's cost analysis of the
   compiled, donated step gives the bytes each fusion reads and writes; an
   elementwise step is memory-bound, so bytes per parameter and the number
   of full-size loop fusions (passes over memory) explain its time. The ideal
   is torch's ``fused=True`` kernel: one pass that reads params, grads and
   state once and writes params and state once (Adam: 28 bytes/param). XLA's
   CPU backend has no multi-output loop fusion, so a step that updates k
   buffers is at least k passes; each pass re-reads what it needs.
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
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

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


def audit(steps: int) -> dict:
    """Compiled passes, state bytes and step time of every AUDIT optimizer."""
    out = {}
    for name, (make_fo, (cls_name, kwargs)) in AUDIT.items():
        opt = make_fo()
        params = {"w": jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32)}
        grads = {"w": jnp.full((N,), 1e-3, jnp.float32)}
        state = opt.init(params)
        full_size = [x for x in jax.tree.leaves(state) if x.size >= N]
        buffers, state_bytes = len(full_size), sum(x.nbytes for x in full_size)
        compiled = jax.jit(opt.step, donate_argnums=(0, 2))
        compiled = compiled.lower(params, grads, state).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        hlo = compiled.as_text()
        entry = hlo[hlo.index("ENTRY") :]
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            params, state = compiled(params, grads, state)
            jax.block_until_ready((params, state))
            if i >= 2:
                times.append(time.perf_counter() - t0)
        del params, state, compiled, full_size
        out[name] = {
            "buffers": buffers,
            "passes": _count_full_size(entry, "fusion"),
            "copies": _count_full_size(entry, "copy"),
            "bytes_per_param": cost["bytes accessed"] / N,
            "state_bytes_per_param": state_bytes / N,
            "ms": 1e3 * statistics.median(times),
            **_torch_audit(cls_name, kwargs, steps),
        }
        print(f"audit {name}: done", flush=True)
    return out


def _torch_audit(cls_name: str, kwargs: dict, steps: int) -> dict:
    """torch's state bytes/param and its fastest CPU step (ms) of three modes."""
    import numpy as np
    import torch

    best, state_bytes = None, None
    for mode in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        p = torch.tensor(np.linspace(-1, 1, N, dtype=np.float32))
        p.grad = torch.full((N,), 1e-3)
        try:
            opt = getattr(torch.optim, cls_name)([p], **kwargs, **mode)
        except (TypeError, RuntimeError):
            continue
        times = []
        with torch.no_grad():
            for i in range(steps + 2):
                t0 = time.perf_counter()
                opt.step()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        if best is None or ms < best[0]:
            best = (
                ms,
                "fused"
                if "fused" in mode
                else "foreach"
                if mode["foreach"]
                else "single",
            )
        state_bytes = sum(
            t.nbytes
            for t in opt.state[p].values()
            if torch.is_tensor(t) and t.numel() >= N
        )
        del opt, p
    return {
        "torch_ms": best[0],
        "torch_mode": best[1],
        "torch_state_bytes_per_param": state_bytes / N,
    }


def audit_markdown(rows: dict) -> str:
    lines = [
        "Every elementwise optimizer, one 10M float32 leaf, torch's default "
        "arguments, params and state donated. Passes = full-size loop fusions "
        "(at least buffers + 1 without multi-output fusion); bytes = XLA's "
        "cost analysis of the compiled step; state = bytes per parameter; "
        "torch = its fastest CPU implementation of single-tensor, foreach "
        "and fused.",
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


def _child(opts: list[str], steps: int) -> dict:
    """Runs in the subprocess: compile and time each step under XLA_FLAGS."""

    def compiled_step(kind, make):
        params = {"w": jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32)}
        grads = {"w": jnp.full((N,), 1e-3, jnp.float32)}
        if kind == "optax":
            tx = make()

            def step(p, g, s):
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            state = tx.init(params)
        else:
            opt = make()
            step = opt.step
            if kind == "funcopt flat":
                layout = ff.layout(params, opt)
                params, grads = layout.pack(params), layout.pack(grads)
            state = opt.init(params)
        jitted = jax.jit(step, donate_argnums=(0, 2))
        compiled = jitted.lower(params, grads, state).compile()
        return compiled, params, grads, state

    out = {}
    for name in opts:
        make_fo, make_optax, _, _ = SPECS[name]
        for kind, make in (
            ("funcopt tree", make_fo),
            ("funcopt flat", make_fo),
            ("optax", make_optax),
        ):
            compiled, p, g, s = compiled_step(kind, make)
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            hlo = compiled.as_text()
            entry = hlo[hlo.index("ENTRY") :]
            passes = _count_full_size(entry, "fusion")
            copies = _count_full_size(entry, "copy")
            times = []
            for i in range(steps + 2):
                t0 = time.perf_counter()
                p, s = compiled(p, g, s)
                jax.block_until_ready((p, s))
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            out[f"{name}|{kind}"] = {
                "ms": 1e3 * statistics.median(times),
                "bytes_per_param": cost["bytes accessed"] / N,
                "passes": passes,
                "copies": copies,
            }
            del p, g, s, compiled
    return out


def _count_full_size(hlo_entry: str, op: str) -> int:
    """Instructions ``op`` whose float32 result has about N elements."""
    count = 0
    for dims in re.findall(rf"= f32\[([0-9,]+)\]\{{[0-9,]*\}} {op}\(", hlo_entry):
        size = 1
        for d in dims.split(","):
            size *= int(d)
        count += size >= N // 2
    return count


def _torch_times(opts: list[str], steps: int) -> dict:
    import numpy as np
    import torch

    out = {}
    for name in opts:
        for mode in ("foreach", "fused"):
            ps = [torch.tensor(np.linspace(-1, 1, N, dtype=np.float32))]
            ps[0].grad = torch.full((N,), 1e-3)
            cls_name, kwargs = SPECS[name][2]
            try:
                opt = getattr(torch.optim, cls_name)(ps, **kwargs, **{mode: True})
            except (TypeError, RuntimeError):
                out[f"{name}|torch {mode}"] = None
                continue
            times = []
            with torch.no_grad():
                for i in range(steps + 2):
                    t0 = time.perf_counter()
                    opt.step()
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
            out[f"{name}|torch {mode}"] = 1e3 * statistics.median(times)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opts", default=",".join(SPECS))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--audit", action="store_true", help="only the every-optimizer audit"
    )
    args = ap.parse_args()
    opts = args.opts.split(",")
    if args.child:
        print(json.dumps(_child(opts, args.steps)))
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = audit(args.steps)
    (out / "profile_audit.json").write_text(json.dumps(rows, indent=1))
    (out / "profile_audit.md").write_text(audit_markdown(rows))
    print(audit_markdown(rows))
    if args.audit:
        return

    by_flag = {}
    for flags in XLA_OPTIONS:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "--opts", args.opts]
            + ["--steps", str(args.steps)],
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
    torch_ms = _torch_times(opts, args.steps)

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
