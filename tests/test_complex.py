"""Complex parameters: torch's results where it supports them, its error elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
from tests.parity.cases import OPT_CASES as ALL_CASES
from tests.parity.noise_floor import assert_close
from tests.torch_ref import run_funcopt, run_torch

# the torch.optim rows (rows for other libraries are another wave's work)
OPT_CASES = [c for c in ALL_CASES if c.torch_cls.__module__.startswith("torch.optim")]

REFUSED = {"adafactor", "muon"}  # torch: RuntimeError at step
COMPLEX_CASES = [c for c in OPT_CASES if c.name not in REFUSED]


def complex_params(rng):
    def c(*shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(
            np.complex128
        )

    return {
        "c": c(4, 3),
        "frozen": np.arange(2, dtype=np.int32),
        "r": rng.normal(size=(3,)),
        "s": c(),
    }


def complex_grads(rng, params, steps):
    def g(p):
        if p.dtype == np.complex128:
            return rng.normal(size=p.shape) + 1j * rng.normal(size=p.shape)
        return rng.normal(size=p.shape) if p.dtype == np.float64 else None

    return [jax.tree.map(g, params) for _ in range(steps)]


def test_every_complex_capable_optimizer_is_covered():
    assert {c.name for c in OPT_CASES} - REFUSED == {c.name for c in COMPLEX_CASES}
    assert len(COMPLEX_CASES) == 11


@pytest.mark.parametrize("case", COMPLEX_CASES, ids=lambda c: c.name)
def test_complex_params_match_torch(case, x64):
    rng = np.random.default_rng(0)
    params = complex_params(rng)
    grads = complex_grads(rng, params, 6)
    for kwargs in (case.combos()[0], case.combos()[-1]):
        expected, _ = run_torch(case, kwargs, params, grads)
        actual, _ = run_funcopt(case, kwargs, params, grads, jit=True)
        got = [actual["c"], actual["r"], actual["s"]]
        for a, e, what in zip(got, expected, ["c", "r", "s"]):
            assert np.asarray(a).dtype == e.dtype
            assert_close(a, e, 1e-10, 1e-12, f"{case.name} {kwargs} {what}")


def _torch_error(cls):
    p = torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(Exception) as err:
        opt = cls([p])
        p.grad = torch.ones_like(p)
        opt.step()
    return err.value


@pytest.mark.parametrize(
    "factory, cls",
    [
        (fo.adafactor, torch.optim.Adafactor),
        (fo.muon, torch.optim.Muon),
        (fo.sparse_adam, torch.optim.SparseAdam),
    ],
    ids=["adafactor", "muon", "sparse_adam"],
)
def test_refused_complex_raises_torchs_error(factory, cls):
    expected = _torch_error(cls)
    params = {"w": jnp.zeros((2, 2), jnp.complex64)}
    with pytest.raises(type(expected)) as err:
        factory().init(params)
    assert str(err.value) == str(expected)
    # and at step, for a state made for another (real) tree of the same shape
    state = factory().init({"w": jnp.zeros((2, 2))})
    with pytest.raises(type(expected)):
        factory().step(params, {"w": jnp.ones((2, 2), jnp.complex64)}, state)
