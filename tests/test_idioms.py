"""JAX and torch idioms that do not fit funcopt: each works, or raises one clear
error, eagerly and under ``jax.jit`` (issue 17, items 7 and 8).

* ``optax.inject_hyperparams(fo.adam)``: refused (funcopt keeps its
  hyperparameters in its own state, so the optimizer optax rebuilds with a new
  value would be ignored); the way that works, ``fo.set_lr``, matches torch.
* ``optax.tree_utils.tree_set(state, lr=0.05)``: every hyperparameter's shape
  and dtype is checked at step time, naming it and ``fo.set_hparam``; a
  right-shaped array set this way works as ``fo.set_lr``.
* A Python float param is trained as optax trains it (an array of the default
  float dtype), matching torch's 0-dim tensor.
* torch tensors, ``nn.Module``s and ``model.parameters()`` as params or grads,
  the parameters passed to the constructor, optax's argument names: a
  ``TypeError`` saying what to do, for every optimizer factory.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from optax.schedules._inject import InjectStatefulHyperparamsState

import funcopt as fo
from funcopt.optim.lbfgs import LBFGS
from tests.parity.cases import OPT_CASES

# 2-D leaves only (Muon's rule)
PARAMS = {
    "w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3),
    "b": jnp.array([[0.5, -0.5]]),
}
GRADS = {"w": jnp.full((2, 3), 0.3), "b": jnp.array([[-0.4, 0.2]])}

# every public optimizer factory, torch.optim's and the ecosystem's
FACTORIES = {name: getattr(fo.optim, name) for name in fo.optim.__all__} | {
    name: getattr(fo.contrib, name)
    for name in [
        "adan",
        "lamb",
        "lion",
        "prodigy",
        "adamw_schedule_free",
        "sgd_schedule_free",
    ]
}
every_factory = pytest.mark.parametrize("name", list(FACTORIES))
eager_and_jit = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def test_every_factory_of_the_parity_table_is_covered():
    assert {c.factory for c in OPT_CASES} <= set(FACTORIES.values())


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc, repr(info.value)
    return info.value


# --------------------------------------------------------------------------
# 7. optax.inject_hyperparams
# --------------------------------------------------------------------------

INJECT = r"^optax\.inject_hyperparams\(fo\.{}\) would silently ignore changed "


@every_factory
@eager_and_jit
def test_inject_hyperparams_is_refused_at_init(name, jit):
    opt = optax.inject_hyperparams(FACTORIES[name])()
    message = INJECT.format(name) + r".*fo\.set_lr\(state, lr\) or fo\.set_hparam"
    _raises(TypeError, message, _maybe_jit(opt.init, jit), PARAMS)


@eager_and_jit
def test_inject_hyperparams_is_refused_at_update(jit):
    """A state built around optax's init (say, restored from elsewhere) does
    not get through `update` either: the new lr is never silently dropped."""
    opt = optax.inject_hyperparams(fo.adam)(lr=1e-2)
    state = InjectStatefulHyperparamsState(
        count=jnp.zeros([], jnp.int32),
        hyperparams={"lr": jnp.asarray(0.5)},
        hyperparams_states={},
        inner_state=fo.adam(lr=1e-2).init(PARAMS),
    )
    update = _maybe_jit(opt.update, jit)
    _raises(TypeError, INJECT.format("adam"), update, GRADS, state, PARAMS)


@eager_and_jit
def test_inject_hyperparams_of_a_function_that_builds_one_is_refused(jit):
    """The factory optax rebuilds may build a funcopt optimizer inside a chain."""

    def factory(lr):
        return optax.chain(optax.clip_by_global_norm(1.0), fo.adamw(lr=lr))

    opt = optax.inject_hyperparams(factory)(lr=1e-2)
    _raises(TypeError, INJECT.format("adamw"), _maybe_jit(opt.init, jit), PARAMS)


def test_inject_hyperparams_of_optax_is_untouched():
    """optax's own optimizers inside inject_hyperparams, next to funcopt's
    made outside it: nothing is refused."""
    opt = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    state = opt.init(PARAMS)
    updates, _ = opt.update(GRADS, state, PARAMS)
    np.testing.assert_allclose(updates["w"], -0.1 * GRADS["w"], rtol=1e-6)
    fo.adam().init(PARAMS)


def test_inject_hyperparams_with_a_schedule_is_refused():
    schedule = optax.exponential_decay(0.1, 10, 0.5)
    opt = optax.inject_hyperparams(fo.sgd)(lr=schedule)
    _raises(TypeError, INJECT.format("sgd"), opt.init, PARAMS)


def _torch_adam_with_lr_change(lrs, grads, dtype):
    ps = [torch.tensor(np.asarray(PARAMS[k]), dtype=dtype) for k in ("b", "w")]
    ps = [torch.nn.Parameter(p) for p in ps]
    opt = torch.optim.Adam(ps, lr=lrs[0])
    for lr, g in zip(lrs, grads):
        opt.param_groups[0]["lr"] = lr  # torch's way to change it
        for p, k in zip(ps, ("b", "w")):
            p.grad = torch.tensor(np.asarray(g[k]), dtype=dtype)
        opt.step()
    return {k: p.detach().numpy() for k, p in zip(("b", "w"), ps)}


@pytest.mark.parametrize(
    "how", ["set_lr", "set_hparam", "tree_set of a right-shaped array"]
)
@eager_and_jit
def test_changing_lr_in_the_state_matches_torch(x64, how, jit):
    """What the inject_hyperparams error points to changes the update exactly
    as torch's `group["lr"] = x` does (float64; also via optax's tree_set
    given an array of the state's shape and dtype)."""
    lrs = [0.1, 0.1, 0.03, 0.03, 0.2]
    grads = [jax.tree.map(lambda g, i=i: g * (i + 1) - 0.5, GRADS) for i in range(5)]
    params = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
    grads = [jax.tree.map(lambda x: x.astype(jnp.float64), g) for g in grads]

    def set_lr(state, lr):
        if how == "set_lr":
            return fo.set_lr(state, lr)
        if how == "set_hparam":
            return fo.set_hparam(state, "lr", lr)
        return optax.tree_utils.tree_set(state, lr=jnp.full((1,), lr, jnp.float64))

    opt = fo.adam(lr=lrs[0])
    state = opt.init(params)
    step = _maybe_jit(lambda p, g, s, lr: opt.step(p, g, set_lr(s, lr)), jit)
    for lr, g in zip(lrs, grads):
        params, state = step(params, g, state, lr)
    expected = _torch_adam_with_lr_change(lrs, grads, torch.float64)
    for k in expected:
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-13, atol=1e-15)
    assert float(fo.get_lr(state)[0]) == lrs[-1]


# --------------------------------------------------------------------------
# 7. optax.tree_utils.tree_set: every hyperparameter checked at step time
# --------------------------------------------------------------------------

CASES = {c.name: c for c in OPT_CASES}


def _hparam_names(name):
    return sorted(CASES[name].factory().init(PARAMS).hparams)


@pytest.mark.parametrize(
    "name,key",
    [(name, key) for name in CASES for key in _hparam_names(name)],
)
@eager_and_jit
def test_tree_set_scalar_hyperparameter_is_named(name, key, jit):
    """optax's scalar idiom puts a scalar (or a tuple, for betas) where the
    state keeps one value per parameter group: the step names the
    hyperparameter (any of them, not only the first), what it is, what it
    must be and fo.set_hparam."""
    opt = CASES[name].factory()
    state = opt.init(PARAMS)
    tail = np.shape(state.hparams[key])[1:]
    value = tuple([0.5] * tail[0]) if tail else 0.5
    if key == "step":  # tree_set would also hit OptState.step, the step counts
        bad = state._replace(hparams={**state.hparams, key: value})
    else:
        bad = optax.tree_utils.tree_set(state, **{key: value})
    written = re.escape(repr(value))
    if tail:  # a tuple stays a tuple under jit: no array at all
        exc = TypeError
        got = (
            rf"a tuple of {tail[0]} traced values" if jit else rf"{written} \(a tuple\)"
        )
        needs = rf"float32\[1, {tail[0]}\] array, one value of shape \({tail[0]},\) "
    else:  # a Python float is a 0-d array under jit: a shape error either way
        exc = ValueError
        got = r"a traced float32\[\] array" if jit else rf"{written} \(a Python float\)"
        needs = r"float32\[1\] array, one value "
    message = (
        rf"^\w+ state: hyperparameter '{key}' is {got}, but this state needs a "
        rf"{needs}per parameter group: set it with fo\.set_hparam\(state, "
        rf"'{key}', {'value' if jit else written}\)"
    )
    _raises(exc, message, _maybe_jit(opt.step, jit), PARAMS, GRADS, bad)


@eager_and_jit
def test_tree_set_lbfgs(jit):
    opt = fo.lbfgs()
    bad = optax.tree_utils.tree_set(opt.init(PARAMS), lr=0.5)

    def run(p, s):
        return opt.step(p, s, lambda q: (jnp.asarray(1.0), GRADS))

    message = r"^LBFGS state: hyperparameter 'lr' is .*, but this state needs a "
    _raises(ValueError, message, _maybe_jit(run, jit), PARAMS, bad)


@eager_and_jit
def test_hyperparameter_of_another_dtype(jit):
    """An integer lr (or a float32 one under x64) would change the step's
    scalar math: refused with the dtype the state needs."""
    opt = fo.adam()
    bad = optax.tree_utils.tree_set(opt.init(PARAMS), lr=jnp.ones(1, jnp.int32))
    message = (
        r"^Adam state: hyperparameter 'lr' is (an|a traced) int32\[1\] array"
        r"( \[1\])?, but this state needs a float32\[1\] array"
    )
    _raises(TypeError, message, _maybe_jit(opt.step, jit), PARAMS, GRADS, bad)


def test_hyperparameter_of_another_dtype_under_x64(x64):
    opt = fo.sgd(lr=0.1)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
    grads = jax.tree.map(lambda x: x.astype(jnp.float64), GRADS)
    state = opt.init(params)
    bad = optax.tree_utils.tree_set(state, lr=jnp.full((1,), 0.1, jnp.float32))
    _raises(
        TypeError,
        r"'lr' is a float32\[1\] array \[0.10000000149011612\], but this state "
        r"needs a float64\[1\] array",
        opt.step,
        params,
        grads,
        bad,
    )
    # fo.set_hparam writes the dtype the state needs
    fixed = fo.set_lr(bad, 0.1)
    np.testing.assert_array_equal(
        opt.step(params, grads, fixed)[0]["w"], opt.step(params, grads, state)[0]["w"]
    )


def test_state_of_another_grouping_is_named_as_such():
    groups = fo.param_groups({"w": "head", "b": "default"}, {"head": {"lr": 0.5}})
    state = fo.adam(param_groups=groups).init(PARAMS)
    _raises(
        ValueError,
        r"^this state has 2 parameter groups; params resolve to 1$",
        fo.adam().step,
        PARAMS,
        GRADS,
        state,
    )


# --------------------------------------------------------------------------
# 7. Python float params
# --------------------------------------------------------------------------

SCALES = [0.5, -0.3, 0.2, 0.7, -0.1]


def _torch_scalar_adam(dtype):
    p = torch.nn.Parameter(torch.tensor(1.0, dtype=dtype))
    opt = torch.optim.Adam([p], lr=0.1, weight_decay=0.01)
    for g in SCALES:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return p.detach().numpy()


def _run_scalar(how, jit):
    """Five Adam steps of `{"scale": 1.0}` (a Python float) by `how`."""
    opt = fo.adam(lr=0.1, weight_decay=0.01)
    params = {"scale": 1.0}
    if how == "train_state":
        ts = fo.TrainState.create(params, opt)
        assert isinstance(ts.params["scale"], jax.Array)

        def one(ts, g):
            ts, _ = ts.backward(lambda p, g: p["scale"] * g, g)
            return ts.step().zero_grad()

        one = _maybe_jit(one, jit)
        for g in SCALES:
            ts = one(ts, jnp.asarray(g))
        return ts.params["scale"]
    state = opt.init(params)
    if how == "step":
        step = _maybe_jit(opt.step, jit)
        for g in SCALES:
            params, state = step(params, {"scale": g}, state)
    else:

        def step(p, g, s):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        step = _maybe_jit(step, jit)
        for g in SCALES:
            params, state = step(params, {"scale": g}, state)
    return params["scale"]


@pytest.mark.parametrize("how", ["step", "update", "train_state"])
@eager_and_jit
def test_python_float_param_trains_as_torch_0dim_float32(how, jit):
    out = _run_scalar(how, jit)
    assert isinstance(out, jax.Array) and out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(
        out, _torch_scalar_adam(torch.float32), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("how", ["step", "update", "train_state"])
@eager_and_jit
def test_python_float_param_trains_as_torch_0dim_float64(x64, how, jit):
    out = _run_scalar(how, jit)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(
        out, _torch_scalar_adam(torch.float64), rtol=1e-13, atol=1e-15
    )


def test_python_float_param_as_optax_trains_it():
    """optax trains a Python float leaf and returns an array of the default
    float dtype: so does funcopt (same values for SGD, whose formula is
    optax's too)."""
    params = {"scale": 1.0, "w": PARAMS["w"]}
    grads = {"scale": jnp.asarray(0.5), "w": GRADS["w"]}
    ours = fo.sgd(lr=0.1, momentum=0.9)
    theirs = optax.sgd(0.1, momentum=0.9)
    p_ours, s_ours = params, ours.init(params)
    p_theirs, s_theirs = params, theirs.init(params)
    for _ in range(3):
        p_ours, s_ours = ours.step(p_ours, grads, s_ours)
        updates, s_theirs = theirs.update(grads, s_theirs, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, updates)
    for k in params:
        assert type(p_ours[k]) is type(p_theirs[k])
        assert p_ours[k].dtype == p_theirs[k].dtype
        assert p_ours[k].shape == np.shape(params[k])
        np.testing.assert_allclose(p_ours[k], p_theirs[k], rtol=1e-6)


@pytest.mark.parametrize("case", OPT_CASES, ids=[c.name for c in OPT_CASES])
def test_python_float_param_is_a_0dim_array_for_every_optimizer(case):
    """`{"s": 1.0}` steps exactly as `{"s": jnp.asarray(1.0)}`, eagerly and
    under jit, with the same types; its state does not change type after a
    step (so a jitted loop compiles once). Muon's 2-D check refuses both."""
    opt = case.factory(**case.combos()[-1])
    floats = {"s": 1.0, "w": PARAMS["w"]}
    arrays = {"s": jnp.asarray(1.0, jnp.float32), "w": PARAMS["w"]}
    grads = {"s": jnp.asarray(0.25), "w": GRADS["w"]}
    if case.name == "muon":
        for params in (floats, arrays):
            with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
                opt.init(params)
        return
    expected, expected_state = opt.step(arrays, grads, opt.init(arrays))
    init = opt.init(floats)
    for step in (opt.step, jax.jit(opt.step)):
        got, state = step(floats, grads, init)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
            assert jax.typeof(got[k]) == jax.typeof(expected[k])
        avals = jax.tree.map(jax.typeof, (state, init))
        assert avals[0] == avals[1] == jax.tree.map(jax.typeof, expected_state)


def test_python_int_param_stays_frozen():
    """Integers are not trainable (torch: only floats require grad), as jit
    treats them."""
    params = {"n": 3, "w": PARAMS["w"]}
    opt = fo.adam()
    new, _ = opt.step(params, {"n": None, "w": GRADS["w"]}, opt.init(params))
    assert new["n"] == 3


# --------------------------------------------------------------------------
# 8. torch objects where funcopt takes JAX arrays
# --------------------------------------------------------------------------

TORCH_PARAMS = r"is a torch\.{}, which funcopt cannot step: pass JAX arrays, "


def _torch_params():
    return {k: torch.tensor(np.asarray(v)) for k, v in PARAMS.items()}


def _step(name, opt, params, grads, state):
    if isinstance(opt, LBFGS):
        return opt.step(params, state, lambda p: (jnp.asarray(1.0), grads))
    return opt.step(params, grads, state)


@every_factory
def test_torch_tensors_as_params(name):
    opt = FACTORIES[name]()
    message = r"^params\['b'\] " + TORCH_PARAMS.format("Tensor")
    message += r"fo\.torch_interop\.module_state_dict_to_params"
    _raises(TypeError, message, opt.init, _torch_params())
    state = opt.init(PARAMS)
    _raises(TypeError, message, _step, name, opt, _torch_params(), GRADS, state)
    # captured by a jitted function: the same check at trace time
    _raises(
        TypeError,
        message,
        jax.jit(lambda s: _step(name, opt, _torch_params(), GRADS, s)),
        state,
    )


def test_torch_tensors_as_jit_arguments_are_refused_by_jax():
    """As arguments of a jitted function torch tensors never reach funcopt:
    JAX refuses them, naming the argument and the type."""
    opt = fo.adam()
    with pytest.raises(TypeError, match=r"of type <class 'torch\.Tensor'>"):
        jax.jit(opt.step)(_torch_params(), GRADS, opt.init(PARAMS))


@eager_and_jit
def test_torch_tensors_as_grads(jit):
    opt = fo.adam()
    torch_grads = {k: torch.tensor(np.asarray(v)) for k, v in GRADS.items()}
    message = (
        r"^grads\['b'\] is a torch\.Tensor: funcopt takes JAX gradients, so compute "
        r"them with jax\.grad"
    )
    step = _maybe_jit(lambda s: opt.step(PARAMS, torch_grads, s), jit)
    _raises(TypeError, message, step, opt.init(PARAMS))


@every_factory
def test_model_parameters_as_params(name):
    """`opt.init(model.parameters())`: a generator, a list of Parameters or
    the module itself; each refused with the conversion."""
    opt = FACTORIES[name]()
    model = torch.nn.Linear(3, 2)
    _raises(
        TypeError,
        r"^params is a generator \(an iterator, such as model\.parameters\(\)\), "
        r"which funcopt cannot step: pass a pytree of JAX arrays",
        opt.init,
        model.parameters(),
    )
    _raises(
        TypeError,
        r"^params\[0\] " + TORCH_PARAMS.format("nn.Parameter"),
        opt.init,
        list(model.parameters()),
    )
    _raises(
        TypeError,
        r"^params is a torch\.nn\.Module, which funcopt cannot step",
        opt.init,
        model,
    )


# --------------------------------------------------------------------------
# 8. torch's constructor, optax's argument names
# --------------------------------------------------------------------------


def _first_argument(name):
    import inspect

    return next(iter(inspect.signature(FACTORIES[name]).parameters))


@every_factory
@pytest.mark.parametrize(
    "given",
    ["dict", "dict and lr", "generator", "list", "module"],
)
def test_params_passed_to_the_constructor(name, given):
    model = torch.nn.Linear(3, 2)
    first = {
        "dict": PARAMS,
        "dict and lr": PARAMS,
        "generator": model.parameters(),
        "list": list(model.parameters()),
        "module": model,
    }[given]
    kwargs = {"lr": 1e-3} if given == "dict and lr" else {}
    arg = _first_argument(name)
    message = (
        rf"^fo\.{name}\(\) got a \w+ as its first argument \({arg}\): funcopt "
        rf"optimizers do not take the parameters, so build opt = fo\.{name}\("
        rf"{arg}=\.\.\.\) and make the state with opt\.init\(params\)$"
    )
    _raises(TypeError, message, FACTORIES[name], first, **kwargs)


@every_factory
def test_learning_rate_is_torch_lr(name):
    message = (
        rf"^fo\.{name}\(\) got learning_rate=0\.01, optax's name: funcopt keeps "
        r"torch's argument names, so pass lr=0\.01$"
    )
    _raises(TypeError, message, FACTORIES[name], learning_rate=0.01)


def test_b1_is_torch_betas():
    _raises(
        TypeError,
        r"^fo\.adam\(\) got b1=0\.8, optax's name: .* so pass betas=\(b1, b2\)$",
        fo.adam,
        b1=0.8,
    )


def test_other_unknown_arguments_are_pythons_error():
    with pytest.raises(TypeError, match=re.escape("unexpected keyword argument")):
        fo.adam(nope=1)


def test_positional_lr_still_works():
    assert fo.sgd(0.5).defaults["lr"] == 0.5
    assert fo.adam(np.asarray(0.5)).defaults["lr"] == 0.5


def test_string_leaves_are_carried_along_eagerly():
    """A tree with string leaves (NumPy arrays and scalars of str, which
    `jit` cannot take) steps un-jitted: the strings come back untouched."""
    params = {"w": np.ones(3, np.float32), "names": np.array(["a", "b"])}
    params["tag"] = np.str_("x")
    grads = {"w": np.ones(3, np.float32), "names": None, "tag": None}
    opt = fo.sgd(lr=0.5)
    new, _ = opt.step(params, grads, opt.init(params))
    assert new["names"] is params["names"] and new["tag"] is params["tag"]
    np.testing.assert_array_equal(new["w"], np.full(3, 0.5, np.float32))
