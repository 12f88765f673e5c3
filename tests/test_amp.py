"""funcopt.amp.GradScaler against live torch.amp.GradScaler (CPU).

Every expected value comes from torch in the test run: torch's CPU kernels
(`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`) on many
inputs, and whole training runs with `torch.amp.GradScaler("cpu")` around
each step (`scale(loss).backward()`, injected inf/NaN gradients, `unscale_`,
`clip_grad_norm_`, `step`, `update`) side by side with funcopt fed the same
scaled gradients.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
import funcopt.torch_interop as fti
from funcopt.amp import GradScaler, GradScalerState

F32_TINY = float(np.finfo(np.float32).tiny)


def _bits(x) -> np.ndarray:
    """The raw bits of an array (NaNs compared by payload, -0 != +0)."""
    a = np.asarray(x)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _t2np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return np.asarray(jnp.asarray(t.view(torch.int16).numpy()).view(jnp.bfloat16))
    return t.detach().numpy().copy()


def _np2t(a) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def assert_same_bits(ours, theirs, what=""):
    """Same dtype, shape and bits (-0.0 != 0.0); a NaN equals any NaN (torch's
    16-bit conversions set other payload bits than XLA's)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.dtype == theirs.dtype, f"{what}: {ours.dtype} != {theirs.dtype}"
    assert ours.shape == theirs.shape, what
    nan = np.isnan(ours.astype(np.float64))
    np.testing.assert_array_equal(
        nan, np.isnan(theirs.astype(np.float64)), err_msg=f"{what}: NaNs"
    )
    np.testing.assert_array_equal(_bits(ours)[~nan], _bits(theirs)[~nan], err_msg=what)


def assert_state_matches(sstate: GradScalerState, tscaler, what=""):
    """Scale (float32 bits) and growth tracker (int32) equal torch's."""
    assert sstate.scale.dtype == jnp.float32 and sstate.growth_tracker.dtype == (
        jnp.int32
    )
    assert_same_bits(sstate.scale, _t2np(tscaler._scale), f"{what} scale")
    assert int(sstate.growth_tracker) == int(tscaler._growth_tracker), what


# --------------------------------------------------------------------------
# the kernels, on many inputs
# --------------------------------------------------------------------------


def _torch_inv_scale(scale: np.float32) -> torch.Tensor:
    s = torch.full((), float(scale), dtype=torch.float32)
    return s.double().reciprocal().float()


def test_inv_scale_is_torchs_double_reciprocal():
    rng = np.random.default_rng(0)
    # float32 scales whose reciprocal is a normal float32 (XLA flushes
    # subnormals: above 2**126 inv_scale is 0 here), powers of two included
    bits = rng.integers(0x00800000, 0x7E800000, size=4000).astype(np.uint32)
    scales = np.concatenate([bits.view(np.float32), np.float32([1.0, 2.0**16, 3.0])])
    ours = jax.jit(jax.vmap(fo.amp._reciprocal))(jnp.asarray(scales))
    expected = torch.from_numpy(scales).double().reciprocal().float().numpy()
    assert_same_bits(ours, expected, "inv_scale")


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, jnp.bfloat16, np.float16], ids=str
)
def test_unscale_matches_torch_kernel(dtype, x64):
    """Unscaled values and found_inf equal `_amp_foreach_non_finite_check_and_unscale_`
    for non-power-of-two scales (float16 only with `allow_fp16`, as torch's
    internal flag)."""
    rng = np.random.default_rng(1)
    allow = {"allow_fp16": True} if dtype == np.float16 else {}
    for trial, scale in enumerate([1000.0, 2.0**16, 3.7e5, 0.3, 1.0, 7e-3]):
        grads = {
            "a": (rng.standard_normal((7, 5)) * 50).astype(dtype),
            "b": (rng.standard_normal(37) * 1e3).astype(dtype),
            "c": None,
        }
        if trial % 2:  # an overflow in one leaf
            grads["b"][3 * trial] = [np.inf, np.nan, -np.inf][trial % 3]
        state = GradScaler("cpu", init_scale=scale).init()
        out, found = GradScaler("cpu", init_scale=scale).unscale(grads, state, **allow)
        t_grads = [_np2t(grads["a"]), _np2t(grads["b"])]
        t_found = torch.zeros((), dtype=torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_(
            t_grads, t_found, _torch_inv_scale(np.float32(scale))
        )
        assert out["c"] is None
        for k, t in zip("ab", t_grads):
            assert_same_bits(out[k], _t2np(t), f"{dtype} scale={scale} {k}")
        assert_same_bits(found, t_found.numpy(), "found_inf")
        assert float(found) == float(trial % 2)


def _torch_update(scale, tracker, found, growth, backoff, interval):
    s = torch.full((), float(scale), dtype=torch.float32)
    t = torch.full((), int(tracker), dtype=torch.int32)
    torch._amp_update_scale_(
        s, t, torch.full((), found, dtype=torch.float32), growth, backoff, interval
    )
    return s.numpy(), t.numpy()


@pytest.mark.parametrize(
    "growth, backoff",
    [(2.0, 0.5), (1.37, 0.3), (1 + 2**-24 - 2**-47, 0.7), (1e30, -0.1)],
)
def test_update_matches_torch_kernel(growth, backoff):
    """`update` is `_amp_update_scale_` bit for bit: growth after
    `growth_interval` clean steps (kept if it would overflow), backoff after an
    overflow, for factors that are not float32 numbers too (torch multiplies in
    float64 and rounds to float32; funcopt does that exactly without x64). The
    third factor pair makes the double rounding differ from the float32 product."""
    rng = np.random.default_rng(2)
    scales = rng.integers(0x00800000, 0x7F7FFFFF, size=300).astype(np.uint32)
    scales = np.concatenate(
        [
            scales.view(np.float32),
            np.float32([1 + 2**-23, 2.0**16, 3.4e38, F32_TINY, np.inf, 0.0]),
        ]
    )
    interval = 3
    scaler = GradScaler(
        "cpu", growth_factor=growth, backoff_factor=backoff, growth_interval=interval
    )
    update = jax.jit(jax.vmap(scaler.update))
    for tracker, found in [(interval - 1, 0.0), (0, 0.0), (interval - 1, 1.0)]:
        state = GradScalerState(
            jnp.asarray(scales), jnp.full(scales.shape, tracker, jnp.int32)
        )
        new = update(state, jnp.full(scales.shape, found, jnp.float32))
        expected = [
            _torch_update(s, tracker, found, growth, backoff, interval) for s in scales
        ]
        exp_scale = np.stack([e[0] for e in expected])
        exp_tracker = np.stack([e[1] for e in expected])
        # XLA flushes float32 subnormals (documented): compare the rest
        normal = ~((np.abs(exp_scale) < F32_TINY) & (exp_scale != 0))
        assert normal.sum() >= len(scales) - 10
        assert_same_bits(new.scale[normal], exp_scale[normal], f"{tracker} {found}")
        np.testing.assert_array_equal(new.growth_tracker, exp_tracker)
    if growth == 1 + 2**-24 - 2**-47:  # the double-rounding case is in there
        s = np.float32(1 + 2**-23)
        assert np.float32(np.float64(s) * growth) != s * np.float32(growth)


def test_update_growth_tracker_edge_cases():
    """int32 tracker arithmetic and growth intervals torch never reaches."""
    for interval in [1, 0, -1, 2**40]:
        scaler = GradScaler("cpu", growth_interval=interval)
        for tracker in [0, 5, 2**31 - 1]:
            state = GradScalerState(jnp.float32(4.0), jnp.int32(tracker))
            new = scaler.update(state, jnp.float32(0.0))
            s, t = _torch_update(4.0, tracker, 0.0, 2.0, 0.5, interval)
            assert_same_bits(new.scale, s)
            assert_same_bits(new.growth_tracker, t)


# --------------------------------------------------------------------------
# training runs side by side with torch
# --------------------------------------------------------------------------

STEPS = 30
# step -> (parameter, index, value) injected into the scaled gradient
INJECT = {4: ("w", (0, 1), np.inf), 5: ("b", (2,), np.nan), 6: ("w", (3, 0), -np.inf)}
INJECT.update({15: ("w", (1, 2), np.nan), 22: ("b", (0,), np.inf)})
NAMES = ("b", "w")  # jax.tree.leaves order of the params dict


def _data(dtype):
    rng = np.random.default_rng(3)
    init = {
        "b": rng.standard_normal(3).astype(dtype),
        "w": rng.standard_normal((5, 3)).astype(dtype),
    }
    xs = rng.standard_normal((STEPS, 8, 5)).astype(dtype)
    ys = rng.standard_normal((STEPS, 8, 3)).astype(dtype)
    return init, xs, ys


def _torch_run(make_opt, dtype, clip, scaler_kwargs):
    """torch's loop; per step: scaled grads (what backward produced, with the
    injected overflow), unscaled grads, and the params, state and scaler after."""
    init, xs, ys = _data(dtype)
    tparams = [torch.tensor(init[k], requires_grad=True) for k in NAMES]
    topt = make_opt(tparams)
    scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
    records = []
    for t in range(STEPS):
        topt.zero_grad()
        x, y = torch.from_numpy(xs[t]), torch.from_numpy(ys[t])
        loss = ((x @ tparams[1] + tparams[0] - y) ** 2).mean()
        scaler.scale(loss).backward()
        if t in INJECT:
            name, idx, value = INJECT[t]
            with torch.no_grad():
                tparams[NAMES.index(name)].grad[idx] = value
        scaled = {k: _t2np(p.grad) for k, p in zip(NAMES, tparams)}
        before = _snapshot(tparams, topt)
        scaler.unscale_(topt)
        unscaled = {k: _t2np(p.grad) for k, p in zip(NAMES, tparams)}
        total = None
        if clip is not None:
            total = float(torch.nn.utils.clip_grad_norm_(tparams, clip))
        scaler.step(topt)
        found = float(
            sum(v.item() for v in scaler._found_inf_per_device(topt).values())
        )
        scaler.update()
        after = _snapshot(tparams, topt)
        if found:  # torch skipped optimizer.step(): nothing moved
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
                assert_same_bits(a, b, f"torch step {t} skipped")
        records.append(
            dict(
                scaled=scaled,
                unscaled=unscaled,
                found=found,
                after=after,
                scale=_t2np(scaler._scale),
                tracker=int(scaler._growth_tracker),
                total=total,
            )
        )
    return init, records


def _snapshot(tparams, topt):
    params = {k: _t2np(p) for k, p in zip(NAMES, tparams)}
    state = {
        k: {n: _t2np(v) for n, v in topt.state[p].items()}
        for k, p in zip(NAMES, tparams)
        if p in topt.state
    }
    return {"params": params, "state": state}


def _funcopt_step(scaler, opt, clip):
    def step(params, opt_state, sstate, scaled):
        grads, found = scaler.unscale(scaled, sstate)
        clipped = grads if clip is None else fo.clip_grad_norm(grads, clip)[0]
        params, opt_state = scaler.step(opt, params, clipped, opt_state, found)
        return params, opt_state, scaler.update(sstate, found), grads, found

    return step


def _funcopt_run(opt, init, records, clip, scaler_kwargs, jit):
    scaler = fo.amp.GradScaler("cpu", **scaler_kwargs)
    step = _funcopt_step(scaler, opt, clip)
    if jit:
        step = jax.jit(step)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    opt_state, sstate = opt.init(params), scaler.init()
    out = []
    for t, rec in enumerate(records):
        scaled = {k: jnp.asarray(v) for k, v in rec["scaled"].items()}
        old = (params, opt_state)
        params, opt_state, sstate, grads, found = step(
            params, opt_state, sstate, scaled
        )
        if t in INJECT:  # skipped: params, buffers and step counts untouched
            assert float(found) == 1.0
            for a, b in zip(jax.tree.leaves(old), jax.tree.leaves((params, opt_state))):
                assert_same_bits(a, b, f"funcopt step {t} skipped")
        out.append((params, opt_state, sstate, grads, found))
    return out


def _compare(t, rec, ours, slot_names, rtol, atol=0.0):
    params, opt_state, sstate, grads, found = ours
    what = f"step {t}"
    # the scaler itself: always bit for bit
    assert float(found) == rec["found"] == float(t in INJECT), what
    assert_same_bits(sstate.scale, rec["scale"], f"{what} scale")
    assert int(sstate.growth_tracker) == rec["tracker"], what
    for k in NAMES:
        assert_same_bits(grads[k], rec["unscaled"][k], f"{what} unscaled {k}")

    def close(a, e, name):
        if rtol == 0:
            assert_same_bits(a, e, f"{what} {name}")
        else:
            np.testing.assert_allclose(
                a, e, rtol=rtol, atol=atol, err_msg=f"{what} {name}"
            )

    for i, k in enumerate(NAMES):
        close(params[k], rec["after"]["params"][k], f"param {k}")
        entry = rec["after"]["state"].get(k, {})
        # per-parameter step counts: torch's state["step"] (none for SGD)
        expected_step = int(entry["step"]) if "step" in entry else None
        if expected_step is not None:
            assert int(opt_state.step[i]) == expected_step, f"{what} step {k}"
        for name in slot_names:
            if name in entry:
                ours = opt_state.unpacked().slots[name][k]
                close(ours, entry[name], f"{name} {k}")
            else:  # torch has no state yet: every step so far was skipped
                assert all(r in INJECT for r in range(t + 1))


SCALER = dict(init_scale=2.0**10, growth_interval=3)


@pytest.mark.parametrize("clip", [None, 4.0], ids=["noclip", "clip"])
def test_sgd_float32_side_by_side(clip):
    """float32 SGD with momentum, 30 steps, five overflows (two in a row, a
    third right after), growth every 3 clean steps.

    The scaler's outputs (scale, growth tracker, found_inf, unscaled
    gradients) equal torch's bit for bit at every step. So do params and
    momentum buffers without clipping; momentum 0.5, lr 2**-6 and weight
    decay 2**-7 keep every product exact, so no rounding of funcopt's float32
    SGD (XLA may fuse a multiply-add that torch rounds twice) enters. With
    clipping, funcopt's float32 `clip_grad_norm` can round the norm one ulp
    away from torch's (and from itself between jit and eager), so the params
    are then compared within float32 rounding. Jitted and eager funcopt agree
    bit for bit (with clipping: the scaler's outputs).
    """
    kwargs = dict(lr=2**-6, momentum=0.5, weight_decay=2**-7)
    init, records = _torch_run(
        lambda ps: torch.optim.SGD(ps, **kwargs), np.float32, clip, SCALER
    )
    assert any(r["tracker"] == 0 and not r["found"] for r in records)  # grew
    if clip is not None:  # clipping acted on some steps, not on others
        totals = [r["total"] for r in records if not r["found"]]
        assert min(totals) < clip < max(totals)
    opt = fo.sgd(**kwargs)
    jitted = _funcopt_run(opt, init, records, clip, SCALER, jit=True)
    eager = _funcopt_run(opt, init, records, clip, SCALER, jit=False)
    for t, (rec, ours) in enumerate(zip(records, jitted)):
        if clip is None:
            _compare(t, rec, ours, ["momentum_buffer"], rtol=0)
        else:
            _compare(t, rec, ours, ["momentum_buffer"], rtol=1e-5, atol=1e-7)
    # jit vs eager: the same bits (with clipping, only the scaler's own
    # outputs: XLA may fuse the float32 norm's multiply-adds under jit)
    for (p1, s1, ss1, g1, f1), (p2, s2, ss2, g2, f2) in zip(jitted, eager):
        if clip is None:
            ss1, ss2 = (p1, s1, ss1), (p2, s2, ss2)
        for a, b in zip(jax.tree.leaves((ss1, g1, f1)), jax.tree.leaves((ss2, g2, f2))):
            assert_same_bits(a, b, "jit vs eager")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
def test_adam_side_by_side(dtype, x64):
    """Adam (weight decay, clipping after unscale), float32 and float64
    parameters, with x64 on so that funcopt's scalar math is float64 as
    torch's. The scaler's outputs are bit for bit; params, `exp_avg`,
    `exp_avg_sq` within the optimizer's own float32/float64 parity and the
    per-parameter step counts exactly (they stop on skipped steps)."""
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2)
    init, records = _torch_run(
        lambda ps: torch.optim.Adam(ps, **kwargs), dtype, 4.0, SCALER
    )
    opt = fo.adam(**kwargs)
    ours = _funcopt_run(opt, init, records, 4.0, SCALER, jit=True)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    for t, (rec, out) in enumerate(zip(records, ours)):
        _compare(t, rec, out, ["exp_avg", "exp_avg_sq"], rtol=rtol)
    # 30 steps, 5 skipped: each parameter stepped 25 times, as in torch
    assert [int(s) for s in ours[-1][1].step] == [STEPS - len(INJECT)] * 2


def test_end_to_end_jax_grad():
    """The documented pattern: `jax.grad` of the scaled loss, jitted; the
    gradients torch's backward gives for the scaled loss, and the same run."""
    init, xs, ys = _data(np.float32)
    scaler = fo.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    opt = fo.sgd(lr=2**-6, momentum=0.5)

    def loss_fn(p, x, y):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    @jax.jit
    def train_step(params, opt_state, sstate, x, y):
        scaled = jax.grad(lambda p: scaler.scale(loss_fn(p, x, y), sstate))(params)
        grads, found_inf = scaler.unscale(scaled, sstate)
        params, opt_state = scaler.step(opt, params, grads, opt_state, found_inf)
        return params, opt_state, scaler.update(sstate, found_inf)

    tparams = [torch.tensor(init[k], requires_grad=True) for k in NAMES]
    topt = torch.optim.SGD(tparams, lr=2**-6, momentum=0.5)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    opt_state, sstate = opt.init(params), scaler.init()
    for t in range(8):
        topt.zero_grad()
        x, y = torch.from_numpy(xs[t]), torch.from_numpy(ys[t])
        loss = (x @ tparams[1] + tparams[0] - y).pow(2)
        tscaler.scale(loss.mean()).backward()
        tscaler.step(topt)
        tscaler.update()
        params, opt_state, sstate = train_step(params, opt_state, sstate, xs[t], ys[t])
        assert_state_matches(sstate, tscaler, f"step {t}")
        for k, p in zip(NAMES, tparams):
            np.testing.assert_allclose(params[k], _t2np(p), rtol=1e-6, atol=1e-7)
    assert float(sstate.scale) == 2.0**12  # grew every second step


def test_none_and_undefined_gradients():
    """A `None` gradient (torch's `p.grad is None`) and one marked undefined
    with `has_grad` are neither checked nor unscaled, as torch skips them."""
    scaler = GradScaler("cpu", init_scale=4.0)
    state = scaler.init()
    grads = {"a": jnp.array([4.0, 8.0]), "b": None, "c": jnp.array([jnp.inf, 1.0])}
    out, found = scaler.unscale(grads, state)
    assert out["b"] is None and float(found) == 1.0
    has_grad = {"a": jnp.array(True), "b": jnp.array(False), "c": jnp.array(False)}
    out, found = jax.jit(lambda g, h: scaler.unscale(g, state, has_grad=h))(
        grads, has_grad
    )
    assert float(found) == 0.0
    assert_same_bits(out["a"], np.float32([1.0, 2.0]))
    assert_same_bits(out["c"], np.asarray(grads["c"]))
    # torch: the None grad is skipped, the other unscaled
    p1, p2 = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    p2.grad = torch.tensor([4.0, 8.0])
    tscaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    tscaler.scale(torch.ones(()))
    topt = torch.optim.SGD([p1, p2], lr=1.0)
    tscaler.unscale_(topt)
    assert p1.grad is None
    assert_same_bits(out["a"], p2.grad.numpy())


def test_step_with_optax_transforms():
    """Any optax transformation (here a chain with a funcopt optimizer) is
    stepped through `update` + `apply_updates`, and skipped alike."""
    import optax

    opt = optax.chain(optax.clip(1.0), fo.sgd(lr=0.5, momentum=0.5))
    scaler = GradScaler("cpu")
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    grads = {"w": jnp.array([0.5, -2.0])}
    step = jax.jit(lambda p, g, s, f: scaler.step(opt, p, g, s, f))
    new_params, new_state = step(params, grads, state, jnp.float32(0.0))
    updates, expected_state = opt.update(grads, state, params)
    np.testing.assert_array_equal(new_params["w"], [0.75, 1.5])
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(expected_state)):
        assert_same_bits(a, b)
    same_params, same_state = step(params, grads, state, jnp.float32(1.0))
    for a, b in zip(
        jax.tree.leaves((same_params, same_state)), jax.tree.leaves((params, state))
    ):
        assert_same_bits(a, b, "skipped")


def test_several_optimizers_sum_found_inf():
    """torch sums the flags of every optimizer stepped since the last update."""
    scaler = GradScaler("cpu", growth_interval=1)
    state = scaler.init()
    clean = scaler.update(state, [jnp.float32(0.0), jnp.float32(0.0)])
    backed = scaler.update(state, [jnp.float32(0.0), jnp.float32(1.0)])
    assert float(clean.scale) == 2.0**17 and float(backed.scale) == 2.0**15


def test_new_scale_like_torch():
    scaler = GradScaler("cpu")
    state = scaler.update(scaler.init(), jnp.float32(0.0))
    tscaler = torch.amp.GradScaler("cpu")
    tscaler.scale(torch.ones(()))
    tscaler._per_optimizer_states[0]["found_inf_per_device"] = {
        torch.device("cpu"): torch.zeros(())
    }
    tscaler.update()
    for new in [3.3, torch.tensor(0.1, dtype=torch.float64)]:
        tscaler.update(new_scale=new)
        ours = new if isinstance(new, float) else jnp.asarray(new.numpy())
        state = scaler.update(state, new_scale=ours)
        assert_state_matches(state, tscaler, f"new_scale={new}")
    assert int(state.growth_tracker) == 1  # kept, as torch keeps it


# --------------------------------------------------------------------------
# scale(): torch's dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (np.float32, ()),
        (np.float32, (3,)),
        (np.float16, ()),
        (np.float16, (40,)),
        (jnp.bfloat16, ()),
        (jnp.bfloat16, (40,)),
        (np.float64, ()),
        (np.float64, (3,)),
        (np.int32, ()),
        (np.int32, (3,)),
    ],
    ids=str,
)
def test_scale_dtype_and_value_like_torch(dtype, shape, x64):
    """A 0-dim output (a loss) is promoted with the float32 scale, a larger
    one keeps its dtype; values as torch's `outputs * scale`."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 30).astype(dtype)
    for init_scale in [2.0**16, 1000.3]:
        scaler = GradScaler("cpu", init_scale=init_scale)
        ours = scaler.scale(jnp.asarray(x), scaler.init())
        tscaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        theirs = tscaler.scale(_np2t(x))
        assert_same_bits(ours, _t2np(theirs), f"{dtype}{shape} {init_scale}")


def test_scale_pytrees():
    scaler = GradScaler("cpu", init_scale=8.0)
    out = scaler.scale({"a": jnp.float32(1.5), "b": [jnp.ones(2), None]}, scaler.init())
    assert float(out["a"]) == 12.0 and out["b"][1] is None
    np.testing.assert_array_equal(out["b"][0], [8.0, 8.0])
    tscaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert [float(v) for v in tscaler.scale([torch.tensor(1.5)])] == [12.0]


# --------------------------------------------------------------------------
# enabled=False
# --------------------------------------------------------------------------


def test_disabled_is_identity():
    """Every call is the identity: no scaling, no skipped step even with an
    inf gradient (torch's disabled `step` is `optimizer.step()`)."""
    scaler = GradScaler("cpu", enabled=False, growth_factor=0.5)  # not validated
    state = scaler.init()
    loss = jnp.float32(3.0)
    assert scaler.scale(loss, state) is loss
    grads = {"w": jnp.array([1.0, jnp.inf])}
    out, found = scaler.unscale(grads, state)
    assert out is grads and float(found) == 0.0
    opt = fo.sgd(lr=0.1)
    params = {"w": jnp.ones(2)}
    p1, _ = scaler.step(opt, params, grads, opt.init(params), found)
    p2, _ = opt.step(params, grads, opt.init(params))
    assert_same_bits(p1["w"], p2["w"])
    assert scaler.update(state, jnp.float32(1.0)) is state
    assert float(scaler.get_scale(state)) == 1.0 and not scaler.is_enabled()
    assert fti.grad_scaler_state_dict(scaler, state) == {}
    # torch, disabled: the same
    tscaler = torch.amp.GradScaler("cpu", enabled=False, growth_factor=0.5)
    tp = torch.ones(2, requires_grad=True)
    tp.grad = torch.tensor([1.0, math.inf])
    tloss = torch.tensor(3.0)
    assert tscaler.scale(tloss) is tloss
    topt = torch.optim.SGD([tp], lr=0.1)
    tscaler.unscale_(topt)
    tscaler.step(topt)
    tscaler.update()
    assert_same_bits(p1["w"], tp.detach().numpy())
    assert tscaler.state_dict() == {} and tscaler.get_scale() == 1.0


# --------------------------------------------------------------------------
# torch state dicts, both ways
# --------------------------------------------------------------------------

FOUND = [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]


def _torch_updates(tscaler, flags):
    for f in flags:
        tscaler._per_optimizer_states[0]["found_inf_per_device"] = {
            torch.device("cpu"): torch.full((), float(f))
        }
        tscaler.update()


def _funcopt_updates(scaler, state, flags):
    update = jax.jit(scaler.update)
    for f in flags:
        state = update(state, jnp.float32(f))
    return state


@pytest.mark.parametrize("factors", [{}, dict(growth_factor=1.5, backoff_factor=0.3)])
def test_state_dict_round_trips(factors):
    kwargs = dict(init_scale=1000.0, growth_interval=2, **factors)
    scaler = GradScaler("cpu", **kwargs)
    k = 6
    # funcopt k updates -> export -> torch loads and continues
    state = _funcopt_updates(scaler, scaler.init(), FOUND[:k])
    sd = fti.grad_scaler_state_dict(scaler, state)
    reference = torch.amp.GradScaler("cpu", **kwargs)
    reference.scale(torch.ones(()))
    _torch_updates(reference, FOUND[:k])
    assert sd == reference.state_dict()
    assert type(sd["scale"]) is float and type(sd["_growth_tracker"]) is int
    loaded = torch.amp.GradScaler("cpu")  # torch's defaults, replaced by the load
    loaded.load_state_dict(sd)
    loaded.scale(torch.ones(()))
    _torch_updates(loaded, FOUND[k:])
    state = _funcopt_updates(scaler, state, FOUND[k:])
    assert_state_matches(state, loaded, "torch after import")
    # torch k updates -> state_dict -> funcopt imports and continues
    tscaler = torch.amp.GradScaler("cpu", **kwargs)
    tscaler.scale(torch.ones(()))
    _torch_updates(tscaler, FOUND[:k])
    fresh = GradScaler("cpu")  # defaults; the dict's factors replace them
    new_scaler, state = fti.load_grad_scaler_state_dict(fresh, tscaler.state_dict())
    assert (new_scaler.growth_factor, new_scaler.backoff_factor) == (
        kwargs.get("growth_factor", 2.0),
        kwargs.get("backoff_factor", 0.5),
    )
    assert new_scaler.growth_interval == 2
    assert_state_matches(state, tscaler, "funcopt after import")
    _torch_updates(tscaler, FOUND[k:])
    state = _funcopt_updates(new_scaler, state, FOUND[k:])
    assert_state_matches(state, tscaler, "funcopt continued")
    assert fti.grad_scaler_state_dict(new_scaler, state) == tscaler.state_dict()


def test_state_dict_errors_like_torch():
    empty = _torch_error(lambda: torch.amp.GradScaler("cpu").load_state_dict({}))
    with pytest.raises(type(empty), match=f"^{_re(empty)}$"):
        fti.load_grad_scaler_state_dict(GradScaler("cpu"), {})
    disabled = GradScaler("cpu", enabled=False)
    scaler, state = fti.load_grad_scaler_state_dict(disabled, {"scale": 5.0})
    assert scaler is disabled  # torch: a no-op
    sd = dict(scale=1e40, growth_factor=2.0, backoff_factor=0.5, growth_interval=1) | {
        "_growth_tracker": 0
    }
    overflow = _torch_error(lambda: _load_and_scale(sd))
    with pytest.raises(type(overflow), match=_re(overflow)):
        fti.load_grad_scaler_state_dict(GradScaler("cpu"), sd)


def _load_and_scale(sd):
    s = torch.amp.GradScaler("cpu")
    s.load_state_dict(sd)
    s.scale(torch.ones(()))


# --------------------------------------------------------------------------
# bad arguments: torch's exception types and messages
# --------------------------------------------------------------------------


def _torch_error(fn) -> BaseException:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except BaseException as e:  # noqa: BLE001 - whatever torch raises
        return e
    raise AssertionError("torch raised nothing")


def _re(e: BaseException) -> str:
    import re

    return re.escape(str(e))


def _torch_scaler_then(kwargs, then):
    s = torch.amp.GradScaler("cpu", **kwargs)
    then(s)


def _torch_first_update(s):
    s.scale(torch.ones(()))
    s._per_optimizer_states[0]["found_inf_per_device"] = {
        torch.device("cpu"): torch.zeros(())
    }
    s.update()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(growth_factor=1.0),
        dict(growth_factor=0.5),
        dict(backoff_factor=1.0),
        dict(backoff_factor=2.0),
        dict(init_scale=1e40),
        dict(init_scale="big"),
        dict(growth_interval=2.5),
        dict(growth_interval=True),
    ],
    ids=str,
)
def test_bad_arguments_raise_torchs_errors(kwargs):
    """The same exception type and message as torch (which raises some of
    them only at the first `scale`/`update`; funcopt at construction)."""
    expected = _torch_error(lambda: _torch_scaler_then(kwargs, _torch_first_update))
    with pytest.raises(type(expected)) as info:
        GradScaler("cpu", **kwargs)
    assert str(info.value) == str(expected)
    GradScaler("cpu", enabled=False, **kwargs)  # not checked when disabled


def test_fp16_gradients_refused_like_torch():
    p = torch.zeros(2, dtype=torch.float16, requires_grad=True)
    p.grad = torch.ones(2, dtype=torch.float16)
    tscaler = torch.amp.GradScaler("cpu")
    tscaler.scale(torch.ones(()))
    expected = _torch_error(lambda: tscaler.unscale_(torch.optim.SGD([p], lr=1.0)))
    scaler = GradScaler("cpu")
    grads = {"w": jnp.ones(2, jnp.float16), "b": jnp.ones(2, jnp.bfloat16)}
    with pytest.raises(type(expected), match=f"^{_re(expected)}$"):
        scaler.unscale(grads, scaler.init())


def test_complex_gradients_refused_like_torch():
    expected = _torch_error(
        lambda: torch._amp_foreach_non_finite_check_and_unscale_(
            [torch.ones(2, dtype=torch.complex64)], torch.zeros(()), torch.ones(())
        )
    )
    scaler = GradScaler("cpu")
    with pytest.raises(type(expected), match=f"^{_re(expected)}$"):
        scaler.unscale([jnp.ones(2, jnp.complex64)], scaler.init())


def test_other_misuse_like_torch():
    scaler = GradScaler("cpu")
    state = scaler.init()
    # scale() of something that is not an array
    expected = _torch_error(lambda: torch.amp.GradScaler("cpu").scale([1.0]))
    with pytest.raises(type(expected), match="outputs must be a Tensor"):
        scaler.scale([1.0], state)
    # update() without any inf check
    tscaler = torch.amp.GradScaler("cpu")
    tscaler.scale(torch.ones(()))
    expected = _torch_error(tscaler.update)
    with pytest.raises(type(expected), match=f"^{_re(expected)}$"):
        scaler.update(state)
    # LBFGS: torch refuses closures
    lbfgs = torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])
    expected = _torch_error(
        lambda: torch.amp.GradScaler("cpu").step(lbfgs, closure=lambda: 0.0)
    )
    opt = fo.lbfgs()
    params = {"w": jnp.zeros(1)}
    with pytest.raises(type(expected), match=f"^{_re(expected)}$"):
        scaler.step(opt, params, params, opt.init(params), jnp.float32(0.0))
    with pytest.raises(TypeError, match="state made by its init"):
        scaler.scale(jnp.ones(()), {"scale": 1.0})
