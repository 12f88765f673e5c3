"""Sharded and ZeRO-sharded optimizer state (``funcopt.sharding``).

The 8-device checks run once, in a subprocess (``tests/_sharded_checks.py``):
the simulated device count must be set before JAX initialises, and the rest
of the suite keeps its single device.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from filelock import FileLock
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import funcopt as fo
from funcopt import sharding as fs
from tests._subprocess import HANG_GUARD_S
from tests.parity.cases import OPT_CASES

# the 8-device subprocess (~80 s) runs once per session, whichever xdist worker
# collects the tests that read it first, and it starts at collection
# (`start_sharded_checks`, called by tests/conftest.py), in the background:
# the workers keep running other tests instead of both waiting ~80 s for it
# at the first test that reads its report (measured: two workers each blocked
# 97 s). Grouping the module onto one worker is not enough: pytest 9.2
# ignores the node id suffix through which pytest-xdist 3.8's ``--dist
# loadgroup`` groups tests (measured: two workers each ran it, 77 s apiece)
pytestmark = pytest.mark.xdist_group("sharded_subprocess")
ROOT = pathlib.Path(__file__).parent.parent
# elementwise optimizers whose sharded steps are bit-identical to one device
BITWISE = {"sgd", "adam", "adamw", "sparse_adam", "train_state+adamw"}
# torch's elementwise rules: a sharded step needs no communication at all
ELEMENTWISE = {
    "sgd", "adam", "adamw", "adamax", "nadam", "radam", "rmsprop", "adagrad",
    "adadelta", "rprop", "asgd",
}  # fmt: skip
# the optimizers whose default step is a native kernel (`_sharded_checks.NATIVE`)
NATIVE = (
    "adam", "adamw", "sgd", "adagrad", "rmsprop", "adamax", "adadelta", "radam",
    "rprop", "nadam", "asgd",
)  # fmt: skip
REPORT = "sharded_checks.json"
# the child this process started: (Popen, its stdout and stderr files)
_CHILD: dict[str, tuple] = {}


def start_sharded_checks(shared: pathlib.Path) -> None:
    """Start `tests/_sharded_checks.py` now, unless a worker of this run has:
    its report is published in `shared` (the run's base temp directory, common
    to all xdist workers) by :func:`_publish`."""
    with FileLock(f"{shared / REPORT}.lock"):
        started = shared / f"{REPORT}.started"
        if started.exists():
            return
        started.touch()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = open(shared / f"{REPORT}.stdout", "w+")  # noqa: SIM115 - kept open
    err = open(shared / f"{REPORT}.stderr", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "tests/_sharded_checks.py"],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=err,
        text=True,
    )
    _CHILD[str(shared)] = (proc, out, err)


def _publish(shared: pathlib.Path) -> None:
    """Wait for this process's child, if it started one; write its report (or
    its failure) to `shared` for every worker."""
    child = _CHILD.pop(str(shared), None)
    if child is None:
        return
    proc, out, err = child
    try:
        proc.wait(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close()
    err.close()
    if proc.returncode == 0:
        result = {"report": json.loads(stdout.strip().splitlines()[-1])}
    else:
        result = {"error": f"exit {proc.returncode}: {stderr[-4000:]}"}
    tmp = shared / f"{REPORT}.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(shared / REPORT)


def publish_sharded_checks(shared: pathlib.Path) -> None:
    """At session end: a worker that started the child publishes its report
    even if none of its own tests read it (another worker's may)."""
    _publish(shared)


@pytest.fixture(scope="session")
def report(tmp_path_factory, worker_id):
    """The subprocess's JSON report, computed once for all xdist workers
    (pytest-xdist's documented pattern: files in the run's shared base temp
    directory, the start guarded by a file lock)."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    start_sharded_checks(shared)  # no-op where collection started it
    _publish(shared)  # this process's own child, if any
    path = shared / REPORT
    for _ in range(HANG_GUARD_S * 10):
        if path.is_file():
            break
        time.sleep(0.1)
    result = json.loads(path.read_text())
    assert "error" not in result, result.get("error")
    return result["report"]


def test_every_optimizer_is_checked(report):
    names = {r["name"] for r in report["results"]}
    assert {c.name for c in OPT_CASES} <= names
    assert "sparse_adam" in names
    assert {
        "lbfgs(line_search_fn=None)",
        "lbfgs(line_search_fn='strong_wolfe')",
    } <= names
    assert "clip_grad_norm+adam" in names
    assert "train_state+adamw" in names
    assert {r["mode"] for r in report["results"]} == {"plain", "zero"}


def test_sharded_steps_equal_single_device(report):
    for r in report["results"]:
        # float32 params of order 1: a few ulp, absolute or relative (some
        # states hold large values, e.g. LAMB's); sharded reductions (norms,
        # trust ratios, Newton-Schulz, dot products) sum in another order
        tol = 1e-9 if "float64" in r["kwargs"] else 1e-6
        assert r["max_abs"] <= tol or r["max_rel"] <= tol, r
        if r["name"] in BITWISE:
            assert r["bitwise"], r


def test_native_kernels_run_per_device_with_the_same_bits(report):
    """The default steps' native kernels on model-sharded params (5 float
    leaves: sharded on either dimension, replicated, 0-d): every device runs
    each leaf's kernel on its piece; bit for bit the single-device step (the
    kernel too); the donated plain step in place (no float copy) with no
    collective, the ZeRO step all-gathering the params only."""
    rows = [r for r in report["results"] if r["name"].startswith("native:")]
    assert len(rows) == 2 * len(NATIVE), [r["name"] for r in rows]
    assert {r["name"] for r in rows} == {f"native:{n}" for n in NATIVE}
    for r in rows:
        assert r["bitwise"], r
        assert r["ref_kernel_calls"] == 5, r
        assert r["kernel_calls"] == 5, r
        c = r["collectives"]
        if r["mode"] == "plain":
            assert not any(c.values()), r
            assert r["float_copies"] == 0, r
        else:
            assert c["all-reduce"] == 0 and c["reduce-scatter"] == 0, r
            assert c["collective-permute"] == 0, r


def test_without_shardy_sharded_steps_take_the_jax_rules(report):
    """With `jax_use_shardy_partitioner` off (GSPMD, which reads no Shardy
    rule) a sharded step runs the JAX rule: no kernel, the same numbers
    within float32 rounding (the single-device step is the kernel's)."""
    (r,) = [r for r in report["results"] if r["name"] == "gspmd:adam"]
    assert r["kernel_calls"] == 0, r
    assert r["max_abs"] <= 1e-6 or r["max_rel"] <= 1e-6, r
    assert r["shardings_kept"] and not any(r["collectives"].values()), r


def test_vmap_of_a_sharded_kernel_step_runs_each_element(report):
    """`jax.vmap(opt.step)` on sharded params: one kernel call per batch
    element (3), each element's single-device bits, no collective; a batch
    of 0 gives an empty batch."""
    (r,) = [r for r in report["results"] if r["name"] == "native-vmap:nadam"]
    assert r["bitwise"], r
    assert r["kernel_calls"] == 3, r
    assert not any(r["collectives"].values()), r
    assert r["empty_batch_shape"] == [0, 8, 12], r


def test_sharded_update_runs_the_jax_rules(report):
    """`update` + `apply_updates` on model-sharded params, donated: the JAX
    rules (`_fused_native.jax_rules_only`), no kernel; the single-device
    bits, no collective, no float copy."""
    (r,) = [r for r in report["results"] if r["name"] == "update:adamw"]
    assert r["bitwise"], r
    assert r["kernel_calls"] == 0, r
    assert not any(r["collectives"].values()), r
    assert r["float_copies"] == 0, r


def test_state_follows_and_keeps_its_sharding(report):
    for r in report["results"]:
        assert r["shardings_kept"], r
        assert r["init_sharded"], r
        assert r["eager_init_follows"], r


def test_plain_step_moves_nothing(report):
    """Elementwise rules on sharded params: no collective in the compiled step."""
    for r in report["results"]:
        if r["mode"] == "plain" and r["name"] in ELEMENTWISE:
            assert not any(r["collectives"].values()), r


def test_train_state_step_moves_nothing(report):
    """A donated TrainState step on sharded params (its gradient written in
    place before the step reads it, `funcopt._math.materialized`): no
    collective."""
    (r,) = [r for r in report["results"] if r["name"] == "train_state+adamw"]
    assert not any(r["collectives"].values()), r


def test_zero_step_gathers_params_only(report):
    """ZeRO: the update runs on slices; XLA all-gathers the new params."""
    for r in report["results"]:
        if r["mode"] == "zero" and r["name"] in ELEMENTWISE:
            c = r["collectives"]
            assert c["all-gather"] > 0, r
            assert c["all-reduce"] == 0 and c["reduce-scatter"] == 0, r


# ---------------------------------------------------------------------------
# single-device checks of the helpers (a 1x1 mesh)
# ---------------------------------------------------------------------------


def _mesh():
    return jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def test_state_shardings_structure_and_abstract_init():
    mesh = _mesh()
    params = {
        "w": jnp.ones((4, 6), jnp.float32),
        "v": jnp.ones((3,), jnp.float32),
        "i": jnp.arange(2),
    }
    sh = {
        "w": NamedSharding(mesh, P(None, "model")),
        "v": NamedSharding(mesh, P()),
        "i": NamedSharding(mesh, P()),
    }
    params = jax.device_put(params, sh)
    for opt in (fo.adafactor(), fo.asgd(), fo.rprop(), fo.lbfgs(history_size=3)):
        abstract = jax.eval_shape(lambda p: p, params)
        shardings = fs.state_shardings(opt, abstract, sh)
        state = fs.init(opt, abstract, sh)
        expected = jax.tree.leaves(opt.init(params))
        assert jax.tree.structure(state) == jax.tree.structure(opt.init(params))
        for x, s, e in zip(
            jax.tree.leaves(state), jax.tree.leaves(shardings), expected
        ):
            assert x.sharding.is_equivalent_to(s, x.ndim)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(e))


def test_zero_and_adafactor_specs():
    mesh = _mesh()
    params = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32)}
    sh = {"w": NamedSharding(mesh, P(None, "model"))}
    assert fs.zero_shardings(params, sh)["w"].spec == P("data", "model")
    st = fs.state_shardings(fo.adafactor(), params, sh, zero_axis="data")
    assert st.slots["row_var"]["w"].spec == P("data", None)
    # (1, 6): the data axis joins "model" on the last dim, the 1 stays whole
    assert st.slots["col_var"]["w"].spec == P(None, ("model", "data"))
    assert st.step.spec == P() and st.hparams["lr"].spec == P()


def test_chain_and_bytes_per_device():
    mesh = _mesh()
    params = {"w": jnp.ones((4, 4), jnp.float32)}
    sh = {"w": NamedSharding(mesh, P())}
    opt = fo.clip_grad_norm_transform(1.0)
    import optax

    chained = optax.chain(opt, fo.adam())
    shardings = fs.state_shardings(chained, params, sh)
    state = fs.init(chained, params, sh)
    assert jax.tree.structure(state) == jax.tree.structure(chained.init(params))
    assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(state))
    mem = fs.bytes_per_device(state)
    assert sum(mem.values()) == sum(x.nbytes for x in jax.tree.leaves(state))


@pytest.mark.parametrize(
    "factory", [fo.adam, fo.nadam, fo.sgd], ids=lambda f: f.__name__
)
def test_step_inside_shard_map_then_outside_it(factory):
    """A step traced inside `shard_map` and then outside it (per-device
    training, then a plain step for evaluation): funcopt's per-leaf programs
    are not reused across the two (the one traced inside names the mesh
    axis: outside it fails with "unbound axis name"), and both give the
    same bits. One leaf (a tree of several is packed, and took another
    path); one device, so it runs in this process."""
    mesh = jax.make_mesh((1,), ("i",), axis_types=(AxisType.Auto,))
    opt = factory(lr=1e-2, momentum=0.9) if factory is fo.sgd else factory(lr=1e-2)
    params = {"w": jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)}
    grads = jax.tree.map(lambda p: p * 0.1, params)

    def two_steps(params, grads):
        state = opt.init(params)
        params, state = opt.step(params, grads, state)
        return opt.step(params, grads, state)[0]

    specs = {"w": P("i")}
    inside = jax.jit(
        jax.shard_map(two_steps, mesh=mesh, in_specs=(specs, specs), out_specs=specs)
    )(params, grads)
    outside = jax.jit(two_steps)(params, grads)
    for k in params:
        np.testing.assert_array_equal(
            np.asarray(inside[k]).view(np.uint32),
            np.asarray(outside[k]).view(np.uint32),
        )


@pytest.mark.parametrize("name", NATIVE)
def test_step_under_an_explicit_mesh_keeps_the_sharding_type(name):
    """Under an explicit mesh (`jax.set_mesh` with `AxisType.Explicit`) the
    params and state a jitted step returns keep the params' sharding in
    their type, the native kernels' results included (typed as the buffers
    they are written over; they came back replicated before). One device,
    so it runs in this process."""
    mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,))
    opt = getattr(fo, name)(lr=1e-2)
    with jax.set_mesh(mesh):
        sharding = NamedSharding(mesh, P("x"))
        params = {
            "w": jax.device_put(jnp.linspace(-1, 1, 8, dtype=jnp.float32), sharding)
        }
        grads = jax.tree.map(lambda p: p * 0.1, params)
        new_params, state = jax.jit(opt.step)(params, grads, opt.init(params))
    assert jax.typeof(new_params["w"]).sharding.spec == P("x")
    for slot, leaves in state.slots.items():
        for leaf in jax.tree.leaves(leaves):
            if jnp.ndim(leaf):
                assert jax.typeof(leaf).sharding.spec == P("x"), slot


@pytest.mark.parametrize("factory", [fo.adam, fo.nadam], ids=lambda f: f.__name__)
def test_step_inside_shard_map_with_its_state_passed_per_device(factory):
    """Inside `shard_map` with the whole state passed in per device (step
    counts and hyperparameters too, so they vary over the mesh axis): the
    per-leaf programs are traced for counts of that type (traced for an
    invariant count, the step failed: "pvary is a invariant->variant
    collective"); the same bits as outside."""
    mesh = jax.make_mesh((1,), ("i",), axis_types=(AxisType.Auto,))
    opt = factory(lr=1e-2)
    params = {"w": jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)}
    grads = jax.tree.map(lambda p: p * 0.1, params)
    state = opt.init(params)
    state_specs = jax.tree.map(lambda x: P("i") if jnp.ndim(x) else P(), state)
    specs = (P("i"), P("i"), state_specs)
    inside = jax.jit(
        jax.shard_map(
            opt.step, mesh=mesh, in_specs=specs, out_specs=(P("i"), state_specs)
        )
    )(params, grads, state)
    outside = jax.jit(opt.step)(params, grads, state)
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(outside)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
