"""SGD and Adagrad with sparse (BCOO) gradients, against live torch.

torch's single-tensor SGD and Adagrad take a sparse ``p.grad`` (as
``nn.Embedding(sparse=True)`` makes): SGD adds it to the parameter
(through a sparse momentum buffer with ``momentum``), Adagrad updates its
sum and the parameter at the coalesced indices only. The gradients come
from ``test_sparse_adam``'s sequence (torch's own ``F.embedding(...,
sparse=True)`` backward, repeated ids, empty gradients, no gradient at some
steps, a 0-d parameter), plus a leaf with dense gradients: every tree mixes
sparse, dense and ``None`` gradients. The option combinations torch refuses
raise torch's exception, compared with torch's own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental import sparse as jsparse

import funcopt as fo
from tests.parity import test_sparse_adam as sparse_case
from tests.parity.noise_floor import assert_close
from tests.torch_ref import correctly_rounded_torch_sqrt

# every combination torch allows with sparse gradients (weight_decay != 0
# and fused raise, see the error tests below)
ROWS = {
    "sgd": (torch.optim.SGD, fo.sgd, dict(lr=0.05)),
    "sgd_max": (torch.optim.SGD, fo.sgd, dict(lr=0.05, maximize=True)),
    "sgd_momentum": (
        torch.optim.SGD,
        fo.sgd,
        dict(lr=0.05, momentum=0.9, dampening=0.3),
    ),
    "sgd_nesterov_max": (
        torch.optim.SGD,
        fo.sgd,
        dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
    ),
    "adagrad": (
        torch.optim.Adagrad,
        fo.adagrad,
        dict(lr=0.05, lr_decay=0.1, initial_accumulator_value=0.2, eps=1e-3),
    ),
    "adagrad_max": (
        torch.optim.Adagrad,
        fo.adagrad,
        dict(lr=0.05, lr_decay=0.01, maximize=True),
    ),
}
# torch's state names and funcopt's, per optimizer
SLOTS = {"SGD": ("momentum_buffer",), "Adagrad": ("sum",)}
# measured (jit, every row, 3 seeds): at most 1.0e-7 beyond 1e-6 * abs(torch)
# (the nesterov momentum buffer); torch adds an uncoalesced sparse gradient
# with fused multiply-adds (axpy), a coalesced one without, XLA the reverse
F32_RTOL, F32_ATOL = 1e-6, 5e-7
# every kind of step: an empty "bias" gradient (t = 2), no gradient for
# "emb" (t = 3), "mat" (t = 1, 5), "scalar" (t = 0, 3, 6), "dense" (t = 4)
JIT_STEPS = 8


def _sequence(rng, params, dtype, pad):
    """``test_sparse_adam``'s sparse gradients plus a dense-gradient leaf."""
    seq = sparse_case._gradients(rng, params, dtype, pad)
    for t, (torch_grads, grads) in enumerate(seq):
        dense = None if t % 6 == 4 else rng.normal(size=(4,)).astype(dtype)
        torch_grads["dense"] = None if dense is None else torch.tensor(dense)
        grads["dense"] = dense
    return seq


def _compare(row, dtype, jit, rtol, atol, seed=0, steps=JIT_STEPS, flagged=False):
    """torch and funcopt (jitted or not) on `steps` steps; with `flagged`
    (jit only) `None` gradients go in as `has_grad` flags, else as `None`
    (each new pattern of them compiles anew under jit)."""
    torch_cls, ours_fn, kwargs = ROWS[row]
    rng = np.random.default_rng(seed)
    params = sparse_case._params(rng, dtype)
    params["dense"] = rng.normal(size=(4,)).astype(dtype)
    # eager runs take unpadded BCOOs (a new nse, so new kernels, each step)
    seq = _sequence(rng, params, dtype, pad=jit)[:steps]

    names = ["bias", "dense", "emb", "mat", "scalar"]  # jax.tree.leaves order
    tparams = {k: torch.tensor(params[k], requires_grad=True) for k in names}
    topt = torch_cls([tparams[k] for k in names], **kwargs)
    for torch_grads, _ in seq:
        for k in names:
            tparams[k].grad = torch_grads[k]
        # Adagrad builds sparse tensors: opt in to torch's invariant checks
        with torch.sparse.check_sparse_tensor_invariants():
            topt.step()

    opt = ours_fn(**kwargs)
    ours = jax.tree.map(jnp.asarray, params)
    state = opt.init(ours)
    step = jax.jit(opt.step) if jit else opt.step
    if flagged:
        for grads, has_grad in sparse_case._flagged(seq):
            ours, state = step(ours, grads, state, has_grad=has_grad)
    else:
        for _, grads in seq:
            ours, state = step(ours, grads, state)

    for k in names:
        assert ours[k].dtype == dtype
        assert_close(ours[k], tparams[k].detach().numpy(), rtol, atol, k)
        tstate = topt.state[tparams[k]]
        for slot in SLOTS[topt.__class__.__name__]:
            if slot not in tstate:
                assert slot not in state.slots, f"{k}: {slot}"
                continue
            # torch's momentum buffer of a sparse gradient is sparse
            expected = tstate[slot]
            expected = expected.to_dense() if expected.is_sparse else expected
            ours_slot = state.unpacked().slots[slot][k]
            assert_close(ours_slot, expected.numpy(), rtol, atol, k)
    np.testing.assert_array_equal(ours["frozen"], params["frozen"])
    # rows never looked up keep their values
    np.testing.assert_array_equal(ours["emb"][-3:], params["emb"][-3:])


@pytest.mark.parametrize("row", sorted(ROWS))
def test_sparse_grads_float64_jit(row, x64):
    # `None` gradients as `has_grad` flags: one compiled step per row (the
    # `None` leaves themselves: the eager and float32 rows)
    _compare(row, np.float64, jit=True, rtol=1e-10, atol=1e-12, flagged=True)


@pytest.mark.parametrize("row", ["adagrad_max", "sgd_nesterov_max"])
def test_sparse_grads_float64_eager(row, x64):
    # the first step, no gradient for "mat" (t=1), an empty one for "bias" (t=2)
    _compare(row, np.float64, jit=False, rtol=1e-10, atol=1e-12, steps=3)


@pytest.mark.parametrize("row", ["adagrad", "sgd_momentum", "sgd_max"])
def test_sparse_grads_float32_jit(row):
    assert not jax.config.jax_enable_x64
    # the first step, no gradient for "mat" (t=1), an empty one for "bias"
    # (t=2): `None` leaves under jit, each new pattern compiled anew
    _compare(row, np.float32, jit=True, rtol=F32_RTOL, atol=F32_ATOL, steps=3)


# float32 bit rows that are not torch's bits, out of reach (xfail, strict)
BITS_GAPS = {
    "sgd_momentum": "out of reach: torch's momentum buffer of a sparse "
    "gradient stays sparse, merged with each gradient's entries (a repeated "
    "index kept as another entry), so its size depends on the data and each "
    "entry is added to the param in turn; funcopt's state has fixed shapes, "
    "its buffer dense",
    "sgd_nesterov_max": "as sgd_momentum",
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "row",
    [
        pytest.param(r, marks=[pytest.mark.xfail(strict=True, reason=BITS_GAPS[r])])
        if r in BITS_GAPS
        else r
        for r in sorted(ROWS)
    ],
)
def test_sparse_grads_float32_bits(row, seed, x64, torch_cpu_loop, exact_float32):
    """float32 with x64 and the exact float32 mode: torch's bits, each
    sparse entry rounded as torch's branch for its gradient rounds it
    (`funcopt.optim._sparse.scatter_add`: one entry, coalesced, uncoalesced,
    with dense dimensions or none), on three draws of the sequence; torch's
    float32 roots made correctly rounded (`correctly_rounded_torch_sqrt`:
    MKL's are not, on every machine)."""
    with correctly_rounded_torch_sqrt():
        _compare(row, np.float32, jit=True, rtol=0, atol=0, seed=seed, flagged=True)


# (param shape, indices (-1: padding), coalesced flag): each of torch's
# branches of `p.add_(sparse, alpha=)` (`funcopt.optim._sparse.scatter_add`)
SPARSE_ADDS = {
    "uncoalesced-repeats": ((6,), [[-1], [1], [3], [1], [1]], False),
    "coalesced-several": ((6,), [[0], [2], [4], [-1]], True),
    "one-entry": ((6,), [[3], [-1]], False),
    "hybrid": ((4, 3), [[2], [0], [2], [-1]], False),
    "elementwise-2d": ((3, 4), [[1, 2], [0, 0], [1, 2]], False),
    "0d-one": ((), [[]], False),
    "0d-three": ((), [[]] * 3, False),
    "0d-five": ((), [[]] * 5, False),
}


def _check_sgd_steps(make_grad, draw, draws: int = 30) -> None:
    """One SGD step (lr 0.05), funcopt's jitted on `make_grad(data)` (a
    BCOO) against torch's on its sparse gradient, bit for bit, for `draws`
    draws of `draw(rng) -> (param, data, torch_grad)`."""
    opt = fo.sgd(lr=0.05)

    @jax.jit
    def step(param, data):
        grads = {"p": make_grad(data)}
        return opt.step({"p": param}, grads, opt.init({"p": param}))[0]["p"]

    rng = np.random.default_rng(0)
    for _ in range(draws):
        param, data, torch_grad = draw(rng)
        tparam = torch.tensor(param, requires_grad=True)
        tparam.grad = torch_grad
        torch.optim.SGD([tparam], lr=0.05).step()
        ours = step(jnp.asarray(param), jnp.asarray(data))
        np.testing.assert_array_equal(ours, tparam.detach().numpy())


@pytest.mark.parametrize("case", sorted(SPARSE_ADDS))
def test_sparse_add_rounds_as_torchs_branch(case, x64, torch_cpu_loop, exact_float32):
    """SGD's sparse step, float32 in the exact mode, against torch's on 30
    draws of the values: one entry, coalesced, uncoalesced with repeats,
    dense dimensions, element indices, a 0-d param with 1, 3 and 5 entries
    (padding entries, dropped, where the param has dimensions)."""
    shape, entries, coalesced = SPARSE_ADDS[case]
    n_sparse = len(entries[0])
    index = np.asarray(
        [[shape[d] if i == -1 else i for d, i in enumerate(e)] for e in entries],
        np.int64,
    ).reshape(len(entries), n_sparse)
    keep = [k for k, e in enumerate(entries) if -1 not in e]  # not padding
    torch_indices = torch.tensor(index[keep].T)

    def make_grad(data):
        flags = dict(unique_indices=coalesced, indices_sorted=coalesced)
        return jsparse.BCOO((data, jnp.asarray(index)), shape=shape, **flags)

    def draw(rng):
        param = rng.normal(size=shape).astype(np.float32)
        data = rng.normal(size=(len(entries), *shape[n_sparse:])).astype(np.float32)
        grad = torch.sparse_coo_tensor(
            torch_indices, torch.tensor(data[keep]), shape, is_coalesced=coalesced
        )
        return param, data, grad

    _check_sgd_steps(make_grad, draw)


def test_batched_sparse_gradient_keeps_its_coalesced_flag(
    x64, torch_cpu_loop, exact_float32
):
    """`BCOO.fromdense(g, n_batch=1)` is torch's `g.to_sparse()`: coalesced
    (flagged unique and sorted), so its entries take the product-rounded
    branch, also once unbatched (`_sparse.entries` drops BCOO's flags)."""

    def draw(rng):
        param = rng.normal(size=(4, 5)).astype(np.float32)
        dense = rng.normal(size=(4, 5)).astype(np.float32)
        dense[rng.random((4, 5)) < 0.6] = 0  # at most 3 per row: nse=3 holds
        dense[np.cumsum(dense != 0, axis=1) > 3] = 0
        return param, dense, torch.tensor(dense).to_sparse()

    _check_sgd_steps(lambda d: jsparse.BCOO.fromdense(d, n_batch=1, nse=3), draw)


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
def test_sparse_step_is_differentiable(exact, x64, torch_cpu_loop):
    """`jax.grad` through SGD's sparse step (repeated indices, padding; in
    the exact float32 mode, its loop over the repeats): the step is
    `param + sum of -lr * entry`, so the derivative is 1 for the param and
    -lr for each entry inside it, 0 for the padding."""
    lr = 0.05
    opt = fo.sgd(lr=lr)
    params = {"w": jnp.arange(5.0, dtype=jnp.float32)}
    indices = jnp.asarray([[1], [3], [1], [1], [5]])  # [5]: padding
    data = jnp.asarray([0.5, -1.0, 2.0, 0.25, 9.0], jnp.float32)

    def loss(params, data):
        grad = jsparse.BCOO((data, indices), shape=(5,))
        new, _ = opt.step(params, {"w": grad}, opt.init(params))
        return jnp.sum(new["w"] * jnp.arange(1.0, 6.0, dtype=jnp.float32))

    fo.precision.set_exact_float32(exact)
    try:
        d_params, d_data = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, data)
    finally:
        fo.precision.set_exact_float32(False)
    weights = np.arange(1.0, 6.0, dtype=np.float32)
    np.testing.assert_array_equal(d_params["w"], weights)
    expected = np.float32(-lr) * np.asarray([2.0, 4.0, 2.0, 2.0, 0.0], np.float32)
    np.testing.assert_array_equal(d_data, expected)


# (torch class, funcopt factory, kwargs): combinations torch refuses
ERRORS = {
    "sgd_weight_decay": (torch.optim.SGD, fo.sgd, dict(weight_decay=0.1)),
    "sgd_momentum_weight_decay": (
        torch.optim.SGD,
        fo.sgd,
        dict(momentum=0.9, weight_decay=0.1, maximize=True),
    ),
    "sgd_fused": (torch.optim.SGD, fo.sgd, dict(fused=True)),
    "adagrad_weight_decay": (
        torch.optim.Adagrad,
        fo.adagrad,
        dict(weight_decay=0.1, maximize=True),
    ),
    "adagrad_fused": (torch.optim.Adagrad, fo.adagrad, dict(fused=True)),
}


def _torch_error(torch_cls, kwargs):
    param = torch.zeros(3, 4, requires_grad=True)
    param.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 1]]), torch.ones(2, 4), (3, 4)
    )
    with pytest.raises(Exception) as error:
        with torch.sparse.check_sparse_tensor_invariants():
            torch_cls([param], lr=0.1, **kwargs).step()
    return error.value


def _tree():
    params = {"a": jnp.zeros(2), "w": jnp.zeros((3, 4))}
    grad = jsparse.BCOO((jnp.ones((2, 4)), jnp.array([[1], [1]])), shape=(3, 4))
    return params, {"a": jnp.ones(2), "w": grad}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_refused_combinations_raise_torchs_error(case, jit):
    torch_cls, ours_fn, kwargs = ERRORS[case]
    expected = _torch_error(torch_cls, kwargs)
    opt = ours_fn(lr=0.1, **kwargs)
    params, grads = _tree()
    step = jax.jit(opt.step) if jit else opt.step
    with pytest.raises(Exception) as error:
        step(params, grads, opt.init(params))
    assert type(error.value) is type(expected)
    assert str(error.value) == f"params['w']: {expected}"


@pytest.mark.parametrize("case", ["sgd_weight_decay", "adagrad_weight_decay"])
def test_weight_decay_set_in_the_state_raises(case):
    """The check reads the state's weight_decay (torch's group value)."""
    torch_cls, ours_fn, kwargs = ERRORS[case]
    expected = _torch_error(torch_cls, kwargs)
    opt = ours_fn(lr=0.1, **{**kwargs, "weight_decay": 0})
    params, grads = _tree()
    opt.step(params, grads, opt.init(params))  # weight_decay 0: accepted
    state = fo.set_hparam(opt.init(params), "weight_decay", 0.1)
    with pytest.raises(RuntimeError) as error:
        opt.step(params, grads, state)
    assert str(error.value) == f"params['w']: {expected}"
