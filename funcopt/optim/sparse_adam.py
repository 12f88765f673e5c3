"""SparseAdam, mirroring `torch.optim.SparseAdam`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from .. import _validate
from .._core import Optimizer, make_optimizer
from .._groups import ParamGroups
from .._math import scalar


def _validate_sparse_adam(group: Mapping[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_positive(group["lr"], "learning rate")
    _validate.check_positive(group["eps"], "epsilon value")
    _validate.check_betas(group["betas"])


def _sparse_adam_slots(param, group):
    return {"exp_avg": jnp.zeros_like(param), "exp_avg_sq": jnp.zeros_like(param)}


def _sparse_adam_rule(param, grad, slots, step, hparams, options):
    if not isinstance(grad, jsparse.BCOO):
        raise RuntimeError(
            "SparseAdam does not support dense gradients, please consider Adam instead"
        )
    lr, eps = hparams["lr"], hparams["eps"]
    beta1, beta2 = hparams["betas"][0], hparams["betas"][1]
    if grad.n_batch:
        grad = jsparse.bcoo_update_layout(grad, n_batch=0)
    if grad.n_sparse == 0:
        # no sparse dimension (a 0-d parameter's gradient): every entry sits
        # at the one index, which coalescing sums into one value
        if grad.nse == 0:
            return param, dict(slots)
        index: tuple = ()
        data = jnp.sum(grad.data, axis=0)
    else:
        # torch's coalesce(): unique, sorted indices, duplicates summed; the
        # padding entries (index == shape) are dropped by the scatters below
        grad = grad.sum_duplicates(nse=grad.nse)
        index = tuple(grad.indices[:, k] for k in range(grad.n_sparse))
        data = grad.data
    values = -data if options["maximize"] else data
    exp_avg, exp_avg_sq = slots["exp_avg"], slots["exp_avg_sq"]
    old_exp_avg = exp_avg.at[index].get(mode="fill", fill_value=0)
    old_exp_avg_sq = exp_avg_sq.at[index].get(mode="fill", fill_value=0)
    # torch: old += (new - old) * (1 - beta), at the gradient's indices only
    exp_avg_update = (values - old_exp_avg) * scalar(1 - beta1, param)
    exp_avg_sq_update = (values * values - old_exp_avg_sq) * scalar(1 - beta2, param)
    exp_avg = exp_avg.at[index].add(exp_avg_update, mode="drop")
    exp_avg_sq = exp_avg_sq.at[index].add(exp_avg_sq_update, mode="drop")
    numer = exp_avg_update + old_exp_avg
    denom = jnp.sqrt(exp_avg_sq_update + old_exp_avg_sq) + scalar(eps, param)
    # torch: Python-float scalar math on the int step
    step_size = lr * jnp.sqrt(1 - beta2**step) / (1 - beta1**step)
    param = param.at[index].add(
        scalar(-step_size, param) * (numer / denom), mode="drop"
    )
    return param, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


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

    State: `exp_avg`, `exp_avg_sq` (dense); the step count is
    `state.step`. Complex parameters raise
    torch's `ValueError` (at `init`; torch: at construction).
    """
    return make_optimizer(
        name="SparseAdam",
        rule=_sparse_adam_rule,
        init_slots=_sparse_adam_slots,
        hyperparams={"lr": lr, "betas": betas, "eps": eps},
        options={"maximize": maximize},
        validate=_validate_sparse_adam,
        param_groups=param_groups,
        supports_complex=False,
        complex_error=_complex_error,
        sparse_grads=True,
    )
