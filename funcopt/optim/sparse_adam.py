"""SparseAdam, mirroring `torch.optim.SparseAdam`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import add_scalar, mul, sqrt, tensor_op
from .._tree import is_trainable
from . import _sparse
from ._common import group_rule


def _validate_sparse_adam(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_positive(group["lr"], "learning rate")
    _validate.check_positive(group["eps"], "epsilon value")
    _validate.check_betas(group["betas"])


def _sparse_adam_slots(param, group):
    return {"exp_avg": jnp.zeros_like(param), "exp_avg_sq": jnp.zeros_like(param)}


def _sparse_adam_rule(param, grad, slots, step, hparams, options, lr_dtype=None):
    if not isinstance(grad, jsparse.BCOO):
        raise RuntimeError(
            "SparseAdam does not support dense gradients, please consider Adam instead"
        )
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    # torch's coalesce(); the padding entries are dropped by the scatters
    grad = _sparse.coalesce(grad)
    values = -grad.data if options["maximize"] else grad.data
    exp_avg, exp_avg_sq = slots["exp_avg"], slots["exp_avg_sq"]
    old_exp_avg = _sparse.gather(exp_avg, grad)
    old_exp_avg_sq = _sparse.gather(exp_avg_sq, grad)
    # torch: old += (new - old) * (1 - beta), at the gradient's indices only
    exp_avg_update = mul(tensor_op(jnp.subtract, values, old_exp_avg), 1 - beta1)
    squares = tensor_op(jnp.multiply, values, values)
    exp_avg_sq_update = mul(tensor_op(jnp.subtract, squares, old_exp_avg_sq), 1 - beta2)
    exp_avg = _sparse.scatter_add(exp_avg, grad, exp_avg_update)
    exp_avg_sq = _sparse.scatter_add(exp_avg_sq, grad, exp_avg_sq_update)
    numer = tensor_op(jnp.add, exp_avg_update, old_exp_avg)
    second_moment = tensor_op(jnp.add, exp_avg_sq_update, old_exp_avg_sq)
    denom = add_scalar(sqrt(second_moment), eps)
    step_size = _step_size(lr, 1 - beta1**step, 1 - beta2**step, lr_dtype)
    update = mul(tensor_op(jnp.divide, numer, denom), -step_size)
    return _sparse.scatter_add(param, grad, update), {
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }


def _step_size(lr, bias_correction1, bias_correction2, lr_dtype):
    """torch's `lr * math.sqrt(bias_correction2) / bias_correction1`.

    With a Python-float `lr` this is float64 math on the int step. With a
    tensor `lr` of a narrower float dtype (`lr_dtype`) each op is a tensor
    op: the Python float operand is converted to float32 (the op math of
    32- and 16-bit floats), the op runs in float32 and its result is
    rounded to `lr_dtype`.
    """
    if lr_dtype is None:
        return lr * jnp.sqrt(bias_correction2) / bias_correction1
    f32 = jnp.float32
    step_size = jnp.asarray(lr).astype(lr_dtype).astype(f32)
    step_size = (step_size * jnp.sqrt(bias_correction2).astype(f32)).astype(lr_dtype)
    return (step_size.astype(f32) / bias_correction1.astype(f32)).astype(lr_dtype)


def _check_dense_params(params, torch_index):
    # torch raises this at construction; funcopt at init() and step()
    flat = jax.tree_util.tree_flatten(
        params, is_leaf=lambda x: isinstance(x, jsparse.BCOO)
    )[0]
    leaf, sparse = 0, []
    for node in flat:
        if isinstance(node, jsparse.BCOO) and is_trainable(node.data):
            sparse.append(torch_index(leaf))  # the BCOO's data leaf
        leaf += len(jax.tree.leaves(node))
    if sparse:
        raise ValueError(
            f"Sparse params at indices {sparse}: SparseAdam requires dense parameter "
            "tensors"
        )


def _complex_error(paths, indices):
    # torch raises this at construction; funcopt at init() and step()
    return ValueError(
        f"Complex params at indices {indices}: SparseAdam does not support complex "
        "parameters"
    )


@_validate.optimizer_factory
def sparse_adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    maximize: bool = False,
    *,
    param_groups: ParamGroups | None = None,
) -> Optimizer:
    r"""SparseAdam, as `torch.optim.SparseAdam`: Adam at the gradient's indices.

    Gradients must be `jax.experimental.sparse.BCOO` arrays with the
    parameter's shape and dtype (torch's sparse `p.grad`); a dense gradient
    raises torch's `RuntimeError`. The gradient is coalesced first
    (duplicate indices summed, `BCOO.sum_duplicates`), then, at its
    indices $I$ only:

    $$
    \begin{aligned}
    m_I &\leftarrow m_I + (g_I - m_I)(1-\beta_1) \\
    v_I &\leftarrow v_I + (g_I^2 - v_I)(1-\beta_2) \\
    \theta_I &\leftarrow \theta_I - \frac{\gamma\sqrt{1-\beta_2^t}}
           {1-\beta_1^t}\,\frac{m_I}{\sqrt{v_I} + \epsilon}
    \end{aligned}
    $$

    with $\gamma$ = `lr`, $g = -\nabla$ when `maximize`.
    Untouched entries keep their stale moments, but `t`, the parameter's
    own step count, counts every step at which it has a gradient, even an
    empty one. Every stored index counts, also one whose value is zero
    (torch never looks at the values).

    An `nn.Embedding(sparse=True)` gradient, rows `ids` of a `(V, D)`
    table with values `rows` of shape `(n, D)`, is the hybrid BCOO
    `BCOO((rows, ids[:, None]), shape=(V, D))` (`n_dense=1`). A dense
    gradient `g` with an explicit index set is
    `BCOO((g[ids], ids[:, None]), shape=g.shape)` for row indices, or
    `BCOO((g[tuple(idx.T)], idx), shape=g.shape)` for element indices
    `idx` of shape `(n, g.ndim)`. (`BCOO.fromdense(g)` keeps only the
    nonzero entries, which is torch's `g.to_sparse()`.) Batched BCOO is
    converted with `bcoo_update_layout(n_batch=0)`; `nse` is static, so
    a fixed `nse` (padded with out-of-range indices, as BCOO pads) keeps
    a jitted step from recompiling.

    A tensor `lr` (an array) of a narrower float dtype than float64, e.g.
    torch's `lr=torch.tensor(0.01)`, makes the step size
    $\gamma\sqrt{1-\beta_2^t}/(1-\beta_1^t)$ float32 tensor math, each
    operation rounded to `lr`'s dtype, as torch computes it; a Python float
    `lr` keeps float64 math. Each param group follows its own `lr`.

    State: `exp_avg`, `exp_avg_sq` (dense); the step count is
    `state.step`. Sparse (BCOO) and complex parameters raise torch's
    `ValueError` (at `init` and `step`; torch: at construction).
    """
    return make_optimizer(
        name="SparseAdam",
        rule=group_rule(_sparse_adam_rule, narrow=True, lr_dtype="lr"),
        init_slots=_sparse_adam_slots,
        hyperparams={"lr": lr, "betas": betas, "eps": eps},
        options={"maximize": maximize},
        validate=_validate_sparse_adam,
        param_groups=param_groups,
        supports_complex=False,
        complex_error=_complex_error,
        check_params=_check_dense_params,
        sparse_grads=True,
    )
