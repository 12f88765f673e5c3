"""The parity harness: the same gradients through torch and funcopt, side by side.

Torch's parameter list is the trainable leaves of ``jax.tree.leaves(params)``,
in that order (the interop convention). A ``None`` gradient leaf is torch's
``p.grad = None``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from funcopt._tree import is_trainable

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    """A bad argument: torch and funcopt must raise the same type and message."""

    name: str
    torch_cls: type
    factory: Callable[..., Any]
    kwargs: dict[str, Any]

    def param(self):
        import pytest

        return pytest.param(self, id=f"{self.name}-{self.kwargs}")


@dataclasses.dataclass(frozen=True)
class OptCase:
    """One row of the parity table: a torch optimizer and its funcopt twin.

    ``grid`` maps argument names to the values to try; every combination that
    ``valid`` accepts is a test. ``f32_rtol``/``f32_atol`` bound the float32
    drift, which comes from torch's float64 scalar math and CPU FMA kernels.
    """

    name: str
    torch_cls: type
    factory: Callable[..., Any]
    grid: dict[str, Sequence[Any]]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    valid: Callable[[dict[str, Any]], bool] = lambda kwargs: True
    f32_rtol: float = 1e-5
    f32_atol: float = 1e-6
    steps: int = 30
    # builds the (numpy) params tree from an rng and a dtype
    tree: Callable[[np.random.Generator, Any], Any] = None  # default: make_params

    def combos(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            kwargs = {**self.fixed, **dict(zip(keys, values))}
            if self.valid(kwargs):
                out.append(kwargs)
        return out

    def params(self):
        """``pytest.param`` per flag combination, with a readable id."""
        import pytest

        return [
            pytest.param(
                self,
                kw,
                id=f"{self.name}-"
                + "-".join(f"{k}={v}" for k, v in kw.items() if k not in self.fixed)
                or f"{self.name}-default",
            )
            for kw in self.combos()
        ]


def make_params_for(case: OptCase, rng, dtype):
    return (case.tree or make_params)(rng, dtype)


def make_params(rng: np.random.Generator, dtype) -> dict:
    """A nested tree with a scalar leaf, several shapes and a frozen int leaf."""
    return {
        "b": rng.normal(size=(3,)).astype(dtype),
        "frozen": np.arange(2, dtype=np.int32),
        "nested": {
            "k": rng.normal(size=(2, 2, 2)).astype(dtype),
            "s": np.asarray(rng.normal(), dtype=dtype),
        },
        "w": rng.normal(size=(4, 3)).astype(dtype),
    }


# Which trainable leaves (by position among trainable leaves) have no gradient
# at a step. A few fixed patterns keep jit recompiles bounded.
NONE_PATTERNS = [(), (1,), (0, 3)]


def make_grads(rng, params, steps: int, with_none: bool) -> list:
    """A gradient sequence; with ``with_none`` some steps have None leaves."""
    leaves, treedef = jax.tree.flatten(params)
    trainable = [i for i, p in enumerate(leaves) if is_trainable(p)]
    seq = []
    for t in range(steps):
        pattern = NONE_PATTERNS[(t * 7 + t // 3) % 3] if with_none else ()
        if with_none and t == 0:
            pattern = (0,)  # a leaf whose first gradient comes late
        flat = [None] * len(leaves)
        for j, i in enumerate(trainable):
            if j not in pattern:
                flat[i] = rng.normal(size=leaves[i].shape).astype(leaves[i].dtype)
        seq.append(treedef.unflatten(flat))
    return seq


def torch_params(params) -> list[torch.Tensor]:
    return [
        torch.tensor(np.array(p), requires_grad=True)
        for p in jax.tree.leaves(params)
        if is_trainable(p)
    ]


def run_torch(case: OptCase, kwargs, params, grads_seq):
    """Run torch; return (trainable leaves as numpy, per-leaf state dicts)."""
    tparams = torch_params(params)
    opt = case.torch_cls(tparams, **kwargs)
    treedef = jax.tree.structure(params)
    for grads in grads_seq:
        flat = treedef.flatten_up_to(grads)
        trainable_grads = [
            g for g, p in zip(flat, jax.tree.leaves(params)) if is_trainable(p)
        ]
        for tp, g in zip(tparams, trainable_grads):
            tp.grad = None if g is None else torch.tensor(np.array(g))
        opt.step()
    return [p.detach().numpy() for p in tparams], [opt.state[p] for p in tparams]


def run_funcopt(case: OptCase, kwargs, params, grads_seq, jit: bool):
    opt = case.factory(**kwargs)
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    step = jax.jit(opt.step) if jit else opt.step
    for grads in grads_seq:
        grads = jax.tree.map(jnp.asarray, grads)
        params, state = step(params, grads, state)
    return params, state


def trainable_leaves(tree) -> list:
    return [np.asarray(p) for p in jax.tree.leaves(tree) if is_trainable(p)]


def slot_leaves(state, params, name) -> list:
    """Slot ``name`` per trainable leaf (None where that leaf has none)."""
    leaves, treedef = jax.tree.flatten(params)
    flat = treedef.flatten_up_to(state.slots[name])
    return [s for s, p in zip(flat, leaves) if is_trainable(p)]


def step_counts(state, params) -> list[int]:
    leaves = jax.tree.leaves(params)
    return [int(s) for s, p in zip(np.asarray(state.step), leaves) if is_trainable(p)]


def assert_close(actual, expected, rtol, atol, what):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=what
    )
