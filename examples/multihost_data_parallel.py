"""Multi-host data-parallel training with funcopt and ``jax.distributed``.

Two processes on this machine (CPU, a loopback coordinator), two devices
each, train one small MLP data-parallel: every process feeds its own half of
each global batch, the gradient mean over the four devices is an all-reduce
that XLA inserts, and the Adam state is ZeRO-sharded over the ``data`` axis
(``fo.sharding``). The launcher then runs the same script as one process
(four devices, and one device) and checks that the results agree::

    python examples/multihost_data_parallel.py            # launch and compare

One worker by hand (what the launcher runs, once per process)::

    python examples/multihost_data_parallel.py --worker --process-id 0 \\
        --num-processes 2 --coordinator 127.0.0.1:12345 --out /tmp/p0.npz

The same code runs on real clusters; only the start differs:

* TPU pod / Cloud TPU VMs: run the script on every host with no arguments
  to ``jax.distributed.initialize()`` (it finds the coordinator itself);
  the mesh spans every chip of the slice.
* Multi-GPU hosts: one process per host (all its GPUs) or per GPU, with
  ``jax.distributed.initialize(coordinator_address="host0:1234",
  num_processes=N, process_id=i)``; under SLURM or Open MPI the arguments
  are found automatically. Drop ``jax_num_cpu_devices``.

In every case each process builds only its own slice of the batch
(``jax.make_array_from_process_local_data``) and calls the same jitted step;
shardings are global, so nothing else changes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 32
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=int(args.timeout),
        )
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, str(ROOT))
    import funcopt as fo
    from funcopt import sharding as fs

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    rep = fs.replicated(mesh)
    data = NamedSharding(mesh, P("data"))

    # the same data and init on every process (seeded); each feeds its slice
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(STEPS, GLOBAL_BATCH, 8)).astype(np.float32)
    ys = np.sin(xs.sum(-1, keepdims=True)).astype(np.float32)
    params = {
        "w1": (rng.normal(size=(8, 16)) / np.sqrt(8)).astype(np.float32),
        "b1": np.zeros((16,), np.float32),
        "w2": (rng.normal(size=(16, 1)) / 4).astype(np.float32),
        "b2": np.zeros((1,), np.float32),
    }
    p_sh = jax.tree.map(lambda _: rep, params)
    params = jax.device_put(params, p_sh)

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        r = h @ p["w2"] + p["b2"] - y
        return jnp.mean(r * r)

    opt = fo.adam(lr=0.05)
    zero = fs.zero_shardings(params, zero_axis="data")  # the update's layout
    state = fs.init(opt, params, zero_axis="data")  # born ZeRO-sharded
    st_sh = fs.state_shardings(opt, params, zero_axis="data")

    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        grads = fs.constrain(grads, zero)  # ZeRO-2: reduce-scatter
        grads, _ = fo.clip_grad_norm(grads, 1.0)  # global norm: XLA all-reduces
        new_p, s = opt.step(fs.constrain(p, zero), grads, s)
        return fs.constrain(new_p, p_sh), s, loss  # all-gather the params

    step = jax.jit(step, out_shardings=(p_sh, st_sh, rep))
    per_process = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * per_process
    losses = []
    for t in range(STEPS):
        x = jax.make_array_from_process_local_data(data, xs[t, lo : lo + per_process])
        y = jax.make_array_from_process_local_data(data, ys[t, lo : lo + per_process])
        params, state, loss = step(params, state, x, y)
        losses.append(np.asarray(loss.addressable_data(0)))
    mem = fs.bytes_per_device(state)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices, "
        f"final loss {float(losses[-1]):.6f}, "
        f"Adam state bytes per local device {sorted(set(mem.values()))}"
    )
    if args.out and jax.process_index() == 0:
        np.savez(
            args.out,
            losses=np.asarray(losses),
            **{k: np.asarray(v.addressable_data(0)) for k, v in params.items()},
        )
    if args.num_processes > 1:
        jax.distributed.shutdown()


def worker_cmd(
    out, local_devices, timeout, num_processes=1, process_id=0, coordinator=""
):
    return [
        sys.executable,
        __file__,
        "--worker",
        "--timeout",
        str(timeout),
        "--out",
        str(out),
        "--local-devices",
        str(local_devices),
        "--num-processes",
        str(num_processes),
        "--process-id",
        str(process_id),
        "--coordinator",
        coordinator,
    ]


def launch(args) -> int:
    """Two processes (2 devices each), then 1 process × 4 and 1 × 1; compare."""
    import tempfile
    import time

    deadline = time.monotonic() + args.timeout  # one limit for the whole launch

    def remaining() -> float:
        return max(1.0, deadline - time.monotonic())

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        coordinator = f"127.0.0.1:{free_port()}"
        procs = [
            subprocess.Popen(
                worker_cmd(tmp / "multi.npz", 2, args.timeout, 2, i, coordinator),
                env=env,
            )
            for i in range(2)
        ]
        try:
            codes = [p.wait(timeout=remaining()) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            print(f"worker exit codes {codes}")
            return 1
        for n in (4, 1):
            subprocess.run(
                worker_cmd(tmp / f"single{n}.npz", n, args.timeout),
                env=env,
                check=True,
                timeout=remaining(),
            )
        multi = dict(np.load(tmp / "multi.npz"))
        single4 = dict(np.load(tmp / "single4.npz"))
        single1 = dict(np.load(tmp / "single1.npz"))
    ok = True
    for n, single in ((4, single4), (1, single1)):
        bitwise = all(multi[k].tobytes() == single[k].tobytes() for k in multi)
        diff = max(float(np.max(np.abs(multi[k] - single[k]))) for k in multi)
        close = all(
            np.allclose(multi[k], single[k], rtol=1e-5, atol=1e-6) for k in multi
        )
        ok &= close
        print(
            f"2 processes x 2 devices vs 1 process x {n} device(s): "
            f"max |diff| {diff:.3g}, bit for bit: {bitwise}, allclose: {close}"
        )
    # the gradient all-reduce sums in another order across processes (gloo)
    # than within one, so the runs agree to float32 rounding, not bit for bit
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="run one process")
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--coordinator", default="")
    ap.add_argument("--local-devices", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds before a hung launch (workers, their connection) is given up",
    )
    args = ap.parse_args()
    if args.worker:
        train(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
