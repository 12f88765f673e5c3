"""L-BFGS, mirroring `torch.optim.LBFGS`, as one pure, jit-able function.

torch's `LBFGS.step(closure)` runs a whole inner optimisation (up to
`max_iter` iterations, each with one or more closure calls). Here that is
`opt.step(params, state, value_and_grad_fn)`, in which every loop of torch's
code is a `jax.lax` loop, so a whole step is one `jax.jit`:

* the outer iteration loop and all of its break conditions: `while_loop`;
* the two-loop recursion over the history: `fori_loop` over the valid
  entries of fixed-size ring buffers (`old_dirs`/`old_stps`/`ro`);
* the strong-Wolfe line search (bracketing, then zoom, with torch's
  `_cubic_interpolate`): one `while_loop` with one closure call per pass.

`value_and_grad_fn(params) -> (loss, grads)` is traced twice: once for the
first evaluation of the step and once inside the loop (the fixed step, or
the line search).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _groups, _validate
from .._core import _as_complex, _as_real
from .._math import widest_float
from .._tree import PyTree, check_params, flatten_grads, is_trainable

_NO_GROUPS = "LBFGS doesn't support per-parameter options (parameter groups)"
_ONLY_STRONG_WOLFE = "only 'strong_wolfe' is supported"
_HYPERPARAMS = ("lr", "tolerance_grad", "tolerance_change")
_STATIC = ("max_iter", "max_eval", "history_size", "line_search_fn")

ValueAndGradFn = Callable[[PyTree], tuple[Any, PyTree]]


class LBFGSState(NamedTuple):
    """torch's `optimizer.state[params[0]]` for LBFGS, as fixed-shape arrays.

    `n` is the length of the flat vector: the trainable leaves of
    `jax.tree.leaves(params)` concatenated in order (complex leaves as real
    pairs, 2·numel). Vectors have the widest real dtype of those leaves;
    `t` and `prev_loss` (Python floats in torch) the widest enabled float.

    Attributes:
      func_evals: `int32[]`, closure calls over all `step` calls.
      n_iter: `int32[]`, iterations over all `step` calls.
      d: `[n]`, the last search direction.
      t: `[]`, the last step length.
      prev_flat_grad: `[n]`, the gradient at the start of the last iteration.
      prev_loss: `[]`, the loss at the start of the last iteration.
      H_diag: `[]`, the scale of the initial inverse Hessian (1 at first).
      old_dirs: `[history_size, n]`, ring buffer of the `y` vectors.
      old_stps: `[history_size, n]`, ring buffer of the `s` vectors.
      ro: `[history_size]`, ring buffer of `1/(y·s)`.
      history_count: `int32[]`, how many ring entries are valid (torch's
        `len(old_dirs)`).
      history_start: `int32[]`, the row of the oldest entry: torch's list
        index `i` is row `(history_start + i) % history_size`.
      hparams: `{"lr", "tolerance_grad", "tolerance_change": float[1]}` (one
        group), so `fo.get_lr`/`fo.set_lr` work without recompiling.
    """

    func_evals: jax.Array
    n_iter: jax.Array
    d: jax.Array
    t: jax.Array
    prev_flat_grad: jax.Array
    prev_loss: jax.Array
    H_diag: jax.Array
    old_dirs: jax.Array
    old_stps: jax.Array
    ro: jax.Array
    history_count: jax.Array
    history_start: jax.Array
    hparams: dict[str, jax.Array]


class LBFGS(optax.GradientTransformationExtraArgs):
    """`funcopt.lbfgs(...)`: `init`, `step` (torch's) and optax's `update`.

    `step(params, state, value_and_grad_fn) -> (params, state, loss)` is
    torch's `loss = optimizer.step(closure)`: `value_and_grad_fn(params)`
    returns `(loss, grads)` (`grads` shaped like `params`; a `None`
    leaf counts as zeros, as in torch) and `loss` is the *first* loss of the
    call, as torch returns `orig_loss`.

    `update(grads, state, params, *, value_fn, value=None)` follows
    `optax.lbfgs`'s contract: `grads` (and `value`, else
    `value_fn(params)`) is the first evaluation, and `value_fn` (a scalar
    loss function, differentiated with `jax.value_and_grad`) is called for
    the others. It returns `(new_params - params, new_state)`.
    """

    def step(self, params, state, value_and_grad_fn):
        """torch's `optimizer.step(closure)`: `(new_params, new_state, loss)`."""
        return self._step_fn(params, state, value_and_grad_fn)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"funcopt.lbfgs({args})"


@_validate.optimizer_factory
def lbfgs(
    lr: float = 1,
    max_iter: int = 20,
    max_eval: int | None = None,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history_size: int = 100,
    line_search_fn: str | None = None,
    *,
    param_groups: _groups.ParamGroups | None = None,
) -> LBFGS:
    r"""L-BFGS, as `torch.optim.LBFGS`: `step(params, state, value_and_grad_fn)`.

    Each `step` runs up to `max_iter` iterations. With $g_k$ the
    flat gradient and the history $(s_i, y_i, \rho_i = 1/y_i^\top s_i)$
    (oldest first, at most `history_size` pairs):

    $$
    \begin{aligned}
    y &= g_k - g_{k-1},\quad s = t_{k-1} d_{k-1}; \quad
         \text{if } y^\top s > 10^{-10}:\ \text{append } (s, y),\
         H_0 = \frac{y^\top s}{y^\top y} \\
    d_k &= -H_k g_k \quad\text{(two-loop recursion, }H_k^0 = H_0 I) \\
    t_k &= \begin{cases} \min(1, 1/\lVert g_1\rVert_1)\,\gamma &
            \text{first iteration ever}\\ \gamma & \text{otherwise}
           \end{cases} \\
    \theta &\leftarrow \theta + t_k d_k
           \quad(t_k \text{ from strong Wolfe if requested})
    \end{aligned}
    $$

    with $\gamma$ = `lr`. torch's quirks, all kept:

    * the first iteration *ever* (`state.n_iter` is cumulative over calls)
      uses `d = -g` and the L1-scaled step above;
    * pairs with `y·s <= 1e-10` (absolute) are not stored; once
      `history_size` pairs are stored the oldest is dropped;
    * without a line search the last iteration moves but does not
      re-evaluate (`func_evals` counts the calls that happened);
    * a step stops when `max|g| <= tolerance_grad` (right after the first
      evaluation it returns without touching `n_iter`), when
      `g·d > -tolerance_change`, after `max_iter` iterations or
      `max_eval` closure calls (default `max_iter*5//4`), when
      `max|t d| <= tolerance_change` or `|loss - prev_loss| <
      tolerance_change`;
    * `line_search_fn="strong_wolfe"` is torch's `_strong_wolfe` with
      `c1=1e-4`, `c2=0.9`, `max_ls = max_eval - evaluations so far` and
      always `tolerance_change=1e-9` (torch does not pass the group's).

    Errors: `lr` as torch (`ValueError`); more than one parameter group
    raises torch's `ValueError` here when the overrides alone imply it, else
    in `init`; a `line_search_fn` other than `None`/`"strong_wolfe"`
    raises torch's `RuntimeError("only 'strong_wolfe' is supported")` here,
    at construction (torch raises it in the first `step` that reaches the
    line search). `history_size < 1` raises `ValueError` here (torch
    fails with `IndexError` at its first curvature update).

    Numerics: vector math and the dot products are in the flat vector's dtype;
    losses, `t` and the line search's scalars in the widest enabled float
    (torch's Python floats). In float64 this is torch's arithmetic up to the
    summation order of dot products. `update` needs `value_fn` (see
    [`LBFGS`][funcopt.optim.lbfgs.LBFGS]).
    """
    with _validate.torch_semantics("LBFGS", {"lr": lr}):
        _validate.check_scalar_lr(lr)
        _validate.check_at_least_zero(lr, "learning rate")
    if max_eval is None:
        max_eval = max_iter * 5 // 4
    defaults = dict(
        lr=lr,
        max_iter=max_iter,
        max_eval=max_eval,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        history_size=history_size,
        line_search_fn=line_search_fn,
    )
    _validate.check_param_groups(param_groups)
    if param_groups is not None:
        named = [n for n in param_groups.overrides if n != _groups.DEFAULT]
        if len(named) > 1:
            raise ValueError(_NO_GROUPS)
        for name, values in param_groups.overrides.items():
            unknown = sorted(set(values) - set(defaults))
            if unknown:
                raise ValueError(
                    f"param group {name!r}: LBFGS has no hyperparameter "
                    f"{unknown[0]!r}; known: {sorted(defaults)}"
                )
            _validate_group({**defaults, **values})
    _validate_group(defaults)

    opt = LBFGS(
        lambda params: _init(defaults, param_groups, params),
        lambda updates, state, params=None, **extra: _update(
            defaults, param_groups, updates, state, params, **extra
        ),
    )
    opt._step_fn = lambda params, state, fn: _step(
        defaults, param_groups, params, state, fn
    )
    opt.name = "LBFGS"
    opt.defaults = defaults
    opt.param_groups = param_groups
    return opt


@_validate.torch_checks("LBFGS")
def _validate_group(group: dict[str, Any]) -> None:
    _validate.check_scalar_lr(group["lr"])
    _validate.check_at_least_zero(group["lr"], "learning rate")
    if not (
        group["line_search_fn"] is None
        or (
            isinstance(group["line_search_fn"], str)
            and group["line_search_fn"] == "strong_wolfe"
        )
    ):
        raise RuntimeError(_ONLY_STRONG_WOLFE)
    # torch takes these as they come and fails in its first step; funcopt
    # needs numbers to build the state and the loop
    for key in ("max_iter", "max_eval", "history_size"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"LBFGS: {key} must be an int, got {value!r}")
    for key in ("tolerance_grad", "tolerance_change"):
        _validate.check_hyperparameter("LBFGS", key, group[key])
        value = _validate.canonical_hyperparameter(group[key])
        _validate.check_hyperparameter_shape("LBFGS", key, value)
    if group["history_size"] < 1:
        raise ValueError(
            f"Invalid history_size: {group['history_size']} (torch.optim.LBFGS "
            "fails with IndexError at its first curvature update)"
        )


def _group(defaults, param_groups, params) -> dict[str, Any]:
    """The one group's values; torch's ValueError when params make several."""
    names, _ = _groups.resolve(param_groups, params)
    if len(names) != 1:
        raise ValueError(_NO_GROUPS)
    if param_groups is None:
        return defaults
    return {**defaults, **param_groups.overrides.get(names[0], {})}


# --------------------------------------------------------------------------
# the flat vector
# --------------------------------------------------------------------------


class _Flat(NamedTuple):
    """Where the trainable leaves sit in the flat vector."""

    positions: list[int]  # of the trainable leaves among all leaves
    like: list[Any]  # those leaves (for shapes and dtypes)
    dtype: Any  # the flat vector's (real) dtype
    size: int


def _real_dtype(leaf) -> Any:
    return jnp.finfo(leaf.dtype).dtype


def _flat_layout(leaves) -> _Flat:
    positions = [i for i, p in enumerate(leaves) if is_trainable(p)]
    like = [leaves[i] for i in positions]
    dtypes = [_real_dtype(p) for p in like]
    # torch.cat promotes to the widest dtype
    dtype = max(dtypes, key=lambda d: jnp.finfo(d).bits) if dtypes else widest_float()
    size = sum(2 * np.size(p) if jnp.iscomplexobj(p) else np.size(p) for p in like)
    return _Flat(positions, like, jnp.dtype(dtype), int(size))


def _flatten(layout: _Flat, pieces) -> jax.Array:
    """torch's `_gather_flat_grad`: `None` pieces are zeros."""
    parts = []
    for p, x in zip(layout.like, pieces):
        if x is None:
            x = jnp.zeros(2 * np.size(p) if jnp.iscomplexobj(p) else np.size(p))
        parts.append(_as_real(jnp.asarray(x)).reshape(-1).astype(layout.dtype))
    if not parts:
        return jnp.zeros((0,), layout.dtype)
    return jnp.concatenate(parts)


def _add_grad(layout: _Flat, xs, t, d) -> list:
    """torch's `_add_grad(t, d)`: `p.add_(d[slice].view_as(p), alpha=t)`."""
    out, offset = [], 0
    step = t.astype(layout.dtype)
    for p in xs:
        real = _as_real(p)
        numel = real.size
        piece = d[offset : offset + numel].reshape(real.shape)
        new = (real.astype(layout.dtype) + step * piece).astype(real.dtype)
        out.append(_as_complex(new, p))
        offset += numel
    return out


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


def _max_abs(x: jax.Array) -> jax.Array:
    """`x.abs().max()` (NaN propagates; 0 for an empty vector)."""
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    return jnp.max(jnp.abs(x))


# --------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------


def _init(defaults, param_groups, params) -> LBFGSState:
    params = check_params(params)
    group = _group(defaults, param_groups, params)
    layout = _flat_layout(jax.tree.leaves(params))
    n, h = layout.size, int(group["history_size"])
    sdt, vdt = widest_float(), layout.dtype
    return LBFGSState(
        func_evals=jnp.zeros((), jnp.int32),
        n_iter=jnp.zeros((), jnp.int32),
        d=jnp.zeros((n,), vdt),
        t=jnp.zeros((), sdt),
        prev_flat_grad=jnp.zeros((n,), vdt),
        prev_loss=jnp.zeros((), sdt),
        H_diag=jnp.ones((), vdt),
        old_dirs=jnp.zeros((h, n), vdt),
        old_stps=jnp.zeros((h, n), vdt),
        ro=jnp.zeros((h,), vdt),
        history_count=jnp.zeros((), jnp.int32),
        history_start=jnp.zeros((), jnp.int32),
        hparams={
            k: jnp.asarray([_validate.canonical_hyperparameter(group[k])], sdt)
            for k in _HYPERPARAMS
        },
    )


def _check_state(state, layout: _Flat, group) -> None:
    if not isinstance(state, LBFGSState):
        raise TypeError(
            f"LBFGS expects the state made by its init(), got {type(state).__name__}"
        )
    expected = (int(group["history_size"]), layout.size)
    if tuple(state.old_dirs.shape) != expected:
        raise ValueError(
            f"this LBFGS state holds a history of shape {tuple(state.old_dirs.shape)}"
            f"; params and history_size need {expected}"
        )
    _validate.check_state_hparams(
        "LBFGS", state.hparams, {k: (1,) for k in _HYPERPARAMS}
    )
    for name in ("d", "prev_flat_grad", "old_dirs", "old_stps", "ro", "H_diag"):
        x = getattr(state, name)
        dtype = getattr(x, "dtype", None)
        if dtype != layout.dtype or (name == "d" and x.shape != (layout.size,)):
            raise ValueError(
                f"this LBFGS state's {name!r} is {dtype}{list(np.shape(x))}; "
                f"params need {layout.dtype} vectors of length {layout.size}: "
                "the state was made for another param tree"
            )


# --------------------------------------------------------------------------
# the two-loop recursion on the ring buffers
# --------------------------------------------------------------------------


class _History(NamedTuple):
    old_dirs: jax.Array
    old_stps: jax.Array
    ro: jax.Array
    n_valid: jax.Array  # the state's history_count
    start: jax.Array


def _push(hist: _History, y, s, rho, accept) -> _History:
    """torch's drop-the-oldest-if-full, then `append`, when `accept`."""
    size = hist.old_dirs.shape[0]
    full = hist.n_valid == size
    row = jnp.where(full, hist.start, (hist.start + hist.n_valid) % size)

    def put(buf, value):
        return buf.at[row].set(jnp.where(accept, value, buf[row]))

    return _History(
        put(hist.old_dirs, y),
        put(hist.old_stps, s),
        put(hist.ro, rho),
        jnp.where(accept & ~full, hist.n_valid + 1, hist.n_valid),
        jnp.where(accept & full, (hist.start + 1) % size, hist.start),
    )


def _two_loop(hist: _History, flat_grad, H_diag) -> jax.Array:
    """torch's collapsed two-loop recursion: `d = -H g`, newest entry first."""
    size = hist.old_dirs.shape[0]

    def row(i):
        return (hist.start + i) % size

    def backward(j, carry):
        q, al = carry
        i = hist.n_valid - 1 - j
        k = row(i)
        a = _dot(hist.old_stps[k], q) * hist.ro[k]
        return q - a * hist.old_dirs[k], al.at[i].set(a)

    q, al = jax.lax.fori_loop(
        0, hist.n_valid, backward, (-flat_grad, jnp.zeros(size, flat_grad.dtype))
    )
    r = q * H_diag

    def forward(i, r):
        k = row(i)
        be_i = _dot(hist.old_dirs[k], r) * hist.ro[k]
        return r + (al[i] - be_i) * hist.old_stps[k]

    return jax.lax.fori_loop(0, hist.n_valid, forward, r)


# --------------------------------------------------------------------------
# strong Wolfe line search
# --------------------------------------------------------------------------


def _py_min(a, b):
    """Python's `min(a, b)`: `b if b < a else a`."""
    return jnp.where(b < a, b, a)


def _py_max(a, b):
    """Python's `max(a, b)`: `b if b > a else a`."""
    return jnp.where(b > a, b, a)


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    r"""torch's `_cubic_interpolate`: the minimiser of the cubic through two points.

    $$
    d_1 = g_1 + g_2 - 3\frac{f_1 - f_2}{x_1 - x_2},\quad
    d_2 = \sqrt{d_1^2 - g_1 g_2},\quad
    x = x_2 - (x_2 - x_1)\frac{g_2 + d_2 - d_1}{g_2 - g_1 + 2 d_2}
    $$

    (the points swapped when `x1 > x2`), clamped to `bounds` (default: the
    two points); the midpoint of the bounds when $d_1^2 < g_1 g_2$.
    """
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        ordered = x1 <= x2
        xmin_bound = jnp.where(ordered, x1, x2)
        xmax_bound = jnp.where(ordered, x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    d2 = jnp.sqrt(jnp.where(d2_square >= 0, d2_square, 0))
    min_pos = jnp.where(
        x1 <= x2,
        x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2)),
        x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2)),
    )
    clamped = _py_min(_py_max(min_pos, xmin_bound), xmax_bound)
    return jnp.where(d2_square >= 0, clamped, (xmin_bound + xmax_bound) / 2.0)


_BRACKET, _ZOOM, _FINISHED = 0, 1, 2


class _Search(NamedTuple):
    phase: jax.Array  # _BRACKET, _ZOOM or _FINISHED
    t: jax.Array  # the next point to evaluate (bracketing)
    bracket: jax.Array  # [2]; while bracketing, slot 0 is (t_prev, f_prev, ...)
    bracket_f: jax.Array  # [2]
    bracket_g: jax.Array  # [2, n]
    bracket_gtd: jax.Array  # [2]
    evals: jax.Array  # ls_func_evals; torch's ls_iter is evals - 1
    done: jax.Array
    insuf_progress: jax.Array
    low_pos: jax.Array  # high_pos = 1 - low_pos


def _strong_wolfe(
    obj_func, t, d, f, g, gtd, max_ls, c1=1e-4, c2=0.9, tolerance_change=1e-9
):
    """torch's `_strong_wolfe` as one `while_loop`: `(f, g, t, evals)`.

    Each pass evaluates `obj_func` once. While bracketing (phase 0) it then
    checks torch's three bracket conditions or extrapolates with a cubic in
    `[t + 0.01 (t - t_prev), 10 t]`; once a bracket is found it zooms (phase
    1): the next point is the cubic's minimiser in the bracket, moved `0.1`
    of the bracket away from an end on insufficient progress. Scalars are in
    `t`'s dtype, vectors in `g`'s.
    """
    sdt = t.dtype
    gtd = gtd.astype(sdt)
    d_norm = _max_abs(d).astype(sdt)
    zero = jnp.zeros((), sdt)

    def stop_zoom(bracket):
        return jnp.abs(bracket[1] - bracket[0]) * d_norm < tolerance_change

    def zoom_trial(s: _Search):
        b, bf, bgtd = s.bracket, s.bracket_f, s.bracket_gtd
        t = _cubic_interpolate(b[0], bf[0], bgtd[0], b[1], bf[1], bgtd[1])
        b_max, b_min = _py_max(b[0], b[1]), _py_min(b[0], b[1])
        eps = 0.1 * (b_max - b_min)
        close = _py_min(b_max - t, t - b_min) < eps
        at_end = s.insuf_progress | (t >= b_max) | (t <= b_min)
        moved = jnp.where(
            jnp.abs(t - b_max) < jnp.abs(t - b_min), b_max - eps, b_min + eps
        )
        return jnp.where(close & at_end, moved, t), close & ~at_end

    def bracket_step(s: _Search, t, f_new, g_new, gtd_new):
        ls_iter = s.evals - 1
        t_prev, f_prev = s.bracket[0], s.bracket_f[0]
        exhausted = ~(ls_iter < max_ls)
        armijo = (f_new > (f + c1 * t * gtd)) | ((ls_iter > 1) & (f_new >= f_prev))
        wolfe = jnp.abs(gtd_new) <= -c2 * gtd
        found = ~exhausted & (armijo | (~wolfe & (gtd_new >= 0)))
        done = ~exhausted & ~armijo & wolfe
        extrapolate = ~exhausted & ~found & ~done

        t_next = _cubic_interpolate(
            t_prev,
            f_prev,
            s.bracket_gtd[0],
            t,
            f_new,
            gtd_new,
            bounds=(t + 0.01 * (t - t_prev), t * 10),
        )
        # slot 0: t_prev for found; t itself when extrapolating or done;
        # torch's (0, f, g) when the search is exhausted
        slot0_new = extrapolate | done
        bracket = jnp.stack(
            [
                jnp.where(exhausted, zero, jnp.where(slot0_new, t, t_prev)),
                t,
            ]
        )
        bracket_f = jnp.stack(
            [jnp.where(exhausted, f, jnp.where(slot0_new, f_new, f_prev)), f_new]
        )
        g0 = jnp.where(exhausted, g, jnp.where(slot0_new, g_new, s.bracket_g[0]))
        bracket_g = jnp.stack([g0, g_new])
        bracket_gtd = jnp.stack(
            [jnp.where(slot0_new, gtd_new, s.bracket_gtd[0]), gtd_new]
        )
        low_pos = jnp.where(bracket_f[0] <= bracket_f[1], 0, 1).astype(jnp.int32)
        zoom = found & ~stop_zoom(bracket)
        phase = jnp.where(extrapolate, _BRACKET, jnp.where(zoom, _ZOOM, _FINISHED))
        return s._replace(
            phase=phase.astype(jnp.int32),
            t=jnp.where(extrapolate, t_next, t),
            bracket=bracket,
            bracket_f=bracket_f,
            bracket_g=bracket_g,
            bracket_gtd=bracket_gtd,
            done=done,
            low_pos=low_pos,
        )

    def zoom_step(s: _Search, t, f_new, g_new, gtd_new):
        ls_iter = s.evals - 1
        low, high = s.low_pos, 1 - s.low_pos
        b, bf, bg, bgtd = s.bracket, s.bracket_f, s.bracket_g, s.bracket_gtd
        higher = (f_new > (f + c1 * t * gtd)) | (f_new >= bf[low])
        wolfe = jnp.abs(gtd_new) <= -c2 * gtd
        flip = ~higher & ~wolfe & (gtd_new * (b[high] - b[low]) >= 0)
        # the new point replaces the high end (higher) or the low end (else);
        # on a flip the old low first becomes the new high
        new_at = jnp.where(higher, high, low)
        b = b.at[high].set(jnp.where(flip, b[low], b[high])).at[new_at].set(t)
        bf = bf.at[high].set(jnp.where(flip, bf[low], bf[high])).at[new_at].set(f_new)
        bg = bg.at[high].set(jnp.where(flip, bg[low], bg[high])).at[new_at].set(g_new)
        bgtd = (
            bgtd.at[high]
            .set(jnp.where(flip, bgtd[low], bgtd[high]))
            .at[new_at]
            .set(gtd_new)
        )
        low_pos = jnp.where(
            higher, jnp.where(bf[0] <= bf[1], 0, 1).astype(jnp.int32), low
        )
        done = ~higher & wolfe
        go_on = ~done & (ls_iter < max_ls) & ~stop_zoom(b)
        return s._replace(
            phase=jnp.where(go_on, _ZOOM, _FINISHED).astype(jnp.int32),
            t=t,
            bracket=b,
            bracket_f=bf,
            bracket_g=bg,
            bracket_gtd=bgtd,
            done=done,
            low_pos=low_pos,
        )

    def body(s: _Search) -> _Search:
        zooming = s.phase == _ZOOM
        t_zoom, insuf = zoom_trial(s)
        t = jnp.where(zooming, t_zoom, s.t)
        s = s._replace(insuf_progress=jnp.where(zooming, insuf, s.insuf_progress))
        f_new, g_new = obj_func(t)
        gtd_new = _dot(g_new, d).astype(sdt)
        s = s._replace(evals=s.evals + 1)
        return jax.lax.cond(
            zooming, zoom_step, bracket_step, s, t, f_new, g_new, gtd_new
        )

    init = _Search(
        phase=jnp.asarray(_BRACKET, jnp.int32),
        t=t,
        bracket=jnp.stack([zero, zero]),
        bracket_f=jnp.stack([f, f]),
        bracket_g=jnp.stack([g, g]),
        bracket_gtd=jnp.stack([gtd, gtd]),
        evals=jnp.zeros((), jnp.int32),
        done=jnp.asarray(False),
        insuf_progress=jnp.asarray(False),
        low_pos=jnp.zeros((), jnp.int32),
    )
    s = jax.lax.while_loop(lambda s: s.phase != _FINISHED, body, init)
    low = s.low_pos
    return s.bracket_f[low], s.bracket_g[low], s.bracket[low], s.evals


# --------------------------------------------------------------------------
# step
# --------------------------------------------------------------------------


class _Loop(NamedTuple):
    xs: list  # the trainable leaves
    flat_grad: jax.Array
    loss: jax.Array
    d: jax.Array
    t: jax.Array
    hist: _History
    H_diag: jax.Array
    prev_flat_grad: jax.Array
    prev_loss: jax.Array
    state_n_iter: jax.Array  # torch's state["n_iter"] (cumulative)
    n_iter: jax.Array  # this call's iterations
    current_evals: jax.Array
    func_evals: jax.Array
    opt_cond: jax.Array
    stop: jax.Array


def _step(defaults, param_groups, params, state, value_and_grad_fn, first=None):
    params = check_params(params)
    group = _group(defaults, param_groups, params)
    leaves, treedef = jax.tree.flatten(params)
    layout = _flat_layout(leaves)
    _check_state(state, layout, group)
    if not callable(value_and_grad_fn):
        raise TypeError(
            "LBFGS: value_and_grad_fn must be a function params -> (loss, grads) "
            f"(torch's closure), got {type(value_and_grad_fn).__name__}"
        )
    sdt, vdt = widest_float(), layout.dtype
    lr = state.hparams["lr"][0]
    tolerance_grad = state.hparams["tolerance_grad"][0]
    tolerance_change = state.hparams["tolerance_change"][0]
    max_iter, max_eval = group["max_iter"], group["max_eval"]
    use_line_search = group["line_search_fn"] is not None

    def rebuild(xs):
        new = list(leaves)
        for i, x in zip(layout.positions, xs):
            new[i] = x
        return treedef.unflatten(new)

    def evaluate(xs):
        """`float(closure())` and `_gather_flat_grad()`."""
        p = rebuild(xs)
        loss, grads = value_and_grad_fn(p)
        return _to_scalar(loss, sdt), _flat_grads(layout, p, grads)

    xs = [leaves[i] for i in layout.positions]
    if first is None:
        orig_loss, grads = value_and_grad_fn(params)
        loss, flat_grad = _to_scalar(orig_loss, sdt), _flat_grads(layout, params, grads)
    else:
        orig_loss, flat_grad = first
        loss = _to_scalar(orig_loss, sdt)
    # torch compares tensors with Python floats in the tensor's dtype
    tolerance_grad_v = tolerance_grad.astype(vdt)
    tolerance_change_v = tolerance_change.astype(vdt)
    opt_cond = _max_abs(flat_grad) <= tolerance_grad_v

    def body(c: _Loop) -> _Loop:
        n_iter, state_n_iter = c.n_iter + 1, c.state_n_iter + 1
        first_ever = state_n_iter == 1
        # update memory (skipped on the first iteration ever)
        y = c.flat_grad - c.prev_flat_grad
        s = c.d * c.t.astype(vdt)
        ys = _dot(y, s)
        accept = ~first_ever & (ys > 1e-10)
        hist = _push(c.hist, y, s, 1.0 / ys, accept)
        H_diag = jnp.where(
            first_ever, jnp.ones((), vdt), jnp.where(accept, ys / _dot(y, y), c.H_diag)
        )
        hist = hist._replace(n_valid=jnp.where(first_ever, 0, hist.n_valid))
        # with an empty history and H_diag = 1 this is exactly d = -g
        d = _two_loop(hist, c.flat_grad, H_diag)
        prev_flat_grad, prev_loss = c.flat_grad, c.loss

        inv_l1 = (1.0 / jnp.sum(jnp.abs(c.flat_grad))).astype(sdt)
        t = jnp.where(first_ever, _py_min(jnp.ones((), sdt), inv_l1) * lr, lr)
        gtd = _dot(c.flat_grad, d)
        small_gtd = gtd > -tolerance_change_v

        def move(_):
            if use_line_search:

                def obj_func(t_trial):
                    return evaluate(_add_grad(layout, c.xs, t_trial, d))

                loss, flat_grad, t_ls, ls_func_evals = _strong_wolfe(
                    obj_func,
                    t,
                    d,
                    c.loss,
                    c.flat_grad,
                    gtd,
                    max_ls=max_eval - c.current_evals,
                )
                xs = _add_grad(layout, c.xs, t_ls, d)
                opt_cond = _max_abs(flat_grad) <= tolerance_grad_v
            else:
                t_ls = t
                xs = _add_grad(layout, c.xs, t, d)

                def reevaluate(xs):
                    loss, flat_grad = evaluate(xs)
                    opt = _max_abs(flat_grad) <= tolerance_grad_v
                    return loss, flat_grad, opt, jnp.ones((), jnp.int32)

                def keep(xs):
                    return c.loss, c.flat_grad, c.opt_cond, jnp.zeros((), jnp.int32)

                # the last iteration does not re-evaluate
                loss, flat_grad, opt_cond, ls_func_evals = jax.lax.cond(
                    n_iter != max_iter, reevaluate, keep, xs
                )
            current_evals = c.current_evals + ls_func_evals
            stop = (
                (n_iter == max_iter)
                | (current_evals >= max_eval)
                | opt_cond
                | (_max_abs(d * t_ls.astype(vdt)) <= tolerance_change_v)
                | (jnp.abs(loss - prev_loss) < tolerance_change)
            )
            return (
                xs,
                flat_grad,
                loss,
                t_ls,
                current_evals,
                c.func_evals + ls_func_evals,
                opt_cond,
                stop,
            )

        def skip(_):
            return (
                c.xs,
                c.flat_grad,
                c.loss,
                t,
                c.current_evals,
                c.func_evals,
                c.opt_cond,
                jnp.asarray(True),
            )

        xs, flat_grad, loss, t, current_evals, func_evals, opt_cond, stop = (
            jax.lax.cond(small_gtd, skip, move, None)
        )
        return _Loop(
            xs=xs,
            flat_grad=flat_grad,
            loss=loss,
            d=d,
            t=t,
            hist=hist,
            H_diag=H_diag,
            prev_flat_grad=prev_flat_grad,
            prev_loss=prev_loss,
            state_n_iter=state_n_iter,
            n_iter=n_iter,
            current_evals=current_evals,
            func_evals=func_evals,
            opt_cond=opt_cond,
            stop=stop,
        )

    init = _Loop(
        xs=xs,
        flat_grad=flat_grad,
        loss=loss,
        d=state.d,
        t=state.t,
        hist=_History(
            state.old_dirs,
            state.old_stps,
            state.ro,
            state.history_count,
            state.history_start,
        ),
        H_diag=state.H_diag,
        prev_flat_grad=state.prev_flat_grad,
        prev_loss=state.prev_loss,
        state_n_iter=state.n_iter,
        n_iter=jnp.zeros((), jnp.int32),
        current_evals=jnp.ones((), jnp.int32),
        func_evals=state.func_evals + 1,
        opt_cond=opt_cond,
        stop=opt_cond,  # optimal at the first evaluation: return at once
    )
    c = jax.lax.while_loop(lambda c: ~c.stop & (c.n_iter < max_iter), body, init)
    new_state = state._replace(
        func_evals=c.func_evals,
        n_iter=c.state_n_iter,
        d=c.d,
        t=c.t,
        prev_flat_grad=c.prev_flat_grad,
        prev_loss=c.prev_loss,
        H_diag=c.H_diag,
        old_dirs=c.hist.old_dirs,
        old_stps=c.hist.old_stps,
        ro=c.hist.ro,
        history_count=c.hist.n_valid,
        history_start=c.hist.start,
    )
    return rebuild(c.xs), new_state, orig_loss


def _to_scalar(loss, dtype) -> jax.Array:
    """torch's `float(loss)`."""
    loss = jnp.asarray(loss)
    if loss.size != 1:
        raise ValueError(
            f"value_and_grad_fn must return a scalar loss, got shape {loss.shape}"
        )
    return loss.reshape(()).astype(dtype)


def _flat_grads(layout: _Flat, params, grads) -> jax.Array:
    _, grad_leaves = flatten_grads(params, grads)
    return _flatten(layout, [grad_leaves[i] for i in layout.positions])


def _update(defaults, param_groups, updates, state, params=None, **extra):
    """optax's `update`, with `optax.lbfgs`'s `value`/`value_fn` extra args."""
    value_fn = extra.get("value_fn")
    if value_fn is None:
        raise NotImplementedError(
            "funcopt.lbfgs needs to re-evaluate the loss (torch's closure): call "
            "opt.step(params, state, value_and_grad_fn), or pass "
            "update(grads, state, params, value_fn=loss_fn) as for optax.lbfgs"
        )
    if params is None:
        raise ValueError(
            "funcopt.lbfgs's update() needs params: call "
            "update(grads, state, params, value_fn=loss_fn)"
        )
    params = check_params(params)
    value = extra.get("value")
    if value is None:
        value = value_fn(params)
    layout = _flat_layout(jax.tree.leaves(params))
    first = (value, _flat_grads(layout, params, updates))
    new_params, new_state, _ = _step(
        defaults,
        param_groups,
        params,
        state,
        jax.value_and_grad(value_fn),
        first=first,
    )
    deltas = jax.tree.map(
        lambda new, old: new - old if is_trainable(old) else jnp.zeros_like(old),
        new_params,
        params,
    )
    return deltas, new_state
