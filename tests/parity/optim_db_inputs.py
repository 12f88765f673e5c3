r"""torch's own optimizer test database as funcopt parity rows.

torch ships the inputs its optimizer tests run on in
`torch.testing._internal.common_optimizers.optim_db`: one `OptimizerInfo` per
optimizer, whose `optim_inputs_func(device)` yields constructor kwargs and
whose `optim_error_inputs_func(device, dtype)` yields the kwargs (or params)
that must raise, with the exception type and a regex for its message. torch's
`_get_optim_inputs_including_global_cliquey_kwargs` adds, per input, one variant
for each execution flag the optimizer supports on the device (on CPU:
`differentiable`, and `fused` for Adam, AdamW, Adagrad and SGD; `foreach` has
no CPU kernels, so torch generates no `foreach` variant there).

Each input becomes rows (`DbRow`): the kwargs translated to funcopt's
(`funcopt_kwargs`: a torch tensor becomes the numpy array of its dtype),
run on a small params tree in float64 (x64), float32 (x64 off) and, where
`OptimizerInfo.supports_complex`, complex128, with fresh random gradients each
step and one step where a leaf has no gradient (torch's `p.grad = None`).
After every step, parameters, every state buffer (funcopt's slot names are
torch's state keys) and the step counts are compared with live torch:
$|x - x_\text{torch}| \le \max(a, 16 f) + r\,|x_\text{torch}|$ with
$(r, a) = (10^{-10}, 10^{-12})$ in float64 and complex128, the parity table's
row tolerance in float32, and $f$ the noise floor of torch's runs on inputs
moved by one ulp (`tests/parity/noise_floor.py`). The sparse-gradient input
of SGD and Adagrad (`metadata_for_sparse`) and every SparseAdam input take
BCOO gradients; L-BFGS rows run `step(closure)` through
`tests/parity/test_lbfgs.py`'s harness. The float32 bit rows (`bit_rows`)
run every real input once more, jitted, with x64 and funcopt's exact float32
mode, and compare every quantity bit for bit (`compare(..., bits=True)`).

Three tables decide what a row expects, each entry named and reasoned:

* `NOT_APPLICABLE`: rows that cannot exist on this device (skipped, shown).
* `KNOWN_GAPS`: rows funcopt does not match yet, `xfail(strict=True)` so a
  fixed one fails until its entry is deleted.
* `PARAMS_LIST_ERRORS`: error inputs about torch's params list itself, which
  have no pytree meaning.

`python -m tests.parity.optim_db_inputs` runs every row (gaps included) and
prints each mismatch with its largest relative difference, the numbers the
`KNOWN_GAPS` entries quote.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.experimental import sparse as jsparse
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import funcopt as fo
from tests.parity.cases import OPT_CASES
from tests.parity.noise_floor import assert_close, nudge, nudged_rngs
from tests.torch_ref import (
    assert_same_bits,
    flag_missing,
    float32_scalar_roots,
    from_torch,
    funcopt_kwargs,
    slot_leaves,
    step_counts,
    to_torch,
)

DEVICE = "cpu"
STEPS = 5
# (step, leaf) without a gradient: torch's p.grad = None for that step
NO_GRAD_STEP, NO_GRAD_LEAF = 1, "m"

# torch.optim class name -> funcopt name (API.md's naming rule)
FUNCOPT_NAME = {
    "Adadelta": "adadelta",
    "Adafactor": "adafactor",
    "Adagrad": "adagrad",
    "Adam": "adam",
    "AdamW": "adamw",
    "Adamax": "adamax",
    "ASGD": "asgd",
    "LBFGS": "lbfgs",
    "Muon": "muon",
    "NAdam": "nadam",
    "RAdam": "radam",
    "RMSprop": "rmsprop",
    "Rprop": "rprop",
    "SGD": "sgd",
    "SparseAdam": "sparse_adam",
}
INFOS = {FUNCOPT_NAME[info.name]: info for info in optim_db}

# float64: the parity table's fixed tolerance (tests/parity/test_optim.py)
F64_RTOL, F64_ATOL = 1e-10, 1e-12
# SparseAdam's measured float32 tolerance (tests/parity/test_sparse_adam.py)
SPARSE_ADAM_F32 = (1e-6, 5e-7)


def f32_tolerance(optimizer: str) -> tuple[float, float]:
    """The float32 `(rtol, atol)` of the optimizer's row in the parity table."""
    if optimizer == "sparse_adam":
        return SPARSE_ADAM_F32
    case = next(c for c in OPT_CASES if c.name == optimizer)
    return case.f32_rtol, case.f32_atol


def slug(desc: str) -> str:
    """An id part from a torch `desc`: `"maximize, weight_decay & fused"` ->
    `"maximize-weight_decay-fused"`."""
    parts = re.split(r"\s*[&,]\s*", desc.strip().lower())
    return "-".join(re.sub(r"[^a-z0-9]+", "_", p).strip("_") for p in parts if p)


# ---------------------------------------------------------------------------
# The rows


@dataclasses.dataclass(frozen=True)
class DbRow:
    """One optim_db input, run in one dtype, jitted or not."""

    optimizer: str  # funcopt name
    desc: str  # torch's desc, cliquey flag included ("amsgrad & fused")
    kwargs: dict[str, Any]  # torch's kwargs
    dtype: str  # "float64", "float32" or "complex128"
    jit: bool
    sparse: bool = False  # metadata_for_sparse: sparse (BCOO) gradients

    @property
    def id(self) -> str:
        mode = "jit" if self.jit else "eager"
        return f"{self.optimizer}-{slug(self.desc)}-{self.dtype}-{mode}"

    @property
    def key(self) -> tuple[str, str]:
        """`(optimizer, rest of the id)`: the key of the tables."""
        return self.optimizer, self.id.split("-", 1)[1]

    @property
    def torch_cls(self) -> type:
        return INFOS[self.optimizer].optim_cls

    def factory(self) -> Callable[..., Any]:
        return getattr(fo, self.optimizer)


def _db_inputs(optimizer: str) -> list[tuple[str, dict[str, Any], bool]]:
    """`(desc, kwargs, sparse)` for every CPU input torch generates, cliquey
    variants included, then the sparse-gradient input (`metadata_for_sparse`)."""
    info = INFOS[optimizer]
    inputs = _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, None, info)
    out = [(i.desc, i.kwargs, info.only_supports_sparse_grads) for i in inputs]
    if info.supports_sparse:
        out.append(("sparse grad", dict(info.metadata_for_sparse[0]), True))
    return out


def _modes(optimizer: str, desc: str, dtype: str) -> list[bool]:
    """`jit` flags of an input's rows. Every input runs un-jitted, as a
    torch-style loop calls `opt.step` (which compiles the step whole,
    `funcopt._core.compiled_when_concrete`); each optimizer's default input
    runs jitted as well, in float64. L-BFGS is the
    other way round: jitted throughout (its closure-driven loop is slow
    eagerly), its default input un-jitted as well."""
    default = desc in ("default", "sparse grad") and dtype == "float64"
    if optimizer == "lbfgs":
        return [False, True] if default else [True]
    return [False, True] if default else [False]


# arguments that only scale the arithmetic, whose one branch is torch's
# `if weight_decay != 0` (`momentum`, `dampening`, ...): their values matter
# to a code path as zero or non-zero. Any other number (ASGD's `t0`,
# Adafactor's `d` and `beta2_decay`, Rprop's `etas` and `step_sizes`, Muon's
# `ns_steps`) may choose a regime (averaging, clipping, clamping): exact.
SCALING_ARGS = {
    "lr", "eps", "betas", "weight_decay", "momentum", "dampening",
    "momentum_decay", "lr_decay", "initial_accumulator_value", "rho",
}  # fmt: skip


def _value_class(value: Any, scaling: bool) -> Any:
    """What of an argument's value can choose a code path: a flag (bool,
    None, string) itself, a tensor its dtype and shape, a tuple (`betas`)
    element by element, a number of a `SCALING_ARGS` argument as zero or
    non-zero, any other number itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    if isinstance(value, tuple):
        return tuple(_value_class(v, scaling) for v in value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if scaling and isinstance(value, (int, float)):
        return "zero" if value == 0 else "nonzero"
    return repr(value)


def code_path(torch_cls: type, kwargs: dict[str, Any]) -> tuple:
    """The code path a constructor call takes: every argument of
    `torch_cls.__init__` (its default where not given) as `_value_class`;
    `foreach=None` and `fused=None` (torch's default, on CPU its single-tensor
    path) as False."""
    params = inspect.signature(torch_cls.__init__).parameters
    full = {
        name: kwargs.get(name, p.default)
        for name, p in params.items()
        if name not in ("self", "params")
    }
    assert set(kwargs) <= set(full), (torch_cls, kwargs)
    for flag in ("foreach", "fused"):
        # None: torch's default, on CPU the single-tensor path, as False
        if flag in full and full[flag] is None:
            full[flag] = False
    return tuple(
        sorted((k, _value_class(v, k in SCALING_ARGS)) for k, v in full.items())
    )


def float32_table_row(optimizer: str, kwargs: dict[str, Any]) -> str | None:
    """The id of the parity table's float32 row
    (`tests/parity/test_optim.py::test_float32_parity`) that runs the same
    optimizer on the same code path as the optim_db input, or None.

    Such an input has no float32 row here: that row already proves the
    formula in float32 at the same tolerance (`f32_tolerance`), on a larger
    tree, 30 steps and `None` gradients; optim_db's own float32 run of it
    would repeat the same compiled code on other numbers.
    """
    from tests.parity.cases import OPT_PARAMS_F32

    path = code_path(INFOS[optimizer].optim_cls, kwargs)
    for param in OPT_PARAMS_F32:
        case, table_kwargs = param.values
        if case.name.split("-")[0] != optimizer:
            continue
        if code_path(case.torch_cls, table_kwargs) == path:
            return f"tests/parity/test_optim.py::test_float32_parity[{param.id}]"
    return None


def rows() -> list[DbRow]:
    out = []
    for optimizer in INFOS:
        info = INFOS[optimizer]
        dtypes = ["float64", "float32"] + (
            ["complex128"] if info.supports_complex else []
        )
        for desc, kwargs, sparse in _db_inputs(optimizer):
            for dtype in dtypes:
                if dtype == "float32" and not sparse:
                    if float32_table_row(optimizer, kwargs) is not None:
                        continue
                for jit in _modes(optimizer, desc, dtype):
                    out.append(DbRow(optimizer, desc, kwargs, dtype, jit, sparse))
    ids = [r.id for r in out]
    assert len(ids) == len(set(ids)), "optim_db row ids collide"
    return out


def bit_rows() -> list[DbRow]:
    """One jitted float32 row per real input (sparse ones included) of every
    optimizer with float32 bit rows (not `BITS_NOT_APPLICABLE`), to compare
    bit for bit (`compare(row, bits=True)`)."""
    return [
        DbRow(optimizer, desc, kwargs, "float32", True, sparse)
        for optimizer in INFOS
        if optimizer not in BITS_NOT_APPLICABLE
        for desc, kwargs, sparse in _db_inputs(optimizer)
    ]


# ---------------------------------------------------------------------------
# The tables: keys are `(optimizer, id glob)`, the id without the optimizer

NOT_APPLICABLE = {
    ("adam", "*fused-complex128-*"): "torch's fused kernels take floating point "
    "params only (RuntimeError at step): no complex fused run to compare; "
    "funcopt raises the same error (tests/parity/test_fused_adam.py, "
    "test_fused_sgd_adagrad.py)",
    ("adamw", "*fused-complex128-*"): "as Adam: fused kernels are real-only",
    ("adagrad", "*fused-complex128-*"): "as Adam: fused kernels are real-only",
    ("sgd", "*fused-complex128-*"): "as Adam: fused kernels are real-only",
    ("sgd", "sparse_grad-complex128-*"): "a sparse complex gradient is not one "
    "of torch's sparse inputs (metadata_for_sparse runs real params only)",
    ("adagrad", "sparse_grad-complex128-*"): "as SGD: real sparse inputs only",
    ("lbfgs", "non_default_lr-float32-*"): "too ill-conditioned to prove a "
    "formula in float32: with lr=0.01 each step moves the gradient by ~1% of "
    "itself, so y = g_new - g_old cancels; torch's own ro moves by 1.2e-4 "
    "(AVX-512) / 1.5e-4 (AVX2) of its scale when its inputs move by one ulp "
    "(10 nudged runs, tests/parity/optim_db_inputs._quartic_problem), above "
    "float32's guard (noise_floor.MAX_RELATIVE_FLOOR, 1e-4)",
    ("lbfgs", "tensor_lr-float32-*"): "as non_default_lr, with lr=0.001: "
    "torch's own ro moves by 1.1e-3 of its scale under one-ulp nudges, 11x "
    "float32's guard (1e-4)",
}

# Rows funcopt does not match yet: xfail(strict=True), so a row that starts
# passing fails until its line is deleted. Keys are exact `(optimizer, id)`;
# error inputs use `(optimizer, "<index>-<desc>")`. Regenerate the numbers
# with `python -m tests.parity.optim_db_inputs`. Empty: every applicable input
# matches (the last gaps, closed in issue 16, were Adam/AdamW/NAdam
# `differentiable=True`, SGD/Adagrad sparse gradients, Muon and SparseAdam
# tensor lrs and SparseAdam's dense-parameter error).
KNOWN_GAPS: dict[tuple[str, str], str] = {}

# float32 bit for bit (`bit_rows`, x64 and `fo.precision.set_exact_float32`):
# the optimizers whose step takes torch's `sqrt`, run in a child process whose
# torch roots are correctly rounded (tests/parity/test_float32_bits.py: torch's
# float32 `sqrt` is MKL's, not correctly rounded on every machine; Adafactor's
# `rsqrt` and `norm` take the instruction's, and run in the parent)
TAKES_SQRT = {
    "adam", "adamw", "nadam", "radam", "rmsprop", "adagrad", "adadelta",
    "sparse_adam",
}  # fmt: skip

# optimizers without float32 bit rows: their results depend on how torch's
# CPU build orders a float32 sum, which varies with the machine
BITS_NOT_APPLICABLE = {
    "lbfgs": "its directions are float32 dot products (torch's BLAS `dot`, "
    "blocked by the machine's vector width); its float32 rows prove the "
    "formula against the noise floor of torch's own runs",
    "muon": "Newton-Schulz in bfloat16: float32 norms and matmul sums in "
    "the order of torch's vector width and oneDNN's blocking; bit-exact here "
    "on these inputs, but 328 steps of benchmarks/float32_bits.py flip one "
    "bfloat16 rounding, so its float32 rows keep the parity table's tolerance",
}

# float32 bit rows funcopt does not match yet: xfail(strict=True)
BITS_KNOWN_GAPS: dict[tuple[str, str], str] = {}

PARAMS_LIST_ERRORS = {
    "invalid param type": "a single tensor instead of an iterable: funcopt "
    "takes any pytree, a bare array is a valid one-leaf tree",
    "a param group cannot have duplicate parameters": "JAX arrays are values: "
    "two leaves holding one array are two parameters, updated independently",
    "duplicate parameters should not occur across param groups either": "a "
    "pytree leaf has exactly one label, so it is in exactly one group",
    "all optimizer params should be with/without names": "(name, tensor) pairs "
    "in torch's list; a pytree's leaves always have paths (names)",
    "all optimizer param groups should be with/without names.": "as above, "
    "per group: every pytree leaf has a path",
}


def lookup(table: dict, row_key: tuple[str, str]) -> str | None:
    """The reason of the first entry whose glob matches the row, or None."""
    optimizer, rest = row_key
    for (opt, pattern), reason in table.items():
        if opt == optimizer and fnmatch.fnmatchcase(rest, pattern):
            return reason
    return None


# ---------------------------------------------------------------------------
# Params and gradients


def make_params(rng: np.random.Generator, optimizer: str, dtype: str) -> dict:
    """A few leaves, a 0-d one and a matrix ("m"); complex rows keep one real
    leaf; Muon takes matrices only."""
    dt = np.dtype(dtype)

    def leaf(*shape):
        x = rng.normal(size=shape)
        if dt.kind == "c":
            x = x + 1j * rng.normal(size=shape)
        return x.astype(dt)

    if optimizer == "muon":
        return {"a": leaf(2, 4), "m": leaf(3, 2)}
    real = rng.normal(size=(4,)).astype(np.float64 if dt.kind == "c" else dt)
    return {"m": leaf(3, 2), "s": leaf(), "v": real}


def make_grads(rng: np.random.Generator, params: dict) -> list[dict]:
    """`STEPS` gradient trees; leaf `NO_GRAD_LEAF` has none at `NO_GRAD_STEP`."""
    seq = []
    for t in range(STEPS):
        grads = {}
        for k, p in params.items():
            g = rng.normal(size=p.shape)
            if p.dtype.kind == "c":
                g = g + 1j * rng.normal(size=p.shape)
            grads[k] = g.astype(p.dtype)
        if t == NO_GRAD_STEP:
            grads[NO_GRAD_LEAF] = None
        seq.append(grads)
    return seq


# sparse rows: an embedding-like matrix and a vector, row / element indices
# with repeats; `NSE` entries per step, padded with out-of-range indices so
# every step has one shape (one compile)
NSE = 4


def make_sparse_params(rng, dtype) -> dict:
    return {
        "m": rng.normal(size=(5, 3)).astype(dtype),
        "v": rng.normal(size=(4,)).astype(dtype),
    }


def make_sparse_grads(rng, params) -> list[dict]:
    """Per step `{leaf: (indices (nse, 1), values)}`; "m" has none at
    `NO_GRAD_STEP`. Each step has 1..NSE entries, repeats included."""
    seq = []
    for t in range(STEPS):
        step = {}
        for k, p in params.items():
            if k == NO_GRAD_LEAF and t == NO_GRAD_STEP:
                step[k] = None
                continue
            n = int(rng.integers(1, NSE + 1))
            ids = rng.integers(0, p.shape[0] - 1, size=(n, 1))  # last row: never
            values = rng.normal(size=(n, *p.shape[1:])).astype(p.dtype)
            step[k] = (ids, values)
        seq.append(step)
    return seq


def _torch_sparse(ids, values, shape):
    return torch.sparse_coo_tensor(
        torch.tensor(ids.T), torch.tensor(values), shape, check_invariants=True
    )


def _bcoo(ids, values, shape):
    n = ids.shape[0]
    ids = np.concatenate([ids, np.full((NSE - n, 1), shape[0])])
    pad = np.zeros((NSE - n, *values.shape[1:]), values.dtype)
    return jsparse.BCOO((jnp.asarray(np.concatenate([values, pad])), ids), shape=shape)


# ---------------------------------------------------------------------------
# Running both libraries


@dataclasses.dataclass
class Snapshot:
    """Trainable leaves (jax.tree.leaves order) and per-leaf torch state."""

    params: list[np.ndarray]
    state: list[dict[str, Any]]


def _torch_grads(row: DbRow, grads, shapes) -> list:
    if not row.sparse:
        return [None if g is None else to_torch(g) for g in grads]
    return [None if g is None else _torch_sparse(*g, s) for g, s in zip(grads, shapes)]


def run_torch(row: DbRow, params: dict, grads_seq: list) -> list[Snapshot]:
    """torch after each step; `differentiable` rows take params that do not
    require grad (torch runs their step with grad mode on, in place)."""
    leaves = jax.tree.leaves(params)
    tparams = [to_torch(p) for p in leaves]
    if not row.kwargs.get("differentiable"):
        tparams = [p.requires_grad_() for p in tparams]
    opt = row.torch_cls(tparams, **copy.deepcopy(row.kwargs))
    shapes = [p.shape for p in leaves]
    out = []
    for grads in grads_seq:
        flat = [grads[k] for k in sorted(grads)]
        for p, g in zip(tparams, _torch_grads(row, flat, shapes)):
            p.grad = g
        # sparse steps: torch warns unless invariant checks are chosen
        with (
            torch.sparse.check_sparse_tensor_invariants(enable=row.sparse),
            float32_scalar_roots(row.kwargs),
        ):
            opt.step()
        state = [
            {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for s in (opt.state[p] for p in tparams)
        ]
        out.append(Snapshot([from_torch(p).copy() for p in tparams], state))
    return out


def run_funcopt(row: DbRow, params: dict, grads_seq: list) -> list[tuple]:
    """funcopt's `(params, state)` after each step.

    Dense rows give a missing gradient as a `has_grad` flag (torch's
    `p.grad = None`: one program a row, where a `None` leaf is a second
    one; `None` leaves run against torch in `test_optim.py`); sparse rows
    give it as `None`."""
    opt = row.factory()(**funcopt_kwargs(row.kwargs))
    ours = jax.tree.map(jnp.asarray, params)
    state = opt.init(ours)
    step = jax.jit(opt.step) if row.jit else opt.step
    out = []
    for grads in grads_seq:
        if row.sparse:
            grads = {
                k: None if g is None else _bcoo(*g, params[k].shape)
                for k, g in grads.items()
            }
            ours, state = step(ours, grads, state)
        else:
            grads, has_grad = flag_missing(ours, grads)
            ours, state = step(ours, grads, state, has_grad=has_grad)
        out.append((ours, state))
    return out


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One compared quantity: its largest relative difference (to the
    quantity's largest magnitude) and whether it is within tolerance."""

    what: str
    max_rel: float
    ok: bool
    error: str = ""


def _max_rel(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return float("inf")
    diff = np.abs(actual.astype(expected.dtype) - expected)
    scale = float(np.max(np.abs(expected), initial=0.0))
    worst = float(np.max(diff, initial=0.0))
    return worst / scale if scale else worst


def _check(what, actual, expected, rtol, atol, nudged=()) -> Comparison:
    try:
        actual = np.asarray(actual)
        assert actual.dtype == np.asarray(expected).dtype, (
            f"{what}: dtype {actual.dtype} != torch {np.asarray(expected).dtype}"
        )
        assert_close(actual, expected, rtol, atol, what, nudged)
    except AssertionError as e:
        return Comparison(what, _max_rel(actual, expected), False, str(e))
    return Comparison(what, _max_rel(actual, expected), True)


def tolerance(row: DbRow) -> tuple[float, float]:
    if row.dtype == "float32":
        return f32_tolerance(row.optimizer)
    return F64_RTOL, F64_ATOL


def compare(row: DbRow, seed: int = 0, bits: bool = False) -> list[Comparison]:
    """Every quantity after every step, funcopt against torch (and torch's
    nudged runs for the noise floor, `tests/parity/noise_floor.py`); `bits`:
    bit for bit (`assert_same_bits`), without nudged runs."""
    rng = np.random.default_rng(seed)
    if row.sparse:
        params = make_sparse_params(rng, np.dtype(row.dtype))
        grads = make_sparse_grads(rng, params)
    else:
        params = make_params(rng, row.optimizer, row.dtype)
        grads = make_grads(rng, params)
    expected = run_torch(row, params, grads)
    nudged_runs = []
    if not (row.sparse or bits):
        for r in nudged_rngs():
            nudged_grads = [nudge(g, r) for g in grads]
            nudged_runs.append(run_torch(row, nudge(params, r), nudged_grads))
    ours = run_funcopt(row, params, grads)
    rtol, atol = tolerance(row)

    def check(what, actual, expected, nudged):
        if not bits:
            return _check(what, actual, expected, rtol, atol, nudged)
        try:
            assert_same_bits(actual, expected, what)
        except AssertionError as e:
            return Comparison(what, _max_rel(actual, expected), False, str(e))
        return Comparison(what, 0.0, True)

    out = []
    for t, (snap, (new, state)) in enumerate(zip(expected, ours)):
        others = [run[t] for run in nudged_runs]
        counts = step_counts(state, new) if hasattr(state, "step") else None
        for i, (a, e) in enumerate(zip(jax.tree.leaves(new), snap.params)):
            floor = [o.params[i] for o in others]
            out.append(check(f"step {t}: param {i}", a, e, floor))
            for key, value in snap.state[i].items():
                what = f"step {t}: param {i}: state {key}"
                if key == "step":
                    ok = counts is not None and counts[i] == int(value)
                    got = None if counts is None else counts[i]
                    out.append(Comparison(what, 0.0 if ok else 1.0, ok, f"{got}"))
                    continue
                ours_slot = slot_leaves(state, new, key)[i]
                floor = [from_torch(o.state[i][key]) for o in others]
                value = from_torch(value)
                out.append(check(what, ours_slot, value, floor))
            # torch creates state lazily: a leaf without any never stepped
            # (unless, like SGD without momentum, the optimizer keeps none)
            has_slots = any(
                slot_leaves(state, new, k)[i] is not None for k in state.slots
            )
            if not snap.state[i] and has_slots and counts and counts[i]:
                out.append(Comparison(f"step {t}: param {i}: no state", 1, False))
    return out


def _complex_problem():
    """A complex leaf (torch's view_as_real flattening) and a real one."""
    from tests.parity.test_lbfgs import Problem

    target = np.array([0.3 - 0.1j, 1.0 + 1.0j, -2.0 + 0.5j])

    def loss(p, lib):
        e = p[0] - lib.asarray(target) if lib is jnp else p[0] - torch.tensor(target)
        return lib.sum(lib.abs(e) ** 4) + lib.sum(e.real * e.imag) + lib.sum(p[1] ** 2)

    return Problem(
        "complex",
        lambda: {
            "r": np.array([0.5, -1.0]),
            "z": np.array([1 + 2j, -0.5 + 0.3j, 0.2 - 1j]),
        },
        lambda p: loss([p["z"], p["r"]], jnp),
        lambda ps: loss([ps[1], ps[0]], torch),
    )


def _quartic_problem():
    r"""$\operatorname{mean}_i (x_i^\top w + b)^4 + \sum_j w_j^4$ on a $3\times 1$
    matrix `w` and a vector `b`, the float32 rows' problem. Homogeneous of
    degree 4 with its minimum 0 at 0: scaling the parameters by $2^k$ scales
    every quantity exactly, so each keeps its relative precision all the way
    (torch's quantities move by at most 2.0e-6 of their scale under one-ulp
    nudges, 10 nudged runs, AVX-512 and AVX2). The logistic fit of the float64
    rows converges to float32's resolution within 20 iterations, where one
    ulp flips its stopping tests (ill-posed); a quadratic with a quartic term
    stops on pairs whose `ro` moves by up to 8e-5."""
    from tests.parity.test_lbfgs import _X, Problem

    def make():
        return {"w": np.array([[0.8], [-0.5], [0.3]]), "b": np.array([0.4])}

    def jax_loss(p):
        z = (jnp.asarray(_X, p["w"].dtype) @ p["w"])[:, 0] + p["b"][0]
        return jnp.mean(z**4) + jnp.sum(p["w"] ** 4)

    def torch_loss(ps):
        b, w = ps  # jax.tree.leaves order: "b" before "w"
        z = (torch.tensor(_X, dtype=w.dtype) @ w)[:, 0] + b[0]
        return torch.mean(z**4) + torch.sum(w**4)

    return Problem("quartic", make, jax_loss, torch_loss)


def compare_lbfgs(row: DbRow) -> list[Comparison]:
    """L-BFGS through `step(closure)` (`tests/parity/test_lbfgs.py`'s harness
    and its tolerances per dtype): after every call the parameters, the loss,
    `func_evals`/`n_iter` and the whole state, against torch and its nudged
    runs. float64 rows: the logistic fit (a matrix and a vector); float32
    rows: `_quartic_problem` (the same tree); complex rows: a complex and a
    real leaf."""
    from tests.parity import test_lbfgs as tl

    calls = 3 if row.jit else 1  # un-jitted L-BFGS: ~3 s a call
    problem = {"float64": tl._logistic, "float32": _quartic_problem}.get(
        row.dtype, _complex_problem
    )()
    real = np.finfo(np.dtype(row.dtype)).dtype  # complex leaves as real pairs
    params0 = tl._cast(problem.make_params(), real)
    torch_kwargs = copy.deepcopy(row.kwargs)
    expected = tl._torch_calls(problem, torch_kwargs, calls, params0)
    nudged_runs = [
        tl._torch_calls(problem, torch_kwargs, calls, params0, r) for r in nudged_rngs()
    ]
    opt = fo.lbfgs(**funcopt_kwargs(row.kwargs))
    params = jax.tree.map(jnp.asarray, params0)
    state = opt.init(params)

    def vg(p):
        # torch's gradient of a real loss is dL/dRe + i dL/dIm: JAX's conjugate
        loss, grads = jax.value_and_grad(problem.jax_loss)(p)
        return loss, jax.tree.map(jnp.conj, grads)

    def step(p, s):
        return opt.step(p, s, vg)

    step = jax.jit(step) if row.jit else step
    out = []
    for call, torch_call in enumerate(expected):
        nudged = [run[call] for run in nudged_runs]
        params, state, loss = step(params, state)
        quantities = [
            (f"call {call}: param {i}", p.view(real), tp.view(real), i)
            for i, (p, tp) in enumerate(
                zip((np.asarray(x) for x in jax.tree.leaves(params)), torch_call.params)
            )
        ]
        for what, a, e, i in quantities:
            floor = [o.params[i].view(real) for o in nudged]
            out.append(_check_lbfgs(what, tl._close, (a, e, what, None, floor)))
        what = f"call {call}: loss"
        floor = [o.loss for o in nudged]
        args = (loss, torch_call.loss, what, None, floor)
        out.append(_check_lbfgs(what, tl._close, args))
        args = (state, torch_call.state, call, [o.state for o in nudged])
        out.append(_check_lbfgs(f"call {call}: state", tl._compare_state, args))
    return out


def _check_lbfgs(what, check, args) -> Comparison:
    """`check(*args)` (an asserting comparison of test_lbfgs) as a Comparison;
    its relative difference: the largest one the failure message reports."""
    try:
        check(*args)
    except AssertionError as e:
        rel = re.search(r"Max relative difference[^:]*: ([0-9.e+-]+|inf)", str(e))
        return Comparison(what, float(rel.group(1)) if rel else 1.0, False, str(e))
    return Comparison(what, 0.0, True)


# ---------------------------------------------------------------------------
# Error inputs


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    """One `ErrorOptimizerInput` of optim_db."""

    optimizer: str
    index: int  # position among the optimizer's error inputs (descs repeat)
    desc: str
    params: Any  # torch's params (None: kwargs alone decide)
    kwargs: dict[str, Any]
    error_on: OptimizerErrorEnum
    error_type: type
    error_regex: str

    @property
    def id(self) -> str:
        return f"{self.optimizer}-{self.index}-{slug(self.desc)}"

    @property
    def key(self) -> tuple[str, str]:
        return self.optimizer, self.id.split("-", 1)[1]

    @property
    def torch_cls(self) -> type:
        return INFOS[self.optimizer].optim_cls


def error_rows() -> list[ErrorRow]:
    out = []
    for optimizer, info in INFOS.items():
        for i, e in enumerate(info.optim_error_inputs_func(DEVICE, torch.float32)):
            oi = e.optimizer_error_input
            out.append(
                ErrorRow(
                    optimizer,
                    i,
                    oi.desc,
                    oi.params,
                    oi.kwargs,
                    e.error_on,
                    e.error_type,
                    e.error_regex,
                )
            )
    return out


def _leaf(t: torch.Tensor):
    """A torch param as the pytree leaf that means the same: a sparse tensor
    as a BCOO, a dense one as the array of its dtype."""
    if t.layout == torch.sparse_coo:
        return jsparse.BCOO.fromdense(jnp.asarray(t.to_dense().numpy()))
    return jnp.asarray(t.detach().numpy())


def error_tree(row: ErrorRow) -> tuple[dict, dict | None, Any]:
    """`(params, grads, param_groups)`: torch's params list as a pytree.

    Without params (the kwargs alone decide) a 2x2 float32 matrix; a torch
    param group becomes a labelled group of the tree.
    """
    if row.params is None:
        return {"w": jnp.zeros((2, 2))}, None, None
    params, grads, labels, grouped = {}, {}, {}, False
    for i, entry in enumerate(row.params):
        group = "default"
        if isinstance(entry, dict):
            grouped = True
            group = f"group{i}"
            entry = entry["params"][0]
        name = f"p{i}"
        params[name] = _leaf(entry)
        grads[name] = None if entry.grad is None else _leaf(entry.grad)
        labels[name] = group
    groups = None
    if grouped:
        overrides = {g: {} for g in labels.values() if g != "default"}
        groups = fo.param_groups(
            lambda p: {
                k: jax.tree.map(lambda _, g=labels[k]: g, v) for k, v in p.items()
            },
            overrides,
        )
    return params, grads, groups


def funcopt_error(row: ErrorRow) -> BaseException | None:
    """What funcopt raises for the input: at construction, `init` or (for a
    step error, or a params check torch makes at construction) the first
    step, which is where funcopt first sees the params. None: nothing."""
    params, grads, groups = error_tree(row)
    kwargs = funcopt_kwargs(row.kwargs)
    if groups is not None:
        kwargs["param_groups"] = groups
    try:
        opt = getattr(fo, row.optimizer)(**kwargs)
        state = opt.init(params)
        if row.error_on == OptimizerErrorEnum.STEP_ERROR:
            grads = {
                k: jnp.ones_like(p) if grads is None or grads[k] is None else grads[k]
                for k, p in params.items()
            }
            opt.step(params, grads, state)
    except Exception as e:  # noqa: BLE001 - the test compares type and message
        return e
    return None


def torch_error(row: ErrorRow) -> BaseException | None:
    """What live torch raises for the input (params None: one 2x2 param)."""
    params = row.params
    if params is None:
        params = [torch.zeros(2, 2, requires_grad=True)]
    try:
        opt = row.torch_cls(params, **row.kwargs)
        if row.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()
    except Exception as e:  # noqa: BLE001
        return e
    return None


# ---------------------------------------------------------------------------
# The gap report


def _report() -> None:  # pragma: no cover - a maintainer's tool
    import warnings

    warnings.simplefilter("ignore")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    for row in rows():
        if lookup(NOT_APPLICABLE, row.key):
            continue
        run = compare_lbfgs if row.optimizer == "lbfgs" else compare
        with jax.enable_x64(row.dtype != "float32"):
            try:
                bad = [c for c in run(row) if not c.ok]
            except Exception as e:  # noqa: BLE001
                print(f"{row.id}: RAISES {type(e).__name__}: {str(e)[:150]}")
                continue
        if bad:
            worst = max(bad, key=lambda c: c.max_rel)
            print(
                f"{row.id}: {len(bad)} mismatches, max rel {worst.max_rel:.3g} "
                f"({worst.what})"
            )
    for row in error_rows():
        if row.desc in PARAMS_LIST_ERRORS:
            continue
        ours = funcopt_error(row)
        good = isinstance(ours, row.error_type) and re.search(
            row.error_regex, str(ours)
        )
        if not good:
            print(f"ERROR {row.id}: {type(ours).__name__}: {ours}")


if __name__ == "__main__":
    _report()
