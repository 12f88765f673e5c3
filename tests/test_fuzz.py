"""Random bad inputs to the public API: clear, documented errors only.

Every call below either succeeds or raises one of the documented exception
types (``ValueError``, ``TypeError``, ``RuntimeError``, ``KeyError``) with a
non-empty message, or the exception the reference (torch, or the ecosystem
package) raises for the same input. Never a raw JAX/XLA error (tracer
errors, ``XlaRuntimeError``), an ``AttributeError`` or an ``AssertionError``
from inside the library, and never a message that leaks JAX internals.

Where the reference rejects an argument when it is constructed, funcopt must
raise the same exception type (and message, where the value prints alike).

Deterministic: ``derandomize=True`` and no example database.
"""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jnp
import lion_pytorch
import numpy as np
import prodigyopt
import pytest
import pytorch_optimizer
import schedulefree
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental import sparse as jsparse
from torch.optim import lr_scheduler as TS
from torch.optim import swa_utils

import funcopt as fo
from funcopt import lr_scheduler as S

fuzz = settings(
    max_examples=15,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
wider = settings(fuzz, max_examples=40)  # for the cheap, single tests

DOCUMENTED = (ValueError, TypeError, RuntimeError, KeyError)
# JAX internals that must not reach the user, as types or in messages
LEAKS = ("Tracer", "jaxlib", "ArrayImpl", "abstract array", "XlaRuntimeError")


def check_error(err: BaseException, reference: BaseException | None = None):
    """``err`` is documented (or the reference's own type) and says what."""
    allowed = DOCUMENTED + ((type(reference),) if reference is not None else ())
    assert isinstance(err, allowed), f"{type(err).__module__}.{err!r}"
    assert not isinstance(err, AssertionError | AttributeError) or (
        reference is not None and type(err) is type(reference)
    ), repr(err)
    assert not type(err).__module__.startswith(("jax", "jaxlib")), repr(err)
    message = str(err)
    assert message.strip(), f"empty message: {err!r}"
    if reference is None or type(err) is not type(reference):
        # (a message in the reference's format may print a JAX array's type)
        assert not any(leak in message for leak in LEAKS), message


def outcome(fn):
    """``(result, None)`` or ``(None, exception)``; warnings are not errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 - the point of the test
            return None, e


# --------------------------------------------------------------------------
# bad values
# --------------------------------------------------------------------------

SCALARS = [
    -1.0,
    -1e-8,
    0.0,
    1.0,
    2.0,
    -1,
    0,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    "x",
    None,
    1j,
    [0.1],
    (0.1, 0.2, 0.3),
    {"lr": 0.1},
    np.ones(2),
    np.asarray(0.5),
    np.asarray([0.5]),
    jnp.ones(3),
]


@st.composite
def bad_value(draw, default):
    """A scalar from the pool; for a tuple default, often that tuple with one
    entry replaced (or a wrong length)."""
    if isinstance(default, tuple) and draw(st.booleans()):
        i = draw(st.integers(0, len(default) - 1))
        kind = draw(st.sampled_from(["entry", "short", "long"]))
        if kind == "short":
            return default[:i]
        if kind == "long":
            return (*default, draw(st.sampled_from(SCALARS[:11])))
        value = draw(st.sampled_from(SCALARS))
        return (*default[:i], value, *default[i + 1 :])
    return draw(st.sampled_from(SCALARS))


def to_torch(x):
    if isinstance(x, np.ndarray | jax.Array):
        return torch.tensor(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(to_torch(v) for v in x)
    if isinstance(x, list):
        return [to_torch(v) for v in x]
    if isinstance(x, dict):
        return {k: to_torch(v) for k, v in x.items()}
    return x


def prints_alike(x) -> bool:
    """A value whose repr is the same on both sides (no arrays)."""
    if isinstance(x, tuple | list):
        return all(prints_alike(v) for v in x)
    if isinstance(x, dict):
        return all(prints_alike(v) for v in x.values())
    return not isinstance(x, np.ndarray | jax.Array)


# --------------------------------------------------------------------------
# optimizers: bad constructor arguments, then init and step
# --------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": (fo.sgd, torch.optim.SGD),
    "adam": (fo.adam, torch.optim.Adam),
    "adamw": (fo.adamw, torch.optim.AdamW),
    "adamax": (fo.adamax, torch.optim.Adamax),
    "nadam": (fo.nadam, torch.optim.NAdam),
    "radam": (fo.radam, torch.optim.RAdam),
    "rmsprop": (fo.rmsprop, torch.optim.RMSprop),
    "adagrad": (fo.adagrad, torch.optim.Adagrad),
    "adadelta": (fo.adadelta, torch.optim.Adadelta),
    "rprop": (fo.rprop, torch.optim.Rprop),
    "asgd": (fo.asgd, torch.optim.ASGD),
    "adafactor": (fo.adafactor, torch.optim.Adafactor),
    "muon": (fo.muon, torch.optim.Muon),
    "sparse_adam": (fo.sparse_adam, torch.optim.SparseAdam),
    "lbfgs": (fo.lbfgs, torch.optim.LBFGS),
    "lion": (fo.contrib.lion, lion_pytorch.Lion),
    "prodigy": (fo.contrib.prodigy, prodigyopt.Prodigy),
    "lamb": (fo.contrib.lamb, pytorch_optimizer.Lamb),
    "adan": (fo.contrib.adan, pytorch_optimizer.Adan),
    "sgd_schedule_free": (fo.contrib.sgd_schedule_free, schedulefree.SGDScheduleFree),
    "adamw_schedule_free": (
        fo.contrib.adamw_schedule_free,
        schedulefree.AdamWScheduleFree,
    ),
}
# Arguments the reference may reject at construction where funcopt accepts
# them, on purpose (documented): torch execution switches that funcopt
# ignores, whose truthiness torch tests (a multi-element array as
# ``differentiable``).
IGNORED = {"foreach", "capturable", "differentiable"}

PARAMS = {"w": jnp.ones((2, 3)), "n": jnp.arange(2)}
# an eager LBFGS step compiles its while loop, SparseAdam's its scatters:
# these are only traced
SLOW_EAGER = {"lbfgs", "sparse_adam"}


def grads_for(name):
    g = jnp.full((2, 3), 0.5)
    if name == "sparse_adam":  # every entry stored, built on the host
        index = jnp.asarray(np.argwhere(np.ones((2, 3), bool)))
        g = jsparse.BCOO((jnp.full(6, 0.5), index), shape=(2, 3))
    return {"w": g, "n": None}


def value_and_grad(params):
    return jnp.sum(params["w"] ** 2), {"w": 2 * params["w"], "n": None}


def trace(fn, *trees):
    """``jax.eval_shape`` of ``fn`` with the array leaves of ``trees`` traced
    and every other leaf static, as under a ``jit`` that marks non-arrays
    static: the library's trace-time checks, without a compile."""
    flat, treedef = jax.tree.flatten(trees)
    is_array = [isinstance(x, jax.Array | np.ndarray) for x in flat]

    def inner(arrays):
        it = iter(arrays)
        full = [next(it) if a else x for x, a in zip(flat, is_array)]
        out = fn(*treedef.unflatten(full))
        return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]

    return jax.eval_shape(inner, [x for x, a in zip(flat, is_array) if a])


def run_step(name, opt, params, grads, state, traced: bool):
    """One eager step, or its trace (the checks under jit)."""
    if name == "lbfgs":

        def step(p, s):
            return opt.step(p, s, value_and_grad)

        return trace(step, params, state) if traced else step(params, state)
    if traced:
        return trace(opt.step, params, grads, state)
    return opt.step(params, grads, state)


def reference_error(ref_cls, kwargs):
    if not set(kwargs) <= set(inspect.signature(ref_cls.__init__).parameters):
        return None
    # lion-pytorch imports triton for use_triton (and exits without it);
    # funcopt ignores the flag
    kwargs = {k: v for k, v in kwargs.items() if k != "use_triton"}
    param = torch.ones(2, 3, requires_grad=True)
    return outcome(lambda: ref_cls([param], **to_torch(kwargs)))[1]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@fuzz
@given(data=st.data())
def test_optimizer_arguments(name, data):
    factory, ref_cls = OPTIMIZERS[name]
    sig = inspect.signature(factory).parameters
    names = [n for n in sig if n != "param_groups"]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2))
    kwargs = {n: data.draw(bad_value(sig[n].default), label=n) for n in chosen}

    ref_err = reference_error(ref_cls, kwargs)
    opt, err = outcome(lambda: factory(**kwargs))
    if err is not None:
        check_error(err, ref_err)
        if ref_err is not None:
            assert type(err) is type(ref_err), (repr(err), repr(ref_err))
            if prints_alike(kwargs) and str(ref_err):
                assert str(err) == str(ref_err)
        return
    if ref_err is not None:
        assert set(kwargs) & IGNORED, f"reference raised {ref_err!r}, funcopt not"
    # accepted at construction: init and step must still fail cleanly
    state, err = outcome(lambda: opt.init(PARAMS))
    if err is not None:
        check_error(err)
        return
    # the trace (jit's checks); eagerly too where a step compiles nothing big
    for traced in (True,) if name in SLOW_EAGER else (True, False):
        _, err = outcome(
            lambda t=traced: run_step(name, opt, PARAMS, grads_for(name), state, t)
        )
        if err is not None:
            check_error(err)


# --------------------------------------------------------------------------
# optimizers: corrupted params, grads and states
# --------------------------------------------------------------------------

STEPPED = [n for n in OPTIMIZERS]


def corrupt_leaf(draw, leaf):
    kind = draw(
        st.sampled_from(
            ["shape", "dtype", "str", "none", "float", "list", "int", "complex"]
        )
    )
    if leaf is None:
        return jnp.ones(2)
    if kind == "shape":
        return jnp.ones((3, 2), getattr(leaf, "dtype", jnp.float32))
    if kind == "dtype":
        return jnp.ones(np.shape(leaf), draw(st.sampled_from(DTYPES)))
    if kind == "complex":
        return jnp.ones(np.shape(leaf), jnp.complex64)
    return {"str": "x", "none": None, "float": 0.5, "list": [1.0], "int": 3}[kind]


DTYPES = [jnp.bfloat16, jnp.float16, jnp.int32, jnp.bool_, jnp.complex64]


@st.composite
def corrupted_tree(draw, tree):
    """``tree`` with one leaf corrupted, removed or added, or replaced whole."""
    kind = draw(st.sampled_from(["leaf", "drop", "add", "whole"]))
    tree = dict(tree)
    if kind == "whole":
        return draw(st.sampled_from([None, "grads", [1.0], (), {}, 1.0]))
    if kind == "drop":
        del tree[draw(st.sampled_from(sorted(tree)))]
    elif kind == "add":
        tree["extra"] = jnp.ones(2)
    else:
        key = draw(st.sampled_from(sorted(tree)))
        tree[key] = corrupt_leaf(draw, tree[key])
    return tree


@st.composite
def corrupted_state(draw, name, opt, state):
    kind = draw(
        st.sampled_from(
            ["other_opt", "other_tree", "none", "dict", "step", "hparam", "slot"]
        )
    )
    if kind == "other_opt":
        other = draw(st.sampled_from([n for n in STEPPED if n != name]))
        return outcome(lambda: OPTIMIZERS[other][0]().init(PARAMS))[0]
    if kind == "other_tree":
        tree = draw(
            st.sampled_from(
                [
                    {"a": jnp.ones((2, 3))},
                    {"w": jnp.ones((3, 2)), "n": jnp.arange(2)},
                    {"w": jnp.ones((2, 3), jnp.bfloat16), "n": jnp.arange(2)},
                    {"v": jnp.ones((2, 3)), "n": jnp.arange(2)},
                ]
            )
        )
        return outcome(lambda: opt.init(tree))[0]
    if kind == "none":
        return None
    if kind == "dict":
        return {"step": 0}
    if not isinstance(state, fo.OptState):
        return state._replace(d=jnp.ones(3))  # LBFGS: a wrong flat vector
    if kind == "step":
        return state._replace(step=jnp.zeros(5, jnp.int32))
    if kind == "hparam":
        hparams = dict(state.hparams)
        hparams.pop(draw(st.sampled_from(sorted(hparams))))
        return state._replace(hparams=hparams)
    if not state.slots:
        return state._replace(slots={"bogus": {"w": jnp.ones((2, 3)), "n": None}})
    state = state.unpacked()
    slot = draw(st.sampled_from(sorted(state.slots)))
    slots = dict(state.slots)
    slots[slot] = draw(corrupted_tree(slots[slot]))
    return state._replace(slots=slots)


@pytest.mark.parametrize("name", STEPPED)
@fuzz
@given(data=st.data())
def test_step_with_corrupted_inputs(name, data):
    opt = OPTIMIZERS[name][0]()
    params, grads = PARAMS, grads_for(name)
    state = opt.init(PARAMS)
    what = data.draw(st.sampled_from(["params", "grads", "state", "update"]))
    if what == "params":
        params = data.draw(corrupted_tree(PARAMS))
    elif what == "grads" and name != "lbfgs":
        grads = data.draw(corrupted_tree(grads))
    elif what == "state":
        state = data.draw(corrupted_state(name, opt, state))
    traced = name in SLOW_EAGER or data.draw(st.booleans())
    if what == "update" and name != "lbfgs":
        params = data.draw(st.sampled_from([None, PARAMS]))
        _, err = outcome(lambda: opt.update(grads, state, params))
    else:
        _, err = outcome(lambda: run_step(name, opt, params, grads, state, traced))
    if err is not None:
        check_error(err)


# --------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------

SCHEDULERS = {
    "step_lr": (S.step_lr, TS.StepLR, {"step_size": 3}),
    "multi_step_lr": (S.multi_step_lr, TS.MultiStepLR, {"milestones": [2, 4]}),
    "lambda_lr": (S.lambda_lr, TS.LambdaLR, {"lr_lambda": lambda e: 0.9**e}),
    "multiplicative_lr": (
        S.multiplicative_lr,
        TS.MultiplicativeLR,
        {"lr_lambda": lambda e: 0.9},
    ),
    "constant_lr": (S.constant_lr, TS.ConstantLR, {}),
    "linear_lr": (S.linear_lr, TS.LinearLR, {}),
    "exponential_lr": (S.exponential_lr, TS.ExponentialLR, {"gamma": 0.9}),
    "polynomial_lr": (S.polynomial_lr, TS.PolynomialLR, {}),
    "cosine_annealing_lr": (S.cosine_annealing_lr, TS.CosineAnnealingLR, {"T_max": 5}),
    "cosine_annealing_warm_restarts": (
        S.cosine_annealing_warm_restarts,
        TS.CosineAnnealingWarmRestarts,
        {"T_0": 3},
    ),
    "cyclic_lr": (S.cyclic_lr, TS.CyclicLR, {"base_lr": 0.01, "max_lr": 0.1}),
    "one_cycle_lr": (S.one_cycle_lr, TS.OneCycleLR, {"max_lr": 0.1, "total_steps": 9}),
    "reduce_lr_on_plateau": (S.reduce_lr_on_plateau, TS.ReduceLROnPlateau, {}),
    "swalr": (S.swalr, swa_utils.SWALR, {"swa_lr": 0.05}),
}
SCHED_STEPS = 4


def torch_sched_run(cls, kwargs):
    """Torch's error for these arguments: at construction or in 4 steps."""
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD(
        [{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1, momentum=0.9
    )

    def run():
        sched = cls(opt, **to_torch(kwargs))
        for _ in range(SCHED_STEPS):
            opt.step()
            if cls is TS.ReduceLROnPlateau:
                sched.step(1.0)
            else:
                sched.step()

    return outcome(run)[1]


def fo_state():
    groups = fo.param_groups({"a": "default", "b": "head"}, {"head": {"lr": 0.2}})
    opt = fo.sgd(lr=0.1, momentum=0.9, param_groups=groups)
    return opt.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})


@pytest.mark.parametrize("name", list(SCHEDULERS))
@fuzz
@given(data=st.data())
def test_scheduler_arguments(name, data):
    factory, torch_cls, required = SCHEDULERS[name]
    sig = inspect.signature(factory).parameters
    arg = data.draw(st.sampled_from([n for n in sig if n != "lr_lambda"]))
    kwargs = {**required, arg: data.draw(bad_value(sig[arg].default), label=arg)}
    ref_err = torch_sched_run(torch_cls, kwargs)

    def run():
        sched = factory(**kwargs)
        state, sched_state = sched.init(fo_state())
        extra = {"metrics": 1.0} if name == "reduce_lr_on_plateau" else {}
        trace(lambda s, ss: sched.step(s, ss, **extra), state, sched_state)
        for _ in range(SCHED_STEPS):
            state, sched_state = sched.step(state, sched_state, **extra)

    _, err = outcome(run)
    if err is not None:
        check_error(err, ref_err)


# --------------------------------------------------------------------------
# clipping and hyperparameter access
# --------------------------------------------------------------------------

GRADS = {"a": jnp.ones(3), "b": {"c": jnp.full((2, 2), 2.0)}, "n": None}


def torch_clip(fn_name, args):
    params = [torch.ones(3, requires_grad=True), torch.ones(2, 2, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    fn = getattr(torch.nn.utils, fn_name)
    return outcome(lambda: fn(params, *to_torch(args)))[1]


@wider
@given(data=st.data())
def test_clip_arguments(data):
    which = data.draw(st.sampled_from(["norm", "value"]))
    grads = GRADS
    if data.draw(st.booleans()):
        grads = data.draw(st.sampled_from(["g", None, [1.0], {"a": "x"}, 3.0]))
    if which == "norm":
        max_norm = data.draw(st.sampled_from([1.0, *SCALARS]))
        norm_type = data.draw(st.sampled_from([2.0, *SCALARS]))
        flag = data.draw(st.booleans())
        args = (max_norm, norm_type, flag)
        ref_err = torch_clip("clip_grad_norm_", args)

        def ours(g):
            return fo.clip_grad_norm(g, *args)
    else:
        args = (data.draw(st.sampled_from(SCALARS)),)
        ref_err = torch_clip("clip_grad_value_", args)

        def ours(g):
            return fo.clip_grad_value(g, *args)

    for call in (lambda: ours(grads), lambda: trace(ours, grads)):
        _, err = outcome(call)
        if err is not None:
            check_error(err, ref_err)
            if ref_err is not None and grads is GRADS:
                assert type(err) is type(ref_err), (repr(err), repr(ref_err))


@wider
@given(
    name=st.sampled_from(["lr", "betas", "momentum", "nope", "", 3, None, ("lr",)]),
    value=st.sampled_from([0.1, (0.9, 0.99), [0.1, 0.2], *SCALARS]),
    target=st.sampled_from(["adam", "sgd", "lbfgs", "not a state"]),
    how=st.sampled_from(["set_hparam", "set_lr", "get_hparam", "get_lr"]),
)
def test_hparam_access(name, value, target, how):
    if target == "not a state":
        state = {"x": jnp.ones(2)}
    else:
        state = OPTIMIZERS[target][0]().init(PARAMS)
    calls = {
        "set_hparam": lambda s: fo.set_hparam(s, name, value),
        "set_lr": lambda s: fo.set_lr(s, value),
        "get_hparam": lambda s: fo.get_hparam(s, name),
        "get_lr": lambda s: fo.get_lr(s),
    }
    for call in (
        lambda: calls[how](state),
        lambda: trace(calls[how], state),
    ):
        _, err = outcome(call)
        if err is not None:
            check_error(err)
