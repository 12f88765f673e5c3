"""Sharded vs single-device steps on 8 simulated CPU devices; prints a JSON report.

Run by ``tests/test_sharding.py`` in a subprocess (the device count must be
fixed before JAX initialises, so the rest of the suite keeps one device):

    python tests/_sharded_checks.py

For every optimizer of ``tests.parity.cases.OPT_CASES`` (its last flag
combination, every flag on), plus SparseAdam, LBFGS and global-norm
clipping, it runs the same steps three ways on a ``("data", "model")`` = (4, 2) mesh:

* ``ref``: ``jax.jit(opt.step)`` on one device;
* ``plain``: params model-sharded, state from ``fo.sharding.init``, and a
  ``jax.jit(opt.step)`` *without* shardings given, so that the report can
  check the state comes out exactly as it went in;
* ``zero``: ``fo.sharding.zero_step`` with the state split over ``data``.

and reports, per run, whether the results are bit-identical, the largest
difference, the output shardings and the collectives in the compiled HLO.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import sparse as jsparse  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import funcopt as fo  # noqa: E402
from funcopt import sharding as fs  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

STEPS = 3
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def make_mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def tree_and_specs(rng, kind: str, complex_ok: bool):
    """numpy params and their PartitionSpecs (model-sharded, some replicated)."""
    if kind == "matrices":  # Muon: 2-D leaves only
        params = {
            "frozen": np.arange(4, dtype=np.int32),
            "sq": rng.normal(size=(8, 8)).astype(np.float32),
            "tall": rng.normal(size=(16, 4)).astype(np.float32),
            "wide": rng.normal(size=(8, 12)).astype(np.float32),
        }
        specs = {"frozen": P(), "sq": P(), "tall": P("model"), "wide": P(None, "model")}
        return params, specs
    params = {
        "b": rng.normal(size=(12,)).astype(np.float32),
        "frozen": np.arange(4, dtype=np.int32),
        "k": rng.normal(size=(4, 2, 6)).astype(np.float32),
        "s": np.asarray(rng.normal(), np.float32),
        "tall": rng.normal(size=(16, 4)).astype(np.float32),
        "w": rng.normal(size=(8, 12)).astype(np.float32),
    }
    specs = {
        "b": P("model"),
        "frozen": P(),
        "k": P(),
        "s": P(),
        "tall": P("model"),
        "w": P(None, "model"),
    }
    if complex_ok:
        params["c"] = (rng.normal(size=(8, 6)) + 1j * rng.normal(size=(8, 6))).astype(
            np.complex64
        )
        specs["c"] = P(None, "model")
    return params, specs


def grads_for(rng, params):
    def one(p):
        if not jnp.issubdtype(p.dtype, jnp.inexact):
            return None
        g = rng.normal(size=p.shape)
        if np.iscomplexobj(p):
            g = g + 1j * rng.normal(size=p.shape)
        return g.astype(p.dtype)

    return [jax.tree.map(one, params) for _ in range(STEPS)]


def compare(a_tree, b_tree):
    """(bit-identical, max abs diff, max rel diff) over all leaves."""
    bitwise, max_abs, max_rel = True, 0.0, 0.0
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        a, b = np.asarray(a), np.asarray(b)
        bitwise &= a.tobytes() == b.tobytes()
        if a.size and np.issubdtype(a.dtype, np.inexact):
            d = np.abs(a.astype(np.complex128) - b.astype(np.complex128))
            max_abs = max(max_abs, float(d.max()))
            scale = np.maximum(np.abs(a.astype(np.complex128)), 1e-30)
            max_rel = max(max_rel, float((d / scale).max()))
    return bitwise, max_abs, max_rel


def same_shardings(tree, shardings):
    """Every array of ``tree`` carries the expected sharding (None leaves skip)."""
    ok = []
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        ok.append(x.sharding.is_equivalent_to(s, x.ndim))
    return len(jax.tree.leaves(tree)) == len(jax.tree.leaves(shardings)) and all(ok)


def single_device_run(opt, np_params, grads_seq):
    """``jax.jit(opt.step)`` on one device over the gradients: the reference
    (params, state)."""
    step = jax.jit(opt.step)
    p, st = np_params, opt.init(np_params)
    for g in grads_seq:
        p, st = step(p, g, st)
    return p, st


def run_steps(step, params, state, grads_seq, shardings, state_shardings):
    """``step`` over the gradients; whether every output kept its sharding."""
    keeps = True
    for g in grads_seq:
        params, state = step(params, g, state)
        keeps &= same_shardings(params, shardings)
        keeps &= same_shardings(state, state_shardings)
    return params, state, keeps


def result(
    name,
    kwargs,
    mode,
    ref,
    got,
    shardings_kept,
    collectives=None,
    init_sharded=True,
    eager_init_follows=True,
):
    """One report row: ``got`` against the single-device ``ref``."""
    bitwise, max_abs, max_rel = compare(ref, got)
    return dict(
        name=name,
        kwargs=kwargs,
        mode=mode,
        bitwise=bitwise,
        max_abs=max_abs,
        max_rel=max_rel,
        shardings_kept=shardings_kept,
        init_sharded=init_sharded,
        eager_init_follows=eager_init_follows,
        collectives=collectives or {},
    )


def collectives(compiled) -> dict[str, int]:
    text = compiled.as_text()
    return {c: len(re.findall(rf"\s{c}(?:-start)?\(", text)) for c in COLLECTIVES}


def run_optimizer(mesh, name, factory, kwargs, kind, rng):
    opt = factory(**kwargs)
    definition = getattr(opt, "definition", None)
    complex_ok = bool(getattr(definition, "supports_complex", False))
    np_params, specs = tree_and_specs(rng, kind, complex_ok)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    grads_seq = grads_for(rng, np_params)
    ref = single_device_run(opt, np_params, grads_seq)

    out = []
    # plain: the state follows the params; jit is given no shardings at all
    params = jax.device_put(np_params, shardings)
    st_sh = fs.state_shardings(opt, params)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    # the state is created from abstract params, directly sharded (unless it
    # copies parameter values, as schedule-free's z)
    state = fs.init(opt, params if fs._reads_values(opt, params) else abstract)
    init_ok = abstract_ok = same_shardings(state, st_sh)
    # eager init: zeros_like puts every buffer shaped like its param on the
    # param's sharding (buffers of other shapes, 0-d scalars, are made on one
    # device: fs.init places those)
    eager = opt.init(params)
    treedef = jax.tree.structure(params)
    eager_ok = all(
        x.sharding.is_equivalent_to(p.sharding, p.ndim)
        for k in eager.slots
        for x, p in zip(treedef.flatten_up_to(eager.slots[k]), jax.tree.leaves(params))
        if x is not None and p.ndim and x.shape == p.shape
    )
    sharded_grads = [jax.device_put(g, shardings) for g in grads_seq]
    # Prodigy keeps flattened (sliced) copies of each parameter (``s``, ``p0``):
    # with no annotations XLA propagates the parameter's sharding onto them, so
    # its jitted step is given the state's shardings explicitly.
    pinned = {"out_shardings": (shardings, st_sh)} if name.startswith("prodigy") else {}
    with fs.per_leaf():
        step = (
            jax.jit(opt.step, **pinned).lower(params, sharded_grads[0], state).compile()
        )
    params, state, keeps = run_steps(
        step, params, state, sharded_grads, shardings, st_sh
    )
    out.append(
        result(
            name,
            repr(kwargs),
            "plain",
            ref,
            (params, state),
            keeps,
            collectives(step),
            init_sharded=init_ok and abstract_ok,
            eager_init_follows=eager_ok,
        )
    )

    # ZeRO: state split over "data", params stay model-sharded
    params = jax.device_put(np_params, shardings)
    st_sh = fs.state_shardings(opt, params, zero_axis="data")
    state = fs.init(opt, params, zero_axis="data")
    step = fs.zero_step(opt, params).lower(params, sharded_grads[0], state).compile()
    keeps = same_shardings(state, st_sh)
    params, state, kept = run_steps(
        step, params, state, sharded_grads, shardings, st_sh
    )
    keeps &= kept
    out.append(
        result(
            name, repr(kwargs), "zero", ref, (params, state), keeps, collectives(step)
        )
    )
    return out


# the optimizers whose default step is a native kernel on CPU
# (`funcopt.optim._fused_native`), with flags that reach their buffers
NATIVE = {
    "adam": (fo.adam, {"weight_decay": 0.1}),
    "adamw": (fo.adamw, {"amsgrad": True}),
    "sgd": (fo.sgd, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "adagrad": (fo.adagrad, {"lr_decay": 0.01}),
    "rmsprop": (fo.rmsprop, {"centered": True, "momentum": 0.9}),
    "adamax": (fo.adamax, {"weight_decay": 0.1}),
    "adadelta": (fo.adadelta, {"weight_decay": 0.1}),
    "radam": (fo.radam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    "rprop": (fo.rprop, {}),
    "nadam": (fo.nadam, {"weight_decay": 0.1}),
    "asgd": (fo.asgd, {"t0": 1.0}),
}


def kernel_calls(compiled) -> int:
    return compiled.as_text().count('custom_call_target="funcopt_')


def float_copies(compiled) -> int:
    """Copies of float arrays (0-d values aside) in the compiled step, but
    for those fused into the loop that computes their operand (no pass of
    their own)."""
    computations = compiled.as_text().split("\n\n")
    unfused = [c for c in computations if not c.startswith("%fused_computation")]
    copy = r"= f(?:32|64)\[[^\]]+\]\S* copy(?:-start)?\("
    return len(re.findall(copy, "\n\n".join(unfused)))


def check_native_kernels(mesh, rng):
    """The native kernels (torch's default steps in C++) on sharded params:
    each device runs the kernel on its own piece of each leaf
    (`_fused_native._partitioned`), with the single-device bits. The plain
    step is donated: in place, no collective; ZeRO all-gathers the params."""
    out = []
    for name, (factory, kwargs) in NATIVE.items():
        opt = factory(**kwargs)
        np_params, specs = tree_and_specs(rng, "mixed", complex_ok=False)
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        grads_seq = grads_for(rng, np_params)
        ref = single_device_run(opt, np_params, grads_seq)
        sharded_grads = [jax.device_put(g, shardings) for g in grads_seq]
        for mode in ("plain", "zero"):
            params = jax.device_put(np_params, shardings)
            zero = "data" if mode == "zero" else None
            st_sh = fs.state_shardings(opt, params, zero_axis=zero)
            state = fs.init(opt, params, zero_axis=zero)
            if zero:
                step = fs.zero_step(opt, params)
            else:
                step = jax.jit(opt.step, donate_argnums=(0, 2))
            with fs.per_leaf():
                compiled = step.lower(params, sharded_grads[0], state).compile()
            params, state, keeps = run_steps(
                compiled, params, state, sharded_grads, shardings, st_sh
            )
            row = result(
                f"native:{name}", repr(kwargs), mode, ref, (params, state), keeps,
                collectives(compiled),
            )  # fmt: skip
            row["kernel_calls"] = kernel_calls(compiled)
            row["float_copies"] = float_copies(compiled)
            ref_step = jax.jit(opt.step)
            row["ref_kernel_calls"] = kernel_calls(
                ref_step.lower(np_params, grads_seq[0], opt.init(np_params)).compile()
            )
            out.append(row)
    out.append(check_without_shardy(mesh, rng))
    out.append(check_vmap(mesh, rng))
    out.append(check_update(mesh, rng))
    return out


def check_update(mesh, rng):
    """`update` + `optax.apply_updates` (the optax protocol: the JAX rules)
    on sharded params, donated: the bits of the run on one device, no
    kernel, no collective, no float copy."""
    import optax

    opt = fo.adamw(amsgrad=True)

    def train_step(params, target, state):
        grads = jax.tree.map(lambda p, t: None if t is None else p - t, params, target)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    np_params, specs = tree_and_specs(rng, "mixed", complex_ok=False)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    grads_seq = grads_for(rng, np_params)
    one_device = jax.jit(train_step)
    p, st = np_params, opt.init(np_params)
    for g in grads_seq:
        p, st = one_device(p, g, st)
    params = jax.device_put(np_params, shardings)
    state = fs.init(opt, params)
    sharded_grads = [jax.device_put(g, shardings) for g in grads_seq]
    step = jax.jit(train_step, donate_argnums=(0, 2))
    with fs.per_leaf():
        compiled = step.lower(params, sharded_grads[0], state).compile()
    params, state, keeps = run_steps(
        compiled, params, state, sharded_grads, shardings,
        fs.state_shardings(opt, params),
    )  # fmt: skip
    row = result("update:adamw", "{'amsgrad': True}", "plain", (p, st),
                 (params, state), keeps, collectives(compiled))  # fmt: skip
    row["kernel_calls"] = kernel_calls(compiled)
    row["float_copies"] = float_copies(compiled)
    return row


def check_vmap(mesh, rng):
    """`vmap` of a sharded kernel step (custom_partitioning has no batching
    rule: `_partitioned`'s custom_vmap runs each batch element in turn): the
    bits of each element's single-device step; a batch of 0 runs too."""
    opt = fo.nadam(weight_decay=0.1)
    batch = 3
    params = {"w": rng.normal(size=(batch, 8, 12)).astype(np.float32)}
    grads = {"w": rng.normal(size=(batch, 8, 12)).astype(np.float32)}
    state = jax.vmap(opt.init)(params)
    ref = [
        single_device_run(opt, {"w": params["w"][i]}, [{"w": grads["w"][i]}])
        for i in range(batch)
    ]
    ref = jax.tree.map(lambda *xs: np.stack(xs), *ref)
    sharding = {"w": NamedSharding(mesh, P(None, None, "model"))}
    step = jax.jit(jax.vmap(opt.step))
    compiled = step.lower(
        jax.device_put(params, sharding), jax.device_put(grads, sharding), state
    ).compile()
    got = compiled(
        jax.device_put(params, sharding), jax.device_put(grads, sharding), state
    )
    empty = {"w": np.zeros((0, 8, 12), np.float32)}
    new_empty, _ = step(empty, empty, jax.vmap(opt.init)(empty))
    row = result("native-vmap:nadam", "{'weight_decay': 0.1}", "plain", ref, got,
                 True, collectives(compiled))  # fmt: skip
    row["kernel_calls"] = kernel_calls(compiled)
    row["empty_batch_shape"] = list(new_empty["w"].shape)
    return row


def check_without_shardy(mesh, rng):
    """XLA's older partitioner (GSPMD) has no use for the kernels' Shardy
    rule: sharded steps take the JAX rules (no kernel call, no crash)."""
    opt = fo.adam(weight_decay=0.1)
    np_params, specs = tree_and_specs(rng, "mixed", complex_ok=False)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    grads_seq = grads_for(rng, np_params)
    ref = single_device_run(opt, np_params, grads_seq)
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        params = jax.device_put(np_params, shardings)
        state = fs.init(opt, params)
        sharded_grads = [jax.device_put(g, shardings) for g in grads_seq]
        with fs.per_leaf():
            step = jax.jit(opt.step).lower(params, sharded_grads[0], state).compile()
        st_sh = fs.state_shardings(opt, params)
        params, state, keeps = run_steps(
            step, params, state, sharded_grads, shardings, st_sh
        )
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)
    row = result("gspmd:adam", "{'weight_decay': 0.1}", "plain", ref,
                 (params, state), keeps, collectives(step))  # fmt: skip
    row["kernel_calls"] = kernel_calls(step)
    return row


def check_sparse_adam(mesh, rng):
    """SparseAdam: dense params and state sharded, the BCOO gradient replicated."""
    opt = fo.sparse_adam(lr=0.05)
    table = rng.normal(size=(16, 4)).astype(np.float32)
    sh = {"emb": NamedSharding(mesh, P("data", "model"))}
    grads_seq = []
    for _ in range(STEPS):
        ids = rng.integers(0, 16, size=5)
        rows = rng.normal(size=(5, 4)).astype(np.float32)
        grads_seq.append(
            {"emb": jsparse.BCOO((rows, ids[:, None].astype(np.int32)), shape=(16, 4))}
        )
    ref = single_device_run(opt, {"emb": table}, grads_seq)
    out = []
    for mode in ("plain", "zero"):
        params = jax.device_put({"emb": table}, sh)
        zero = "data" if mode == "zero" else None
        st_sh = fs.state_shardings(opt, params, zero_axis=zero)
        state = fs.init(opt, params, zero_axis=zero)
        step = jax.jit(opt.step, out_shardings=(sh, st_sh))
        for g in grads_seq:
            params, state = step(params, g, state)
        kept = same_shardings(state, st_sh)
        out.append(
            result("sparse_adam", "{'lr': 0.05}", mode, ref, (params, state), kept)
        )
    return out


def least_squares(rng):
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = rng.normal(size=(32, 12)).astype(np.float32)
    params = {
        "w": (0.1 * rng.normal(size=(8, 12))).astype(np.float32),
        "b": np.zeros((12,), np.float32),
    }

    def loss(params, x, y):
        r = x @ params["w"] + params["b"] - y
        return jnp.mean(r * r) + 0.01 * jnp.sum(params["w"] * params["w"])

    return params, x, y, loss


def check_lbfgs(mesh, rng, dtype, max_iter):
    """LBFGS (flat-vector state, dot products: global reductions).

    Its sharded dot products sum in another order, and over many iterations
    L-BFGS amplifies float32 rounding (the curvature pairs of a nearly
    converged quadratic are mostly rounding noise), so the long run is
    checked in float64 and float32 over two iterations.
    """
    params0, x, y, loss = least_squares(rng)
    params0, x, y = jax.tree.map(lambda a: a.astype(dtype), (params0, x, y))
    out = []
    for ls in (None, "strong_wolfe"):
        opt = fo.lbfgs(lr=0.5, max_iter=max_iter, history_size=5, line_search_fn=ls)

        def run(params, state, x, y, opt=opt):
            return opt.step(params, state, jax.value_and_grad(lambda p: loss(p, x, y)))

        ref = jax.jit(run)(params0, opt.init(params0), x, y)
        for mode in ("plain", "zero"):
            sh = {
                "w": NamedSharding(mesh, P(None, "model")),
                "b": NamedSharding(mesh, P("model")),
            }
            data = NamedSharding(mesh, P("data"))
            params = jax.device_put(params0, sh)
            zero = "data" if mode == "zero" else None
            st_sh = fs.state_shardings(opt, params, zero_axis=zero)
            state = fs.init(opt, params, zero_axis=zero)
            step = jax.jit(run, out_shardings=(sh, st_sh, fs.replicated(mesh)))
            got = step(params, state, jax.device_put(x, data), jax.device_put(y, data))
            out.append(
                result(
                    f"lbfgs(line_search_fn={ls!r})",
                    f"{np.dtype(dtype).name}, max_iter={max_iter}",
                    mode,
                    ref,
                    got,
                    same_shardings(got[1], st_sh),
                )
            )
    return out


def check_clip(mesh, rng):
    """A data-parallel train step: grads, fo.clip_grad_norm, adam; ZeRO-2 too."""
    params0, x, y, loss = least_squares(rng)
    opt = fo.adam(lr=0.01)

    def train(params, state, x, y, grad_shardings=None):
        grads = jax.grad(loss)(params, x, y)
        if grad_shardings is not None:  # ZeRO-2: reduce-scatter the grads
            grads = fs.constrain(grads, grad_shardings)
        grads, norm = fo.clip_grad_norm(grads, 0.5)
        params, state = opt.step(params, grads, state)
        return params, state, norm

    ref = jax.jit(train)(params0, opt.init(params0), x, y)
    ref = jax.jit(train)(*ref[:2], x, y)
    out = []
    for mode in ("plain", "zero"):
        sh = {
            "w": NamedSharding(mesh, P(None, "model")),
            "b": NamedSharding(mesh, P("model")),
        }
        data = NamedSharding(mesh, P("data"))
        params = jax.device_put(params0, sh)
        zero = "data" if mode == "zero" else None
        st_sh = fs.state_shardings(opt, params, zero_axis=zero)
        state = fs.init(opt, params, zero_axis=zero)
        local = fs.zero_shardings(params) if zero else None

        def step_fn(params, state, x, y, local=local, sh=sh):
            if local is None:
                return train(params, state, x, y)
            # ZeRO: run the update on the data slices, then all-gather params
            p_local = fs.constrain(params, local)
            new_p, new_s, norm = train(p_local, state, x, y, grad_shardings=local)
            return fs.constrain(new_p, sh), new_s, norm

        step = jax.jit(step_fn, out_shardings=(sh, st_sh, fs.replicated(mesh)))
        xs, ys = jax.device_put(x, data), jax.device_put(y, data)
        got = step(params, state, xs, ys)
        got = step(*got[:2], xs, ys)
        out.append(
            result(
                "clip_grad_norm+adam",
                "{'max_norm': 0.5}",
                mode,
                ref,
                got,
                same_shardings(got[1], st_sh),
                collectives(step.lower(*got[:2], xs, ys).compile()),
            )
        )
    return out


def check_train_state(mesh, rng):
    """A donated `fo.TrainState` step (zero_grad, backward, step) on
    model-sharded params: the same bits as on one device, the state keeps
    its shardings, and nothing moves between devices (the gradient of a
    squared distance is elementwise)."""
    params0 = {
        "w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(8), jnp.float32),
    }
    target = jax.tree.map(lambda p: p * 0.5, params0)
    opt = fo.adamw(lr=0.01)

    def loss(params, target):
        pairs = zip(jax.tree.leaves(params), jax.tree.leaves(target))
        return sum(jnp.sum((p - t) ** 2) for p, t in pairs)

    def train_step(ts, target):
        ts, _ = ts.zero_grad().backward(loss, target)
        return ts.step()

    def run(ts, target):
        step = jax.jit(train_step, donate_argnums=0)
        for _ in range(STEPS):
            ts = step(ts, target)
        return ts, step

    ref, _ = run(fo.TrainState.create(jax.tree.map(jnp.copy, params0), opt), target)
    sh = {
        "w": NamedSharding(mesh, P("data", "model")),
        "b": NamedSharding(mesh, P("model")),
    }
    params, target = jax.device_put(params0, sh), jax.device_put(target, sh)
    ts = fo.TrainState.create(params, opt)
    ts = dataclasses.replace(ts, opt_state=fs.init(opt, params))
    got, step = run(ts, target)
    st_sh = fs.state_shardings(opt, params)
    kept = same_shardings(got.params, sh) and same_shardings(got.grads, sh)
    kept &= same_shardings(got.opt_state, st_sh)
    compiled = step.lower(got, target).compile()
    state = (got.params, got.opt_state, got.grads)
    return [
        result(
            "train_state+adamw",
            "{'lr': 0.01}",
            "plain",
            (ref.params, ref.opt_state, ref.grads),
            state,
            kept,
            collectives(compiled),
        )
    ]


def main():
    from tests.parity.cases import OPT_CASES

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    results = []
    names = []
    for case in OPT_CASES:
        names.append(case.name)
        combos = case.combos()
        kind = "matrices" if case.tree is not None else "mixed"
        # the last combination has every flag on (as the eager parity tests)
        results += run_optimizer(mesh, case.name, case.factory, combos[-1], kind, rng)
    results += check_native_kernels(mesh, rng)
    results += check_sparse_adam(mesh, rng)
    results += check_lbfgs(mesh, rng, np.float32, 2)
    with jax.enable_x64(True):
        results += check_lbfgs(mesh, rng, np.float64, 8)
    results += check_clip(mesh, rng)
    results += check_train_state(mesh, rng)
    print(json.dumps({"cases": names, "results": results}))


if __name__ == "__main__":
    main()
