"""A whole torch training loop, side by side: MLP, AdamW with two param groups
(no weight decay on biases), clip_grad_norm_ every step, linear warm-up then
cosine through SequentialLR; 200 steps in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import funcopt as fo

STEPS = 200
WARMUP = 20
SIZES = [(3, 16), (16, 16), (16, 1)]


def init_params(rng):
    return {
        f"l{i}": {
            "b": 0.1 * rng.normal(size=(n_out,)),
            "w": rng.normal(size=(n_in, n_out)) / np.sqrt(n_in),
        }
        for i, (n_in, n_out) in enumerate(SIZES)
    }


def forward(p, x, tanh):
    n_layers = len(SIZES)
    for i in range(n_layers):
        x = x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
        if i < n_layers - 1:
            x = tanh(x)
    return x


def test_mlp_adamw_groups_clip_warmup_cosine(x64):
    rng = np.random.default_rng(0)
    params = init_params(rng)
    xs = rng.normal(size=(STEPS, 32, 3))
    ys = np.sin(xs.sum(-1, keepdims=True)) + 0.1 * rng.normal(size=(STEPS, 32, 1))

    # ---- torch -----------------------------------------------------------
    tp = jax.tree.map(lambda a: torch.tensor(a, requires_grad=True), params)
    leaves = jax.tree.leaves(tp)  # funcopt's order: l0.b, l0.w, l1.b, ...
    weights = [t for t in leaves if t.ndim == 2]
    biases = [t for t in leaves if t.ndim == 1]
    topt = torch.optim.AdamW(
        [{"params": weights}, {"params": biases, "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.05,
    )
    warm = torch.optim.lr_scheduler.LinearLR(topt, start_factor=0.1, total_iters=WARMUP)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=STEPS - WARMUP)
    tsched = torch.optim.lr_scheduler.SequentialLR(topt, [warm, cos], [WARMUP])
    t_losses, t_norms, t_lrs = [], [], []
    for x, y in zip(xs, ys):
        topt.zero_grad()
        loss = torch.mean(
            (forward(tp, torch.tensor(x), torch.tanh) - torch.tensor(y)) ** 2
        )
        loss.backward()
        t_norms.append(float(torch.nn.utils.clip_grad_norm_(leaves, 1.0)))
        topt.step()
        tsched.step()
        t_losses.append(loss.item())
        t_lrs.append([g["lr"] for g in topt.param_groups])

    # ---- funcopt ---------------------------------------------------------
    label_fn = lambda p: jax.tree.map(  # noqa: E731
        lambda a: "no_decay" if a.ndim == 1 else "default", p
    )
    opt = fo.adamw(
        lr=1e-2,
        weight_decay=0.05,
        param_groups=fo.param_groups(label_fn, {"no_decay": {"weight_decay": 0.0}}),
    )
    sched = fo.lr_scheduler.sequential_lr(
        [
            fo.lr_scheduler.linear_lr(start_factor=0.1, total_iters=WARMUP),
            fo.lr_scheduler.cosine_annealing_lr(T_max=STEPS - WARMUP),
        ],
        milestones=[WARMUP],
    )
    ts = fo.TrainState.create(jax.tree.map(jnp.asarray, params), opt)
    ts, sched_state = sched.init(ts)

    def loss_fn(p, x, y):
        return jnp.mean((forward(p, x, jnp.tanh) - y) ** 2)

    @jax.jit
    def train_step(ts, sched_state, x, y):
        ts = ts.zero_grad()
        ts, loss = ts.backward(loss_fn, x, y)
        ts, total = ts.clip_grad_norm(1.0)
        ts = ts.step()
        ts, sched_state = sched.step(ts, sched_state)
        return ts, sched_state, loss, total

    losses, norms, lrs = [], [], []
    for x, y in zip(xs, ys):
        ts, sched_state, loss, total = train_step(
            ts, sched_state, jnp.asarray(x), jnp.asarray(y)
        )
        losses.append(float(loss))
        norms.append(float(total))
        lrs.append([float(v) for v in fo.get_lr(ts)])

    np.testing.assert_allclose(lrs, t_lrs, rtol=1e-12)
    np.testing.assert_allclose(norms, t_norms, rtol=1e-9)
    np.testing.assert_allclose(losses, t_losses, rtol=1e-9)
    assert losses[-1] < 0.5 * losses[0]  # it trains
    for a, e in zip(jax.tree.leaves(ts.params), leaves):
        np.testing.assert_allclose(a, e.detach().numpy(), rtol=1e-9, atol=1e-11)
