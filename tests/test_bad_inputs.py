"""Wrong gradients, wrong states and wrong groups raise clear errors."""

import jax.numpy as jnp
import pytest

import funcopt as fo

PARAMS = {
    "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
    "step": jnp.arange(2),
}


def good_grads():
    return {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "step": None}


@pytest.fixture(params=["sgd", "adam", "adamw"])
def opt(request):
    return getattr(fo, request.param)(lr=0.1)


def test_missing_leaf_named(opt):
    grads = good_grads()
    del grads["dense"]["bias"]
    with pytest.raises(TypeError, match=r"missing from grads: \['dense'\]\['bias'\]"):
        opt.step(PARAMS, grads, opt.init(PARAMS))


def test_extra_leaf_named(opt):
    grads = good_grads()
    grads["dense"]["extra"] = jnp.ones(1)
    with pytest.raises(TypeError, match=r"not in params: \['dense'\]\['extra'\]"):
        opt.step(PARAMS, grads, opt.init(PARAMS))


def test_wrong_shape_named(opt):
    grads = good_grads()
    grads["dense"]["kernel"] = jnp.ones((3, 4))
    with pytest.raises(
        ValueError,
        match=r"params\['dense'\]\['kernel'\]: "
        r"grad shape \(3, 4\) != param shape \(4, 3\)",
    ):
        opt.step(PARAMS, grads, opt.init(PARAMS))


def test_wrong_dtype_named(opt):
    grads = good_grads()
    grads["dense"]["bias"] = jnp.ones(3, jnp.bfloat16)
    with pytest.raises(TypeError, match=r"\['dense'\]\['bias'\]: grad dtype bfloat16"):
        opt.step(PARAMS, grads, opt.init(PARAMS))


def test_gradient_for_integer_leaf(opt):
    grads = good_grads()
    grads["step"] = jnp.ones(2)
    with pytest.raises(TypeError, match=r"params\['step'\].*not trainable"):
        opt.step(PARAMS, grads, opt.init(PARAMS))


def test_state_of_another_optimizer():
    with pytest.raises(ValueError, match="made by another optimizer"):
        fo.sgd().step(PARAMS, good_grads(), fo.adam().init(PARAMS))


def test_state_of_another_tree(opt):
    state = opt.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="param tree with 1 leaves"):
        opt.step(PARAMS, good_grads(), state)


def test_state_that_is_not_a_state(opt):
    with pytest.raises(TypeError, match="expects the state made by its init"):
        opt.step(PARAMS, good_grads(), {"not": "a state"})


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


def test_get_lr_without_optimizer_state():
    with pytest.raises(ValueError, match="no funcopt optimizer state"):
        fo.get_lr({"nothing": jnp.ones(1)})


def test_set_lr_wrong_number_of_groups():
    state = fo.sgd().init(PARAMS)
    with pytest.raises(ValueError, match="got 2 values for 1 parameter groups"):
        fo.set_lr(state, [0.1, 0.2])
