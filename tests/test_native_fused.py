"""The native CPU kernels (`funcopt/_native`, `funcopt.optim._fused_native`)
against torch's `fused=True` kernels and, for Adam/AdamW, SGD, Adagrad,
RMSprop, Adamax, Adadelta, RAdam and Rprop, torch's default (single-tensor)
step, live, bit for bit.

The kernels' selling point: torch's bits in float32 without x64 and without
the bit-exact mode (and with them), and in float64. Leaves of 4101, 7, 1 and
0-d elements: vectorised bodies and scalar tails (`numel % 8` float32,
`% 4` float64). The library must be built (`make venv`): without it these
tests fail, unless `FUNCOPT_NATIVE=0` selects the JAX path on purpose.
"""

import contextlib
import functools
import itertools
import os
import platform
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch

import funcopt as fo
import funcopt.flat as ff
from funcopt import _multi_tensor, _packing
from funcopt.optim import _fused_native
from tests._subprocess import run_pytest_child
from tests.torch_ref import (
    OptCase,
    assert_same_bits,
    check_against_torch,
    check_packed_against_torch,
    correctly_rounded_torch_sqrt,
    from_torch,
    native_kernels,
    run_funcopt,
    run_torch,
    to_torch,
    trainable_leaves,
)

DISABLED = not fo._native.enabled_by_environment()
pytestmark = pytest.mark.skipif(DISABLED, reason="FUNCOPT_NATIVE=0: the JAX path")
STEPS = 100
CHILD = "FUNCOPT_TEST_NATIVE_CHILD"

ADAM = OptCase("adam", torch.optim.Adam, fo.adam, {})
ADAMW = OptCase("adamw", torch.optim.AdamW, fo.adamw, {})
SGD = OptCase("sgd", torch.optim.SGD, fo.sgd, {})
ADAGRAD = OptCase("adagrad", torch.optim.Adagrad, fo.adagrad, {})
RMSPROP = OptCase("rmsprop", torch.optim.RMSprop, fo.rmsprop, {})
ADAMAX = OptCase("adamax", torch.optim.Adamax, fo.adamax, {})
ADADELTA = OptCase("adadelta", torch.optim.Adadelta, fo.adadelta, {})
RADAM = OptCase("radam", torch.optim.RAdam, fo.radam, {})
RPROP = OptCase("rprop", torch.optim.Rprop, fo.rprop, {})
NADAM = OptCase("nadam", torch.optim.NAdam, fo.nadam, {})
ASGD = OptCase("asgd", torch.optim.ASGD, fo.asgd, {})


def _grid(case, prefix="", lr=1e-2, fused=None, **axes):
    """Rows of `case`, one per combination of the `axes` values (in their
    order, the last varying fastest), with `lr` and, where given, `fused`;
    ids `prefix` + `_id`."""
    rows = []
    for values in itertools.product(*axes.values()):
        kw = dict(lr=lr, **dict(zip(axes, values)))
        if fused is not None:
            kw["fused"] = fused
        rows.append(pytest.param(case, kw, id=prefix + _id(case, kw)))
    return rows


def _adam_rows():
    return [
        row
        for case in (ADAM, ADAMW)
        for row in _grid(
            case,
            fused=True,
            betas=((0.9, 0.999), (0.3, 0.99)),  # both lerp branches
            weight_decay=(0.0, 0.1),
            amsgrad=(False, True),
            maximize=(False, True),
        )
    ]


def _sgd_rows():
    momenta = (
        (0.0, 0.0, False),
        (0.9, 0.0, False),
        (0.9, 0.3, False),
        (0.9, 0.0, True),
    )
    return [
        row
        for momentum, dampening, nesterov in momenta
        for row in _grid(
            SGD,
            fused=True,
            momentum=(momentum,),
            dampening=(dampening,),
            nesterov=(nesterov,),
            weight_decay=(0.0, 0.1),
            maximize=(False, True),
        )
    ]


def _adagrad_rows():
    return _grid(
        ADAGRAD,
        lr=1e-1,
        fused=True,
        lr_decay=(0.0, 0.01),
        weight_decay=(0.0, 0.1),
        initial_accumulator_value=(0.1,),
        maximize=(False, True),
    )


def _grid_rows(case, **axes):
    """Default-step rows of `case` (torch has no fused kernel for it), one
    per combination of the `axes` values, `lr=1e-2`."""
    return _grid(case, prefix="default-", **axes)


def _rmsprop_rows():
    return _grid_rows(
        RMSPROP,
        alpha=(0.99, 0.3),  # both branches of `grad_avg.lerp_`
        centered=(False, True),
        momentum=(0.0, 0.9),
        weight_decay=(0.0, 0.1),
        maximize=(False, True),
    )


def _adamax_rows():
    return _grid_rows(
        ADAMAX,
        betas=((0.9, 0.999), (0.3, 0.99)),  # both branches of `exp_avg.lerp_`
        weight_decay=(0.0, 0.1),
        maximize=(False, True),
    )


def _path_id(kw):
    return "fused" if kw.get("fused") else "default"


def _adadelta_rows():
    return _grid_rows(
        ADADELTA,
        rho=(0.9, 1.0),  # rho may be 1: `1 - rho` is 0
        weight_decay=(0.0, 0.1),
        maximize=(False, True),
    )


def _radam_rows():
    return _grid_rows(
        RADAM,
        # both lerp branches; rho_t passes 5 at step 6 (beta2 0.999) and at
        # step 3 (beta2 0.99): unrectified then rectified steps
        betas=((0.9, 0.999), (0.3, 0.99)),
        weight_decay=(0.0, 0.1),
        decoupled_weight_decay=(False, True),
        maximize=(False, True),
    )


def _rprop_rows():
    return _grid_rows(
        RPROP,
        etas=((0.5, 1.2), (0.3, 1.5)),
        step_sizes=((1e-6, 50), (2e-3, 2e-2)),  # the clamp's both ends
        maximize=(False, True),
    )


def _nadam_rows():
    return _grid_rows(
        NADAM,
        # both lerp branches; with beta1 0.3 mu_product turns subnormal at
        # step ~46 and 0 at ~55 (torch keeps the subnormals)
        betas=((0.9, 0.999), (0.3, 0.99)),
        weight_decay=(0.0, 0.1),
        decoupled_weight_decay=(False, True),
        maximize=(False, True),
    )


def _asgd_rows():
    return _grid_rows(
        ASGD,
        lambd=(1e-4, 0.5),
        t0=(1e6, 5.0),  # mu is 1 (ax copies the param) / mu < 1 from step 7
        weight_decay=(0.0, 0.1),
        maximize=(False, True),
    )


def _id(case, kw):
    skip = ("fused", "lr")
    return (
        case.name + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k not in skip)
    )


def _default_path_rows():
    """The rows without `fused`: torch's default step."""
    rows = []
    for row in _adam_rows() + _sgd_rows() + _adagrad_rows():
        case, kwargs = row.values
        kw = {k: v for k, v in kwargs.items() if k != "fused"}
        rows.append(pytest.param(case, kw, id="default-" + _id(case, kw)))
    return (
        rows
        + _rmsprop_rows()
        + _adamax_rows()
        + _adadelta_rows()
        + _radam_rows()
        + _rprop_rows()
        + _nadam_rows()
        + _asgd_rows()
    )


ROWS = _adam_rows() + _sgd_rows() + _adagrad_rows()
DEFAULT_ROWS = _default_path_rows()
# one row per optimizer and branch family, for the slower modes
SOME = [r for r in ROWS if r.id.endswith("maximize=True")][::3]
SOME_DEFAULT = [r for r in DEFAULT_ROWS if r.id.endswith("maximize=True")][::3]


def tail_sized_params(rng, dtype) -> dict:
    """4101 elements (512 float32 vectors, a tail of 5; float64: 1025 and 1),
    7 (only a tail), 1, 0-d, and a frozen int leaf."""
    shapes = {"a": (4101,), "b": (7,), "c": (1,), "s": ()}
    tree = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    return {**tree, "frozen": np.arange(2, dtype=np.int32)}


def grads_for(rng, params, steps):
    return [
        jax.tree.map(
            lambda p: (
                rng.normal(size=p.shape).astype(p.dtype)
                if p.dtype != np.int32
                else None
            ),
            params,
        )
        for _ in range(steps)
    ]


def _check(case, kwargs, dtype, steps=STEPS, params=None):
    rng = np.random.default_rng(1)
    params = tail_sized_params(rng, dtype) if params is None else params
    grads = grads_for(rng, params, steps)
    new_params, state = run_funcopt(case, kwargs, params, grads, jit=True)
    if case is SGD and not kwargs["momentum"]:
        # no momentum: torch keeps no state (the harness checks it by its steps)
        expected, _ = run_torch(case, kwargs, params, grads)
        for i, (a, e) in enumerate(zip(trainable_leaves(new_params), expected)):
            assert_same_bits(a, e, f"param {i}")
        return
    check_against_torch(case, kwargs, params, grads, new_params, state)


def _torch_roots(case) -> contextlib.AbstractContextManager:
    """torch's roots correctly rounded for the default steps that take one
    (Adam's, Adagrad's, RMSprop's, Adadelta's, RAdam's, NAdam's): its float32
    and float64 `sqrt` are MKL's, not correctly rounded
    (`correctly_rounded_torch_sqrt`); torch's fused kernels, SGD, Adamax,
    Rprop and ASGD take no such root."""
    if case in (SGD, ADAMAX, RPROP, ASGD):
        return contextlib.nullcontext()
    return correctly_rounded_torch_sqrt(float64=True)


def test_library_is_built():
    """Not a skip: a missing library fails here (FUNCOPT_NATIVE=0 skips)."""
    assert _fused_native.available(), fo._native.load()
    assert _fused_native.native_fused()


KERNELS = (
    "Adam", "Sgd", "Adagrad", "Rmsprop", "Adamax", "Adadelta", "Radam", "Rprop",
    "Nadam", "Asgd",
)  # fmt: skip


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 only")
def test_every_avx2_build_is_vectorised():
    """Each kernel's AVX2 build (`ForCpu<...>::avx2`) uses 256-bit vectors.
    GCC keeps a loop scalar without saying so where it cannot if-convert it
    (a select on a runtime flag, nested selects): Adam with weight decay and
    AMSGrad, and centered RMSprop with momentum, ran 1.3-3x slower so, with
    the same bits. A build GCC found identical to another (SGD's `FIRST`
    flag without momentum) is a jump to it. objdump comes with the binutils
    the build's g++ needs."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) not found"
    text = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", str(fo._native.LIBRARY)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pattern = r"::(\w+)Kernel::segment<([^>]*)>.*>::avx2\("
    blocks = {}
    for block in text.split("\n\n"):
        found = re.search(pattern, block.strip().split("\n")[0])
        if found:
            blocks[found.groups()] = block
    builds = {}
    for key, block in blocks.items():
        jump = re.fullmatch(
            r".*:\n\s*\w+:\s+jmp\s+\w+ <.*?" + pattern + r".*", block.strip(), re.S
        )
        builds[key] = "ymm" in (blocks[jump.groups()] if jump else block)
    assert {kernel for kernel, _ in builds} == set(KERNELS)
    scalar = sorted(key for key, vectorised in builds.items() if not vectorised)
    assert not scalar, f"AVX2 builds without 256-bit vectors: {scalar}"


@pytest.mark.parametrize("case,kwargs", ROWS)
def test_float32_bits_without_x64(case, kwargs, torch_cpu_loop):
    """Every flag combination, 100 steps, float32 without x64 nor the
    bit-exact mode: torch's params and every buffer, bit for bit."""
    _check(case, kwargs, np.float32)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case,kwargs", SOME)
def test_16bit_fused_bits_without_x64(case, kwargs, dtype, torch_cpu_loop):
    """bfloat16 and float16 params with `fused=True`, without x64 (where
    the JAX rules are not torch's bits): torch's fused kernel computes them
    in float32 and rounds each stored buffer; vectors of 16 elements (4109:
    256 and a tail of 13, 29: one and 13, both 5 in float32 vectors; 7 and
    0-d: only a tail; 29 and 7 packed together). SGD: leaves shorter than a
    vector, since torch 2.13's vectorised loop never stores a 16-bit param
    and funcopt computes every element as its scalar loop
    (tests/parity/test_fused_sgd_adagrad.py; longer leaves below)."""
    assert not jax.config.jax_enable_x64
    shapes = {"a": (4109,), "b": (29,), "c": (7,), "s": ()}
    if case is SGD:
        shapes = {"a": (15,), "b": (3, 5), "s": ()}
    rng = np.random.default_rng(2)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    assert _KERNEL_CALL.search(_lowered(case.factory(**kwargs), params))
    _check(case, kwargs, dtype, steps=30, params=params)


# a fused optimizer's kernel in a lowered step (not the packing copies)
_KERNEL_CALL = re.compile(r"funcopt_(adam|sgd|adagrad)")


def _bits(x) -> np.ndarray:
    """A 16-bit array's (or torch tensor's) bits."""
    if isinstance(x, torch.Tensor):
        x = from_torch(x)
    return np.asarray(x).view(np.uint16)


NAN_ROWS = [
    pytest.param(case, dtype, id=f"{case.name}-{name}")
    for case in (ADAM, ADAGRAD)
    for dtype, name in ((ml_dtypes.bfloat16, "bf16"), (np.float16, "f16"))
]


@pytest.mark.parametrize("case,dtype", NAN_ROWS)
def test_16bit_nan_bits_are_torchs(case, dtype, torch_cpu_loop):
    """NaN gradients (payloads, both signs) in a 16-bit leaf's vectorised
    loop and scalar tail: every stored NaN has torch's bits, compared raw
    (`assert_same_bits` takes any NaN for any other). torch's AVX2/AVX-512
    builds: float16 keeps the payload, as F16C does; bfloat16 stores 0xffff
    from the vectorised loop and 0x7fc0 from the scalar tail. Its `default`
    build (`test_torch_default_build_without_fma`): c10's conversions,
    bfloat16 0x7fc0 and float16 0x7e00 with the sign."""
    rng = np.random.default_rng(3)
    n = 29  # a vector of 16 and a tail of 13
    p = rng.normal(size=n).astype(dtype)
    grads = [rng.normal(size=n).astype(dtype) for _ in range(2)]
    nan = 0x7E05 if dtype == np.float16 else 0x7FC5
    for g in grads:
        g.view(np.uint16)[[0, 20]] = nan
        g.view(np.uint16)[[3, 25]] = nan | 0x8000
    kwargs = dict(lr=1e-2, fused=True)
    tp = to_torch(p).requires_grad_()
    topt = case.torch_cls([tp], **kwargs)
    opt = case.factory(**kwargs)
    params, state, step = {"w": p}, opt.init({"w": p}), jax.jit(opt.step)
    for g in grads:
        tp.grad = to_torch(g)
        topt.step()
        params, state = step(params, {"w": g}, state)
    names = ("exp_avg", "exp_avg_sq") if case is ADAM else ("sum",)
    pairs = [("param", params["w"], tp)] + [
        (k, state.unpacked().slots[k]["w"], topt.state[tp][k]) for k in names
    ]
    for what, ours, theirs in pairs:
        np.testing.assert_array_equal(_bits(ours), _bits(theirs), what)
    assert np.isnan(np.asarray(params["w"], np.float32)[[0, 3, 20, 25]]).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "factory,kwargs",
    [
        (fo.adam, dict(amsgrad=True, weight_decay=0.1, maximize=True)),
        (fo.sgd, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
        (fo.sgd, dict(momentum=0.9, dampening=0.3)),
        (fo.adagrad, dict(lr_decay=0.01, weight_decay=0.1)),
    ],
    ids=["adam", "sgd-nesterov", "sgd-dampening", "adagrad"],
)
def test_16bit_fused_kernel_is_the_jax_rule_on_any_leaf(factory, kwargs, dtype, x64):
    """With x64 the JAX rule is torch's 16-bit fused arithmetic: the
    kernel gives its bits where torch 2.13 cannot be compared (SGD's leaves
    of 16 elements and more), on a leaf split over threads (70,003
    elements), one of (30, 7) and one of 9 (packed together), through
    `step` in place and `update` (the new param written over the gradient),
    over 3 steps."""
    rng = np.random.default_rng(4)
    shapes = {"a": (70_003,), "b": (30, 7), "c": (9,)}
    draws = [
        {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
        for _ in range(4)
    ]
    params, grads = draws[0], draws[1:]
    opt = factory(lr=1e-2, fused=True, **kwargs)

    def run(native: bool, through_update: bool):
        with native_kernels(native):
            step, update = jax.jit(opt.step), jax.jit(opt.update)
            lowered = step.lower(params, grads[0], opt.init(params)).as_text()
            assert bool(_KERNEL_CALL.search(lowered)) == native
            p, state = params, opt.init(params)
            for g in grads:
                if through_update:
                    updates, state = update(g, state, p)
                    p = jax.tree.map(lambda a, u: a + u, p, updates)
                else:
                    p, state = step(p, g, state)
            return p, state.unpacked()  # the layouts differ: `init` asks the kernel

    for through_update in (False, True):
        got, want = run(True, through_update), run(False, through_update)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert_same_bits(a, b, f"update={through_update}", reference="JAX rule")


def _converted(kind: int, values: np.ndarray, out_dtype) -> np.ndarray:
    """The kernels' 16-bit conversion `kind` (`funcopt_convert_16bit`)
    of `values`."""
    import ctypes

    lib = ctypes.CDLL(str(fo._native.LIBRARY))
    values = np.ascontiguousarray(values)
    out = np.empty(values.shape, out_dtype)
    status = lib.funcopt_convert_16bit(
        ctypes.c_int(kind),
        ctypes.c_void_p(values.ctypes.data),
        ctypes.c_void_p(out.ctypes.data),
        ctypes.c_int64(values.size),
    )
    assert status == 0
    return out


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_16bit_conversions_round_as_torch(dtype):
    """The kernels read and write 16-bit buffers with bit operations (GCC
    vectorises them): every 16-bit value widens exactly, and 2^22 float32
    bit patterns (every exponent: subnormals, overflow, ties) round to
    nearest even as ml_dtypes and torch round them. NaN stays NaN."""
    widen, narrow = (0, 1) if dtype == np.float16 else (2, 3)
    every = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    assert_same_bits(
        _converted(widen, every, np.float32), every.astype(np.float32), "widen"
    )
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=1 << 22, dtype=np.uint64).astype(np.uint32)
    # ties and their neighbours: halfway between two 16-bit values
    halfway = every.astype(np.float32).view(np.uint32) + (
        1 << (12 if dtype == np.float16 else 15)
    )
    # and exact midpoints, where float16's subnormals are spaced alike
    finite = np.sort(every[np.isfinite(every) & (every >= 0)].astype(np.float64))
    middle = ((finite[:-1] + finite[1:]) / 2).astype(np.float32).view(np.uint32)
    bits = np.concatenate([bits, halfway, halfway + 1, halfway - 1, middle])
    bits = np.concatenate([bits, bits ^ np.uint32(1 << 31)])
    floats = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = floats.astype(dtype)
    assert_same_bits(_converted(narrow, floats, dtype), expected, "narrow")
    torch_dtype = torch.float16 if dtype == np.float16 else torch.bfloat16
    sample = floats[:: 1 << 10]
    via_torch = torch.from_numpy(sample).to(torch_dtype).view(torch.int16).numpy()
    assert_same_bits(_converted(narrow, sample, dtype), via_torch.view(dtype), "torch")


@pytest.mark.parametrize("case,kwargs", SOME)
def test_float32_bits_with_x64_and_exact_mode(
    case, kwargs, torch_cpu_loop, x64, exact_float32
):
    _check(case, kwargs, np.float32)


@pytest.mark.parametrize("case,kwargs", ROWS)
def test_float64_bits(case, kwargs, torch_cpu_loop, x64):
    """torch's double kernel: 4-element vectors, tail `numel % 4`."""
    _check(case, kwargs, np.float64, steps=30)


@pytest.mark.parametrize("case,kwargs", DEFAULT_ROWS)
def test_default_path_float32_bits_without_x64(case, kwargs, torch_cpu_loop):
    """Adam, AdamW, SGD, Adagrad, RMSprop, Adamax, Adadelta, RAdam, Rprop,
    NAdam and ASGD without `fused`, every flag combination, 100 steps, float32
    without x64 nor the bit-exact mode: torch's default step
    (`_single_tensor_adam`, ...), params and every buffer, bit for bit; where
    it takes a square root, with torch's roots correctly rounded
    (`_torch_roots`). The 7- and 1-element leaves are packed into one bucket
    (`funcopt.flat.set_policy`), the others run one call each."""
    with _torch_roots(case):
        _check(case, kwargs, np.float32)


@pytest.mark.parametrize("case,kwargs", SOME_DEFAULT)
def test_default_path_float32_bits_with_x64_and_exact_mode(
    case, kwargs, torch_cpu_loop, x64, exact_float32
):
    with _torch_roots(case):
        _check(case, kwargs, np.float32)


@pytest.mark.parametrize("case,kwargs", DEFAULT_ROWS)
def test_default_path_float64_bits(case, kwargs, torch_cpu_loop, x64):
    with _torch_roots(case):
        _check(case, kwargs, np.float64, steps=30)


@pytest.mark.parametrize("case,kwargs", SOME_DEFAULT)
def test_default_path_flat_buckets(case, kwargs, torch_cpu_loop):
    with _torch_roots(case):
        check_packed_against_torch(case, kwargs, np.float32, steps=10)


@pytest.mark.parametrize("case,kwargs", SOME)
def test_packed_buckets(case, kwargs, torch_cpu_loop):
    """Leaves packed into one buffer (`funcopt.flat`): each leaf's tail and
    step count inside the bucket."""
    check_packed_against_torch(case, kwargs, np.float32, steps=10)


@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="runs in the parent only")
def test_torch_default_build_without_fma():
    """torch's `ATEN_CPU_CAPABILITY=default` build (no FMA; funcopt's
    `torch_cpu_block()` is None there): the kernel's `fma=False` variant,
    fused and default steps, float32 and 16-bit (NaNs included: that build
    stores a 16-bit NaN as c10's scalar conversion does, in its vectorised
    loops too)."""
    args = [
        "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__, "-k",
        "float32_bits_without_x64 or 16bit_fused_bits_without_x64 or 16bit_nan_bits",
    ]  # fmt: skip
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", CHILD: "1"}
    probe = (
        "import torch\nassert torch.backends.cpu.get_cpu_capability() == "
        "'DEFAULT', torch.backends.cpu.get_cpu_capability()"
    )
    rows = len(ROWS) + len(DEFAULT_ROWS) + 2 * len(SOME) + len(NAN_ROWS)
    assert run_pytest_child(args, env, probe=probe) == rows


@pytest.mark.parametrize(
    "case,kwargs",
    [
        (RMSPROP, dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.1)),
        (ADAMW, dict(lr=1e-2, amsgrad=True, fused=True)),
        (SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, fused=True)),
        (ADAGRAD, dict(lr=1e-1, lr_decay=0.01, fused=True)),
    ],
    ids=lambda x: getattr(x, "name", ""),
)
def test_large_leaves_split_over_threads(case, kwargs, torch_cpu_loop):
    """Leaves large enough to be split over XLA's intra-op threads (in
    chunks of whole vectors, the tail in the last): torch's bits still.
    "b" is just over the two-chunk threshold (2 x 16,384 elements)."""
    rng = np.random.default_rng(5)
    params = {
        "a": rng.normal(size=(1 << 18) + 5).astype(np.float32),
        "b": rng.normal(size=40_003).astype(np.float32),
    }
    grads = grads_for(rng, params, 5)
    new_params, state = run_funcopt(case, kwargs, params, grads, jit=True)
    with _torch_roots(case):
        check_against_torch(case, kwargs, params, grads, new_params, state)


@pytest.mark.parametrize(
    "case,kwargs",
    [
        (ADAM, dict(lr=1e-2, weight_decay=0.1, fused=True)),
        (ADAMW, dict(lr=1e-2, amsgrad=True)),
        (SGD, dict(lr=0.5, momentum=0.9, fused=True)),
        (SGD, dict(lr=0.5, momentum=0.9)),
        (ADAGRAD, dict(lr=0.5, fused=True)),
        (ADAGRAD, dict(lr=0.5)),
        (RMSPROP, dict(lr=1e-2, centered=True, momentum=0.9)),
        (ADAMAX, dict(lr=1e-2)),
        (ADADELTA, dict(lr=1.0, eps=1e-40)),
        (RADAM, dict(lr=1e-2)),
        (RPROP, dict(lr=1e-39, step_sizes=(1e-41, 50))),
        (NADAM, dict(lr=1e-2)),
        (ASGD, dict(lr=1e-2, t0=1.0)),
    ],
    ids=lambda x: getattr(x, "name", None) or _path_id(x),
)
def test_subnormals_are_kept_as_torch_keeps_them(case, kwargs, torch_cpu_loop):
    """Params and gradients in float32's subnormal range (below 2**-126): torch
    keeps subnormal inputs and results; XLA runs its threads with them
    flushed to zero (so do the JAX rules), the kernels clear that while they
    run. A leaf split over threads ("b") and one that is not ("a")."""
    rng = np.random.default_rng(7)
    params = {
        "a": (rng.normal(size=4101) * 1e-38).astype(np.float32),
        "b": (rng.normal(size=40_003) * 1e-38).astype(np.float32),
    }
    assert np.abs(params["a"]).min() < 2.0**-126
    grads = [
        {
            k: (rng.normal(size=v.shape) * 1e-39).astype(np.float32)
            for k, v in params.items()
        }
        for _ in range(4)
    ]
    new_params, state = run_funcopt(case, kwargs, params, grads, jit=True)
    with _torch_roots(case):
        check_against_torch(case, kwargs, params, grads, new_params, state)


def _setup(case=ADAM, kwargs=None, dtype=np.float32):
    kwargs = kwargs or dict(lr=1e-2, weight_decay=0.1, amsgrad=True, fused=True)
    rng = np.random.default_rng(2)
    params = jax.tree.map(jnp.asarray, tail_sized_params(rng, dtype))
    grads = jax.tree.map(jnp.asarray, grads_for(rng, params, 1)[0])
    opt = case.factory(**kwargs)
    return opt, params, grads, opt.init(params)


@pytest.mark.parametrize("policy", ["auto", "never"])
def test_rmsprop_reads_momentum_at_every_step(policy, torch_cpu_loop):
    """torch's `if momentum > 0` at every step: a group whose momentum is
    set to 0 after its buffer exists steps without it (the buffer kept),
    and with it again when set back; the small leaves packed (`"auto"`), or
    each in its own buffers, stepped in one call (`"never"`)."""
    rng = np.random.default_rng(6)
    params = tail_sized_params(rng, np.float32)
    grads = grads_for(rng, params, 6)
    opt = fo.rmsprop(lr=1e-2, momentum=0.9, centered=True)
    with ff.policy(policy):
        p, s = jax.tree.map(jnp.asarray, params), opt.init(params)
        step = jax.jit(opt.step)
        g0 = jax.tree.map(jnp.asarray, grads[0])
        hlo = step.lower(p, g0, s).compile().as_text()
    if policy == "never":
        calls = [(t, n) for t, n, _ in _optimizer_kernels(hlo)]
        assert calls == [("funcopt_rmsprop_centered_momentum_many", 4)], hlo
    tparams = [torch.tensor(params[k]).requires_grad_() for k in "abcs"]
    topt = torch.optim.RMSprop(tparams, lr=1e-2, momentum=0.9, centered=True)
    for i, g in enumerate(grads):
        momentum = 0.0 if i in (2, 3) else 0.9
        s = fo.set_hparam(s, "momentum", momentum)
        topt.param_groups[0]["momentum"] = momentum
        with ff.policy(policy):
            p, s = step(p, jax.tree.map(jnp.asarray, g), s)
        for tp, k in zip(tparams, "abcs"):
            tp.grad = torch.tensor(g[k])
        with correctly_rounded_torch_sqrt(float64=True):
            topt.step()
    for tp, k in zip(tparams, "abcs"):
        assert_same_bits(p[k], tp.detach().numpy(), k)
        state = topt.state[tp]
        for name in ("square_avg", "grad_avg", "momentum_buffer"):
            ours = s.unpacked().slots[name][k]
            assert_same_bits(ours, state[name].numpy(), f"{k} {name}")


def test_jit_and_eager_agree(torch_cpu_loop):
    opt, params, grads, state = _setup()
    for _ in range(3):
        eager = opt.step(params, grads, state)
        jitted = jax.jit(opt.step)(params, grads, state)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            assert_same_bits(a, b, "eager vs jit")
        params, state = eager


@pytest.mark.parametrize(
    "case,kwargs",
    [
        *((c, {"fused": f}) for c in (ADAM, SGD, ADAGRAD) for f in (True, False)),
        (RMSPROP, {"centered": True, "momentum": 0.9}),
        (ADAMAX, {"weight_decay": 0.1}),
        (ADADELTA, {"weight_decay": 0.1}),
        (RADAM, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        (RPROP, {}),
        (NADAM, {"weight_decay": 0.1}),
        (ASGD, {"t0": 1.0}),
    ],
    ids=lambda x: x.name if isinstance(x, OptCase) else _path_id(x),
)
def test_grad_through_a_step_is_the_jax_paths(case, kwargs, torch_cpu_loop):
    """`jax.grad` of a loss of the stepped params (w.r.t. params, gradient
    and lr): the native step's derivative is the JAX rule's."""
    kwargs = {"lr": 1e-2, **kwargs}
    if case is SGD:
        kwargs["momentum"] = 0.9
    opt, params, grads, state = _setup(case, kwargs)
    params = {k: v for k, v in params.items() if k != "frozen"}
    grads = {k: v for k, v in grads.items() if k != "frozen"}
    state = opt.init(params)
    state = opt.step(params, grads, state)[1]  # buffers set

    def loss(params, grads, lr):
        new, _ = opt.step(params, grads, fo.set_lr(state, lr))
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new))

    d = jax.grad(loss, argnums=(0, 1, 2))
    got = jax.jit(d)(params, grads, 1e-2)
    with native_kernels(False):
        want = jax.jit(d)(params, grads, 1e-2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "case,kwargs",
    [(ADAM, None), (NADAM, {"weight_decay": 0.1}), (ASGD, {"t0": 1.0})],
    ids=lambda x: getattr(x, "name", ""),
)
def test_vmap_runs_each_batch_element(case, kwargs, torch_cpu_loop):
    """Each batch element its own kernel call; NAdam's and ASGD's 0-d
    per-parameter state batched with the params."""
    opt, params, grads, state = _setup(case, kwargs)
    batch = 3
    bp = jax.tree.map(lambda x: jnp.stack([x * (i + 1) for i in range(batch)]), params)
    bg = jax.tree.map(lambda x: jnp.stack([x - i for i in range(batch)]), grads)
    bs = jax.vmap(opt.init)(bp)
    out_p, out_s = jax.jit(jax.vmap(opt.step))(bp, bg, bs)
    for i in range(batch):
        one = jax.tree.map(lambda x, i=i: x[i], (bp, bg, bs))
        p, s = jax.jit(opt.step)(*one)
        for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((out_p, out_s))):
            assert_same_bits(a, b[i], f"vmap element {i}")


def test_set_lr_takes_effect_without_recompiling(torch_cpu_loop):
    """lr is a runtime buffer: a new lr, the same executable, torch's bits."""
    rng = np.random.default_rng(3)
    params = tail_sized_params(rng, np.float32)
    grads = grads_for(rng, params, 6)
    kwargs = dict(lr=1e-2, weight_decay=0.1, fused=True)
    opt = fo.adamw(**kwargs)
    step = jax.jit(opt.step)
    p, s = jax.tree.map(jnp.asarray, params), opt.init(params)
    for i, g in enumerate(grads):
        if i == 3:
            s = fo.set_lr(s, 3e-3)
        p, s = step(p, jax.tree.map(jnp.asarray, g), s)
    assert step._cache_size() == 1
    # torch: the same schedule
    tparams = [torch.tensor(params[k]).requires_grad_() for k in "abcs"]
    topt = torch.optim.AdamW(tparams, **kwargs)
    for i, g in enumerate(grads):
        if i == 3:
            topt.param_groups[0]["lr"] = 3e-3
        for tp, k in zip(tparams, "abcs"):
            tp.grad = torch.tensor(g[k])
        topt.step()
    for tp, k in zip(tparams, "abcs"):
        assert_same_bits(p[k], tp.detach().numpy(), k)


def _optimized_hlo(opt, params, grads, state) -> str:
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    return step.lower(params, grads, state).compile().as_text()


def _float_copies(hlo: str, leaves: int) -> list[str]:
    """The copies of float arrays (any width) in an optimized HLO, but for
    those fused into the loop that computes their operand (no pass of their
    own). 0-d float32 values may be copied, 4 bytes each: the step
    counters, and the per-parameter scalars such as NAdam's mu_product,
    stacked (`[k]` or `[k,1]`, k up to one per leaf) and sliced for the
    leaves that share a kernel."""
    computations = hlo.split("\n\n")
    hlo = "\n\n".join(c for c in computations if not c.startswith("%fused_comp"))
    copies = re.finditer(r"= f32\[(\d+)(,1)?\]\S* copy(?:-start)?\(.*", hlo)
    stacked = [c.group(0) for c in copies if int(c.group(1)) <= leaves]
    return [
        c
        for c in re.findall(
            r"= (?:f16|bf16|f32|f64)\[[^\]]+\]\S* copy(?:-start)?\(.*", hlo
        )
        if c not in stacked
    ]


# every kernel and branch family: (factory, kwargs), ids
KERNEL_STEPS = pytest.mark.parametrize(
    "factory,kwargs",
    [
        (fo.adam, dict(fused=True)),
        (fo.adam, dict(fused=True, amsgrad=True)),
        (fo.sgd, dict(lr=0.1, momentum=0.9, fused=True)),
        (fo.adagrad, dict(fused=True)),
        (fo.adam, {}),
        (fo.adagrad, dict(lr_decay=0.01, weight_decay=0.1, maximize=True)),
        (fo.adamw, dict(amsgrad=True)),
        (fo.sgd, dict(lr=0.1, momentum=0.9)),
        (fo.sgd, dict(lr=0.1)),
        (fo.rmsprop, {}),
        (fo.rmsprop, dict(centered=True, momentum=0.9)),
        (fo.rmsprop, dict(momentum=0.9, weight_decay=0.1)),
        (fo.rmsprop, dict(centered=True, maximize=True)),
        (fo.adamax, dict(weight_decay=0.1)),
        (fo.adadelta, {}),
        (fo.radam, dict(weight_decay=0.1)),
        (fo.rprop, {}),
        (fo.nadam, dict(weight_decay=0.1)),
        (fo.asgd, dict(t0=1.0)),
    ],
    ids=[
        "adam", "amsgrad", "sgd", "adagrad",
        "default-adam", "default-adagrad", "default-adamw-amsgrad",
        "default-sgd-momentum", "default-sgd",
        "default-rmsprop", "default-rmsprop-centered-momentum",
        "default-rmsprop-momentum", "default-rmsprop-centered", "default-adamax",
        "default-adadelta", "default-radam", "default-rprop", "default-nadam",
        "default-asgd",
    ],
)  # fmt: skip


# the optimizers whose kernels step many leaves in one call (`_run_many`)
MANY_LEAVES = (fo.adam, fo.adamw, fo.sgd, fo.adagrad, fo.rmsprop)


def _kernel_calls(hlo: str) -> list[tuple[str, int, dict[int, int]]]:
    """Each kernel call of an optimized HLO text: its target, the leaves it
    steps (its `leaves` attribute; 1 without) and its results' aliased
    operands (result index -> operand index)."""
    calls = []
    for line in hlo.splitlines():
        target = re.search(r'custom_call_target="(funcopt_\w+)"', line)
        if target is None:
            continue
        leaves = re.search(r"leaves = (\d+)", line)
        aliases = re.findall(r"\{(\d*)\}: \((\d+),", line)
        calls.append((
            target.group(1),
            int(leaves.group(1)) if leaves else 1,
            {int(r or 0): int(o) for r, o in aliases},
        ))  # fmt: skip
    return calls


def _close_to_the_kernels(got, want, what: str) -> None:
    """The float32 JAX rules' numbers without x64 (`got`) against the
    kernels' (`want`, torch's bits), within 1e-4 of `want`'s largest value.
    Beyond rounding, the JAX rules hold the hyperparameters in float32:
    `1 - beta2` is 0.99998713e-3 there, torch's 1e-3 computed in double and
    rounded once, a relative error of 1.3e-5 in each increment of
    `exp_avg_sq` (optax's too), which the bias corrections carry into the
    params. Integers (step counts): equal."""
    if not jnp.issubdtype(jnp.asarray(want).dtype, jnp.inexact):
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    got, want = (np.asarray(x, np.float64) for x in (got, want))
    scale = np.max(np.abs(want), initial=np.finfo(np.float32).tiny)
    np.testing.assert_allclose(got, want, rtol=0, atol=scale * 1e-4, err_msg=what)


def _optimizer_kernels(hlo: str) -> list[tuple[str, int, dict[int, int]]]:
    """`_kernel_calls` but for the copies that pack and unpack buckets."""
    copies = (_packing.PACK_TARGET, _packing.UNPACK_TARGET)
    return [call for call in _kernel_calls(hlo) if call[0] not in copies]


@pytest.mark.parametrize("policy", ["never", "auto"])
@KERNEL_STEPS
def test_donated_step_is_custom_calls_in_place(factory, kwargs, policy):
    """The optimized HLO of the donated jitted step: every leaf stepped by
    one custom call, no copy (results alias the donated inputs). The
    leaves here are large (and one 0-d): per-leaf state under either
    policy, one call per leaf, or one for every leaf where the kernel steps
    many (`MANY_LEAVES`). (The packed state of `"always"`:
    `test_packed_state_steps_with_params_where_they_are`.)"""
    rng = np.random.default_rng(4)
    shapes = {"a": (4101,), "b": (300, 7), "c": ()}
    params = {
        k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()
    }
    grads = jax.tree.map(jnp.ones_like, params)
    with ff.policy(policy):
        opt = factory(**kwargs)
        state = opt.init(params)
        hlo = _optimized_hlo(opt, params, grads, state)
    calls = _kernel_calls(hlo)
    assert sum(leaves for _, leaves, _ in calls) == len(shapes), hlo
    many = factory in MANY_LEAVES
    packed = _multi_tensor.packed_layout(state) is not None
    assert not packed  # large leaves and a 0-d one: per-leaf state
    assert len(calls) == (1 if many else len(shapes)), hlo
    assert not _float_copies(hlo, len(shapes)), hlo
    assert "output_to_operand_aliasing" in hlo
    with native_kernels(False):
        assert "custom_call_target" not in _optimized_hlo(
            opt, params, grads, opt.init(params)
        )


@pytest.mark.parametrize("policy", ["never", "always"])
@KERNEL_STEPS
def test_many_leaves_in_one_call_are_each_leaf_stepped_alone(
    factory, kwargs, policy, x64
):
    """Where one kernel call steps many leaves (`MANY_LEAVES`), each leaf's
    param and buffers are the bits of that leaf stepped alone (its own
    call): over three steps, a leaf with no gradient (None) and one masked
    out by a traced `has_grad`, and leaves whose elements the threads split
    as one range (cut inside a leaf with a tail, at a whole vector). With
    per-leaf state (`"never"`) all in one call, float32 and float64 leaves
    together; with the state packed (`"always"`), the float32 leaves with
    dimensions in one call, their state buffers a bucket's. The other
    kernels: one call a leaf, or a bucket (`"always"`)."""
    rng = np.random.default_rng(11)
    shapes = {"a": (20_003,), "b": (30_001,), "c": (300, 7), "d": (), "e": (4101,)}
    params = {
        k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()
    }
    params["e"] = params["e"].astype(jnp.float64)
    with ff.policy(policy):
        opt = factory(**kwargs)
        state = opt.init(params)
        step = jax.jit(opt.step)
        hlo = step.lower(params, params, state).compile().as_text()
    calls = [leaves for _, leaves, _ in _optimizer_kernels(hlo)]
    if policy == "never":
        assert calls == ([5] if factory in MANY_LEAVES else [1] * 5), hlo
    elif _multi_tensor.packed_layout(state) is not None:
        # a bucket of every float32 leaf, or (`MANY_LEAVES`) one of the
        # large ones, read where they are, and the 0-d leaf's; the float64
        # leaf's
        large = factory in MANY_LEAVES
        assert sorted(calls) == ([1, 1, 3] if large else [1, 1]), hlo
    with ff.policy(policy):  # traced under it
        masked = jax.jit(lambda p, g, s, on: opt.step(p, g, s, has_grad=on))
        alone = {k: (params[k], opt.init({k: params[k]})) for k in shapes}
        for i in range(3):
            grads = {
                k: jnp.asarray(rng.normal(size=s), params[k].dtype)
                for k, s in shapes.items()
            }
            grads["d"] = None if i == 1 else grads["d"]
            has_grad = {k: jnp.asarray(not (i == 2 and k == "b")) for k in shapes}
            params, state = masked(params, grads, state, has_grad)
            for k in shapes:
                if grads[k] is None or not has_grad[k]:
                    continue
                alone[k] = step({k: alone[k][0]}, {k: grads[k]}, alone[k][1])
                alone[k] = (alone[k][0][k], alone[k][1])
    slots = state.unpacked().slots
    for k in shapes:
        assert_same_bits(params[k], alone[k][0], k)
        for name, buffers in slots.items():
            assert_same_bits(buffers[k], alone[k][1].unpacked().slots[name][k], name)


def _steps_with_gaps(rng, shapes, dtype, none, off, steps=4):
    """`steps` steps' gradients and `has_grad` flags: leaf `none`'s gradient
    None at step 1, leaf `off`'s flag false at step 2, the others
    stepping."""
    for i in range(steps):
        g = {k: jnp.asarray(rng.normal(size=v), dtype) for k, v in shapes.items()}
        g[none] = None if i == 1 else g[none]
        yield g, {k: jnp.asarray(not (i == 2 and k == off)) for k in shapes}


@pytest.mark.parametrize(
    "factory,kwargs,dtype",
    [
        (fo.adam, dict(fused=True), jnp.float32),
        (fo.adam, dict(fused=True), jnp.bfloat16),
        (fo.adamw, dict(amsgrad=True), jnp.float32),
        (fo.sgd, dict(lr=0.1, momentum=0.9, nesterov=True, fused=True), jnp.float32),
        (fo.sgd, dict(lr=0.1, momentum=0.9, nesterov=True, fused=True), jnp.bfloat16),
        (fo.sgd, dict(lr=0.1, momentum=0.9, dampening=0.5), jnp.float32),
        (fo.adagrad, dict(fused=True, weight_decay=0.1), jnp.float32),
        (fo.adagrad, dict(fused=True, lr_decay=0.1), jnp.bfloat16),
        (fo.rmsprop, dict(centered=True, momentum=0.9), jnp.float32),
        (fo.rmsprop, dict(weight_decay=0.1), jnp.float32),
    ],
    ids=[
        "adam", "adam-bf16", "default-adamw-amsgrad", "sgd-nesterov",
        "sgd-nesterov-bf16", "default-sgd-momentum", "adagrad", "adagrad-bf16",
        "default-rmsprop-centered-momentum", "default-rmsprop",
    ],
)  # fmt: skip
def test_packed_state_steps_with_params_where_they_are(factory, kwargs, dtype):
    """A packed state's bucket of large leaves under Adam/AdamW, SGD,
    Adagrad or RMSprop (`set_policy("always")`): one kernel call reads the
    leaves' params and gradients where they are (the donated step packs and
    unpacks none of them) and updates the packed buffers in place; each
    leaf's bits as
    stepped alone over steps with a None gradient and a traced `has_grad`
    false (that leaf skipped by the call), and of `update`, which runs the
    kernel on such a bucket too (the new params written over the
    gradients, a skipped leaf's param copied there). 16-bit params: with
    `fused=True` (torch's default steps round each op to 16 bits: the JAX
    rules). The reference: each leaf stepped alone (its own call)."""
    rng = np.random.default_rng(12)
    # above 4 KB (`AUTO_MAX_LEAF_BYTES`): smaller leaves are packed per step
    shapes = {"a": (2100,), "b": (50, 60), "c": (1100, 2), "d": (3001,), "e": (2500,)}
    params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
    opt = factory(**kwargs)
    assert _multi_tensor.packed_layout(opt.init(params)) is None  # "auto"
    with ff.policy("always"):
        state = opt.init(params)
        assert _multi_tensor.packed_layout(state) is not None
        hlo = _optimized_hlo(opt, params, params, state)
        step = jax.jit(lambda p, g, s, on: opt.step(p, g, s, has_grad=on))
        update = jax.jit(lambda g, s, p, on: opt.update(g, s, p, has_grad=on))
        flags = {k: jnp.asarray(True) for k in shapes}
        update_hlo = update.lower(params, state, params, flags).compile().as_text()
        p, r = params, np.random.default_rng(13)
        alone = {k: (params[k], opt.init({k: params[k]})) for k in shapes}
        for g, on in _steps_with_gaps(r, shapes, dtype, none="c", off="d"):
            updates, from_update = update(g, state, p, on)
            new_p, state = step(p, g, state, on)
            for a, b in zip(jax.tree.leaves(from_update), jax.tree.leaves(state)):
                assert_same_bits(a, b, "update's state")
            for k in shapes:
                assert_same_bits(updates[k], new_p[k] - p[k], f"update {k}")
                if g[k] is not None and on[k]:
                    stepped = step({k: alone[k][0]}, {k: g[k]}, alone[k][1], {k: on[k]})
                    alone[k] = (stepped[0][k], stepped[1])
            p = new_p
    for program in (hlo, update_hlo):
        ((target, leaves, _),) = _optimizer_kernels(program)
        assert target.endswith("_many") and leaves == len(shapes), program
    assert not _float_copies(hlo, len(shapes)), hlo
    slots = state.unpacked().slots
    for k in shapes:  # each leaf as stepped alone (its own call)
        assert_same_bits(p[k], alone[k][0], k)
        for name, buffers in slots.items():
            assert_same_bits(buffers[k], alone[k][1].unpacked().slots[name][k], name)


@KERNEL_STEPS
def test_update_runs_the_jax_rules(factory, kwargs):
    """`update` (the optax protocol) runs the JAX rules on the leaves it
    steps one by one, which XLA fuses with `new - param` and
    `optax.apply_updates` (a kernel is a custom call it cannot fuse): no
    kernel for them, one for the bucket of small leaves (packed: nothing to
    fuse); its new params and states within float32 rounding of the
    kernels' step (torch's bits), on a tree with large leaves, small
    leaves packed into a bucket and a 0-d one, and on `funcopt.flat`
    buckets (no kernel); a donated `update` + `apply_updates` step on
    gradients it computes calls the bucket's kernel only (XLA's own copies,
    where a fusion writes a buffer another still reads, are optax's
    too)."""
    rng = np.random.default_rng(9)
    shapes = {"a": (40_003,), "b": (4101,), "c": (30, 7), "d": (7,), "s": ()}
    params, grads, p2, g2 = (
        {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        for _ in range(4)
    )
    opt = factory(**kwargs)
    step, update = jax.jit(opt.step), jax.jit(opt.update)
    # a second step: from momentum buffers as the first left them
    state = opt.init(params)
    for p, g in ((params, grads), (p2, g2)):
        new_params, want = step(p, g, state)
        updates, state = update(g, state, p)
        for k in shapes:
            _close_to_the_kernels(p[k] + updates[k], new_params[k], k)
        for got, expected in zip(
            jax.tree.leaves(state), jax.tree.leaves(want), strict=True
        ):
            _close_to_the_kernels(got, expected, "state")

    def kernels(*args) -> int:
        return len(_optimizer_kernels(update.lower(*args).compile().as_text()))

    assert kernels(grads, state, params) == 1  # the bucket of "c" and "d"
    large = {k: params[k] for k in ("a", "b", "s")}
    assert kernels(large, opt.init(large), large) == 0

    layout = ff.layout(params, opt)
    flat, flat_grads = layout.pack(params), layout.pack(grads)
    flat_state = opt.init(flat)
    new_flat, want = step(flat, flat_grads, flat_state)
    updates, got = update(flat_grads, flat_state, flat)
    assert kernels(flat_grads, flat_state, flat) == 0
    for u, new, p in zip(updates.buffers, new_flat.buffers, flat.buffers, strict=True):
        _close_to_the_kernels(p + u, new, "flat")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _close_to_the_kernels(a, b, "flat state")

    def train_step(params, state):
        grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x)) for x in p.values()))
        updates, state = opt.update(grads(params), state, params)
        return optax.apply_updates(params, updates), state

    donated = jax.jit(train_step, donate_argnums=(0, 1))
    hlo = donated.lower(params, opt.init(params)).compile().as_text()
    assert len(_optimizer_kernels(hlo)) == 1, hlo


@pytest.mark.parametrize(
    "factory,kwargs,dtype",
    [
        (fo.adamw, {}, jnp.float32),
        (fo.adam, dict(fused=True, amsgrad=True), jnp.bfloat16),
        (fo.sgd, dict(lr=0.1, momentum=0.9, nesterov=True), jnp.float32),
        (fo.adagrad, dict(lr_decay=0.01, weight_decay=0.1), jnp.float32),
        (fo.rmsprop, dict(centered=True, momentum=0.9), jnp.float32),
        (fo.nadam, {}, jnp.float32),  # no kernel for many leaves: packed
    ],
    ids=["adamw", "amsgrad-bf16", "sgd-nesterov", "adagrad", "rmsprop", "nadam"],
)  # fmt: skip
def test_update_on_computed_gradients_steps_small_leaves_where_they_are(
    factory, kwargs, dtype
):
    """`update` + `apply_updates` in one `jit`, the gradients clipped
    there (`optax.chain(optax.clip_by_global_norm(1.0), opt)`): the packed
    bucket of small leaves (one spans several rows) is stepped by one call
    for many leaves that reads their params and gradients where they are
    and writes the new params over the clipped gradients
    (`_fused_native.update_steps_buckets_where_they_are`: no pack, no
    unpack), with a None gradient and traced `has_grad` flags too;
    gradients that are arguments of the `jit` are packed (written over,
    each would be copied first), and so is a rule without such a kernel;
    clipped gradients the program also returns come back as the clip made
    them (XLA copies them before the call). Over steps with a None
    gradient and a `has_grad` false, `update`'s increments are the bits of
    `opt.step`'s new params minus the params, on the same clipped
    gradients (the clip compiled twice: its global norm is one reduction,
    the same bits), and its state has `opt.step`'s bits."""
    rng = np.random.default_rng(21)
    shapes = {"a": (33,), "b": (5, 7), "c": (100,), "d": (3,)}
    params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}
    clip = optax.clip_by_global_norm(1.0)
    opt = factory(**kwargs)
    chained = optax.chain(clip, opt)

    @jax.jit
    def update(g, s, p, on):
        return chained.update(g, s, p, has_grad=on)

    @jax.jit
    def step(g, s, p, on):
        clipped, _ = clip.update(g, None)
        return opt.step(p, clipped, s, has_grad=on)

    @jax.jit
    def update_returning_clipped(g, s, p):
        clipped, _ = clip.update(g, None)
        return opt.update(clipped, s[1], p)[0], clipped

    state = chained.init(params)
    layout = _multi_tensor.packed_layout(state[1])
    assert layout is not None and max(layout.buckets[0].rows) > 1
    many = factory in MANY_LEAVES
    on = {k: jnp.asarray(True) for k in shapes}
    no_b = {**params, "b": None}
    for args in ((params, state, params, None), (no_b, state, params, on)):
        hlo = update.lower(*args).compile().as_text()
        targets = [t for t, _, _ in _kernel_calls(hlo)]
        assert (_packing.UNPACK_TARGET in targets) != many, targets
        if many:  # (`has_grad`'s flags are stacked by a pack of bools)
            assert not re.search(r"= f\S+ custom-call\(.*funcopt_pack", hlo), hlo
            ((target, leaves, aliases),) = _optimizer_kernels(hlo)
            live = len(shapes) - (args[0] is no_b)
            assert target.endswith("_many") and leaves == live, hlo
            # the new params over the gradients: result i, operand live + i
            assert all(aliases[i] == live + i for i in range(live)), hlo
    passed_in = jax.jit(lambda g, s, p: opt.update(g, s, p))
    text = passed_in.lower(params, state[1], params).compile().as_text()
    assert _packing.PACK_TARGET in [t for t, _, _ in _kernel_calls(text)]
    _, clipped = update_returning_clipped(params, state, params)
    want, _ = jax.jit(lambda g: clip.update(g, None))(params)
    for k in shapes:
        assert_same_bits(clipped[k], want[k], f"returned clipped gradient {k}")

    p, stepped = params, state[1]
    steps = _steps_with_gaps(rng, shapes, dtype, none="b", off="d")
    for i, (g, on) in enumerate(steps):
        updates, state = update(g, state, p, on)
        new_p, stepped = step(g, stepped, p, on)
        for a, b in zip(
            jax.tree.leaves(state[1]), jax.tree.leaves(stepped), strict=True
        ):
            assert_same_bits(a, b, f"step {i}: update's state")
        for k in shapes:
            assert_same_bits(updates[k], new_p[k] - p[k], f"step {i}: update {k}")
        if i == 2:  # `has_grad` false: no increment
            assert not np.any(np.asarray(updates["d"]))
        p = new_p


def _new_param_over(hlo: str) -> set[str]:
    """The operands the kernel calls write their new params (the first
    results, one per leaf) over: "param" (the leaf's param operand) or "grad"
    (its gradient's, after every param)."""
    over = set()
    for target, leaves, aliases in _kernel_calls(hlo):
        if target in ("funcopt_pack", "funcopt_unpack"):  # copies
            continue
        for leaf in range(leaves):
            over.add({leaf: "param", leaves + leaf: "grad"}[aliases[leaf]])
    return over


def _layer_problem(rng) -> tuple[dict, jax.Array]:
    """The params (two weights, a bias) and input of `_layer_loss`."""
    shapes = {"w0": (48, 48), "w1": (48, 48), "b": (48,)}
    params = {
        k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()
    }
    return params, jnp.asarray(rng.normal(size=(8, 48)), jnp.float32)


def _layer_loss(params, x):
    h = jnp.tanh(x @ params["w0"] + params["b"])
    return jnp.mean(jnp.tanh(h @ params["w1"]) ** 2)


@KERNEL_STEPS
def test_step_on_gradients_it_computes_writes_over_them(factory, kwargs):
    """A step inside the `jit` that computes its gradients by backprop through
    matrix products (`_fused_native.tracing_step`) writes the new params over
    the gradients: the same bits as the in-place step on the same program
    (`keeping_gradients`; XLA copies each weight that backprop reads twice
    for the in-place kernel, the speed in `benchmarks/in_jit_grads.py`).
    In place
    still: `jax.jit(opt.step)` (the gradients are arguments, also inside
    another `jit`), `fo.TrainState` (it keeps them), gradients of a loss
    that reads the params elementwise only (jitted helpers included), and a
    clip of passed-in gradients; over them a product of transposed, cast
    weights."""
    params, x = _layer_problem(np.random.default_rng(3))
    opt = factory(**kwargs)

    def train_step(p, s, x):
        return opt.step(p, jax.grad(_layer_loss)(p, x), s)

    def kept_step(p, s, x):
        with _fused_native.keeping_gradients():
            return train_step(p, s, x)

    def compiled(step, *args):
        return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()

    args = (params, opt.init(params), x)
    over, in_place = compiled(train_step, *args), compiled(kept_step, *args)
    assert _new_param_over(over.as_text()) == {"grad"}
    assert _new_param_over(in_place.as_text()) == {"param"}
    copy = functools.partial(jax.tree.map, jnp.copy)
    for _ in range(2):  # a second step from the first's state
        got, want = over(*copy(args)), in_place(*copy(args))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert_same_bits(a, b, "step")
        args = (got[0], got[1], x)

    def transposed_step(p, s, x):
        # torch's layout: `x @ w.T`, the weights cast first
        def loss(p, x):
            return jnp.mean(jnp.tanh(x @ p["w0"].T.astype(jnp.float32)) @ p["w1"].T)

        return opt.step(p, jax.grad(loss)(p, x), s)

    state = opt.init(params)
    hlo = jax.jit(transposed_step).lower(params, state, x).compile().as_text()
    assert _new_param_over(hlo) == {"grad"}

    ts = fo.TrainState.create(params, opt)

    def train_state_step(ts, x):
        return ts.zero_grad().backward(_layer_loss, x)[0].step()

    def elementwise_step(p, s):
        # a jitted helper (a call in the traced program) with no product
        activation = jax.jit(lambda v: jnp.sin(v) * v)

        def loss(p):
            return sum(jnp.sum(activation(v)) for v in p.values())

        return opt.step(p, jax.grad(loss)(p), s)

    def clipped_step(p, g, s):
        return opt.step(p, fo.clip_grad_norm(g, 1.0)[0], s)

    def nested_step(p, s, x):  # `jax.jit(opt.step)` takes them as arguments
        return jax.jit(opt.step)(p, jax.grad(_layer_loss)(p, x), s)

    for hlo in (
        jax.jit(opt.step).lower(params, params, state).compile().as_text(),
        jax.jit(train_state_step).lower(ts, x).compile().as_text(),
        jax.jit(elementwise_step).lower(params, state).compile().as_text(),
        jax.jit(clipped_step).lower(params, params, state).compile().as_text(),
        jax.jit(nested_step).lower(params, state, x).compile().as_text(),
    ):
        assert _new_param_over(hlo) == {"param"}


@pytest.mark.parametrize(
    "factory,kwargs",
    [(fo.adam, dict(fused=True)), (fo.adamw, {}), (fo.sgd, dict(lr=0.1, momentum=0.9))],
    ids=["adam-fused", "adamw", "sgd-momentum"],
)
def test_step_on_gradients_it_computes_takes_a_call_per_leaf(factory, kwargs):
    """Where the traced program computes the gradients by backprop through
    a matrix product (a train step, also `fo.TrainState`'s backward then
    step), each leaf takes a kernel call of its own, which XLA runs beside
    the rest of backprop (`_fused_native.one_call_per_leaf`); on gradients
    passed in (`jax.jit(opt.step)`, a `TrainState` step alone) or
    elementwise in the params (nothing to run beside) one call steps them
    all. The same bits either way."""
    params, x = _layer_problem(np.random.default_rng(5))
    opt = factory(**kwargs)
    state = opt.init(params)

    def train_step(p, s, x):
        return opt.step(p, jax.grad(_layer_loss)(p, x), s)

    def train_state_step(ts, x):
        return ts.zero_grad().backward(_layer_loss, x)[0].step()

    def calls(step, *args) -> list[int]:
        hlo = jax.jit(step).lower(*args).compile().as_text()
        return sorted(leaves for _, leaves, _ in _optimizer_kernels(hlo))

    ts = fo.TrainState.create(params, opt)
    # `update` traced first: its per-leaf programs (the JAX rules) are
    # cached under other trace settings than the train step's kernels
    grads = jax.grad(_layer_loss)(params, x)
    assert calls(opt.update, grads, state, params) == []
    assert calls(train_step, params, state, x) == [1, 1, 1]
    assert calls(train_state_step, ts, x) == [1, 1, 1]
    assert calls(opt.step, params, params, state) == [3]
    with_grads = ts.zero_grad().backward(_layer_loss, x)[0]
    assert calls(lambda ts: ts.step(), with_grads) == [3]

    def elementwise_step(p, s):
        loss = lambda p: sum(jnp.sum(jnp.sin(v) * v) for v in p.values())  # noqa: E731
        return opt.step(p, jax.grad(loss)(p), s)

    assert calls(elementwise_step, params, state) == [3]

    def nested_step(p, s, x):  # `jax.jit(opt.step)` takes them as arguments
        return jax.jit(opt.step)(p, jax.grad(_layer_loss)(p, x), s)

    assert calls(nested_step, params, state, x) == [3]
    got = jax.jit(train_step)(params, state, x)
    want = jax.jit(nested_step)(params, state, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_same_bits(a, b, "a call per leaf")


def _lowered(opt, params) -> str:
    return jax.jit(opt.step).lower(params, params, opt.init(params)).as_text()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "default"])
def test_16bit_default_step_and_tensor_lr_take_the_jax_path(fused):
    """16-bit params on the default step (torch rounds each op to 16
    bits there) and a tensor lr: no custom call. With `fused=True` 16-bit
    params take the kernel."""
    for dtype in (jnp.bfloat16, jnp.float16):
        params = {"w": jnp.ones(20, dtype)}
        lowered = _lowered(fo.adam(fused=fused), params)
        assert ("funcopt_adam" in lowered) == fused
    params = {"w": jnp.ones(20, jnp.float32)}
    tensor_lr = fo.adam(lr=np.float32(1e-3), fused=fused)
    assert "funcopt_adam" not in _lowered(tensor_lr, params)
    assert "funcopt_adam" in _lowered(fo.adam(fused=fused), params)


@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_adams_tensor_scalar_path_takes_the_jax_rule(flag):
    """Adam's `differentiable`/`capturable` step is torch's tensor-scalar
    arithmetic (`adam`'s docstring), which the kernel does not compute."""
    params = {"w": jnp.ones(20, jnp.float32)}
    assert "funcopt_adam" not in _lowered(fo.adam(**{flag: True}), params)


def test_radams_foreach_path_takes_the_jax_rule():
    """RAdam's `foreach=True` is torch's `_multi_tensor_radam`, which rounds
    otherwise (`radam`'s docstring): not the kernel's step."""
    params = {"w": jnp.ones(20, jnp.float32)}
    assert "funcopt_radam" not in _lowered(fo.radam(foreach=True), params)
    assert "funcopt_radam" in _lowered(fo.radam(), params)


def test_sparse_gradients_take_the_jax_rule():
    """SGD's BCOO gradient (torch's sparse `p.grad`) is not the kernel's."""
    from jax.experimental import sparse as jsparse

    params = {"w": jnp.ones((6, 3), jnp.float32)}
    grads = {"w": jsparse.BCOO.fromdense(jnp.eye(6, 3, dtype=jnp.float32))}
    opt = fo.sgd(lr=0.1)
    new, _ = jax.jit(opt.step)(params, grads, opt.init(params))
    np.testing.assert_array_equal(new["w"], 1 - 0.1 * np.eye(6, 3, dtype=np.float32))


def test_switch_is_in_the_trace_settings():
    from funcopt import _math

    with native_kernels(False):
        off = _math.trace_settings()
        assert not fo.precision.native_fused()
    assert _math.trace_settings() != off
    assert fo.precision.native_fused()
    in_place = _math.trace_settings()
    with _fused_native.writing_over_gradients():  # the params written out of place
        assert _math.trace_settings() != in_place
    # `update`: the kernels on, but not on the leaves it steps one by one
    # (its packed buckets run them: not the program of the kernels off)
    with _fused_native.jax_rules_only(), _fused_native.writing_over_gradients():
        assert fo.precision.native_fused()
        assert not _fused_native.kernels_now()
        assert _math.trace_settings() not in (off, in_place)


def test_eager_update_and_step_keep_their_programs():
    """The un-jitted `update` and `step` share one compile cache, keyed on
    the trace settings: an eager `update` (the JAX rules one by one, the
    kernels on packed buckets) gives the jitted `update`'s bits after an
    eager step with the kernels off compiled first, and a step with the
    kernels off after it runs no kernel (its bits: the jitted step's)."""
    rng = np.random.default_rng(21)
    shapes = {"a": (5000,), "c": (30, 7), "d": (7,)}
    params, grads = (
        {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        for _ in range(2)
    )
    opt = fo.adamw()
    state = opt.init(params)
    with native_kernels(False):
        off = opt.step(params, grads, state)
        jitted_off = jax.jit(opt.step)(params, grads, state)
    eager_update = opt.update(grads, state, params)
    jitted_update = jax.jit(opt.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(eager_update), jax.tree.leaves(jitted_update)):
        assert_same_bits(a, b, "update")
    with native_kernels(False):
        again = opt.step(params, grads, state)
    for x, y, z in zip(
        jax.tree.leaves(off), jax.tree.leaves(again), jax.tree.leaves(jitted_off)
    ):
        assert_same_bits(x, y, "step, kernels off")
        assert_same_bits(x, z, "step, kernels off, jitted")


@pytest.mark.parametrize("enabled", [0, 1, "no", None])
def test_switch_takes_a_bool_only(enabled):
    with pytest.raises(TypeError, match=f"enabled must be a bool, got {enabled!r}"):
        fo.precision.set_native_fused(enabled)


@pytest.mark.parametrize("cxx", ["/nonexistent/g++", "false"])
def test_build_without_a_working_compiler_returns_none(cxx, tmp_path, monkeypatch):
    """No compiler, or one that fails: no library and no exception (the
    install goes on, funcopt runs its JAX path)."""
    from funcopt._native import build

    monkeypatch.setenv("CXX", cxx)
    assert build.build(tmp_path / "lib.so") is None
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "default"])
@pytest.mark.parametrize(
    "factory,size,call",
    [
        (fo.adam, 100, "funcopt_adam"),
        (fo.adagrad, 100, "funcopt_adagrad"),
        (fo.adam, 2000, "funcopt_adam_many"),
    ],
)
def test_packed_state_bucket_is_one_custom_call_in_place(factory, size, call, fused):
    """50 leaves of a plain tree, their state packed in one bucket
    (`set_policy`): one kernel call for the bucket, the packed buffers
    updated in place, no copy or loop over a `[rows, width]` buffer besides
    the call. Small leaves: the call reads the params and gradients as the
    pack wrote them (a reshape between them was a copy of each buffer before
    the call); Adam's large leaves (packed under `"always"`): where they are
    (`funcopt_adam_many`)."""
    opt = factory(fused=fused)
    params = {f"l{i}": jnp.ones((size + i,), jnp.float32) for i in range(50)}
    with ff.policy("always" if call.endswith("_many") else "auto"):
        state = opt.init(params)
        assert _multi_tensor.packed_layout(state) is not None
        hlo = _optimized_hlo(opt, params, params, state)
    copies = ("funcopt_pack", "funcopt_unpack")
    kernels = [(t, n) for t, n, _ in _kernel_calls(hlo) if t not in copies]
    assert kernels == [(call, 50 if call.endswith("_many") else 1)], hlo
    assert not re.findall(r"= f32\[\d+,\d+\]\S* (?:copy|fusion)\(", hlo), hlo


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "default"])
def test_stateless_sgd_steps_large_leaves_in_one_call(fused):
    """SGD without momentum keeps no state (nothing to pack at `init`): its
    50 large leaves (the per-leaf path) are stepped by one call that reads
    them where they are (`funcopt_sgd_many`); the bits of each leaf stepped
    alone."""
    rng = np.random.default_rng(14)
    params = {
        f"l{i}": jnp.asarray(rng.normal(size=2000 + i), jnp.float32) for i in range(50)
    }
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params
    )
    opt = fo.sgd(lr=0.1, fused=fused)
    hlo = _optimized_hlo(opt, params, grads, opt.init(params))
    assert [(t, n) for t, n, _ in _kernel_calls(hlo)] == [("funcopt_sgd_many", 50)]
    step = jax.jit(opt.step)
    got = step(params, grads, opt.init(params))[0]
    for k in params:  # each leaf alone: its own call
        alone = {k: params[k]}
        want = step(alone, {k: grads[k]}, opt.init(alone))[0][k]
        assert_same_bits(got[k], want, k)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "default"])
def test_grad_through_scanned_packed_steps(fused, torch_cpu_loop, x64):
    """`jax.grad` through `lax.scan` of steps on packed leaves: JAX traces
    the kernel's derivative after the rule's trace, outside its packing
    context (it raised before the kernel closed over its layout). float64:
    the two paths' derivatives agree to its rounding (in float32 the
    kernel's and the rule's trajectories part by ulps, which the derivative
    through three steps turns into ~3e-6 relative)."""
    opt = fo.adam(fused=fused)
    params = {"w": jnp.full((6, 5), 0.3), "b": jnp.full(5, 0.1)}

    def loss(lr):
        def body(carry, _):
            p, s = carry
            g = jax.tree.map(lambda x: jnp.sin(x) * 0.1, p)
            return opt.step(p, g, s), None

        state = fo.set_lr(opt.init(params), lr)
        (p, _), _ = jax.lax.scan(body, (params, state), None, length=3)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    got = jax.jit(jax.grad(loss))(1e-2)
    with native_kernels(False):
        want = jax.jit(jax.grad(loss))(1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isfinite(got) and got != 0


def test_packed_bucket_is_one_custom_call_in_place():
    """50 leaves packed by `funcopt.flat`: one custom call for the bucket."""
    opt = fo.adam(fused=True)
    params = {f"l{i}": jnp.ones((100 + i,), jnp.float32) for i in range(50)}
    layout = ff.layout(params, opt)
    flat = layout.pack(params)
    hlo = _optimized_hlo(opt, flat, layout.pack(params), opt.init(flat))
    assert hlo.count("custom_call_target=") == 1
    assert not re.findall(r"= f32\[[^\]]*\]\S* copy(?:-start)?\(", hlo)


@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="runs in the parent only")
def test_fused_parity_suite_on_the_jax_path():
    """The fallback stays tested where the library is built: the fused parity
    tests (torch's `fused=True` bits, float32 and float64, SGD's and
    Adagrad's 16-bit rows, packed leaves, the AVX2 and no-FMA children) with
    `FUNCOPT_NATIVE=0`, the pure JAX rules a machine without a compiler
    runs. The 16-bit Adam rule: equal to the kernel,
    `test_16bit_fused_kernel_is_the_jax_rule_on_any_leaf`."""
    parity = os.path.join(os.path.dirname(__file__), "parity")
    args = [
        "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
        os.path.join(parity, "test_fused_adam.py"),
        os.path.join(parity, "test_fused_sgd_adagrad.py"),
    ]  # fmt: skip
    env = {**os.environ, "FUNCOPT_NATIVE": "0", CHILD: "1"}
    probe = (
        "from funcopt.optim import _fused_native\n"
        "assert not _fused_native.native_fused(), 'FUNCOPT_NATIVE=0 ignored'"
    )
    assert run_pytest_child(args, env, probe=probe) > 0


def test_flags_given_as_any_truthy_value():
    """torch reads `maximize`, `nesterov` by truth value (the fuzz test's
    `maximize=[0.1]`): the kernel's attributes are Python bools."""
    params = {"w": jnp.linspace(-1.0, 1.0, 11, dtype=jnp.float32)}
    grads = {"w": jnp.ones(11, jnp.float32)}
    for factory, kwargs in ((fo.adagrad, {}), (fo.sgd, {"lr": 0.1, "momentum": 0.9})):
        truthy = factory(fused=True, maximize=[0.1], **kwargs)
        plain = factory(fused=True, maximize=True, **kwargs)
        got = truthy.step(params, grads, truthy.init(params))[0]
        want = plain.step(params, grads, plain.init(params))[0]
        assert_same_bits(got["w"], want["w"], factory.__name__)
