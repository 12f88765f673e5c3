"""The shape of each compiled CPU step: passes over memory and copies.

A structural check, not a timing: XLA's CPU backend runs a rule that updates
k buffers as k + 1 loops over memory at best. The rules are arranged so that
the donated step reaches that (no full-size temporary such as a shared
weight-decayed gradient, no copy of a donated buffer); this fails when a
change to a rule makes XLA materialise or copy something again. Measured
speed is in ``benchmarks/`` (``profile_step.py --audit``).

These are the JAX rules' programs, which GPUs, TPUs, sharded steps and
installs without funcopt's native library run: on one CPU device Adam,
AdamW, SGD, Adagrad, RMSprop, Adamax, Adadelta, RAdam and Rprop take the
native kernel instead (one custom call per bucket or leaf, in place:
``tests/test_native_fused.py``), so the tests here turn it off
(``jax_rules``).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import funcopt as fo
from funcopt import _multi_tensor
from tests._subprocess import HANG_GUARD_S
from tests.torch_ref import native_kernels

N = 1 << 16


@pytest.fixture(autouse=True)
def jax_rules():
    with native_kernels(False):
        yield


# name -> (optimizer, full-size copies XLA cannot avoid)
RULES = {
    "sgd": (lambda: fo.sgd(lr=0.1), 0),
    "sgd(momentum, nesterov, weight_decay)": (
        lambda: fo.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        0,
    ),
    "adam": (fo.adam, 0),
    "adam(amsgrad)": (lambda: fo.adam(amsgrad=True), 0),
    "adamw": (fo.adamw, 0),
    "adamax": (fo.adamax, 0),
    "nadam": (fo.nadam, 0),
    "nadam(decoupled)": (
        lambda: fo.nadam(weight_decay=0.1, decoupled_weight_decay=True),
        0,
    ),
    "radam": (fo.radam, 0),
    "rmsprop": (fo.rmsprop, 0),
    "rmsprop(centered, momentum)": (
        lambda: fo.rmsprop(centered=True, momentum=0.9),
        0,
    ),
    "adagrad": (fo.adagrad, 0),
    "asgd": (fo.asgd, 0),
    # each of their later passes reads an old value another pass overwrites
    "adadelta": (fo.adadelta, 2),
    "rprop": (fo.rprop, 2),
}


def full_size(hlo_entry: str, op: str) -> int:
    """Instructions ``op`` with an N-element float32 result (or tuple element)."""
    results = re.findall(rf"= (\(?[^=]*?\)?) {op}\(", hlo_entry)
    return sum(f"f32[{N}]" in result for result in results)


def passes_and_copies(name: str) -> tuple[int, int, int]:
    """(buffers, full-size loops, full-size copies) of the donated step."""
    opt = RULES[name][0]()
    params = {"w": jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32)}
    state = opt.init(params)
    buffers = sum(x.size == N for x in jax.tree.leaves(state))
    compiled = (
        jax.jit(opt.step, donate_argnums=(0, 2)).lower(params, params, state).compile()
    )
    hlo = compiled.as_text()
    entry = hlo[hlo.index("ENTRY") :]
    return buffers, full_size(entry, "fusion"), full_size(entry, "copy")


@pytest.mark.parametrize("name", RULES)
def test_donated_step_makes_one_pass_per_output(name):
    buffers, passes, copies = passes_and_copies(name)
    assert (passes, copies) == (buffers + 1, RULES[name][1])


# with XLA's multi-output fusion on, the buffers that read the same inputs
# update in one loop: passes (copies) expected per rule
MULTI_OUTPUT = {
    "adam": (2, 0),
    "adam(amsgrad)": (3, 0),
    "adamw": (2, 0),
    "adamax": (2, 0),
    "nadam": (2, 0),
    "radam": (2, 0),
    "rmsprop(centered, momentum)": (3, 0),
    "adadelta": (2, 0),
    "rprop": (3, 0),
}


def test_multi_output_fusion_updates_buffers_together():
    """Each buffer computes the decayed gradient itself (``in_own_pass``)."""
    code = (
        "import json, tests.test_compiled_passes as t; "
        "print(json.dumps({n: t.passes_and_copies(n)[1:] for n in t.MULTI_OUTPUT}))"
    )
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion",
        "FUNCOPT_NATIVE": "0",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=pathlib.Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {n: tuple(v) for n, v in got.items()} == MULTI_OUTPUT


# --------------------------------------------------------------------------
# compile cost of many leaves (issue 15): code shared between leaves
# --------------------------------------------------------------------------


def distinct_kernels(compiled_hlo: str) -> int:
    """Fused computations of a compiled module, counting identical bodies once
    (XLA generates machine code once for identical kernels)."""
    text = re.sub(r", metadata=\{[^}]*\}", "", compiled_hlo)
    bodies = set()
    for m in re.finditer(r"\n(%\S+) \([^\n]*\{\n(.*?)\n\}", text, re.S):
        if "fused" in m.group(1) or "wrapped" in m.group(1):
            bodies.add(re.sub(r"%[\w.\-]+", "%", m.group(2)))
    return len(bodies)


def two_shape_tree(n: int) -> dict:
    """``n`` leaves of each of two shapes."""
    vectors = {f"v{i}": jnp.full((1000,), 0.1, jnp.float32) for i in range(n)}
    matrices = {f"m{i}": jnp.full((30, 20), 0.1, jnp.float32) for i in range(n)}
    return {**vectors, **matrices}


def lowered(step, init, params, path: str = "auto") -> jax.stages.Lowered:
    """``step(params, grads, init(params))`` jitted, donated, lowered, with
    the multi-tensor policy ``path`` (``"never"``: one program per leaf, the
    path of large leaves and of every program off one CPU device)."""
    grads = jax.tree.map(lambda p: p * 0.1, params)
    with _multi_tensor.policy(path):
        step = jax.jit(step, donate_argnums=(0, 2))
        return step.lower(params, grads, init(params))


@pytest.mark.parametrize("name", RULES)
def test_same_shaped_leaves_share_compiled_kernels(name):
    """More leaves of the same shapes add no kernel code: each leaf reads its
    step count at a runtime index (``funcopt._compile``), not a constant one
    that would make its kernels differ from every other leaf's (measured
    before: Adam 20 distinct kernels for 3 leaves per shape, 44 for 9)."""
    opt = RULES[name][0]()
    kernels = [
        distinct_kernels(
            lowered(opt.step, opt.init, two_shape_tree(n), "never").compile().as_text()
        )
        for n in (3, 9)
    ]
    # (fewer is fine: a rule with 0-d state stacks it over the leaves in one
    # concatenate, which XLA fuses for 6 operands and not for 18)
    assert kernels[1] <= kernels[0]


@pytest.mark.parametrize("name", ["nadam", "nadam(decoupled)"])
def test_zero_dim_state_math_runs_once_for_all_leaves(name):
    """The scalar math of a leaf's 0-d state (NAdam's `mu_product`) is
    vectorised over the leaves with their step counts
    (``funcopt._compile.leaf_program``): each further leaf adds its passes
    over memory and one kernel that reads its new `mu_product`, not three
    small scalar kernels (measured before: 6 kernels per leaf, after 4;
    optax's NAdam 3)."""
    opt = RULES[name][0]()
    entry = [
        lowered(opt.step, opt.init, two_shape_tree(n), "never")
        .compile()
        .as_text()
        .split("\nENTRY")[1]
        for n in (3, 9)
    ]
    per_leaf = (entry[1].count(" fusion(") - entry[0].count(" fusion(")) / 12
    assert per_leaf <= 4


# rules whose step-count math raises a hyperparameter to the step's power
# (bias corrections, NAdam's momentum schedule, RAdam's rho_t, ASGD's eta)
STEP_POWERS = [
    "adam",
    "adam(amsgrad)",
    "adamw",
    "adamax",
    "nadam",
    "nadam(decoupled)",
    "radam",
    "asgd",
]


@pytest.mark.parametrize("name", STEP_POWERS)
def test_step_count_math_runs_once_for_all_leaves(name):
    """The scalar math of the step counts (`beta**step`, ...) is one
    vectorised computation for all leaves of a shape and group
    (``funcopt._compile.leaf_program``), not a few small kernels per leaf:
    the compiled step has as many `power` ops for 9 leaves per shape as for
    3 (measured before: Adam 12 and 36)."""
    opt = RULES[name][0]()
    powers = [
        lowered(opt.step, opt.init, two_shape_tree(n), "never")
        .compile()
        .as_text()
        .count(" power(")
        for n in (3, 9)
    ]
    assert powers[0] > 0
    assert powers[0] == powers[1], f"power ops for 3 and 9 leaves: {powers}"


OPTAX_TWINS = {
    "sgd": (lambda: fo.sgd(lr=0.1), lambda: optax.sgd(0.1)),
    "sgd(momentum)": (
        lambda: fo.sgd(lr=0.1, momentum=0.9),
        lambda: optax.sgd(0.1, momentum=0.9),
    ),
    "adam": (fo.adam, lambda: optax.adam(1e-3)),
    "adamw": (fo.adamw, lambda: optax.adamw(1e-3)),
    "adamax": (fo.adamax, lambda: optax.adamax(1e-3)),
    "nadam": (fo.nadam, lambda: optax.nadam(1e-3)),
    "radam": (fo.radam, lambda: optax.radam(1e-3)),
    "rmsprop": (fo.rmsprop, lambda: optax.rmsprop(1e-2)),
    "adagrad": (fo.adagrad, lambda: optax.adagrad(1e-2)),
    "adadelta": (fo.adadelta, lambda: optax.adadelta(1.0)),
    "rprop": (fo.rprop, lambda: optax.rprop(1e-2)),
}


@pytest.mark.parametrize("path", ["never", "auto"])
@pytest.mark.parametrize("name", OPTAX_TWINS)
def test_lowered_program_per_leaf_is_no_larger_than_optax(name, path):
    """The StableHLO that JAX hands XLA grows per leaf by no more lines than
    optax's for the same rule, on both paths: per leaf, the rule is traced
    once per shape and group and called per leaf
    (``funcopt._core._leaf_step``); packed (the default for these small
    leaves on one CPU device), a leaf adds its arguments and results and the
    operands of one copy in and one out per buffer."""
    make_opt, make_tx = OPTAX_TWINS[name]
    opt, tx = make_opt(), make_tx()

    def optax_step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def lines_per_leaf(step, init):
        lines = [
            len(lowered(step, init, two_shape_tree(n), path).as_text().splitlines())
            for n in (4, 8)
        ]
        return (lines[1] - lines[0]) / 8

    ours = lines_per_leaf(opt.step, opt.init)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes float and int32
        theirs = lines_per_leaf(optax_step, tx.init)
    assert ours <= theirs, f"{ours} lines per leaf, optax {theirs}"


@pytest.mark.parametrize("name", ["adam", "nadam", "rmsprop(centered, momentum)"])
def test_leaf_programs_hold_no_calls_or_conditionals(name):
    """A leaf's program (``@arrays``, called once per leaf) calls nothing and
    branches nowhere: the jitted helpers a rule uses are traced in place
    (``_compile.inline``) and its CPU barriers are one primitive
    (``_math.cpu_barrier``), since XLA's call-graph passes clone every call
    and conditional once per call site, that is per leaf."""
    opt = RULES[name][0]()
    text = lowered(opt.step, opt.init, two_shape_tree(2), "never").as_text()
    programs = [
        f for f in text.split("func.func")[1:] if f.split("(")[0].endswith("@arrays")
    ]
    assert programs
    for body in programs:
        assert "call @" not in body and "stablehlo.case" not in body, body[:2000]
