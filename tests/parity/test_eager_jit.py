"""An un-jitted step is the jitted step: the same bits, on every row.

`opt.step` (and `opt.update`) called on concrete arrays compile the whole
step (`funcopt._core.compiled_when_concrete`), so an eager training loop and
`jax.jit(opt.step)` run one program. Run op by op instead, XLA compiles the
step's scalar and per-leaf parts into other machine code, and float32 results
moved by an ulp (86 of the 206 float32 rows of the parity table differed
before). Checked in float32,
where such rewrites show, with the `None`-gradient steps: params, every state
buffer, the step counts and the hyperparameters the state carries (the group
scalars of Prodigy, schedule-free, ...), bit for bit.

Every row runs its `None`-gradient steps as `has_grad` flags: one program a
path. `None` leaves change the tree, so each of their patterns is another
program of the same step (four here, traced and compiled twice each: 236 s of
the suite for these rows). They run against torch for every optimizer
(jitted, `test_optim.py::test_none_gradient_leaves`), and eagerly, bit for
bit against the jitted step, for one row below.
"""

import jax
import numpy as np
import pytest

from funcopt.optim.adam import adam
from tests.parity.cases import FLAG_CASES, OPT_CASES
from tests.torch_ref import (
    assert_same_bits,
    make_grads,
    make_params_for,
    run_funcopt,
    run_funcopt_flagged,
)


def _assert_same_trees(eager, jitted):
    paths_eager, tree_eager = jax.tree.flatten_with_path(eager)
    paths_jitted, tree_jitted = jax.tree.flatten_with_path(jitted)
    assert tree_eager == tree_jitted
    for (path, e), (_, j) in zip(paths_eager, paths_jitted):
        assert_same_bits(e, j, jax.tree_util.keystr(path), reference="jit")


# one program per optimizer and flag path: the all-flags combination of each
# row of the table (eager == jit is a property of the compiled step, not of a
# formula; all 206 float32 rows were checked once, 0 differed)
@pytest.mark.parametrize(
    "case,kwargs", [case.params()[-1] for case in OPT_CASES + FLAG_CASES]
)
def test_eager_step_is_the_jitted_step(case, kwargs):
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    params = make_params_for(case, rng, np.float32)
    grads = make_grads(rng, params, case.steps, True)
    eager = run_funcopt_flagged(case, kwargs, params, grads, jit=False)
    jitted = run_funcopt_flagged(case, kwargs, params, grads, jit=True)
    _assert_same_trees(eager, jitted)


ADAM_ALL_FLAGS = next(case for case in OPT_CASES if case.name == "adam").params()[-1]


@pytest.mark.parametrize("case,kwargs", [ADAM_ALL_FLAGS])
def test_eager_step_with_none_leaves_is_the_jitted_step(case, kwargs):
    """`None` gradient leaves, each pattern its own program, eager as jitted.
    (Not the flags' bits: another program, whose float32 rounding differs in
    the default mode; in the bit-exact mode both are torch's bits,
    `test_float32_bits.py`.)"""
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    params = make_params_for(case, rng, np.float32)
    grads = make_grads(rng, params, case.steps, True)
    assert any(None in jax.tree.leaves(g, is_leaf=lambda x: x is None) for g in grads)
    eager = run_funcopt(case, kwargs, params, grads, jit=False)
    jitted = run_funcopt(case, kwargs, params, grads, jit=True)
    _assert_same_trees(eager, jitted)


def test_eager_update_is_the_jitted_update():
    """The optax protocol's `update`, un-jitted, is its jitted program too."""
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.float32(0.5)}
    grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(p.dtype), params)
    opt = adam(lr=0.1, weight_decay=0.01)
    state = opt.init(params)
    eager = opt.update(grads, state, params)
    jitted = jax.jit(opt.update)(grads, state, params)
    _assert_same_trees(eager, jitted)
