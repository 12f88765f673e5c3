"""float32 bit for bit against torch's default CPU path, with x64 enabled and
funcopt's bit-exact float32 mode (`fo.precision.set_exact_float32(True)`).

torch rounds every float32 op once and fuses the multiply-adds of
`add(alpha=)`, `addcmul` and `lerp` (x86 AVX2/AVX-512 builds); with x64
funcopt's helpers compute each op in float64 and round it as torch does
(`funcopt/_math.py`), and add Adafactor's norms and means in torch's order
(`funcopt/_reductions.py`). The optimizers below are bit-identical to torch: params,
every buffer and the step counts, at every step checked, on leaves sized for
torch's vectorised blocks and scalar tails alike.

Not exact, and why (``benchmarks/results/float32_bits.md`` has the numbers):
every optimizer that takes a square root, where torch's float32 root is not
correctly rounded (in a child process whose torch roots are made correctly
rounded, Adam, AdamW, RAdam, RMSprop, Adagrad, Adadelta and NAdam are
bit-exact too: the last test). torch's float32 (and float64) `sqrt` on CPU is
MKL's `vsSqrt` (`VML_HA`), not correctly rounded: on an Intel AVX-512 machine
about 0.6% of its results are 1 ulp from the correctly rounded root (none with
``MKL_ENABLE_INSTRUCTIONS=AVX2``), on an AMD EPYC (AVX2) about 16% (under any
MKL setting; measured on uniform inputs); XLA's is correctly rounded. That
covers Adam,
AdamW, NAdam, RAdam, RMSprop, Adagrad, Adadelta and the contrib Adan, LAMB,
Prodigy and schedule-free AdamW (Adafactor's roots are not MKL's: it is
exact here). Muon (not elementwise) matches for the benchmark's first
327 steps; at step 328 its buffers still match but a bfloat16 rounding inside
Newton-Schulz (a norm or matmul sum) differs.
"""

import os

import jax
import numpy as np
import pytest

from tests.parity.cases import FLAG_CASES, OPT_CASES
from tests.torch_ref import (
    NATIVE_DEFAULT_STEP,
    assert_same_bits,
    check_against_torch,
    make_grads,
    native_kernels,
    run_funcopt,
    run_funcopt_flagged,
    run_with_correctly_rounded_sqrt,
)

# the rows that are exact (their all-flags combination), and SGD with nesterov
# (`cases.OPT_CASES` and the flag paths, `cases.FLAG_CASES`)
EXACT = [
    "sgd",
    "adamax",
    "adamax-capturable",
    "rprop",
    "asgd",
    "asgd-capturable",
    "asgd-foreach-capturable",
    "lion",
    "lion-decoupled",
    "schedulefree_sgd",
    # its roots are the `sqrt` instruction, as torch's `rsqrt` and `norm`
    # take them, not MKL's. (Not "adafactor-foreach-tensor-lr": on these
    # leaves the `None` gradients leave the step counts unequal, and torch's
    # foreach step with a tensor lr raises a TypeError there.)
    "adafactor",
    "adafactor-foreach",
    "adafactor-tensor-lr",
]
# exact wherever torch's float32 `sqrt` is correctly rounded, which is not
# every machine's MKL (see `torch_ref.correctly_rounded_torch_sqrt`)
NEED_CORRECTLY_ROUNDED_SQRT = [
    "adam",
    "adamw",
    "radam",
    "radam-capturable",
    "radam-foreach-capturable",
    "nadam-capturable",
    "nadam-foreach-capturable",
    "rmsprop",
    "adagrad",
    "adadelta",
    "nadam",
]
# set in the child process that runs those rows with correctly rounded roots
SQRT_CHILD = "FUNCOPT_TEST_CORRECTLY_ROUNDED_SQRT"
STEPS = 100
EAGER_STEPS = 3
# NATIVE_DEFAULT_STEP: their default step runs funcopt's native kernel on one
# CPU device (the same bits, tests/test_native_fused.py); here they run the
# JAX rule as well


def odd_sized_params(rng: np.random.Generator, dtype) -> dict:
    """float32 leaves of 37, 65, 7 and 24 elements: torch's CPU loops run
    blocks of 16 or 32 float32 elements and a scalar tail (here 5, 1, 7, 24
    or 8 elements)."""
    shapes = {"a": (37,), "b": (5, 13), "c": (7,), "d": (2, 3, 4)}
    tree = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    return {**tree, "frozen": np.arange(2, dtype=np.int32)}


def _rows():
    names = EXACT + (NEED_CORRECTLY_ROUNDED_SQRT if os.environ.get(SQRT_CHILD) else [])
    rows = []
    for case in OPT_CASES + FLAG_CASES:
        if case.name not in names:
            continue
        combos = case.combos()
        picks = [combos[-1]]
        if case.name == "sgd":
            picks.append(next(kw for kw in combos if kw["nesterov"]))
        for i, kw in enumerate(picks):
            rows.append(pytest.param(case, kw, True, id=f"{case.name}-{i}"))
            if case.name in NATIVE_DEFAULT_STEP:
                rows.append(pytest.param(case, kw, False, id=f"{case.name}-{i}-jax"))
    return rows


@pytest.mark.parametrize("case,kwargs,native", _rows())
def test_float32_is_bit_exact(case, kwargs, native, x64, torch_cpu_loop, exact_float32):
    """Jitted, `STEPS` steps with `None` gradients (as `has_grad`), and
    eagerly for the first steps: torch's bits at each."""
    with native_kernels(native):
        _check_bit_exact(case, kwargs)


def _check_bit_exact(case, kwargs):
    assert jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    params = odd_sized_params(rng, np.float32)
    grads = make_grads(rng, params, STEPS, True)
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    check_against_torch(case, kwargs, params, grads, new_params, state)
    # un-jitted (the whole step compiled as one program): the same bits
    first = grads[:EAGER_STEPS]
    new_params, state = run_funcopt(case, kwargs, params, first, jit=False)
    check_against_torch(case, kwargs, params, first, new_params, state)


def test_fused_multiply_add_rounds_once(x64, torch_cpu_loop, exact_float32):
    """`x.add(other, alpha=)` where rounding `alpha*other + x` to float64
    first lands on a float32 midpoint: the fused result, as torch's, is
    the correctly rounded one (round to odd in float64 keeps it)."""
    import jax.numpy as jnp
    import torch

    from funcopt import _math

    alpha = 1 - 2.0**-23
    # alpha*other = 2**-24 - 2**-70: x + alpha*other sits just below the
    # midpoint between x and the next float32
    other = np.full(37, 2.0**-24 + 2.0**-47, np.float32)
    x = np.full(37, 1 + 2.0**-23, np.float32)
    x[::3] = np.random.default_rng(0).normal(size=13)
    expected = torch.tensor(x).add(torch.tensor(other), alpha=alpha).numpy()
    assert expected[1] == np.float32(1 + 2.0**-23)
    actual = _math.add(jnp.asarray(x), jnp.asarray(other), alpha)
    assert_same_bits(actual, expected, "add")


@pytest.mark.parametrize("divisor", [3.0, 0.7, 1.2345678, 0.031622775])
def test_division_by_a_scalar_is_a_division(divisor):
    """`x.div(s)` under `jit`, float32, x64 off (the default mode): torch's
    bits. XLA rewrites `x / broadcast(s)` into `x * (1 / s)`, which moved up
    to 44% of these quotients by an ulp before `_math.true_divide`."""
    import jax.numpy as jnp
    import torch

    from funcopt import _math

    x = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    expected = torch.tensor(x).div(divisor).numpy()
    actual = jax.jit(_math.div)(jnp.asarray(x), jnp.float32(divisor))
    assert_same_bits(actual, expected, f"x / {divisor}")


def test_sqrt_optimizers_are_bit_exact_where_torchs_sqrt_is_correctly_rounded():
    """The optimizers that take a square root differ from torch only by
    torch's `sqrt`: in a child process whose torch takes correctly rounded
    float32 roots (`torch_ref.correctly_rounded_torch_sqrt`, checked by its
    probe), Adam, AdamW, RAdam, RMSprop, Adagrad, Adadelta and NAdam are
    torch's bits too."""
    names = NEED_CORRECTLY_ROUNDED_SQRT
    ids = " or ".join(f"[{name}-0]" for name in names)
    ids += " or " + " or ".join(
        f"[{n}-0-jax]" for n in names if n in NATIVE_DEFAULT_STEP
    )
    k = f"test_float32_is_bit_exact and ({ids})"
    passed = run_with_correctly_rounded_sqrt(__file__, k, SQRT_CHILD)
    assert passed == len(names) + len(NATIVE_DEFAULT_STEP & set(names))


# torch's CPU `pow` of a 0-d tensor and a Python float: each exponent it
# special-cases, and two it does not
_POW_EXPONENTS = [2.0, 3.0, 0.5, -0.5, -1.0, -2.0, 0.75, 1.5]


@pytest.mark.parametrize("exponent", _POW_EXPONENTS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_power_of_a_0d_tensor(exponent, dtype, x64):
    """`_common.pow_scalar` (`base ** exponent`, `base` a 0-d tensor, the
    exponent traced as a hyperparameter is): torch's bits on 2,000 bases,
    its roots correctly rounded (`torch_ref.correctly_rounded_torch_sqrt`)."""
    import jax.numpy as jnp
    import torch

    from funcopt.optim._common import pow_scalar
    from tests.torch_ref import correctly_rounded_torch_sqrt

    bases = np.random.default_rng(0).uniform(0.5, 4.0, 2000).astype(dtype)
    with correctly_rounded_torch_sqrt(float64=True):
        expected = [(torch.tensor(b) ** exponent).numpy() for b in bases]
    power = jax.jit(jax.vmap(pow_scalar, in_axes=(0, None)))
    actual = power(jnp.asarray(bases), jnp.asarray(exponent))
    assert_same_bits(actual, np.stack(expected), f"** {exponent}")


_ASGD_ETA_ROWS = ["asgd-foreach", "asgd-capturable", "asgd-foreach-capturable"]


@pytest.mark.parametrize("alpha", [0.5, -0.5, 3.0, -2.0])
@pytest.mark.parametrize("name", _ASGD_ETA_ROWS)
def test_asgd_eta_takes_torchs_special_powers(
    name, alpha, x64, torch_cpu_loop, exact_float32
):
    """ASGD's float32 `eta` (`(1 + lambd * lr * step) ** alpha` a 0-d
    float32 tensor op in these steps) for an `alpha` torch's `pow`
    special-cases: torch's bits over 30 steps, its roots correctly
    rounded."""
    from tests.torch_ref import correctly_rounded_torch_sqrt

    case = next(c for c in FLAG_CASES if c.name == name)
    kwargs = {**case.combos()[-1], "alpha": alpha}
    rng = np.random.default_rng(0)
    params = odd_sized_params(rng, np.float32)
    grads = make_grads(rng, params, 30, True)
    new_params, state = run_funcopt_flagged(case, kwargs, params, grads)
    with correctly_rounded_torch_sqrt():
        check_against_torch(case, kwargs, params, grads, new_params, state)
