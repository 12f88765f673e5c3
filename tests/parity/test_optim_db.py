r"""Parity driven by torch's own optimizer test database (`optim_db`).

Every CPU input torch's optimizer tests run
(`torch.testing._internal.common_optimizers`, cliquey `differentiable`/`fused`
variants and tensor learning rates included) against live torch, in float64
($|\Delta| \le 10^{-12} + 10^{-10}\,|x_\text{torch}|$ for parameters, every
state buffer and the step counts, after every step), float32 (the parity
table's tolerance of the optimizer's row; an input whose code path a float32
row of the parity table already runs, differing only in numbers that scale
the arithmetic, is proven there: `optim_db_inputs.float32_table_row`; L-BFGS
rows: `test_lbfgs.RTOL` and the noise floor) and complex128 where torch's
`OptimizerInfo.supports_complex` says so; float32 bit for bit with x64 and
the exact float32 mode (`test_float32_bits`: every real input, one jitted
row each, square-root optimizers in a child process whose torch roots are
correctly rounded); and every error input that has a pytree meaning must
raise torch's type with a message matching torch's regex. The rows and the
tables that say what each expects (`NOT_APPLICABLE`, `KNOWN_GAPS`,
`PARAMS_LIST_ERRORS`; for the bit rows `BITS_NOT_APPLICABLE` and
`BITS_KNOWN_GAPS`) live in
`tests/parity/optim_db_inputs.py`; the parity table (`tests/parity/cases.py`)
stays the readable spec.
"""

from __future__ import annotations

import os
import re

import jax
import pytest
import torch

from tests.parity import optim_db_inputs as db
from tests.torch_ref import run_with_correctly_rounded_sqrt

# set in the child process that runs the square-root optimizers' bit rows
SQRT_CHILD = "FUNCOPT_TEST_OPTIM_DB_SQRT"


def _row_param(row: db.DbRow):
    marks = []
    if reason := db.lookup(db.NOT_APPLICABLE, row.key):
        marks.append(pytest.mark.skip(reason=f"not applicable: {reason}"))
    elif reason := db.lookup(db.KNOWN_GAPS, row.key):
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(row, id=row.id, marks=marks)


ROWS = db.rows()
ERROR_ROWS = db.error_rows()


def _rows(dtype: str) -> list:
    return [_row_param(r) for r in ROWS if r.dtype == dtype]


def _assert_matches(row: db.DbRow, bits: bool = False) -> None:
    if row.optimizer == "lbfgs":
        comparisons = db.compare_lbfgs(row)
    else:
        comparisons = db.compare(row, bits=bits)
    assert comparisons, "nothing compared"
    bad = [c for c in comparisons if not c.ok]
    if bad:
        worst = max(bad, key=lambda c: c.max_rel)
        raise AssertionError(
            f"{len(bad)} of {len(comparisons)} quantities differ from torch; "
            f"worst {worst.what}: max relative difference {worst.max_rel:.3g}\n"
            + worst.error
        )


@pytest.mark.parametrize("row", _rows("float64"))
def test_float64(row, x64):
    _assert_matches(row)


@pytest.mark.parametrize("row", _rows("complex128"))
def test_complex128(row, x64):
    _assert_matches(row)


@pytest.mark.parametrize("row", _rows("float32"))
def test_float32(row):
    assert not jax.config.jax_enable_x64
    _assert_matches(row)


def _bit_param(row: db.DbRow):
    marks = []
    if reason := db.lookup(db.BITS_KNOWN_GAPS, row.key):
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(row, id=row.id, marks=marks)


BIT_ROWS = db.bit_rows()


def _bit_rows(takes_sqrt: bool) -> list:
    return [
        _bit_param(r) for r in BIT_ROWS if (r.optimizer in db.TAKES_SQRT) == takes_sqrt
    ]


@pytest.mark.parametrize("row", _bit_rows(takes_sqrt=bool(os.environ.get(SQRT_CHILD))))
def test_float32_bits(row, x64, torch_cpu_loop, exact_float32):
    """float32 params, every state buffer and the step counts bit for bit
    against torch's after every step, with x64 and funcopt's exact float32
    mode (`tests/parity/test_float32_bits.py`), every flag variant optim_db
    generates (`differentiable`, `fused`, tensor lrs) included. The
    optimizers that take a square root run in the child process of
    `test_float32_bits_where_torchs_sqrt_is_correctly_rounded`."""
    _assert_matches(row, bits=True)


def test_float32_bits_where_torchs_sqrt_is_correctly_rounded():
    """The `db.TAKES_SQRT` optimizers' bit rows, in a child process whose
    torch takes correctly rounded float32 roots (checked by its probe)."""
    rows = [r for r in BIT_ROWS if r.optimizer in db.TAKES_SQRT]
    k = "test_float32_bits and not correctly_rounded"
    passed = run_with_correctly_rounded_sqrt(__file__, k, SQRT_CHILD)
    gaps = [r for r in rows if db.lookup(db.BITS_KNOWN_GAPS, r.key)]
    assert passed == len(rows) - len(gaps)


def test_every_optimizer_and_input_is_a_row():
    """All 15 of optim_db's optimizers, every CPU input of each, in each dtype
    (complex where torch supports it), none filtered out silently."""
    assert set(db.INFOS) == set(db.FUNCOPT_NAME.values())
    assert len(db.INFOS) == 15
    for optimizer, info in db.INFOS.items():
        descs = {desc for desc, _, _ in db._db_inputs(optimizer)}
        dtypes = {"float64", "float32"} | (
            {"complex128"} if info.supports_complex else set()
        )
        # float32 inputs on a code path of the parity table's float32 rows
        # are proven there (`db.float32_table_row`), and have no row here
        in_table = {
            desc
            for desc, kwargs, sparse in db._db_inputs(optimizer)
            if not sparse and db.float32_table_row(optimizer, kwargs)
        }
        for dtype in dtypes:
            got = {
                r.desc for r in ROWS if r.optimizer == optimizer and r.dtype == dtype
            }
            if dtype == "float32":
                assert not got & in_table, (optimizer, got & in_table)
                got |= in_table
            assert got == descs, (optimizer, dtype)


def test_float32_table_rows_run_the_same_code_path():
    """An input left to the parity table names a float32 row of it that
    exists and differs only in numbers that scale the arithmetic; a flag, a
    tensor lr or a regime-choosing number (`t0`) keeps the input's own row."""
    from tests.parity.cases import OPT_PARAMS_F32

    table_ids = {
        f"tests/parity/test_optim.py::test_float32_parity[{p.id}]"
        for p in OPT_PARAMS_F32
    }
    adam = db.INFOS["adam"].optim_cls
    covered = db.float32_table_row("adam", {"weight_decay": 0.5})
    assert covered in table_ids
    assert db.code_path(adam, {"foreach": None}) == db.code_path(
        adam, {"foreach": False}
    )
    assert db.float32_table_row("adamax", {"differentiable": True}) is None
    assert db.float32_table_row("sgd", {"lr": torch.tensor(0.01)}) is None
    asgd = db.INFOS["asgd"].optim_cls
    assert db.code_path(asgd, {"t0": 5.0}) != db.code_path(asgd, {"t0": 1e6})
    for optimizer in db.INFOS:
        for _, kwargs, sparse in db._db_inputs(optimizer):
            row = None if sparse else db.float32_table_row(optimizer, kwargs)
            assert row is None or row in table_ids, row


def test_tables_name_existing_rows():
    """Every table entry matches at least one row (a stale one is an error)."""
    keys = [r.key for r in ROWS] + [r.key for r in ERROR_ROWS]
    for table in (db.NOT_APPLICABLE, db.KNOWN_GAPS):
        for entry in table:
            assert any(db.lookup({entry: ""}, k) is not None for k in keys), entry
    bit_keys = [r.key for r in BIT_ROWS]
    for entry in db.BITS_KNOWN_GAPS:
        assert any(db.lookup({entry: ""}, k) is not None for k in bit_keys), entry
    assert set(db.BITS_NOT_APPLICABLE) <= set(db.INFOS)
    assert db.TAKES_SQRT <= set(db.INFOS)
    descs = {r.desc for r in db.error_rows()}
    assert set(db.PARAMS_LIST_ERRORS) <= descs


def _error_param(row: db.ErrorRow):
    marks = []
    if reason := db.PARAMS_LIST_ERRORS.get(row.desc):
        marks.append(pytest.mark.skip(reason=f"no pytree meaning: {reason}"))
    elif reason := db.lookup(db.KNOWN_GAPS, row.key):
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(row, id=row.id, marks=marks)


@pytest.mark.parametrize("row", [_error_param(r) for r in ERROR_ROWS])
def test_error_input(row):
    """torch raises what optim_db says; funcopt raises the same type with a
    message matching torch's regex (at construction, `init` or first step:
    funcopt sees the params only there)."""
    theirs = db.torch_error(row)
    assert isinstance(theirs, row.error_type), f"torch: {theirs!r}"
    assert re.search(row.error_regex, str(theirs)), str(theirs)
    ours = db.funcopt_error(row)
    assert type(ours) is type(theirs), f"funcopt: {ours!r}, torch: {theirs!r}"
    assert re.search(row.error_regex, str(ours)), f"funcopt: {ours}"
