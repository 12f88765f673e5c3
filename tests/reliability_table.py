"""The bad inputs of docs/reliability.md: each row is run by test_reliability_table.py.

Regenerate the docs table with ``python -m tests.reliability_table``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

import funcopt as fo

P = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "n": jnp.arange(2)}


def _g(**change):
    g = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "n": None}
    g["dense"].update(change)
    return g


def _step(grads, opt=None, state=None, params=P):
    opt = opt or fo.adam()
    return lambda: opt.step(params, grads, opt.init(params) if state is None else state)


def _missing():
    g = _g()
    del g["dense"]["bias"]
    return g


C = {"w": jnp.zeros((2, 2), jnp.complex64)}
# the same number of leaves as P, other key paths; P's leaves in bfloat16
OTHER = {"x": jnp.ones((4, 3)), "y": jnp.zeros(3), "z": jnp.arange(2)}
P16 = {
    "dense": {
        "kernel": jnp.ones((4, 3), jnp.bfloat16),
        "bias": jnp.zeros(3, jnp.bfloat16),
    },
    "n": jnp.arange(2),
}
SPARSE = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}


def _sparse_missing():
    opt = fo.sparse_adam()
    grads = {"w": jsparse.BCOO.fromdense(jnp.ones((4, 3)))}
    return opt.step(SPARSE, grads, opt.init(SPARSE))


def _jit_wrong_shape():
    opt = fo.adam()
    return jax.jit(opt.step)(P, _g(kernel=jnp.ones((3, 4))), opt.init(P))


def _traced_lr():
    return jax.jit(lambda lr: fo.adam(lr=lr).init(P))(0.1)


def _lbfgs(state=None, fn=None):
    opt = fo.lbfgs()
    grads = _g()
    fn = fn if fn is not None else (lambda p: (jnp.asarray(1.0), grads))
    return lambda: opt.step(P, opt.init(P) if state is None else state, fn)


def _inject(jit=False):
    import optax

    init = optax.inject_hyperparams(fo.adam)(lr=1e-2).init
    return (jax.jit(init) if jit else init)(SPARSE)  # (float leaves: optax's dtype)


def _tree_set(jit=False, **values):
    import optax

    opt = fo.adam()
    state = optax.tree_utils.tree_set(opt.init(P), **values)
    return (jax.jit(opt.step) if jit else opt.step)(P, _g(), state)


def _torch(tree):
    import torch

    return jax.tree.map(lambda x: torch.tensor(np.asarray(x)), tree)


def _model():
    import torch

    return torch.nn.Linear(3, 2)


def _groups(values):
    return fo.param_groups({"dense": {"kernel": "g", "bias": "g"}, "n": "g"}, values)


# (bad input, call, exception type, message (regex))
ROWS = [
    (
        "grads missing a leaf",
        _step(_missing()),
        TypeError,
        r"missing from grads: \['dense'\]\['bias'\]",
    ),
    (
        "grads with an extra leaf",
        _step(_g(extra=jnp.ones(1))),
        TypeError,
        r"not in params: \['dense'\]\['extra'\]",
    ),
    (
        "grad of the wrong shape",
        _step(_g(kernel=jnp.ones((3, 4)))),
        ValueError,
        r"params\['dense'\]\['kernel'\]: grad shape \(3, 4\) != param shape \(4, 3\)",
    ),
    (
        "grad of the wrong dtype",
        _step(_g(bias=jnp.ones(3, jnp.bfloat16))),
        TypeError,
        r"params\['dense'\]\['bias'\]: grad dtype bfloat16 != param dtype float32",
    ),
    (
        "a gradient for an integer leaf",
        _step({**_g(), "n": jnp.ones(2)}),
        TypeError,
        r"params\['n'\]: leaf of dtype int32 is not trainable",
    ),
    (
        "a string as a gradient leaf",
        _step(_g(bias="x")),
        TypeError,
        r"params\['dense'\]\['bias'\]: gradient must be an array or None, got str",
    ),
    (
        "a string as the grads",
        _step("grads"),
        TypeError,
        r"grads do not have the structure of params",
    ),
    (
        "a state of another optimizer",
        _step(_g(), fo.sgd(), fo.adam().init(P)),
        ValueError,
        r"this state was made by another optimizer",
    ),
    (
        "a state of another param tree",
        _step(_g(), fo.adam(), fo.adam().init({"a": jnp.ones(2)})),
        ValueError,
        r"made for a param tree with 1 leaves; params have 3",
    ),
    (
        "a grad of the wrong shape, under jit (a trace-time check)",
        _jit_wrong_shape,
        ValueError,
        r"params\['dense'\]\['kernel'\]: grad shape \(3, 4\) != param shape \(4, 3\)",
    ),
    (
        "sparse grads missing a leaf, SparseAdam",
        _sparse_missing,
        TypeError,
        r"grads do not have the structure of params \(missing from grads: \['b'\]\)",
    ),
    (
        "a state of another param tree with as many leaves",
        _step(_g(), fo.adam(), fo.adam().init(OTHER)),
        ValueError,
        r"this Adam state was made for another param tree: its buffer 'exp_avg' "
        r"does not have the structure of params \(missing from 'exp_avg': "
        r"\['dense'\]\['bias'\]",
    ),
    (
        "a state of the bfloat16 version of the params",
        _step(_g(), fo.adam(), fo.adam().init(P16)),
        ValueError,
        r"params\['dense'\]\['bias'\]: state buffer 'exp_avg' is bfloat16\[3\], "
        r"Adam makes float32\[3\] for this float32\[3\] param",
    ),
    (
        "a state of another optimizer with the same hyperparameters",
        _step(_g(), fo.adamax(), fo.adam().init(P)),
        ValueError,
        r"params\['dense'\]\['bias'\]: this state holds buffers \['exp_avg', "
        r"'exp_avg_sq'\] for it, Adamax with these options makes \['exp_avg', "
        r"'exp_inf'\]",
    ),
    (
        "a state made with other options",
        _step(_g(), fo.adam(amsgrad=True), fo.adam().init(P)),
        ValueError,
        r"this state holds buffers \['exp_avg', 'exp_avg_sq'\] for it, Adam with "
        r"these options makes \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'\]",
    ),
    (
        "LBFGS, a value_and_grad_fn that is not a function",
        _lbfgs(fn=3),
        TypeError,
        r"LBFGS: value_and_grad_fn must be a function params -> \(loss, grads\)",
    ),
    (
        "LBFGS, a state of the bfloat16 version of the params",
        _lbfgs(state=fo.lbfgs().init(P16)),
        ValueError,
        r"this LBFGS state's 'd' is bfloat16\[15\]; params need float32 vectors",
    ),
    (
        "LBFGS, a gradient of the wrong shape",
        _lbfgs(fn=lambda p: (jnp.asarray(1.0), _g(kernel=jnp.ones((3, 4))))),
        ValueError,
        r"params\['dense'\]\['kernel'\]: grad shape \(3, 4\) != param shape \(4, 3\)",
    ),
    (
        "None as the state",
        lambda: fo.adam().step(P, _g(), None),
        TypeError,
        r"Adam expects the state made by its init\(\), got NoneType",
    ),
    (
        "a dict as the state",
        _step(_g(), fo.adam(), {"step": 0}),
        TypeError,
        r"Adam expects the state made by its init\(\), got dict",
    ),
    (
        "complex params, Adafactor",
        lambda: fo.adafactor().init(C),
        RuntimeError,
        r"^Adafactor does not support complex parameters$",
    ),
    (
        "complex params, Muon",
        lambda: fo.muon().init(C),
        RuntimeError,
        r"^Muon does not support complex parameters$",
    ),
    (
        "complex params, SparseAdam",
        lambda: fo.sparse_adam().init(C),
        ValueError,
        r"Complex params at indices \[\[0, 0\]\]: SparseAdam does not support complex",
    ),
    (
        "sparse (BCOO) params, SparseAdam",
        lambda: fo.sparse_adam().init({"w": jsparse.BCOO.fromdense(jnp.eye(2))}),
        ValueError,
        r"Sparse params at indices \[\[0, 0\]\]: SparseAdam requires dense parameter",
    ),
    (
        "sparse grads with weight_decay, Adagrad",
        _step(
            {"w": jsparse.BCOO.fromdense(jnp.ones((4, 3)))},
            fo.adagrad(weight_decay=0.1),
            params={"w": jnp.ones((4, 3))},
        ),
        RuntimeError,
        r"params\['w'\]: weight_decay option is not compatible with sparse gradients",
    ),
    (
        "lr as a string",
        lambda: fo.adam(lr="0.1"),
        TypeError,
        r"'<=' not supported between instances of 'float' and 'str'",
    ),
    (
        "lr None",
        lambda: fo.sgd(lr=None),
        TypeError,
        r"not supported between instances of 'NoneType' and 'float'",
    ),
    (
        "lr NaN",
        lambda: fo.adam(lr=float("nan")),
        ValueError,
        r"Invalid learning rate: nan",
    ),
    (
        "lr traced (the optimizer made inside jit)",
        _traced_lr,
        TypeError,
        r"Adam: lr is a traced JAX value; optimizer arguments are checked when the "
        r"optimizer is made",
    ),
    (
        "a multi-element array as eps",
        lambda: fo.adam(eps=np.ones(2)),
        RuntimeError,
        r"^Boolean value of Tensor with more than one value is ambiguous$",
    ),
    (
        "a string hyperparameter that torch checks only in step",
        lambda: fo.sgd(dampening="x").init(P),
        TypeError,
        r"SGD: dampening must be a real number, got 'x'",
    ),
    (
        "a number where torch unpacks a tuple",
        lambda: fo.rprop(step_sizes=1e-3).init(P),
        TypeError,
        r"Rprop: step_sizes must be a tuple of 2 numbers, got 0.001",
    ),
    (
        "a tuple of the wrong length",
        lambda: fo.adam(betas=(0.9, 0.99, 0.5)).init(P),
        ValueError,
        r"Adam: betas must be a tuple of 2 numbers, got \(0.9, 0.99, 0.5\)",
    ),
    (
        "param_groups not made by fo.param_groups",
        lambda: fo.adam(param_groups={"head": {"lr": 0.1}}),
        TypeError,
        r"param_groups must be made by funcopt.param_groups\(labels, overrides\), "
        r"got dict",
    ),
    (
        "a group value of another shape",
        lambda: fo.adam(param_groups=_groups({"g": {"betas": (0.9, 0.99, 0.5)}})).init(
            P
        ),
        ValueError,
        r"Adam param group 'g': betas has shape \(3,\); Adam's betas has shape "
        r"\(2,\)",
    ),
    (
        "StepLR, a float step_size",
        lambda: fo.lr_scheduler.step_lr(step_size=2.5),
        TypeError,
        r"StepLR: step_size must be an int, got 2.5",
    ),
    (
        "ExponentialLR, a string gamma",
        lambda: fo.lr_scheduler.exponential_lr(gamma="x"),
        TypeError,
        r"ExponentialLR: gamma must be a real number, got 'x'",
    ),
    (
        "clip_grad_norm, max_norm None",
        lambda: fo.clip_grad_norm(_g(), None),
        TypeError,
        r"float\(\) argument must be a string or a real number, not 'NoneType'",
    ),
    (
        "clip_grad_norm, a norm_type of two values",
        lambda: fo.clip_grad_norm(_g(), 1.0, np.ones(2)),
        ValueError,
        r"norm_type must be a number or a 1-element array, got shape \(2,\)",
    ),
    (
        "skip_nonfinite with the inner state",
        _step(_g(), fo.skip_nonfinite(fo.adam()), fo.adam().init(P)),
        TypeError,
        r"skip_nonfinite expects the state made by its init\(\), got OptState",
    ),
    (
        "skip_nonfinite of a non-optimizer",
        lambda: fo.skip_nonfinite("adam"),
        TypeError,
        r"skip_nonfinite\(\) wraps an optimizer",
    ),
    (
        "precision_policy, unknown buffer",
        lambda: fo.precision_policy(fo.adam(), {"mu": jnp.bfloat16}).init(P),
        ValueError,
        r"Adam has no state buffer 'mu'",
    ),
    (
        "precision_policy, integer dtype",
        lambda: fo.precision_policy(fo.adam(), {"exp_avg": jnp.int8}),
        TypeError,
        r"int8 is not a real floating-point dtype",
    ),
    (
        "master_weights, wrong state",
        _step(_g(), fo.master_weights(fo.adam()), fo.adam().init(P)),
        TypeError,
        r"master_weights expects the state made by its init\(\)",
    ),
    (
        "optax.inject_hyperparams(fo.adam): its init",
        _inject,
        TypeError,
        r"optax\.inject_hyperparams\(fo\.adam\) would silently ignore changed "
        r"hyperparameters, because funcopt keeps them in its own state: build "
        r"opt = fo\.adam\(\.\.\.\) directly and change them with "
        r"fo\.set_lr\(state, lr\) or fo\.set_hparam\(state, name, value\)",
    ),
    (
        "optax.inject_hyperparams(fo.adam): its init, under jit",
        lambda: _inject(jit=True),
        TypeError,
        r"optax\.inject_hyperparams\(fo\.adam\) would silently ignore changed ",
    ),
    (
        "optax.tree_utils.tree_set(state, lr=0.05)",
        lambda: _tree_set(lr=0.05),
        ValueError,
        r"Adam state: hyperparameter 'lr' is 0\.05 \(a Python float\), but this "
        r"state needs a float32\[1\] array, one value per parameter group: set it "
        r"with fo\.set_hparam\(state, 'lr', 0\.05\) \(or fo\.set_lr\), which "
        r"keeps that shape and dtype",
    ),
    (
        "optax.tree_utils.tree_set(state, lr=0.05), under jit",
        lambda: _tree_set(jit=True, lr=0.05),
        ValueError,
        r"Adam state: hyperparameter 'lr' is a traced float32\[\] array, but this "
        r"state needs a float32\[1\] array",
    ),
    (
        "optax.tree_utils.tree_set(state, eps=1e-6)",
        lambda: _tree_set(eps=1e-6),
        ValueError,
        r"Adam state: hyperparameter 'eps' is 1e-06 \(a Python float\), but this "
        r"state needs a float32\[1\] array",
    ),
    (
        "optax.tree_utils.tree_set(state, betas=(0.8, 0.9))",
        lambda: _tree_set(betas=(0.8, 0.9)),
        TypeError,
        r"Adam state: hyperparameter 'betas' is \(0\.8, 0\.9\) \(a tuple\), but "
        r"this state needs a float32\[1, 2\] array, one value of shape \(2,\) per "
        r"parameter group: set it with fo\.set_hparam\(state, 'betas', "
        r"\(0\.8, 0\.9\)\)",
    ),
    (
        "an integer array as a hyperparameter in the state",
        lambda: _tree_set(lr=jnp.ones(1, jnp.int32)),
        TypeError,
        r"Adam state: hyperparameter 'lr' is an int32\[1\] array \[1\], but this "
        r"state needs a float32\[1\] array",
    ),
    (
        "torch tensors as params",
        lambda: fo.adam().init(_torch(P)),
        TypeError,
        r"params\['dense'\]\['bias'\] is a torch\.Tensor, which funcopt cannot "
        r"step: pass JAX arrays, fo\.torch_interop\.module_state_dict_to_params"
        r"\(dict\(model\.named_parameters\(\)\)\) for a model or "
        r"jnp\.asarray\(t\.detach\(\)\.cpu\(\)\.numpy\(\)\) for one tensor",
    ),
    (
        "torch tensors as grads",
        _step(_torch(_g())),
        TypeError,
        r"grads\['dense'\]\['bias'\] is a torch\.Tensor: funcopt takes JAX "
        r"gradients, so compute them with jax\.grad \(or convert one with "
        r"jnp\.asarray\(t\.detach\(\)\.cpu\(\)\.numpy\(\)\)\)",
    ),
    (
        "opt.init(model.parameters())",
        lambda: fo.adam().init(_model().parameters()),
        TypeError,
        r"params is a generator \(an iterator, such as model\.parameters\(\)\), "
        r"which funcopt cannot step: pass a pytree of JAX arrays, e\.g\. "
        r"fo\.torch_interop\.module_state_dict_to_params",
    ),
    (
        "opt.init(list(model.parameters()))",
        lambda: fo.adam().init(list(_model().parameters())),
        TypeError,
        r"params\[0\] is a torch\.nn\.Parameter, which funcopt cannot step",
    ),
    (
        "opt.init(model)",
        lambda: fo.adam().init(_model()),
        TypeError,
        r"params is a torch\.nn\.Module, which funcopt cannot step: pass its "
        r"parameters as JAX arrays, fo\.torch_interop\.module_state_dict_to_params",
    ),
    (
        "fo.adam(params) (torch's constructor)",
        lambda: fo.adam(P),
        TypeError,
        r"fo\.adam\(\) got a dict as its first argument \(lr\): funcopt optimizers "
        r"do not take the parameters, so build opt = fo\.adam\(lr=\.\.\.\) and "
        r"make the state with opt\.init\(params\)",
    ),
    (
        "fo.adam(params, lr=1e-3)",
        lambda: fo.adam(P, lr=1e-3),
        TypeError,
        r"fo\.adam\(\) got a dict as its first argument \(lr\): funcopt optimizers "
        r"do not take the parameters",
    ),
    (
        "fo.adam(model.parameters())",
        lambda: fo.adam(_model().parameters()),
        TypeError,
        r"fo\.adam\(\) got a generator as its first argument \(lr\)",
    ),
    (
        "fo.adam(learning_rate=1e-3) (optax's name)",
        lambda: fo.adam(learning_rate=1e-3),
        TypeError,
        r"fo\.adam\(\) got learning_rate=0\.001, optax's name: funcopt keeps "
        r"torch's argument names, so pass lr=0\.001",
    ),
    (
        "set_lr with too many values",
        lambda: fo.set_lr(fo.sgd().init(P), [0.1, 0.2]),
        ValueError,
        r"got 2 values for 1 parameter groups",
    ),
    (
        "get_hparam of an unknown name",
        lambda: fo.get_hparam(fo.sgd().init(P), "beta"),
        KeyError,
        r"no hyperparameter 'beta'",
    ),
]


def markdown() -> str:
    lines = ["| bad input | exception | message (regex) |", "|---|---|---|"]
    for what, _, exc, msg in ROWS:
        msg = msg.replace("|", "\\|")
        lines.append(f"| {what} | `{exc.__name__}` | `{msg}` |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- table:begin -->\n", "<!-- table:end -->\n"

if __name__ == "__main__":
    path = "docs/reliability.md"
    text = open(path).read()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    open(path, "w").write(head + BEGIN + markdown() + END + tail)
