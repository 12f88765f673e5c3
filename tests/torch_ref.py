"""The parity harness: the same gradients through torch and funcopt, side by side.

Torch's parameter list is the trainable leaves of ``jax.tree.leaves(params)``,
in that order (the interop convention). A ``None`` gradient leaf is torch's
``p.grad = None``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

import funcopt as fo
from funcopt._tree import is_trainable
from tests.parity.noise_floor import nudge, nudged_rngs

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    """A bad argument: torch and funcopt must raise the same type and message."""

    name: str
    torch_cls: type
    factory: Callable[..., Any]
    kwargs: dict[str, Any]

    def param(self):
        import pytest

        return pytest.param(self, id=f"{self.name}-{self.kwargs}")

    def funcopt_kwargs(self) -> dict[str, Any]:
        """``kwargs`` with every torch tensor as the numpy array funcopt takes."""
        return funcopt_kwargs(self.kwargs)


def funcopt_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every torch tensor (a tensor ``lr``) as the numpy array
    of its dtype that funcopt takes."""

    def convert(x):
        if isinstance(x, torch.Tensor):
            return x.numpy()
        if isinstance(x, tuple):
            return tuple(convert(v) for v in x)
        return x

    return {k: convert(v) for k, v in kwargs.items()}


@dataclasses.dataclass(frozen=True)
class OptCase:
    """One row of the parity table: a torch optimizer and its funcopt twin.

    ``grid`` maps argument names to the values to try; every combination that
    ``valid`` accepts is a test. ``f32_rtol``/``f32_atol`` bound the float32
    drift, which comes from torch's float64 scalar math and CPU FMA kernels.
    """

    name: str
    torch_cls: type
    factory: Callable[..., Any]
    grid: dict[str, Sequence[Any]]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    valid: Callable[[dict[str, Any]], bool] = lambda kwargs: True
    f32_rtol: float = 1e-5
    f32_atol: float = 1e-6
    steps: int = 30
    # builds the (numpy) params tree from an rng and a dtype
    tree: Callable[[np.random.Generator, Any], Any] = None  # default: make_params

    def combos(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            kwargs = {**self.fixed, **dict(zip(keys, values))}
            if self.valid(kwargs):
                out.append(kwargs)
        return out

    def params(self):
        """``pytest.param`` per flag combination, with a readable id."""
        import pytest

        return [
            pytest.param(
                self,
                kw,
                id=f"{self.name}-"
                + "-".join(f"{k}={v}" for k, v in kw.items() if k not in self.fixed)
                or f"{self.name}-default",
            )
            for kw in self.combos()
        ]


def make_params_for(case: OptCase, rng, dtype):
    return (case.tree or make_params)(rng, dtype)


@contextlib.contextmanager
def using_torch_cpu_block(block: int | None):
    """Mirror a torch CPU loop of ``block``-element blocks inside the block."""
    old = fo.precision.torch_cpu_block()
    fo.precision.set_torch_cpu_block(block)
    try:
        yield
    finally:
        fo.precision.set_torch_cpu_block(old)


# the optimizers whose default step runs funcopt's native kernel on one CPU
# device (`funcopt.optim._fused_native`): tests that prove their JAX rules
# too turn it off (`native_kernels(False)`)
NATIVE_DEFAULT_STEP = frozenset(
    {
        "adam",
        "adamw",
        "sgd",
        "adagrad",
        "rmsprop",
        "adamax",
        "adadelta",
        "radam",
        "rprop",
        "nadam",
        "asgd",
    }
)


@contextlib.contextmanager
def native_kernels(enabled: bool):
    """funcopt's native CPU kernels on or off inside the block
    (`fo.precision.set_native_fused`)."""
    from funcopt.optim import _fused_native

    old = _fused_native._switch["enabled"]
    fo.precision.set_native_fused(enabled)
    try:
        yield
    finally:
        _fused_native._switch["enabled"] = old


@contextlib.contextmanager
def correctly_rounded_torch_sqrt(float64: bool = False):
    """Within this context torch's float32 square roots are correctly rounded
    (`float64`: its float64 roots too).

    torch's float32 `sqrt` on CPU (MKL's `vsSqrt`, 0-d tensors included) is
    not correctly rounded on every x86 machine: on an Intel AVX-512 machine
    ~0.7% of roots are 1 ulp off unless MKL takes its AVX2 path, on an AMD
    EPYC (AVX2) ~16-21% are, whatever MKL is told. XLA's root, which funcopt
    takes, is correctly rounded. Tests that show an optimizer is otherwise
    torch's arithmetic replace every float32 root torch's optimizers take
    (`Tensor.sqrt`, `sqrt_`, `torch.sqrt`, `torch._foreach_sqrt`,
    `_foreach_sqrt_`, `tensor ** 0.5`, `_foreach_pow_(xs, 0.5)`) by the
    float64 root rounded to float32, which is correctly rounded
    (53 >= 2 * 24 + 2); the child processes' probe checks
    it on 100,000 values. torch's float64 root is MKL's `vdSqrt`, about 1% of
    its results 1 ulp off on an AMD EPYC; with `float64` it is NumPy's
    (IEEE's correctly rounded `sqrt`).
    """
    sqrt, sqrt_, power = torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.Tensor.__pow__
    foreach_power_ = torch._foreach_pow_

    def rounded(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64 and float64:
            return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))
        if x.dtype != torch.float32:
            return sqrt(x)
        return sqrt(x.double()).float()

    def rounded_(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or (x.dtype == torch.float64 and float64):
            return x.copy_(rounded(x))
        return sqrt_(x)

    def pow_(x: torch.Tensor, exponent):
        # `bias_correction2**0.5` (torch's default path, a tensor beta2): MKL's
        # 0-d root; on an AMD EPYC 1 ulp high at step 2 of beta2 = 0.95
        # (sqrt(0.0975000262f)), a few float32 params 1 ulp off from there
        if _is_root(x, exponent):
            return rounded(x)
        return power(x, exponent)

    def _is_root(x, exponent) -> bool:
        # `x ** 0.5` is torch's `sqrt` (ASGD's `** alpha` too)
        root_dtype = x.dtype == torch.float32 or (float64 and x.dtype == torch.float64)
        return root_dtype and isinstance(exponent, float) and exponent == 0.5

    def foreach_pow_(xs, exponent):
        # `_foreach_pow_(etas, alpha)`: ASGD's foreach capturable eta
        if all(_is_root(x, exponent) for x in xs):
            return [rounded_(x) for x in xs]
        return foreach_power_(xs, exponent)

    replacements = [
        (torch.Tensor, "sqrt", rounded),
        (torch.Tensor, "sqrt_", rounded_),
        (torch.Tensor, "__pow__", pow_),
        (torch, "sqrt", rounded),
        (torch, "_foreach_sqrt", lambda xs: [rounded(x) for x in xs]),
        (torch, "_foreach_sqrt_", lambda xs: [rounded_(x) for x in xs]),
        (torch, "_foreach_pow_", foreach_pow_),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, replacement in replacements:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# what a child process whose rows need correctly rounded torch roots runs
# first (`run_pytest_child(..., probe=...)`): the patch, held for the whole
# process, and the check (before its rows) that it works: else a row would
# fail without saying why
CORRECTLY_ROUNDED_SQRT_PROBE = """
from tests.torch_ref import correctly_rounded_torch_sqrt
rounded_sqrt = correctly_rounded_torch_sqrt()  # held: the whole process
rounded_sqrt.__enter__()
import numpy as np, torch
x = np.random.default_rng(0).uniform(0, 10, 100000).astype(np.float32)
exact = np.sqrt(x.astype(np.float64)).astype(np.float32)
assert (torch.tensor(x).sqrt().numpy() == exact).all(), "sqrt probe"
assert (torch.sqrt(torch.tensor(x)).numpy() == exact).all(), "sqrt probe"
assert (torch._foreach_sqrt([torch.tensor(x)])[0].numpy() == exact).all(), "probe"
"""


def run_with_correctly_rounded_sqrt(test_file: str, k: str, switch: str) -> int:
    """The tests of `test_file` selected by `-k k`, in a child pytest whose
    torch takes correctly rounded float32 roots (`CORRECTLY_ROUNDED_SQRT_PROBE`)
    and whose environment sets `switch` (what the file's rows read to know
    they run there); returns how many passed."""
    from tests._subprocess import run_pytest_child

    args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", test_file, "-k", k]
    env = {**os.environ, switch: "1"}
    return run_pytest_child(args, env, probe=CORRECTLY_ROUNDED_SQRT_PROBE)


def float32_scalar_roots(kwargs) -> contextlib.AbstractContextManager:
    """torch's `differentiable`/`capturable` steps, and steps with a tensor
    `lr` or `betas`, take their bias corrections' roots as 0-d float32
    tensors (the float32 step; a float32 hyperparameter), whatever the
    params' dtype; where torch's roots are not correctly rounded (an AMD
    EPYC: 7 of Adam's first 30 steps) its float64 params move by ~1e-8.
    Those runs take correctly rounded roots (`correctly_rounded_torch_sqrt`),
    the arithmetic funcopt reproduces; other runs are torch as it is."""

    def tensor(value) -> bool:
        if isinstance(value, (tuple, list)):
            return any(map(tensor, value))
        return torch.is_tensor(value)

    flags = kwargs.get("differentiable") or kwargs.get("capturable")
    if flags or any(tensor(v) for v in kwargs.values()):
        return correctly_rounded_torch_sqrt()
    return contextlib.nullcontext()


def make_params_16bit(rng: np.random.Generator, dtype) -> dict:
    """A tree for 16-bit runs: leaves sized for both of torch's CPU loops.

    torch's CPU kernels run 16-bit tensors in blocks of 32 elements (x86 AVX2
    and AVX-512; measured per session, see ``tests/conftest.py``) and the rest
    in a scalar loop that rounds some ops differently: "k" has one block and
    an 18-element tail, "w" one block and no tail, "s" only a tail.
    """
    return {
        "frozen": np.arange(2, dtype=np.int32),
        "k": rng.normal(size=(5, 10)).astype(dtype),
        "s": np.asarray(rng.normal(), dtype=dtype),
        "w": rng.normal(size=(4, 8)).astype(dtype),
    }


def make_params_16bit_for(case: OptCase, rng) -> dict:
    """The row's tree twice: bfloat16 and float16 leaves, one optimizer."""
    make = case.tree or make_params_16bit
    return {
        "bfloat16": make(rng, np.dtype(ml_dtypes.bfloat16)),
        "float16": make(rng, np.dtype(np.float16)),
    }


# enough columns that a 4-row leaf is above the packing limit in every dtype of
# the parity table (float32, its narrowest: 1,040 elements, 4,160 bytes)
_PER_LEAF_COLUMNS = fo.flat.AUTO_MAX_LEAF_BYTES // (4 * np.float32().itemsize) + 4


def make_params(rng: np.random.Generator, dtype, w_columns=_PER_LEAF_COLUMNS) -> dict:
    """A nested tree with a scalar leaf, several shapes and a frozen int leaf.

    It runs both of ``opt.step``'s paths (``funcopt.flat.set_policy``) for
    an elementwise optimizer: "b" and "k" are small leaves of one group,
    packed into one buffer on one CPU device; "w" is larger than the packing
    limit and "s" is 0-d, so each runs its own per-leaf program.
    """
    return {
        "b": rng.normal(size=(3,)).astype(dtype),
        "frozen": np.arange(2, dtype=np.int32),
        "nested": {
            "k": rng.normal(size=(2, 2, 2)).astype(dtype),
            "s": np.asarray(rng.normal(), dtype=dtype),
        },
        "w": rng.normal(size=(4, w_columns)).astype(dtype),
    }


def make_small_params(rng: np.random.Generator, dtype) -> dict:
    """:func:`make_params` with a small "w" (4 x 3). For the rows of an
    optimizer that reduces over each parameter (Prodigy's `d` estimate, on
    the per-leaf path whatever the sizes): its float32 sums over 1,040
    elements are too ill-conditioned for the float32 comparison."""
    return make_params(rng, dtype, w_columns=3)


# Which trainable leaves (by position among trainable leaves) have no gradient
# at a step. A few fixed patterns keep jit recompiles bounded.
NONE_PATTERNS = [(), (1,), (0, 3)]


def make_grads(rng, params, steps: int, with_none: bool) -> list:
    """A gradient sequence; with ``with_none`` some steps have None leaves."""
    leaves, treedef = jax.tree.flatten(params)
    trainable = [i for i, p in enumerate(leaves) if is_trainable(p)]
    seq = []
    for t in range(steps):
        pattern = NONE_PATTERNS[(t * 7 + t // 3) % 3] if with_none else ()
        if with_none and t == 0:
            pattern = (0,)  # a leaf whose first gradient comes late
        flat = [None] * len(leaves)
        for j, i in enumerate(trainable):
            if j not in pattern:
                flat[i] = rng.normal(size=leaves[i].shape).astype(leaves[i].dtype)
        seq.append(treedef.unflatten(flat))
    return seq


def to_torch(x) -> torch.Tensor:
    """A numpy (or JAX) array as a torch tensor (a copy) of its dtype and
    bits, bfloat16 included (its NaN payloads too: moved as 16-bit integers,
    not converted through float32)."""
    x = np.asarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.tensor(np.array(x))


def from_torch(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as a numpy array of its dtype and bits, bfloat16
    included (a copy for bfloat16, as `to_torch` moves it)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_params(params) -> list[torch.Tensor]:
    return [
        to_torch(p).requires_grad_() for p in jax.tree.leaves(params) if is_trainable(p)
    ]


@contextlib.contextmanager
def capturable_on_cpu(case: OptCase, kwargs):
    """torch's `capturable=True` step on CPU params, which torch refuses
    (its devices: CUDA, XPU, HPU, XLA): the optimizer module's device list
    with the CPU added while the row runs. The step is torch's own code, a
    device-agnostic sequence of tensor ops."""
    if not kwargs.get("capturable"):
        yield
        return
    module = sys.modules[case.torch_cls.__module__]
    devices = module._get_capturable_supported_devices
    module._get_capturable_supported_devices = lambda *args, **kw: [
        *devices(*args, **kw),
        "cpu",
    ]
    try:
        yield
    finally:
        module._get_capturable_supported_devices = devices


def run_torch(case: OptCase, kwargs, params, grads_seq):
    """Run torch; return (trainable leaves as numpy, per-leaf state dicts)."""
    tparams = torch_params(params)
    if kwargs.get("differentiable"):
        # its step runs with autograd on: in-place ops need non-leaf params
        tparams = [p.detach() for p in tparams]
    opt = case.torch_cls(tparams, **kwargs)
    treedef = jax.tree.structure(params)
    for grads in grads_seq:
        flat = treedef.flatten_up_to(grads)
        trainable_grads = [
            g for g, p in zip(flat, jax.tree.leaves(params)) if is_trainable(p)
        ]
        for tp, g in zip(tparams, trainable_grads):
            tp.grad = None if g is None else to_torch(g)
        with float32_scalar_roots(kwargs), capturable_on_cpu(case, kwargs):
            opt.step()
    return [from_torch(p) for p in tparams], [opt.state[p] for p in tparams]


def run_torch_nudged(case: OptCase, kwargs, params, grads_seq) -> list:
    """:func:`run_torch` once per :func:`nudged_rngs`, params and gradients
    moved by one ulp: the runs that measure each quantity's noise floor."""
    runs = []
    for rng in nudged_rngs():
        grads = [nudge(g, rng) for g in grads_seq]
        runs.append(run_torch(case, kwargs, nudge(params, rng), grads))
    return runs


def run_funcopt(case: OptCase, kwargs, params, grads_seq, jit: bool):
    opt = case.factory(**funcopt_kwargs(kwargs))
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    step = jax.jit(opt.step) if jit else opt.step
    for grads in grads_seq:
        grads = jax.tree.map(jnp.asarray, grads)
        params, state = step(params, grads, state)
    return params, state


def run_funcopt_flagged(case: OptCase, kwargs, params, grads_seq, jit: bool = True):
    """:func:`run_funcopt` with ``None`` gradients as ``has_grad`` flags
    (:func:`flag_missing`)."""
    opt = case.factory(**funcopt_kwargs(kwargs))
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    step = jax.jit(opt.step) if jit else opt.step
    for grads in grads_seq:
        filled, has_grad = flag_missing(params, grads)
        params, state = step(params, filled, state, has_grad=has_grad)
    return params, state


def flag_missing(params, grads) -> tuple:
    """``(grads, has_grad)``: each ``None`` gradient of a trainable leaf as
    zeros and a ``False`` flag. The same semantics as the ``None`` (torch's
    ``p.grad = None``), compiled once instead of once per ``None`` pattern.
    Non-trainable leaves keep their ``None``."""
    leaves, treedef = jax.tree.flatten(params)
    flat = treedef.flatten_up_to(grads)

    def filled(g, p):
        if g is not None:
            return jnp.asarray(g)
        return jnp.zeros_like(p) if is_trainable(p) else None

    has_grad = treedef.unflatten([g is not None for g in flat])
    return treedef.unflatten([filled(g, p) for g, p in zip(flat, leaves)]), has_grad


def trainable_leaves(tree) -> list:
    return [np.asarray(p) for p in jax.tree.leaves(tree) if is_trainable(p)]


def slot_leaves(state, params, name) -> list:
    """Slot ``name`` per trainable leaf (None where that leaf has none)."""
    leaves, treedef = jax.tree.flatten(params)
    flat = treedef.flatten_up_to(state.unpacked().slots[name])
    return [s for s, p in zip(flat, leaves) if is_trainable(p)]


def step_counts(state, params) -> list[int]:
    leaves = jax.tree.leaves(params)
    return [int(s) for s, p in zip(np.asarray(state.step), leaves) if is_trainable(p)]


def check_against_torch(
    case, kwargs, params, grads, new_params, state, same=None, same_buffers=None
) -> None:
    """funcopt's params, state buffers and step counts after `grads` against
    torch's on the same inputs; `same(actual, expected, what)` compares params
    and `same_buffers` buffers (both bit for bit unless given)."""
    same = same or assert_same_bits
    same_buffers = same_buffers or assert_same_bits
    expected, torch_state = run_torch(case, kwargs, params, grads)
    for i, (a, e) in enumerate(zip(trainable_leaves(new_params), expected)):
        same(a, e, f"param {i}")
    steps = step_counts(state, params)
    for i, torch_leaf_state in enumerate(torch_state):
        assert torch_leaf_state or steps[i] == 0, f"param {i} never had a gradient"
        for key, value in torch_leaf_state.items():
            if key == "step":
                assert steps[i] == int(value), f"param {i}: step"
                continue
            ours = slot_leaves(state, params, key)[i]
            same_buffers(ours, from_torch(value), f"param {i}: state {key}")


def assert_same_bits(actual, expected, what, reference="torch"):
    """Bit for bit (any NaN matches any NaN), dtype included."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    uint = np.dtype(f"uint{8 * actual.dtype.itemsize}")
    nan = np.isnan(actual.astype(np.float32)) & np.isnan(expected.astype(np.float32))
    differ = (actual.view(uint) != expected.view(uint)) & ~nan
    if differ.any():
        i = np.unravel_index(np.argmax(differ), differ.shape)
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {differ.size} elements differ, first "
            f"at {tuple(int(j) for j in i)}: {actual[i]!r} != {reference} "
            f"{expected[i]!r}"
        )


def check_packed_against_torch(case: OptCase, kwargs, dtype, steps: int) -> None:
    """`case` on leaves packed into the rows of one buffer (`funcopt.flat`),
    jitted, against torch on the same leaves: odd-sized leaves (37, 65, 7,
    50 and 1 elements), so that each has a tail in the packed rows."""
    import funcopt.flat as ff

    rng = np.random.default_rng(0)
    shapes = {"a": (37,), "b": (5, 13), "c": (7,), "d": (50,), "e": ()}
    params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    grads = [
        {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
        for _ in range(steps)
    ]
    opt = case.factory(**kwargs)
    layout = ff.layout(params, opt)
    flat, state = layout.pack(params), opt.init(layout.pack(params))
    step = jax.jit(opt.step)
    for g in grads:
        flat, state = step(flat, layout.pack(g), state)
    new_params, state = layout.unpack(flat), layout.unpack_state(state)
    check_against_torch(case, kwargs, params, grads, new_params, state)
