"""SparseAdam against live torch, with sparse (BCOO) gradients.

The generic table feeds dense gradients, which SparseAdam rejects, so its
parity is here. The embedding gradient comes from torch's own
``F.embedding(..., sparse=True)`` backward (uncoalesced, repeated row ids);
funcopt gets the same ids and rows as a hybrid BCOO.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.experimental import sparse as jsparse

import funcopt as fo
from funcopt.optim.sparse_adam import sparse_adam
from tests.parity.noise_floor import assert_close

V, D = 12, 4  # embedding table; rows >= V - 3 are never looked up
NSE = 10  # fixed BCOO size under jit: padded with out-of-range indices
STEPS = 25
# measured (4 seeds, jit/eager, min/max): 3.6e-7 abs at worst
F32_RTOL, F32_ATOL = 1e-6, 5e-7


def _params(rng, dtype):
    return {
        "bias": rng.normal(size=(7,)).astype(dtype),
        "emb": rng.normal(size=(V, D)).astype(dtype),
        "frozen": np.arange(2, dtype=np.int32),
        "mat": rng.normal(size=(3, 5)).astype(dtype),
        "scalar": np.asarray(rng.normal(), dtype),  # 0-d: no sparse dimension
    }


def _pad(indices, data, shape, nse):
    """Pad to ``nse`` entries with index ``shape`` (dropped), as BCOO does."""
    n = indices.shape[0]
    pad_index = np.broadcast_to(
        np.asarray(shape[: indices.shape[1]]), (nse - n, indices.shape[1])
    )
    pad_data = np.zeros((nse - n, *data.shape[1:]), data.dtype)
    return np.concatenate([indices, pad_index]), np.concatenate([data, pad_data])


def _gradients(rng, params, dtype, pad):
    """Per step: ``(torch grads by name, funcopt grads tree)``; None = no grad."""
    seq = []
    for t in range(STEPS):
        torch_grads, grads = {}, {"frozen": None}
        # the embedding: a lookup with repeated ids, through torch's backward
        if t % 5 == 3:
            torch_grads["emb"], grads["emb"] = None, None
        else:
            n = int(rng.integers(1, NSE + 1))
            ids = rng.integers(0, V - 3, size=n)
            upstream = rng.normal(size=(n, D)).astype(dtype)
            weight = torch.tensor(params["emb"], requires_grad=True)
            out = F.embedding(torch.tensor(ids), weight, sparse=True)
            (out * torch.tensor(upstream)).sum().backward()
            torch_grads["emb"] = weight.grad
            indices, data = ids[:, None], upstream
            if pad:
                indices, data = _pad(indices, data, (V, D), NSE)
            grads["emb"] = jsparse.BCOO((data, indices), shape=(V, D))
        # a vector, element-wise indices with repeats; empty at some steps
        n = 0 if t % 7 == 2 else int(rng.integers(1, 6))
        ids = rng.integers(0, 6, size=(n, 1))
        values = rng.normal(size=(n,)).astype(dtype)
        torch_grads["bias"] = torch.sparse_coo_tensor(
            torch.tensor(ids.T.reshape(1, n)),
            torch.tensor(values),
            (7,),
            check_invariants=True,
        )
        if pad:
            ids, values = _pad(ids, values, (7,), 6)
        grads["bias"] = jsparse.BCOO((values, ids), shape=(7,))
        # a matrix with element indices (n_sparse=2), sometimes no grad at all
        if t % 4 == 1:
            torch_grads["mat"], grads["mat"] = None, None
        else:
            n = int(rng.integers(1, 8))
            idx = np.stack(
                [rng.integers(0, 3, size=n), rng.integers(0, 4, size=n)], axis=1
            )
            values = rng.normal(size=(n,)).astype(dtype)
            torch_grads["mat"] = torch.sparse_coo_tensor(
                torch.tensor(idx.T), torch.tensor(values), (3, 5), check_invariants=True
            )
            if pad:
                idx, values = _pad(idx, values, (3, 5), 8)
            grads["mat"] = jsparse.BCOO((values, idx), shape=(3, 5))
        # the 0-d parameter: entries all at the one index (summed), no gradient
        # at some steps, an empty one at others (eager only: nse is static)
        if t % 3 == 0:
            torch_grads["scalar"], grads["scalar"] = None, None
        else:
            n = 2 if pad or t % 6 != 2 else 0
            values = rng.normal(size=(n,)).astype(dtype)
            torch_grads["scalar"] = torch.sparse_coo_tensor(
                torch.zeros((0, n), dtype=torch.long),
                torch.tensor(values),
                (),
                check_invariants=True,
            )
            grads["scalar"] = jsparse.BCOO(
                (values, np.zeros((n, 0), np.int32)), shape=()
            )
        seq.append((torch_grads, grads))
    return seq


def _flagged(seq):
    """The funcopt gradients of `seq` with each `None` one as a `has_grad`
    flag (torch's `p.grad = None`, one compiled step for every pattern):
    `[(grads, has_grad)]`. A flagged-off leaf gets its gradient of another
    step, which the step must discard."""
    first = {}
    for _, grads in seq:
        for k, g in grads.items():
            if g is not None:
                first.setdefault(k, g)
    out = []
    for _, grads in seq:
        has_grad = {k: g is not None for k, g in grads.items()}
        filled = {k: first.get(k) if g is None else g for k, g in grads.items()}
        out.append((filled, has_grad))
    return out


def _compare(dtype, jit, maximize, rtol, atol, seed=0, flagged=False):
    """torch and funcopt (jitted or not); with `flagged` (jit only) `None`
    gradients go in as `has_grad` flags (one compiled step), else as `None`
    (each new pattern of them compiles anew under jit)."""
    rng = np.random.default_rng(seed)
    params = _params(rng, dtype)
    # eager runs take unpadded BCOOs (a new nse each step); each shape compiles
    # its own eager kernels, so they run 3 steps (~6 s each): the first step, a
    # step without a gradient for "mat" (t=1) and an empty one for "bias" (t=2)
    seq = _gradients(rng, params, dtype, pad=jit)[: None if jit else 3]
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=maximize)

    names = ["bias", "emb", "mat", "scalar"]  # jax.tree.leaves order, trainable
    tparams = {k: torch.tensor(params[k], requires_grad=True) for k in names}
    topt = torch.optim.SparseAdam([tparams[k] for k in names], **kwargs)
    for torch_grads, _ in seq:
        for k in names:
            tparams[k].grad = torch_grads[k]
        topt.step()

    opt = sparse_adam(**kwargs)
    ours = jax.tree.map(jnp.asarray, params)
    state = opt.init(ours)
    step = jax.jit(opt.step) if jit else opt.step
    if flagged:
        for grads, has_grad in _flagged(seq):
            ours, state = step(ours, grads, state, has_grad=has_grad)
    else:
        for _, grads in seq:
            ours, state = step(ours, grads, state)

    steps = dict(
        zip(["bias", "emb", "frozen", "mat", "scalar"], np.asarray(state.step))
    )
    for k in names:
        assert ours[k].dtype == dtype
        assert_close(ours[k], tparams[k].detach().numpy(), rtol, atol, k)
        tstate = topt.state[tparams[k]]
        assert steps[k] == tstate["step"], f"{k}: step"
        for slot in ("exp_avg", "exp_avg_sq"):
            expected = tstate[slot].numpy()
            ours_slot = state.unpacked().slots[slot][k]
            assert_close(ours_slot, expected, rtol, atol, f"{k}: {slot}")
    np.testing.assert_array_equal(ours["frozen"], params["frozen"])
    # rows never looked up keep their initial values and zero moments
    np.testing.assert_array_equal(ours["emb"][V - 3 :], params["emb"][V - 3 :])
    assert not np.any(np.asarray(state.unpacked().slots["exp_avg"]["emb"][V - 3 :]))
    assert steps["frozen"] == 0


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_sparse_adam_float64_parity(jit, maximize, x64):
    # `None` leaves: eagerly and in the jitted "min" row (each new pattern of
    # them compiles anew); the jitted "max" row takes them as `has_grad` flags
    flagged = jit and maximize
    _compare(np.float64, jit, maximize, rtol=1e-10, atol=1e-12, flagged=flagged)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("jit", [True], ids=["jit"])
def test_sparse_adam_float32_parity(jit, maximize):
    """Jitted, `None` gradients as `has_grad` flags: one compiled step."""
    assert not jax.config.jax_enable_x64
    _compare(np.float32, jit, maximize, rtol=F32_RTOL, atol=F32_ATOL, flagged=True)


def test_sparse_adam_dense_gradient_raises_like_torch():
    param = torch.zeros(3, requires_grad=True)
    param.grad = torch.ones(3)
    with pytest.raises(Exception) as torch_error:
        torch.optim.SparseAdam([param]).step()
    opt = sparse_adam()
    params = {"w": jnp.zeros(3)}
    with pytest.raises(Exception) as our_error:
        opt.step(params, {"w": jnp.ones(3)}, opt.init(params))
    assert type(our_error.value) is type(torch_error.value)
    assert str(our_error.value) == str(torch_error.value)


def test_dense_optimizers_reject_sparse_gradients():
    opt = fo.adam()
    params = {"w": jnp.zeros(3)}
    grad = jsparse.BCOO((jnp.ones(1), jnp.array([[1]])), shape=(3,))
    with pytest.raises(RuntimeError, match=r"\['w'\]: Adam does not support sparse"):
        opt.step(params, {"w": grad}, opt.init(params))


# SGD and Adagrad take sparse gradients (tests/parity/test_sparse_grads.py)
DENSE_ONLY = {
    "Adam": fo.adam,
    "AdamW": fo.adamw,
    "Adamax": fo.adamax,
    "NAdam": fo.nadam,
    "RAdam": fo.radam,
    "RMSprop": fo.rmsprop,
    "Rprop": fo.rprop,
    "Adadelta": fo.adadelta,
    "ASGD": fo.asgd,
    "Adafactor": fo.adafactor,
    "Muon": fo.muon,
}


@pytest.mark.parametrize("name", sorted(DENSE_ONLY))
def test_sparse_gradient_message_is_torchs(name):
    param = torch.zeros(3, 4, requires_grad=True)
    param.grad = torch.zeros(3, 4).to_sparse()
    with pytest.raises(RuntimeError) as torch_error:
        getattr(torch.optim, name)([param]).step()
    opt = DENSE_ONLY[name]()
    params = {"w": jnp.zeros((3, 4))}
    grad = jsparse.BCOO((jnp.ones(1), jnp.array([[1, 2]])), shape=(3, 4))
    with pytest.raises(RuntimeError) as our_error:
        opt.step(params, {"w": grad}, opt.init(params))
    assert str(our_error.value) == f"params['w']: {torch_error.value}"


def test_sparse_adam_optax_update_and_batched_layout(x64):
    """``update`` returns new - old; a batched BCOO is the same gradient."""
    rng = np.random.default_rng(1)
    params = {"emb": jnp.asarray(rng.normal(size=(V, D)))}
    dense = np.zeros((V, D))
    dense[[1, 4]] = rng.normal(size=(2, D))
    grad = jsparse.BCOO.fromdense(jnp.asarray(dense), n_batch=1)
    flat = jsparse.bcoo_update_layout(grad, n_batch=0)
    opt = sparse_adam(lr=0.1)
    state = opt.init(params)
    new, _ = opt.step(params, {"emb": flat}, state)
    updates, _ = opt.update({"emb": grad}, state, params)
    np.testing.assert_allclose(params["emb"] + updates["emb"], new["emb"], rtol=1e-15)
    untouched = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(new["emb"][untouched], params["emb"][untouched])


def test_sparse_params_raise_like_torch():
    """A BCOO parameter: torch's ValueError (at construction; funcopt at
    init and step), naming torch's [group, index] of each, before the
    complex-parameter error."""
    complex_param = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(ValueError) as torch_error:
        sparse = [torch.eye(3).to_sparse() for _ in range(2)]
        torch.optim.SparseAdam([complex_param, *sparse])
    opt = sparse_adam()
    dense = {"a": jnp.zeros(2, jnp.complex64), "b": jnp.eye(3), "c": jnp.eye(3)}
    params = {k: jsparse.BCOO.fromdense(v) if k != "a" else v for k, v in dense.items()}
    with pytest.raises(ValueError) as init_error:
        opt.init(params)
    assert str(init_error.value) == str(torch_error.value)
    grads = {"a": None, "b": None, "c": None}
    with pytest.raises(ValueError) as step_error:
        opt.step(params, grads, opt.init({**dense, "a": jnp.zeros(2)}))
    assert str(step_error.value) == str(torch_error.value)


def test_sparse_adam_tensor_lr_float64_parity(x64):
    """A float32 tensor lr: torch's scalar math (`lr * sqrt(bias_correction2)
    / bias_correction1`) runs in float32 tensor ops, which float64 params
    then see (float64 math would differ by ~1e-8 relative)."""
    rng = np.random.default_rng(2)
    start = rng.normal(size=(V, D))
    kwargs = dict(betas=(0.8, 0.95), eps=1e-6)
    param = torch.tensor(start, requires_grad=True)
    topt = torch.optim.SparseAdam([param], lr=torch.tensor(0.01), **kwargs)
    opt = sparse_adam(lr=jnp.asarray(0.01, jnp.float32), **kwargs)
    ours = {"emb": jnp.asarray(start)}
    state = opt.init(ours)
    step = jax.jit(opt.step)
    for _ in range(12):
        n = int(rng.integers(1, NSE + 1))
        ids = rng.integers(0, V, size=n)
        values = rng.normal(size=(n, D))
        param.grad = torch.sparse_coo_tensor(
            torch.tensor(ids[None]), torch.tensor(values), (V, D), check_invariants=True
        )
        topt.step()
        indices, data = _pad(ids[:, None], values, (V, D), NSE)
        grad = jsparse.BCOO((data, indices), shape=(V, D))
        ours, state = step(ours, {"emb": grad}, state)
    assert_close(ours["emb"], param.detach().numpy(), 1e-10, 1e-12, "emb")
