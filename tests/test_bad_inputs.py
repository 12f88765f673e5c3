"""Wrong gradients, wrong states and wrong groups raise clear errors.

The gradient and state checks run for every optimizer of the parity table
(each row's constructor with all its flags on), plus SparseAdam (sparse
gradients) and LBFGS (gradients from its ``value_and_grad_fn``), eagerly and
under ``jax.jit``: they are trace-time checks, so the jitted step raises the
same exception as the eager one, naming the offending key path.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import funcopt as fo
from tests.parity.cases import OPT_CASES

PARAMS = {
    # 2-D trainable leaves only (Muon's rule) and a frozen integer leaf
    "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros((1, 3))},
    "step": jnp.arange(2),
}

OPTIMIZERS = {case.name: (case.factory, case.combos()[-1]) for case in OPT_CASES} | {
    "sparse_adam": (fo.sparse_adam, {}),
    "lbfgs": (fo.lbfgs, {}),
}
NAMES = list(OPTIMIZERS)


def make(name, **kwargs):
    factory, flags = OPTIMIZERS[name]
    return factory(**{**flags, **kwargs})


def as_grad(name, x):
    """SparseAdam takes sparse gradients (torch's ``p.grad.is_sparse``): every
    entry stored (built on the host: no compile)."""
    if name == "sparse_adam" and isinstance(x, jax.Array) and x.ndim:
        index = np.argwhere(np.ones(x.shape, bool))
        data = np.asarray(x)[tuple(index.T)]
        return jsparse.BCOO((jnp.asarray(data), jnp.asarray(index)), shape=x.shape)
    return x


def good_grads(name):
    g = {
        "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((1, 3))},
        "step": None,
    }
    return jax.tree.map(lambda x: as_grad(name, x), g)


def step(name, opt, params, grads, state, jit):
    """``opt.step``; for LBFGS the grads come from its ``value_and_grad_fn``."""
    if name == "lbfgs":

        def run(p, s):
            return opt.step(p, s, lambda q: (jnp.asarray(1.0), grads))

    else:

        def run(p, s):
            return opt.step(p, grads, s)

    return (jax.jit(run) if jit else run)(params, state)


def raises(name, exc, match, grads=None, state=None, params=PARAMS, jit=False):
    opt = make(name)
    grads = good_grads(name) if grads is None else grads
    state = opt.init(params) if state is None else state
    with pytest.raises(exc, match=match) as info:
        step(name, opt, params, grads, state, jit)
    assert type(info.value) is exc  # not a subclass from inside JAX
    return info.value


every = pytest.mark.parametrize("name", NAMES)
eager_and_jit = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


@every
@eager_and_jit
def test_missing_leaf_named(name, jit):
    grads = good_grads(name)
    del grads["dense"]["bias"]
    raises(
        name, TypeError, r"missing from grads: \['dense'\]\['bias'\]", grads, jit=jit
    )


@every
@eager_and_jit
def test_extra_leaf_named(name, jit):
    grads = good_grads(name)
    grads["dense"]["extra"] = as_grad(name, jnp.ones((1, 1)))
    raises(name, TypeError, r"not in params: \['dense'\]\['extra'\]", grads, jit=jit)


@every
@eager_and_jit
def test_wrong_shape_named(name, jit):
    grads = good_grads(name)
    grads["dense"]["kernel"] = as_grad(name, jnp.ones((3, 4)))
    message = (
        r"^params\['dense'\]\['kernel'\]: grad shape \(3, 4\) != param shape \(4, 3\)"
    )
    raises(name, ValueError, message, grads, jit=jit)


@every
@eager_and_jit
def test_wrong_dtype_named(name, jit):
    grads = good_grads(name)
    grads["dense"]["bias"] = as_grad(name, jnp.ones((1, 3), jnp.bfloat16))
    message = (
        r"^params\['dense'\]\['bias'\]: grad dtype bfloat16 != param dtype float32"
    )
    raises(name, TypeError, message, grads, jit=jit)


@every
@eager_and_jit
def test_gradient_for_integer_leaf(name, jit):
    grads = good_grads(name)
    grads["step"] = as_grad(name, jnp.ones(2))
    message = r"^params\['step'\]: leaf of dtype int32 is not trainable"
    raises(name, TypeError, message, grads, jit=jit)


@every
@eager_and_jit
def test_integer_params(name, jit):
    """All-integer params are frozen: a gradient for them raises, none is fine."""
    params = {"dense": {"kernel": jnp.ones((4, 3), jnp.int32)}}
    grads = {"dense": {"kernel": as_grad(name, jnp.ones((4, 3)))}}
    message = r"^params\['dense'\]\['kernel'\]: leaf of dtype int32 is not trainable"
    raises(name, TypeError, message, grads, params=params, jit=jit)
    if name != "lbfgs" and not jit:  # (LBFGS needs a trainable leaf to step)
        opt = make(name)
        out, _ = step(
            name, opt, params, {"dense": {"kernel": None}}, opt.init(params), jit
        )
        np.testing.assert_array_equal(out["dense"]["kernel"], params["dense"]["kernel"])


@every
@eager_and_jit
def test_state_of_another_optimizer(name, jit):
    if name == "lbfgs":
        state, exc, message = fo.adam().init(PARAMS), TypeError, "^LBFGS expects"
    else:
        other = fo.adam() if name == "sgd" else fo.sgd()
        state, exc = other.init(PARAMS), ValueError
        message = r"^this state was made by another optimizer: it holds hyperparameters"
    raises(name, exc, message, state=state, jit=jit)


@every
@eager_and_jit
def test_state_of_a_tree_with_fewer_leaves(name, jit):
    state = make(name).init({"a": jnp.ones((2, 2))})
    if name == "lbfgs":
        message = (
            r"^this LBFGS state holds a history of shape \(100, 4\); .* \(100, 15\)"
        )
    else:  # the key paths, read from the state's buffers
        message = (
            r"^this state was made for a param tree with 1 leaves; params have 3 "
            r"\(missing from the state: \['dense'\]\['bias'\], "
            r"\['dense'\]\['kernel'\], \['step'\]; not in params: \['a'\]\)"
        )
    raises(name, ValueError, message, state=state, jit=jit)


@every
@eager_and_jit
def test_state_of_a_tree_with_other_key_paths(name, jit):
    """Same number of leaves, other names: the buffers name the missing paths."""
    other = {"x": jnp.ones((4, 3)), "y": jnp.zeros((1, 3)), "z": jnp.arange(2)}
    opt = make(name)
    state = opt.init(other)
    if name == "lbfgs":  # one flat vector: only its length and dtype are known
        step(name, opt, PARAMS, good_grads(name), state, jit)
        return
    if not state.slots:
        pytest.fail(f"{name} keeps no buffers: use a row that has some")
    message = (
        r"^this \w+ state was made for another param tree: its buffer '\w+' does "
        r"not have the structure of params \(missing from '\w+': "
        r"\['dense'\]\['bias'\], \['dense'\]\['kernel'\]"
    )
    raises(name, ValueError, message, state=state, jit=jit)


@every
@eager_and_jit
def test_state_of_a_tree_with_other_shapes_or_dtypes(name, jit):
    """Same key paths, other shapes (or bfloat16 leaves): named per leaf."""
    other = {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((1, 3))},
        "step": jnp.arange(2),
    }
    if name == "lbfgs":
        other = jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, PARAMS
        )
        message = r"^this LBFGS state's 'd' is bfloat16\[15\]; params need float32"
    else:
        message = (
            r"^params\['dense'\]\['kernel'\]: state buffer '\w+' is float32\[[\d, ]+\]"
            r", \w+ makes float32\[[\d, ]+\] for this float32\[4, 3\] param: the "
            r"state was made for another param tree"
        )
    raises(name, ValueError, message, state=make(name).init(other), jit=jit)


@every
def test_state_that_is_not_a_state(name):
    opt = make(name)
    with pytest.raises(TypeError, match=r"^\w+ expects the state made by its init"):
        step(name, opt, PARAMS, good_grads(name), {"not": "a state"}, False)


@every
def test_traced_constructor_argument(name):
    """Arguments are checked when the optimizer is made: a traced lr is refused
    by name (not a JAX tracer error); traced hyperparameters go in the state."""

    def build(lr):
        return make(name, lr=lr).init(PARAMS)

    with pytest.raises(TypeError, match=r"lr is a traced JAX value") as info:
        jax.jit(build)(0.5)
    assert type(info.value) is TypeError


@every
def test_one_element_array_hyperparameter_keeps_shapes(name):
    """torch's 1-element tensor lr is a scalar: no leaf changes shape."""
    lr = float(np.asarray(make(name).defaults["lr"]))
    opt = make(name, lr=np.asarray([lr], np.float32))
    params = {"w": jnp.ones((2, 3)), "s": jnp.ones((1, 1))}
    grads = jax.tree.map(
        lambda x: as_grad(name, x), jax.tree.map(jnp.ones_like, params)
    )
    state = opt.init(params)
    new = jax.eval_shape(
        lambda p, s: step(name, opt, p, grads, s, False), params, state
    )

    def shapes(tree):
        return jax.tree.structure(tree), [jnp.shape(x) for x in jax.tree.leaves(tree)]

    assert shapes(new[0]) == shapes(params)
    assert shapes(new[1]) == shapes(state)


def test_state_made_with_other_options():
    state = fo.adam().init(PARAMS)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "params['dense']['bias']: this state holds buffers ['exp_avg', "
            "'exp_avg_sq'] for it, Adam with these options makes ['exp_avg', "
            "'exp_avg_sq', 'max_exp_avg_sq']"
        ),
    ):
        fo.adam(amsgrad=True).step(PARAMS, good_grads("adam"), state)


def test_unknown_group_label():
    groups = fo.param_groups(
        lambda p: {"dense": {"kernel": "head", "bias": "nope"}, "step": "default"},
        {"head": {"lr": 1.0}},
    )
    with pytest.raises(
        ValueError, match=r"\['dense'\]\['bias'\]: unknown parameter group label 'nope'"
    ):
        fo.adam(param_groups=groups).init(PARAMS)


def test_unknown_group_hyperparameter():
    with pytest.raises(ValueError, match="Adam has no hyperparameter 'weight_decy'"):
        fo.adam(param_groups=fo.param_groups(lambda p: p, {"g": {"weight_decy": 0.0}}))


def test_invalid_group_value_is_validated():
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        fo.adam(param_groups=fo.param_groups(lambda p: p, {"g": {"lr": -1.0}}))


def test_group_value_of_another_shape():
    groups = fo.param_groups(
        {"dense": {"kernel": "g", "bias": "g"}, "step": "g"},
        {"g": {"betas": (0.9, 0.99, 0.5)}},
    )
    with pytest.raises(
        ValueError, match=r"^Adam param group 'g': betas has shape \(3,\); Adam's"
    ):
        fo.adam(param_groups=groups).init(PARAMS)


def test_param_groups_not_from_param_groups():
    for factory in (fo.adam, fo.adafactor, fo.lbfgs, fo.contrib.prodigy):
        with pytest.raises(TypeError, match=r"param_groups must be made by"):
            factory(param_groups={"head": {"lr": 0.1}})


def test_get_lr_without_optimizer_state():
    with pytest.raises(ValueError, match="no funcopt optimizer state"):
        fo.get_lr({"nothing": jnp.ones(1)})


def test_set_lr_wrong_number_of_groups():
    state = fo.sgd().init(PARAMS)
    with pytest.raises(ValueError, match="got 2 values for 1 parameter groups"):
        fo.set_lr(state, [0.1, 0.2])
