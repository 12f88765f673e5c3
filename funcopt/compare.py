"""A parity harness: your torch training loop and its funcopt port, side by side.

::

    report = fo.compare.compare(
        torch_model, torch_loss_fn, torch_optimizer,   # torch_loss_fn(model, batch)
        loss_fn, opt, batches,                          # loss_fn(params, batch)
        torch_scheduler=..., scheduler=...,             # optional, stepped per step
        rtol=1e-6, atol=1e-8)
    print(report.summary()); report.plot("divergence.png")

Both sides start from the same weights: `params` defaults to the torch
model's `named_parameters()` as nested dicts (see
[`module_state_dict_to_params`][funcopt.torch_interop.module_state_dict_to_params];
torch layouts, e.g. `nn.Linear` weights `(out, in)`). Each step runs `zero_grad`,
`loss.backward()`, `optimizer.step()` (and `scheduler.step()`) in
torch and `value_and_grad` + `opt.step` (and `scheduler.step`) in
funcopt on the same batch (numpy arrays, converted for each side), then
records the loss difference and, over every parameter, the max absolute and
max relative difference. Step `k` (1-based) *diverges* when a parameter
or the loss fails `|ours - torch| <= atol + rtol * |torch|`;
`report.first_divergence` is the first such step (None if none).

`opt` may be any optax transform: a funcopt optimizer steps with its
`step`, others with `update` + `optax.apply_updates`.

`python -m funcopt.compare` runs a small built-in example (a torch MLP with
RMSprop against `fo.rmsprop` and against `optax.rmsprop`) and writes a PNG
plot of the divergence (needs matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass
class StepDiff:
    """The differences after one step (`step` counts from 1)."""

    step: int
    loss_torch: float
    loss_funcopt: float
    loss_abs: float
    loss_rel: float
    param_abs: float  # max over all parameters and elements
    param_rel: float
    worst_param: str  # the parameter with the largest relative difference
    diverged: bool


@dataclasses.dataclass
class Report:
    steps: list[StepDiff]
    rtol: float
    atol: float

    @property
    def first_divergence(self) -> int | None:
        """The first step (1-based) beyond the tolerance, or None."""
        for s in self.steps:
            if s.diverged:
                return s.step
        return None

    def summary(self) -> str:
        lines = [
            f"{'step':>5} {'loss (torch)':>14} {'loss abs':>10} {'param abs':>10} "
            f"{'param rel':>10}  worst"
        ]
        for s in self.steps:
            mark = " <- diverged" if s.step == self.first_divergence else ""
            lines.append(
                f"{s.step:>5} {s.loss_torch:>14.6g} {s.loss_abs:>10.2e} "
                f"{s.param_abs:>10.2e} {s.param_rel:>10.2e}  {s.worst_param}{mark}"
            )
        first = self.first_divergence
        lines.append(
            f"first divergence beyond rtol={self.rtol:g}, atol={self.atol:g}: "
            + ("none" if first is None else f"step {first}")
        )
        return "\n".join(lines)

    def plot(self, path: str, label: str | None = None, ax: Any = None) -> Any:
        """A PNG of the max abs/rel parameter difference per step (log scale)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(7, 4))
        steps = [s.step for s in self.steps]
        tiny = np.finfo(np.float64).tiny
        prefix = f"{label}: " if label else ""
        ax.semilogy(steps, [max(s.param_abs, tiny) for s in self.steps],
                    label=prefix + "max |param diff|")  # fmt: skip
        ax.semilogy(steps, [max(s.param_rel, tiny) for s in self.steps], "--",
                    label=prefix + "max rel param diff")  # fmt: skip
        if self.first_divergence is not None:
            ax.axvline(self.first_divergence, color="red", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("difference to torch")
        ax.legend(fontsize=8)
        if own:
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
        return ax


def _torch_batch(batch: Any) -> Any:
    import torch

    return jax.tree.map(lambda x: torch.from_numpy(np.array(x)), batch)


def _diff(ours: np.ndarray, theirs: np.ndarray, rtol: float, atol: float):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    err = np.abs(ours - theirs)
    rel = err / np.maximum(np.abs(theirs), np.finfo(np.float64).tiny)
    bad = bool(np.any(~(err <= atol + rtol * np.abs(theirs))))
    return float(err.max(initial=0.0)), float(rel.max(initial=0.0)), bad


def compare(
    torch_model: Any,
    torch_loss_fn: Callable[[Any, Any], Any],
    torch_optimizer: Any,
    loss_fn: Callable[[Any, Any], jax.Array],
    opt: optax.GradientTransformation,
    batches: Iterable[Any],
    *,
    params: Any = None,
    torch_scheduler: Any = None,
    scheduler: Any = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    jit: bool = True,
) -> Report:
    """Train both on `batches`; return a `Report` (module doc).

    `torch_loss_fn(model, batch)` returns a scalar tensor,
    `loss_fn(params, batch)` a scalar array; `batch` is any pytree of
    numpy arrays. `params` (default: the model's parameters, by name) must
    have the model's parameters as leaves with the same dotted names.
    """
    from .torch_interop import module_state_dict_to_params, param_names

    named = dict(torch_model.named_parameters())
    if params is None:
        params = module_state_dict_to_params(named)
    names = param_names(params)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"params has leaves the torch model lacks: {missing}")
    state = opt.init(params)
    sched_state = None
    if scheduler is not None:
        state, sched_state = scheduler.init(state)

    def fo_step(params, state, sched_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        if hasattr(opt, "step"):
            params, state = opt.step(params, grads, state)
        else:
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        if scheduler is not None:
            state, sched_state = scheduler.step(state, sched_state)
        return params, state, sched_state, loss

    step = jax.jit(fo_step) if jit else fo_step
    leaves_of = jax.tree_util.tree_flatten_with_path

    records = []
    for k, batch in enumerate(batches, start=1):
        torch_optimizer.zero_grad()
        tloss = torch_loss_fn(torch_model, _torch_batch(batch))
        tloss.backward()
        torch_optimizer.step()
        if torch_scheduler is not None:
            torch_scheduler.step()
        params, state, sched_state, loss = step(
            params, state, sched_state, jax.tree.map(jnp.asarray, batch)
        )
        tl, ol = float(tloss.detach()), float(loss)
        l_abs, l_rel, l_bad = _diff(np.asarray(ol), np.asarray(tl), rtol, atol)
        p_abs = p_rel = 0.0
        worst, bad = names[0] if names else "", l_bad
        ours = {n: leaf for n, leaf in zip(names, _trainable_leaves(params, leaves_of))}
        for n in names:
            a, r, b = _diff(ours[n], named[n].detach().cpu().numpy(), rtol, atol)
            bad |= b
            p_abs = max(p_abs, a)
            if r >= p_rel:
                p_rel, worst = r, n
        records.append(StepDiff(k, tl, ol, l_abs, l_rel, p_abs, p_rel, worst, bad))
    return Report(records, rtol, atol)


def _trainable_leaves(params, leaves_of):
    from ._tree import is_trainable

    return [np.asarray(x) for _, x in leaves_of(params)[0] if is_trainable(x)]


# --------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------


def switch_at(step: int, first: Any, second: Any) -> optax.GradientTransformation:
    """`first`'s updates for steps `1..step-1`, `second`'s from `step`
    on (both see every gradient): an injected divergence starting at `step`.
    """

    def init(params):
        return (first.init(params), second.init(params), jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        a, b, count = state
        ua, a = _updates(first, grads, a, params)
        ub, b = _updates(second, grads, b, params)
        use_second = count + 1 >= step
        updates = jax.tree.map(lambda x, y: jnp.where(use_second, y, x), ua, ub)
        return updates, (a, b, count + 1)

    return optax.GradientTransformation(init, update)


def _updates(opt, grads, state, params):
    if hasattr(opt, "step"):  # funcopt: exact new params, as an update
        new, state = opt.step(params, grads, state)
        return jax.tree.map(lambda n, p: n - p, new, params), state
    return opt.update(grads, state, params)


def demo_problem(seed: int = 0, steps: int = 30):
    """A small torch MLP (float64), its loss in JAX and torch, and batches."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        x = rng.normal(size=(32, 4))
        batches.append((x, np.sin(x.sum(axis=1, keepdims=True))))

    def torch_loss(model, batch):
        x, y = batch
        return torch.mean((model(x) - y) ** 2)

    def loss(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["0"]["weight"].T + params["0"]["bias"])
        out = h @ params["2"]["weight"].T + params["2"]["bias"]
        return jnp.mean((out - y) ** 2)

    return model, torch_loss, loss, batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m funcopt.compare",
        description="torch RMSprop vs fo.rmsprop and vs optax.rmsprop on a small MLP",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rtol", type=float, default=1e-9)
    parser.add_argument("--atol", type=float, default=1e-12)
    parser.add_argument("--out", default="divergence.png")
    args = parser.parse_args(argv)

    with jax.enable_x64(True):
        return _demo(args)


def _demo(args) -> int:
    import torch

    import funcopt as fo

    candidates = {
        "fo.rmsprop": fo.rmsprop(lr=args.lr),
        "optax.rmsprop": optax.rmsprop(args.lr, decay=0.99, eps=1e-8),
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(candidates), figsize=(12, 4), sharey=True)
    for ax, (label, opt) in zip(axes, candidates.items()):
        model, torch_loss, loss, batches = demo_problem(steps=args.steps)
        topt = torch.optim.RMSprop(model.parameters(), lr=args.lr)
        report = compare(model, torch_loss, topt, loss, opt, batches,
                         rtol=args.rtol, atol=args.atol)  # fmt: skip
        print(f"== {label}")
        print(report.summary())
        report.plot(args.out, label=label, ax=ax)
        ax.set_title(f"{label}: first divergence {report.first_divergence}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
