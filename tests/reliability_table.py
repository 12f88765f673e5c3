"""The bad inputs of docs/reliability.md: each row is run by test_reliability_table.py.

Regenerate the docs table with ``python -m tests.reliability_table``.
"""

import jax.numpy as jnp

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
