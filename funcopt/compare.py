"""A parity harness: your torch training loop and its funcopt port, side by side.

```python
report = fo.compare.compare(
    torch_model, torch_loss_fn, torch_optimizer,  # torch_loss_fn(model, batch)
    loss_fn, opt, batches,                         # loss_fn(params, batch)
    rtol=1e-6, atol=1e-8)
print(report.summary()); report.plot("divergence.png")
```

Both sides start from the same weights: `params` defaults to the torch
model's `named_parameters()` as nested dicts (see
[`module_state_dict_to_params`][funcopt.torch_interop.module_state_dict_to_params];
torch layouts, e.g. `nn.Linear` weights `(out, in)`). `batches` is any
iterable of pytrees of numpy arrays, converted for each side. `opt` may be any
optax transform: a funcopt optimizer steps with its `step`, others with
`update` + `optax.apply_updates`.

**The loop.** Optimizer step `k` (1-based) does, on each side:

1. with `lr_fn`, every group's learning rate becomes `lr_fn(k - 1)` (torch:
   `g["lr"] = ...` for each group; funcopt: [`fo.set_lr`][funcopt.set_lr]);
2. gradients: torch runs `zero_grad()`, then for each micro-batch
   `(torch_loss_fn(model, mb) / accumulate).backward()`; funcopt sums the
   gradients of `loss_fn(params, mb) / accumulate` in micro-batch order;
3. clipping: `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm,
   norm_type)` or `clip_grad_value_` against
   [`fo.clip_grad_norm`][funcopt.clip_grad_norm] or
   [`fo.clip_grad_value`][funcopt.clip_grad_value];
4. `optimizer.step()` against `opt.step` (an optax transform:
   `update` + `optax.apply_updates`);
5. when `k % scheduler_every == 0` (or `scheduler_every(k)`, a callback),
   `scheduler.step()` on each side.

Options (keywords of [`compare`][funcopt.compare.compare]):

- `accumulate=k`: gradient accumulation. Each optimizer step takes the next
  `k` batches of `batches` as micro-batches and, as training scripts do
  (nanoGPT's `loss = loss / gradient_accumulation_steps`), divides each
  micro-batch loss by `k` before its backward pass; the loss functions
  return the plain micro-batch loss, and the report's loss is the mean of
  the `k` of them. The number of batches must be a multiple of `k`.
  `accumulate=1` (the default) divides by nothing.
- `clip_grad_norm=max_norm` (with `norm_type=2.0`) or `clip_grad_value=v`:
  clip the accumulated gradients before the step, with torch's formula; the
  report compares the total norms `clip_grad_norm_` returns.
- `torch_scheduler=` / `scheduler=`: a torch scheduler and its funcopt
  counterpart (e.g. [`fo.lr_scheduler.step_lr`][funcopt.lr_scheduler.step_lr]),
  stepped after every `scheduler_every` optimizer steps: `1` (the default)
  per step, the number of steps in an epoch per epoch; or a callback
  `scheduler_every(k) -> bool`, called after step `k` (epochs of different
  lengths, a scheduler that starts late). Either may be given
  alone (a scheduler on one side only is a divergence to find).
- `lr_fn=get_lr`: a learning rate callback, as nanoGPT's `get_lr(iter_num)`:
  before step `k` both sides get `lr_fn(k - 1)`, a number for every group or a
  list with one per group (in [`fo.get_lr`][funcopt.get_lr] order, which is
  torch's `param_groups` order when the groups are built in the same order).
- `buffers=True`: the model has buffers (BatchNorm's `running_mean`,
  `running_var`, `num_batches_tracked`, ...) that torch's forward updates
  in train mode. funcopt keeps them outside the parameters, so the loss
  function is then `loss_fn(params, buffers, batch) -> (loss, new_buffers)`
  (with `jax.value_and_grad(..., has_aux=True)` inside the harness); the
  buffers start as the model's `named_buffers()` as nested dicts (or pass
  the pytree, with the same dotted names), are threaded through every
  micro-batch and are compared with the model's after every step.

**The report.** For every optimizer step, a
[`StepDiff`][funcopt.compare.StepDiff]: the loss, the accumulated (clipped)
gradients the optimizer consumed (torch's `p.grad`), the parameters, the
buffers, each group's learning rate as the step used it, and the total
gradient norm when clipping by norm, each as the max absolute and max relative
difference over all elements. Step `k` *diverges* when any of them fails
`|ours - torch| <= atol + rtol * |torch|` (learning rates and norms: the same
test); `StepDiff.failed` names which, and `report.first_divergence` is the
first such step (None if none). Gradients that agree while parameters do not
point at the optimizer; gradients that do not, at the loss function (or the
buffers it was given).

`python -m funcopt.compare` runs a small built-in example (a torch MLP with
RMSprop against `fo.rmsprop` and against `optax.rmsprop`) and writes a PNG
plot of the divergence (needs matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass
class StepDiff:
    """The differences after one optimizer step (`step` counts from 1).

    `*_abs` / `*_rel` are the max absolute / relative difference over all
    elements (0 where there is nothing to compare); `worst_*` names the
    parameter (buffer) with the largest relative difference. `lr_*` are the
    groups' learning rates the step used (empty when the funcopt state holds
    no funcopt optimizer state), `grad_norm_*` the total norms before clipping
    (None without `clip_grad_norm`). `failed` lists the checks beyond the
    tolerance: `"loss"`, `"grads"`, `"params"`, `"buffers"`, `"lr"`,
    `"grad_norm"`.
    """

    step: int
    loss_torch: float
    loss_funcopt: float
    loss_abs: float
    loss_rel: float
    param_abs: float  # max over all parameters and elements
    param_rel: float
    worst_param: str  # the parameter with the largest relative difference
    diverged: bool
    grad_abs: float = 0.0
    grad_rel: float = 0.0
    worst_grad: str = ""
    buffer_abs: float = 0.0
    buffer_rel: float = 0.0
    worst_buffer: str = ""
    lr_torch: tuple[float, ...] = ()
    lr_funcopt: tuple[float, ...] = ()
    grad_norm_torch: float | None = None
    grad_norm_funcopt: float | None = None
    failed: tuple[str, ...] = ()


@dataclasses.dataclass
class Report:
    """The [`StepDiff`][funcopt.compare.StepDiff] of every step and the tolerances."""

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

    @property
    def has_buffers(self) -> bool:
        """Whether buffers were compared."""
        return any(s.worst_buffer for s in self.steps)

    def summary(self) -> str:
        """A table: one row per step, the first divergence marked with its checks."""
        buffers = self.has_buffers
        head = (
            f"{'step':>5} {'loss (torch)':>14} {'loss abs':>10} {'grad rel':>10} "
            f"{'param abs':>10} {'param rel':>10}"
        )
        if buffers:
            head += f" {'buffer rel':>10}"
        lines = [head + "  worst param"]
        first = self.first_divergence
        for s in self.steps:
            row = (
                f"{s.step:>5} {s.loss_torch:>14.6g} {s.loss_abs:>10.2e} "
                f"{s.grad_rel:>10.2e} {s.param_abs:>10.2e} {s.param_rel:>10.2e}"
            )
            if buffers:
                row += f" {s.buffer_rel:>10.2e}"
            row += f"  {s.worst_param}"
            if s.step == first:
                row += " <- diverged: " + ", ".join(_failed_names(s))
            lines.append(row)
        lines.append(
            f"first divergence beyond rtol={self.rtol:g}, atol={self.atol:g}: "
            + ("none" if first is None else f"step {first}")
        )
        return "\n".join(lines)

    def plot(self, path: str, label: str | None = None, ax: Any = None) -> Any:
        """A PNG of the max abs/rel parameter (and buffer) difference per step
        (log scale)."""
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
        if self.has_buffers:
            ax.semilogy(steps, [max(s.buffer_rel, tiny) for s in self.steps], ":",
                        label=prefix + "max rel buffer diff")  # fmt: skip
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


def _failed_names(s: StepDiff) -> list[str]:
    """The failed checks, each with its worst array where it has one."""
    worst = {"grads": s.worst_grad, "params": s.worst_param, "buffers": s.worst_buffer}
    return [f"{c} ({worst[c]})" if worst.get(c) else c for c in s.failed]


def _torch_batch(batch: Any) -> Any:
    import torch

    return jax.tree.map(lambda x: torch.from_numpy(np.array(x)), batch)


def _diff(ours: Any, theirs: Any, rtol: float, atol: float):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        return np.inf, np.inf, True
    err = np.abs(ours - theirs)
    rel = err / np.maximum(np.abs(theirs), np.finfo(np.float64).tiny)
    bad = bool(np.any(~(err <= atol + rtol * np.abs(theirs))))
    return float(err.max(initial=0.0)), float(rel.max(initial=0.0)), bad


def _diff_named(ours: dict, theirs: dict, rtol: float, atol: float):
    """(max abs, max rel, worst name, any bad) over the names of `ours`."""
    max_abs = max_rel = 0.0
    worst, bad = (next(iter(ours)) if ours else ""), False
    for name, value in ours.items():
        a, r, b = _diff(value, theirs[name], rtol, atol)
        bad |= b
        max_abs = max(max_abs, a)
        if r >= max_rel:
            max_rel, worst = r, name
    return max_abs, max_rel, worst, bad


def _named_leaves(tree: Any, trainable_only: bool) -> dict[str, np.ndarray]:
    from ._tree import is_trainable
    from .torch_interop import _key_name

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if trainable_only and not is_trainable(leaf):
            continue
        out[".".join(_key_name(k) for k in path)] = np.asarray(leaf)
    return out


def _funcopt_lrs(state: Any) -> tuple[float, ...]:
    from ._hparams import get_lr

    try:
        return tuple(float(x) for x in get_lr(state))
    except (ValueError, KeyError):  # no funcopt state, or no lr
        return ()


def _micro_batches(batches: Iterable[Any], k: int):
    if k < 1:
        raise ValueError(f"accumulate must be a positive integer, got {k}")
    if hasattr(batches, "__len__") and len(batches) % k:  # type: ignore[arg-type]
        raise ValueError(
            f"accumulate={k}: {len(batches)} batches are not a whole number "  # type: ignore[arg-type]
            "of optimizer steps"
        )
    it = iter(batches)
    while True:
        group = list(itertools.islice(it, k))
        if not group:
            return
        if len(group) < k:
            raise ValueError(
                f"accumulate={k}: the batches ran out after {len(group)} "
                "micro-batches of the last optimizer step"
            )
        yield group


def compare(
    torch_model: Any,
    torch_loss_fn: Callable[[Any, Any], Any],
    torch_optimizer: Any,
    loss_fn: Callable[..., Any],
    opt: optax.GradientTransformation,
    batches: Iterable[Any],
    *,
    params: Any = None,
    buffers: Any = False,
    torch_scheduler: Any = None,
    scheduler: Any = None,
    scheduler_every: int | Callable[[int], bool] = 1,
    lr_fn: Callable[[int], float | Sequence[float]] | None = None,
    accumulate: int = 1,
    clip_grad_norm: float | None = None,
    norm_type: float = 2.0,
    clip_grad_value: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    jit: bool = True,
) -> Report:
    """Train both on `batches`; return a [`Report`][funcopt.compare.Report]
    (the module doc describes the loop and the options).

    Args:
      torch_model: the `torch.nn.Module`; its parameters (and buffers) are
        trained in place and compared after every step.
      torch_loss_fn: `torch_loss_fn(model, batch)`, a scalar tensor.
      torch_optimizer: built on `torch_model`'s parameters.
      loss_fn: `loss_fn(params, batch)`, a scalar array; with `buffers`,
        `loss_fn(params, buffers, batch) -> (loss, new_buffers)`.
      opt: a funcopt optimizer or any optax transform.
      batches: pytrees of numpy arrays, one per micro-batch.
      params: the funcopt parameters (default: the model's
        `named_parameters()` as nested dicts); its leaves must be model
        parameters with the same dotted names.
      buffers: `False` (no buffers), `True` (the model's `named_buffers()`
        as nested dicts) or the initial buffers pytree (dotted names of the
        model's buffers).
      torch_scheduler: stepped every `scheduler_every` optimizer steps.
      scheduler: the funcopt scheduler, stepped likewise.
      scheduler_every: optimizer steps per scheduler step (1: per step;
        the steps of an epoch: per epoch), or `scheduler_every(k) -> bool`,
        whether to step the schedulers after step `k`.
      lr_fn: `lr_fn(iteration)` (0-based), the learning rate(s) to set on
        both sides before each step.
      accumulate: micro-batches per optimizer step; each micro-batch loss is
        divided by it before the backward pass.
      clip_grad_norm: `max_norm` of `torch.nn.utils.clip_grad_norm_`.
      norm_type: its `norm_type`.
      clip_grad_value: `clip_value` of `torch.nn.utils.clip_grad_value_`.
      rtol: relative tolerance of every check.
      atol: absolute tolerance of every check.
      jit: compile the funcopt step.
    """
    import torch

    from . import clip as _clip
    from ._hparams import set_lr
    from .torch_interop import module_state_dict_to_params

    if clip_grad_norm is not None and clip_grad_value is not None:
        raise ValueError("give clip_grad_norm or clip_grad_value, not both")
    if callable(scheduler_every):
        sched_now = scheduler_every
    elif int(scheduler_every) < 1:
        raise ValueError(f"scheduler_every must be positive, got {scheduler_every}")
    else:
        every = int(scheduler_every)

        def sched_now(k: int) -> bool:
            return k % every == 0

    named = dict(torch_model.named_parameters())
    if params is None:
        params = module_state_dict_to_params(named)
    names = list(_named_leaves(params, trainable_only=True))
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"params has leaves the torch model lacks: {missing}")
    use_buffers = buffers is not False and buffers is not None
    named_buffers = dict(torch_model.named_buffers())
    if buffers is True:
        buffers = module_state_dict_to_params(named_buffers)
    elif not use_buffers:
        buffers = None
    missing = [n for n in _named_leaves(buffers, False) if n not in named_buffers]
    if missing:
        raise ValueError(f"buffers has leaves the torch model lacks: {missing}")

    state = opt.init(params)
    sched_state = None
    if scheduler is not None:
        state, sched_state = scheduler.init(state)
    scale = 1.0 / accumulate if accumulate > 1 else None

    def micro_loss(params, buffers, batch):
        if use_buffers:
            loss, new_buffers = loss_fn(params, buffers, batch)
        else:
            loss, new_buffers = loss_fn(params, batch), buffers
        scaled = loss if scale is None else loss / accumulate
        return scaled, (loss, new_buffers)

    def fo_step(params, state, buffers, micro_batches):
        grads, losses = None, []
        for batch in micro_batches:
            (_, (loss, buffers)), g = jax.value_and_grad(micro_loss, has_aux=True)(
                params, buffers, batch
            )
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            losses.append(loss)
        total = None
        if clip_grad_norm is not None:
            grads, total = _clip.clip_grad_norm(grads, clip_grad_norm, norm_type)
        elif clip_grad_value is not None:
            grads = _clip.clip_grad_value(grads, clip_grad_value)
        if hasattr(opt, "step"):
            params, state = opt.step(params, grads, state)
        else:
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state, buffers, grads, losses, total

    step_fn = jax.jit(fo_step) if jit else fo_step
    sched_step = None
    if scheduler is not None:
        sched_step = jax.jit(scheduler.step) if jit else scheduler.step

    records = []
    for k, group in enumerate(_micro_batches(batches, accumulate), start=1):
        # torch
        if lr_fn is not None:
            lr = lr_fn(k - 1)
            lrs = list(lr) if isinstance(lr, list | tuple) else None
            for i, g in enumerate(torch_optimizer.param_groups):
                g["lr"] = lrs[i] if lrs is not None else lr
            state = set_lr(state, lrs if lrs is not None else lr)
        torch_optimizer.zero_grad()
        tlosses = []
        for batch in group:
            tloss = torch_loss_fn(torch_model, _torch_batch(batch))
            tlosses.append(float(tloss.detach()))
            (tloss if scale is None else tloss / accumulate).backward()
        tnorm = None
        if clip_grad_norm is not None:
            tnorm = float(
                torch.nn.utils.clip_grad_norm_(
                    torch_model.parameters(), clip_grad_norm, norm_type
                )
            )
        elif clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(torch_model.parameters(), clip_grad_value)
        lr_torch = tuple(float(g["lr"]) for g in torch_optimizer.param_groups)
        torch_optimizer.step()
        step_schedulers = bool(sched_now(k))
        if torch_scheduler is not None and step_schedulers:
            torch_scheduler.step()
        # funcopt
        lr_ours = _funcopt_lrs(state)
        params, state, buffers, grads, losses, norm = step_fn(
            params, state, buffers,
            tuple(jax.tree.map(jnp.asarray, b) for b in group),
        )  # fmt: skip
        if sched_step is not None and step_schedulers:
            state, sched_state = sched_step(state, sched_state)
        records.append(
            _step_diff(
                k,
                tlosses,
                [float(x) for x in losses],
                torch_model,
                params,
                buffers,
                grads,
                named,
                named_buffers,
                lr_torch,
                lr_ours,
                tnorm,
                None if norm is None else float(norm),
                rtol,
                atol,
            )  # fmt: skip
        )
    return Report(records, rtol, atol)


def _step_diff(
    k, tlosses, olosses, torch_model, params, buffers, grads, named,
    named_buffers, lr_torch, lr_ours, tnorm, onorm, rtol, atol,
) -> StepDiff:  # fmt: skip
    failed = []
    tl, ol = float(np.mean(tlosses)), float(np.mean(olosses))
    l_abs, l_rel, bad = _diff(ol, tl, rtol, atol)
    if bad:
        failed.append("loss")

    ours = _named_leaves(grads, trainable_only=True)
    theirs = {}
    for n in ours:
        g = named[n].grad
        theirs[n] = np.zeros(ours[n].shape) if g is None else g.detach().cpu().numpy()
    g_abs, g_rel, worst_grad, bad = _diff_named(ours, theirs, rtol, atol)
    if bad:
        failed.append("grads")

    ours = _named_leaves(params, trainable_only=True)
    theirs = {n: named[n].detach().cpu().numpy() for n in ours}
    p_abs, p_rel, worst_param, bad = _diff_named(ours, theirs, rtol, atol)
    if bad:
        failed.append("params")

    ours = _named_leaves(buffers, trainable_only=False)
    theirs = {n: named_buffers[n].detach().cpu().numpy() for n in ours}
    b_abs, b_rel, worst_buffer, bad = _diff_named(ours, theirs, rtol, atol)
    if bad:
        failed.append("buffers")

    if lr_ours and (
        len(lr_ours) != len(lr_torch) or _diff(lr_ours, lr_torch, rtol, atol)[2]
    ):
        failed.append("lr")
    if tnorm is not None and _diff(onorm, tnorm, rtol, atol)[2]:
        failed.append("grad_norm")
    return StepDiff(
        k, tl, ol, l_abs, l_rel, p_abs, p_rel, worst_param, bool(failed),
        g_abs, g_rel, worst_grad, b_abs, b_rel, worst_buffer, lr_torch, lr_ours,
        tnorm, onorm, tuple(failed),
    )  # fmt: skip


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
