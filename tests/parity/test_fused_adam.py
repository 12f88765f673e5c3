"""Adam and AdamW with `fused=True` against torch's fused CPU kernel
(`torch._fused_adam_`, `_fused_adamw_`), bit for bit in float32.

The kernel's square root is the hardware one (correctly rounded, unlike the
MKL `sqrt` of torch's default path on AVX-512), so with x64 and funcopt's
bit-exact float32 mode the fused rule gives torch's bits on this machine,
in torch's AVX2 kernels (a child with `ATEN_CPU_CAPABILITY=avx2`) and in
its build without vector kernels (`ATEN_CPU_CAPABILITY=default`: no FMA,
[`torch_cpu_block`][funcopt.precision.torch_cpu_block] `None`). Leaves are
sized for both of the kernel's loops: its vectorised loop (8 float32
elements a vector, AVX2 and AVX-512 dispatch alike) and its scalar tail
(each leaf's last `numel % 8` elements), which rounds `exp_avg_sq`
otherwise. The float64, float32 and 16-bit rows of the parity table
(`adam-fused`, `adamw-fused` in `tests/parity/cases.py`) cover the flag grid.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
from tests._subprocess import run_pytest_child
from tests.parity.cases import FLAG_CASES
from tests.torch_ref import (
    check_against_torch,
    check_packed_against_torch,
    make_grads,
    run_funcopt,
    run_funcopt_flagged,
)

CASES = {c.name: c for c in FLAG_CASES if c.name in ("adam-fused", "adamw-fused")}
STEPS = 30
EAGER_STEPS = 3
# set in the child processes that run the rows under another torch CPU build
CHILD = "FUNCOPT_TEST_FUSED_CHILD"


def _rows():
    rows = []
    for name, case in CASES.items():
        combos = case.combos()
        # the all-flags combination, and Adam's coupled weight decay
        picks = [combos[-1]]
        if name == "adam-fused":
            picks.append(
                next(kw for kw in combos if kw["weight_decay"] and kw["amsgrad"])
            )
        rows += [pytest.param(case, kw, id=f"{name}-{i}") for i, kw in enumerate(picks)]
    # tensor betas (float32): the kernel takes their values (`.item()`)
    case = CASES["adamw-fused"]
    betas = tuple(torch.tensor(b) for b in case.fixed["betas"])
    kwargs = {**case.combos()[0], "betas": betas}
    return rows + [pytest.param(case, kwargs, id="adamw-fused-tensor-betas")]


def odd_sized_params(rng: np.random.Generator, dtype) -> dict:
    """Leaves of 37, 65, 7 and 1 elements: vectors of 8 float32 elements
    and scalar tails of 5, 1, 7 and 1 (a leaf with no vector at all)."""
    shapes = {"a": (37,), "b": (5, 13), "c": (7,), "s": ()}
    tree = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    return {**tree, "frozen": np.arange(2, dtype=np.int32)}


@pytest.mark.parametrize("case,kwargs", _rows())
def test_float32_is_bit_exact(case, kwargs, x64, torch_cpu_loop, exact_float32):
    """Jitted, `STEPS` steps with `None` gradients, and (the all-flags
    combination) eagerly for the first steps: torch's params, buffers and
    step counts at each."""
    rng = np.random.default_rng(0)
    params = odd_sized_params(rng, np.float32)
    grads = make_grads(rng, params, STEPS, True)
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    check_against_torch(case, kwargs, params, grads, new_params, state)
    if kwargs != case.combos()[-1]:
        return
    first = grads[:EAGER_STEPS]
    new_params, state = run_funcopt(case, kwargs, params, first, jit=False)
    check_against_torch(case, kwargs, params, first, new_params, state)


@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="runs in the parent only")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_bit_exact_in_other_torch_cpu_builds(capability):
    """Two rows above (coupled weight decay; the other lerp branch) in a
    child whose torch runs its `capability` kernels (checked first): AVX2
    vectors of 8 floats; no vector kernels and no FMA."""
    args = [
        "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__,
        "-k", "test_float32_is_bit_exact and (adam-fused-1 or adamw-fused-0)",
    ]  # fmt: skip
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, CHILD: "1"}
    probe = (
        "import torch\nassert torch.backends.cpu.get_cpu_capability() == "
        f"{capability.upper()!r}, torch.backends.cpu.get_cpu_capability()"
    )
    assert run_pytest_child(args, env, probe=probe) == 2


@pytest.mark.parametrize(
    "factory, cls", [(fo.adam, torch.optim.Adam), (fo.adamw, torch.optim.AdamW)]
)
def test_complex_params_raise_torchs_error(factory, cls):
    """torch's fused kernels take real floating-point params only: its
    `RuntimeError` at the first step, funcopt's at `init` and `step`."""
    p = torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(RuntimeError) as expected:
        opt = cls([p], fused=True)
        p.grad = torch.ones_like(p)
        opt.step()
    params = {"w": jnp.zeros((2, 2), jnp.complex64)}
    with pytest.raises(RuntimeError) as err:
        factory(fused=True).init(params)
    assert str(err.value) == str(expected.value)
    state = factory(fused=True).init({"w": jnp.zeros((2, 2, 2))})
    with pytest.raises(RuntimeError) as err:
        factory(fused=True).step(params, params, state)
    assert str(err.value) == str(expected.value)


def test_packed_leaves_keep_each_leafs_scalar_tail(x64, exact_float32):
    """`funcopt.flat` (leaves packed into rows of one buffer): each leaf's
    scalar tail found in the packed rows, torch's bits as per leaf."""
    case = CASES["adam-fused"]
    check_packed_against_torch(case, case.combos()[-1], np.float32, steps=10)
