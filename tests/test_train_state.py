"""TrainState's backward/step/zero_grad against the same torch training loop.

Each scenario is a script of operations run in both libraries; parameters are
compared after every operation, so accumulation, forgotten ``zero_grad``,
``step`` before ``backward``, stale gradients and ``set_to_none`` all show.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt import _packing

# where the default layout packs the small leaves' state (one CPU device,
# the native library), and with it `TrainState`'s gradients
packs_by_default = pytest.mark.skipif(
    not _packing.native_available(),
    reason="no native library: the default layout is per leaf",
)

RNG = np.random.default_rng(0)
BATCHES = [(RNG.normal(size=(5, 3)), RNG.normal(size=(5, 2))) for _ in range(4)]
INIT = {
    "w": RNG.normal(size=(3, 2)),
    "b": RNG.normal(size=(2,)),
    "h": RNG.normal(size=(2,)),
}


def jax_loss(params, x, y, use_head=True):
    out = x @ params["w"] + params["b"]
    if use_head:
        out = out * params["h"]
    return jnp.mean((out - y) ** 2)


def torch_loss(params, x, y, use_head=True):
    out = torch.as_tensor(x) @ params["w"] + params["b"]
    if use_head:
        out = out * params["h"]
    return torch.mean((out - torch.as_tensor(y)) ** 2)


SCENARIOS = {
    "standard": ["bw0", "step", "zero", "bw1", "step", "zero", "bw2", "step"],
    "accumulate": ["bw0", "bw1", "step", "zero", "bw2", "bw3", "step"],
    "forgot_zero_grad": ["bw0", "step", "bw1", "step", "bw2", "step"],
    "step_before_backward": ["step", "step", "bw0", "step"],
    "stale_gradient": ["bw0", "step", "step", "step"],
    "keep_zeros": [
        "bw0",
        "step",
        "zero_keep",
        "step",
        "bw1",
        "step",
        "zero_keep",
        "step",
    ],
    "unused_param": [
        "bw0_nohead",
        "step",
        "zero",
        "bw1",
        "step",
        "zero",
        "bw2_nohead",
        "step",
    ],
}

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, fo.sgd, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    "adamw": (torch.optim.AdamW, fo.adamw, dict(lr=0.05, weight_decay=0.1)),
}


def run_scenario_torch(ops, torch_cls, kwargs):
    params = {k: torch.tensor(v, requires_grad=True) for k, v in INIT.items()}
    opt = torch_cls(list(params.values()), **kwargs)
    history = []
    for op in ops:
        if op.startswith("bw"):
            x, y = BATCHES[int(op[2])]
            torch_loss(params, x, y, use_head="nohead" not in op).backward()
        elif op == "step":
            opt.step()
        elif op == "zero":
            opt.zero_grad()
        elif op == "zero_keep":
            opt.zero_grad(set_to_none=False)
        history.append({k: v.detach().numpy().copy() for k, v in params.items()})
    return history


def run_scenario_funcopt(ops, factory, kwargs, jit):
    params = {k: jnp.asarray(v) for k, v in INIT.items()}
    ts = fo.TrainState.create(params, factory(**kwargs))
    maybe_jit = jax.jit if jit else (lambda f, **kw: f)
    backward = maybe_jit(
        lambda ts, x, y, use_head: ts.backward(jax_loss, x, y, use_head),
        static_argnums=3,
    )
    step = maybe_jit(lambda ts: ts.step())
    zero = maybe_jit(
        lambda ts, keep: ts.zero_grad(set_to_none=not keep), static_argnums=1
    )
    history = []
    for op in ops:
        if op.startswith("bw"):
            x, y = BATCHES[int(op[2])]
            ts, _ = backward(ts, jnp.asarray(x), jnp.asarray(y), "nohead" not in op)
        elif op == "step":
            ts = step(ts)
        elif op == "zero":
            ts = zero(ts, False)
        elif op == "zero_keep":
            ts = zero(ts, True)
        history.append({k: np.asarray(v) for k, v in ts.params.items()})
    return history


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_matches_torch(scenario, opt_name, jit, x64):
    torch_cls, factory, kwargs = OPTIMIZERS[opt_name]
    ops = SCENARIOS[scenario]
    expected = run_scenario_torch(ops, torch_cls, kwargs)
    actual = run_scenario_funcopt(ops, factory, kwargs, jit)
    for i, (a, e) in enumerate(zip(actual, expected)):
        for k in e:
            np.testing.assert_allclose(
                a[k],
                e[k],
                rtol=1e-12,
                atol=1e-14,
                err_msg=f"after op {i} {ops[i]}: {k}",
            )


def test_backward_accumulates_like_torch(x64):
    # torch: two backward passes on sum(w**2) with w=[1,2] give grad [4, 8]
    ts = fo.TrainState.create({"w": jnp.array([1.0, 2.0])}, fo.sgd())
    for _ in range(2):
        ts, _ = ts.backward(lambda p: jnp.sum(p["w"] ** 2))
    np.testing.assert_array_equal(ts.grads["w"], [4.0, 8.0])
    assert bool(ts.grad_defined["w"])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unused_leaf_keeps_no_gradient(jit):
    """An unused leaf's flag stays false and its stored gradient keeps its
    bits (a -0.0 included); in one `jit` after `zero_grad`, where the flags
    are known while tracing, too."""
    params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    ts = fo.TrainState.create(params, fo.sgd(momentum=0.9))
    ts = ts.with_grads({"a": None, "b": None, "c": jnp.asarray([-0.0, 2.0])})

    def backward(ts, zero):
        if zero:
            ts = ts.zero_grad()
        return ts.backward(lambda p: jnp.sum(p["a"]))[0]

    run = jax.jit(backward, static_argnums=1) if jit else backward
    kept = run(ts, False)
    assert [bool(kept.grad_defined[k]) for k in "abc"] == [True, False, True]
    np.testing.assert_array_equal(np.signbit(kept.grads["c"]), [True, False])
    cleared = run(ts, True)
    assert [bool(cleared.grad_defined[k]) for k in "abc"] == [True, False, False]


def test_train_step_compiles_once():
    ts = fo.TrainState.create({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}, fo.adam())
    traces = []

    @jax.jit
    def train_step(ts, x, y):
        traces.append(None)
        ts = ts.zero_grad()
        ts, loss = ts.backward(jax_loss, x, y, False)
        return ts.step(), loss

    for x, y in BATCHES:
        ts, _ = train_step(ts, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    ts = fo.set_lr(ts, 1e-2)
    ts, _ = train_step(ts, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    assert len(traces) == 1
    assert float(fo.get_lr(ts)[0]) == pytest.approx(1e-2)


@pytest.mark.parametrize("zero_grad", [True, False])
def test_donated_train_step_updates_the_state_in_place(zero_grad):
    """A jitted zero_grad / backward / step with the TrainState donated: each
    donated buffer is the output of its own slot (jit pairs donated inputs
    with outputs of their shape in leaf order), the new gradient included
    (`zero_grad` keeps the old one an argument), and XLA copies nothing:
    the gradient here is an elementwise function of the params that XLA
    would recompute inside the optimizer's loops, leaving the loop that
    writes `grads` unordered against the in-place parameter update (a
    copy of the params) but for `backward`'s `_math.materialized`."""
    n = 1 << 14
    params = {"w": jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)}
    ts = fo.TrainState.create(params, fo.adam())

    def train_step(ts, target):
        if zero_grad:
            ts = ts.zero_grad()
        ts, _ = ts.backward(lambda p, t: jnp.sum((p["w"] - t) ** 2), target)
        return ts.step()

    step = jax.jit(train_step, donate_argnums=0)
    compiled = step.lower(ts, params["w"] * 0.5).compile()
    hlo = compiled.as_text()
    entry = hlo[hlo.index("ENTRY") :]
    copies = [
        line for line in entry.splitlines() if f"f32[{n}]" in line and " copy(" in line
    ]
    assert not copies, copies
    memory = compiled.memory_analysis()
    if memory is not None:  # params, exp_avg, exp_avg_sq and grads in place
        assert memory.alias_size_in_bytes >= 4 * 4 * n
        assert memory.temp_size_in_bytes < 4 * n


def test_non_trainable_leaves_are_carried():
    params = {"w": jnp.ones(2), "count": jnp.arange(3)}
    ts = fo.TrainState.create(params, fo.adam(lr=0.1))
    ts, _ = ts.backward(lambda p: jnp.sum(p["w"] * p["count"][:2].astype(jnp.float32)))
    ts = ts.step()
    assert ts.grads["count"] is None
    np.testing.assert_array_equal(ts.params["count"], params["count"])
    assert not np.allclose(ts.params["w"], params["w"])


# --------------------------------------------------------------------------
# a model with state: BatchNorm's running statistics through has_aux
# --------------------------------------------------------------------------


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    ).double()


def _bn_loss(params, buffers, x, y, momentum=0.1, eps=1e-5):
    """The torch model's training-mode forward (BatchNorm1d) and MSE loss;
    returns the loss and the running statistics torch's forward writes."""
    h = x @ params["0"]["weight"].T + params["0"]["bias"]
    mean, var = jnp.mean(h, 0), jnp.var(h, 0)
    n = h.shape[0]
    bn = params["1"]
    h = (h - mean) / jnp.sqrt(var + eps) * bn["weight"] + bn["bias"]
    out = h @ params["2"]["weight"].T + params["2"]["bias"]
    stats = buffers["1"]
    new = {
        "running_mean": (1 - momentum) * stats["running_mean"] + momentum * mean,
        "running_var": (1 - momentum) * stats["running_var"]
        + momentum * var * n / (n - 1),
        "num_batches_tracked": stats["num_batches_tracked"] + 1,
    }
    return jnp.mean((out - y) ** 2), {"1": new}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_backward_has_aux_threads_batchnorm_buffers(jit, x64):
    """`backward(..., has_aux=True)`: a BatchNorm model trained as torch
    trains it (forward updates the running statistics); params and buffers
    equal torch's after every step."""
    import funcopt.torch_interop as fti

    model = _bn_model()
    params = fti.module_state_dict_to_params(dict(model.named_parameters()))
    buffers = fti.module_state_dict_to_params(dict(model.named_buffers()))
    buffers = {"1": dict(buffers["1"])}
    # SGD: the first Linear's bias feeds BatchNorm, so its gradient is zero up
    # to rounding noise, which Adam's normalisation would amplify to ~1e-9
    opt = fo.sgd(lr=0.05, momentum=0.9)
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def train_step(ts, buffers, x, y):
        ts = ts.zero_grad()
        ts, (loss, buffers) = ts.backward(_bn_loss, buffers, x, y, has_aux=True)
        return ts.step(), buffers, loss

    step = jax.jit(train_step) if jit else train_step
    ts = fo.TrainState.create(params, opt)
    rng = np.random.default_rng(1)
    for _ in range(3):
        x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
        ts, buffers, loss = step(ts, buffers, jnp.asarray(x), jnp.asarray(y))
        torch_opt.zero_grad()
        tloss = torch.nn.functional.mse_loss(model(torch.tensor(x)), torch.tensor(y))
        tloss.backward()
        torch_opt.step()
        np.testing.assert_allclose(float(loss), float(tloss.detach()), rtol=1e-12)
        ours = fti.params_to_module_state_dict(ts.params)
        for n, p in model.named_parameters():
            np.testing.assert_allclose(ours[n].numpy(), p.detach().numpy(), rtol=1e-10)
        ours_buffers = fti.params_to_module_state_dict(buffers)
        for n, b in model.named_buffers():
            np.testing.assert_allclose(ours_buffers[n].numpy(), b.numpy(), rtol=1e-12)


def test_backward_without_has_aux_rejects_a_tuple_loss():
    ts = fo.TrainState.create({"w": jnp.ones(2)}, fo.sgd(lr=0.1))
    with pytest.raises(TypeError):
        ts.backward(lambda p: (jnp.sum(p["w"]), None))


# --------------------------------------------------------------------------
# gradients kept in the optimizer state's packed buckets
# --------------------------------------------------------------------------


def _run_scenario_states(ops, factory, kwargs, jit):
    """Every op of a scenario on float32 params: after each, the params,
    gradients, flags and (per-leaf) optimizer state, as NumPy."""
    params = {k: jnp.asarray(v, jnp.float32) for k, v in INIT.items()}
    ts = fo.TrainState.create(params, factory(**kwargs))
    maybe_jit = jax.jit if jit else (lambda f, **kw: f)
    backward = maybe_jit(
        lambda ts, x, y, use_head: ts.backward(jax_loss, x, y, use_head)[0],
        static_argnums=3,
    )
    step = maybe_jit(lambda ts: ts.step())
    zero = maybe_jit(lambda ts, keep: ts.zero_grad(not keep), static_argnums=1)
    history = []
    for op in ops:
        if op.startswith("bw"):
            x, y = (jnp.asarray(a, jnp.float32) for a in BATCHES[int(op[2])])
            ts = backward(ts, x, y, "nohead" not in op)
        elif op == "step":
            ts = step(ts)
        else:
            ts = zero(ts, op == "zero_keep")
        seen = (ts.params, ts.grads, ts.grad_defined, ts.opt_state.unpacked())
        history.append(jax.tree.map(np.asarray, seen))
    return ts, history


@packs_by_default
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_packed_gradients_give_the_per_leaf_bits(scenario, opt_name, jit):
    """The default layout keeps the small leaves' gradients and flags in the
    optimizer state's buckets; every op gives the same bits as gradients
    kept per leaf (`set_policy("never")`), flags of unused leaves included."""
    _, factory, kwargs = OPTIMIZERS[opt_name]
    ops = SCENARIOS[scenario]
    ts, packed = _run_scenario_states(ops, factory, kwargs, jit)
    assert isinstance(ts.stored_grads, fo.flat.FlatParams)
    assert isinstance(ts.stored_defined, fo.flat.FlatParams)
    with fo.flat.policy("never"):
        ts, per_leaf = _run_scenario_states(ops, factory, kwargs, jit)
    assert isinstance(ts.stored_grads, dict)
    for i, (a, b) in enumerate(zip(packed, per_leaf)):
        assert jax.tree.structure(a) == jax.tree.structure(b), ops[i]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=f"after op {i} {ops[i]}")


def _many_leaf_train_step(n):
    params = {f"p{i:03d}": jnp.full((7,), 0.1 * i, jnp.float32) for i in range(n)}
    ts = fo.TrainState.create(params, fo.adamw(lr=1e-2))

    def train_step(ts, target):
        ts = ts.zero_grad()
        ts, _ = ts.backward(
            lambda p, t: sum(jnp.sum((p[k] - t) ** 2) for k in p), target
        )
        return ts.step()

    return ts, train_step


@packs_by_default
def test_a_train_step_passes_few_arrays_and_reads_no_flag():
    """A train step over many small leaves takes and returns the params and a
    few buffers (gradients and flags packed with the state), and its flags,
    set while tracing (`backward` after `zero_grad`), are folded: no select
    of old and new values in the program."""
    n = 40
    ts, train_step = _many_leaf_train_step(n)
    assert len(jax.tree.leaves(ts)) < n + 12
    hlo = jax.jit(train_step, donate_argnums=0).lower(ts, 0.5).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    assert " select(" not in entry and "select_n" not in entry
    assert not [
        line for line in entry.splitlines() if " copy(" in line and "f32[" in line
    ]


def test_known_flags_fold_to_the_step_without_them():
    """`has_grad` flags known while tracing (constants of the trace) step as
    if absent (true) or as a gradient None (false); traced flags are read."""
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    grads = {"a": jnp.full(3, 0.5), "b": jnp.full(3, 0.25)}
    opt = fo.adam(lr=0.1)
    state = opt.init(params)

    def step_with(flags):
        return jax.jit(lambda p, g, s: opt.step(p, g, s, has_grad=flags()))(
            params, grads, state
        )

    const = step_with(lambda: {"a": jnp.asarray(True), "b": jnp.asarray(False)})
    grads_b_none = opt.step(params, {"a": grads["a"], "b": None}, state)
    for x, y in zip(jax.tree.leaves(const), jax.tree.leaves(grads_b_none)):
        np.testing.assert_array_equal(x, y)

    def program(step):
        return jax.jit(step).lower(params, grads, state).as_text()

    known = program(lambda p, g, s: opt.step(p, g, s, has_grad={"a": True, "b": True}))
    assert known == program(lambda p, g, s: opt.step(p, g, s))
    traced = jax.jit(lambda p, g, s, f: opt.step(p, g, s, has_grad=f)).lower(
        params, grads, state, {"a": True, "b": True}
    )
    assert traced.as_text() != known


def test_known_flags_reads_constants_only():
    assert _packing.known_flag(True) is True
    assert _packing.known_flag(np.bool_(False)) is False
    np.testing.assert_array_equal(_packing.known_flags(np.array([1, 0], bool)), [1, 0])
    assert _packing.known_flag(jnp.asarray(True)) is None  # concrete: read at run time

    def inside(x):
        assert _packing.known_flag(jnp.asarray(True)) is True
        np.testing.assert_array_equal(
            _packing.known_flags(jnp.asarray(np.array([True, False]))), [True, False]
        )
        assert _packing.known_flag(x > 0) is None
        assert _packing.known_flag(x) is None
        return x

    jax.jit(inside)(1.0)


def test_with_grads_is_torch_grad_assignment(x64):
    """`ts.with_grads(g)` then `step` is torch's `p.grad = g; opt.step()`;
    a None gradient skips its parameter; a wrong shape is named."""
    params = {k: jnp.asarray(v) for k, v in INIT.items()}
    grads = {k: jnp.asarray(RNG.normal(size=np.shape(v))) for k, v in INIT.items()}
    ts = fo.TrainState.create(params, fo.adamw(lr=0.05, weight_decay=0.1))
    ts = ts.with_grads({**grads, "h": None}).step()
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in INIT.items()}
    topt = torch.optim.AdamW(list(tparams.values()), lr=0.05, weight_decay=0.1)
    for k, p in tparams.items():
        p.grad = None if k == "h" else torch.tensor(np.asarray(grads[k]))
    topt.step()
    for k, p in tparams.items():
        np.testing.assert_allclose(ts.params[k], p.detach().numpy(), rtol=1e-12)
    assert not bool(ts.grad_defined["h"]) and bool(ts.grad_defined["w"])
    np.testing.assert_array_equal(ts.grads["w"], grads["w"])
    with pytest.raises(ValueError, match=r"\['b'\]"):
        ts.with_grads({**grads, "b": jnp.ones(5)})


@packs_by_default
def test_a_state_of_another_layout_steps_the_per_leaf_gradients():
    """A `TrainState` whose optimizer state was replaced by one of another
    layout (per leaf here, as a loaded or sharded one may be) steps its
    packed gradients per leaf: the same bits."""
    params = {k: jnp.asarray(v, jnp.float32) for k, v in INIT.items()}
    opt = fo.adam(lr=0.1)
    ts = fo.TrainState.create(params, opt)
    ts, _ = ts.backward(jax_loss, *(jnp.asarray(a, jnp.float32) for a in BATCHES[0]))
    assert isinstance(ts.stored_grads, fo.flat.FlatParams)
    with fo.flat.policy("never"):
        per_leaf = dataclasses.replace(ts, opt_state=opt.init(params))

    def run(ts, x, y):  # the gradients' layout kept through every call
        ts, _ = ts.clip_grad_norm(0.5)
        ts = ts.clip_grad_value(0.3).step().zero_grad()
        ts, _ = ts.backward(jax_loss, x, y)
        return ts.step()

    batch = [jnp.asarray(a, jnp.float32) for a in BATCHES[1]]
    a = jax.jit(run)(per_leaf, *batch)
    b = jax.jit(run)(ts, *batch)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


@packs_by_default
def test_in_place_buckets_keep_their_gradients_per_leaf():
    """Under `set_policy("always")` large leaves step in place, one call
    for their bucket reading each leaf where it is: `TrainState` keeps
    their gradients per leaf (packed, each step would copy them in and
    the call out again), with the same bits as gradients kept per leaf."""
    rng = np.random.default_rng(3)
    params = {
        "w": jnp.asarray(rng.normal(size=(40, 40)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(50, 40)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(40,)), jnp.float32),
        "c": jnp.asarray(rng.normal(size=(40,)), jnp.float32),
    }

    def loss(p, t):
        return (
            jnp.sum((p["w"] - t) ** 2) + jnp.sum(p["v"] ** 3) + jnp.sum(p["b"] * p["c"])
        )

    def train_step(ts, t):
        ts = ts.zero_grad()
        ts, _ = ts.backward(loss, t)
        ts, _ = ts.backward(loss, t * 2)
        return ts.step()

    def run():
        ts = fo.TrainState.create(jax.tree.map(jnp.copy, params), fo.adam(lr=0.01))
        step = jax.jit(train_step, donate_argnums=0)
        for k in range(3):
            ts = step(ts, jnp.float32(0.1 * k))
        return ts, jax.tree.map(
            np.asarray, (ts.params, ts.grads, ts.opt_state.unpacked())
        )

    with fo.flat.policy("always"):
        ts, always = run()
        kept = ts.stored_grads.buffers
        assert any(isinstance(b, tuple) for b in kept)
        assert any(not isinstance(b, tuple) for b in kept)
        hlo = (
            jax.jit(train_step, donate_argnums=0)
            .lower(ts, jnp.float32(0.5))
            .compile()
            .as_text()
        )
    entry = hlo[hlo.index("ENTRY") :]
    big = [
        line
        for line in entry.splitlines()
        if (" copy(" in line or "funcopt_pack" in line)
        and ("f32[40,40]" in line or "f32[50,40]" in line)
    ]
    assert not big, big
    with fo.flat.policy("never"):
        _, per_leaf = run()
    for x, y in zip(jax.tree.leaves(always), jax.tree.leaves(per_leaf)):
        np.testing.assert_array_equal(x, y)


def test_with_sparse_gradients_keeps_them_per_leaf():
    """A BCOO gradient given with `with_grads` is kept (and stepped) per
    leaf whatever the layout: SGD's sparse step, as torch's."""
    from jax.experimental import sparse as jsparse

    params = {k: jnp.ones((3, 2)) for k in "abc"}
    dense = {k: jnp.asarray([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]) for k in params}
    opt = fo.sgd(lr=0.1, momentum=0.9)
    ts = fo.TrainState.create(params, opt)
    sparse = {**dense, "b": jsparse.BCOO.fromdense(dense["b"])}
    ts = ts.with_grads(sparse)
    assert isinstance(ts.stored_grads, dict)
    stepped = ts.step()
    expected, _ = opt.step(params, dense, opt.init(params))
    for k in params:
        np.testing.assert_allclose(stepped.params[k], expected[k], rtol=1e-6)
