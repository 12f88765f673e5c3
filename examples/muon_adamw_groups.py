"""Mixing rules per parameter group: Muon for hidden matrices, AdamW for the rest.

Modern LLM recipes train 2-D hidden weights with Muon and everything else
(embeddings, output head, biases) with AdamW, under one learning-rate schedule.
In torch that is two optimizers and two schedulers kept in step by hand. Here
it is one ``optax.partition`` of two funcopt optimizers; funcopt's
hyperparameter helpers see the groups of both (AdamW's, then Muon's), so one
scheduler (linear warm-up, then cosine) drives all of them, inside one jitted
train step. Trains an MLP on scikit-learn's digits and writes a PNG.

    python examples/muon_adamw_groups.py [--steps 300] [--plot PATH]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import funcopt as fo


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    return jnp.asarray(x[order]), jnp.asarray(y[order])


def init_params(key, sizes=(64, 128, 128, 10)):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "w": jax.random.normal(sub, (n_in, n_out)) / jnp.sqrt(n_in),
            "b": jnp.zeros(n_out),
        }
    return params


def forward(params, x):
    *hidden, last = sorted(params)
    for name in hidden:
        x = jax.nn.gelu(x @ params[name]["w"] + params[name]["b"])
    return x @ params[last]["w"] + params[last]["b"]


def loss_fn(params, x, y):
    logp = jax.nn.log_softmax(forward(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def labels_for(params):
    """Muon for the 2-D hidden weights; AdamW for biases and the output layer."""
    last = sorted(params)[-1]
    return {
        name: {"w": "adamw" if name == last else "muon", "b": "adamw"}
        for name in params
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--plot", default="out/muon_adamw_groups.png")
    args = parser.parse_args(argv)

    x, y = load_data()
    params = init_params(jax.random.key(0))
    opt = optax.partition(
        {
            "muon": fo.muon(lr=0.02, weight_decay=0.01),
            "adamw": fo.adamw(lr=3e-3, weight_decay=0.01),
        },
        labels_for(params),
    )
    warmup = max(1, args.steps // 10)
    sched = fo.lr_scheduler.sequential_lr(
        [
            fo.lr_scheduler.linear_lr(start_factor=0.1, total_iters=warmup),
            fo.lr_scheduler.cosine_annealing_lr(T_max=args.steps - warmup),
        ],
        milestones=[warmup],
    )
    state = opt.init(params)
    state, sched_state = sched.init(state)

    @jax.jit
    def train_step(params, state, sched_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        state, sched_state = sched.step(state, sched_state)
        return params, state, sched_state, loss

    rng = np.random.default_rng(0)
    losses, lrs = [], []
    for step in range(args.steps):
        idx = rng.integers(0, len(x), size=args.batch_size)
        lrs.append([float(lr) for lr in fo.get_lr(state)])
        params, state, sched_state, loss = train_step(
            params, state, sched_state, x[idx], y[idx]
        )
        losses.append(float(loss))
        if step % 50 == 0 or step == args.steps - 1:
            lr_text = ", ".join(f"{lr:.2e}" for lr in lrs[-1])
            print(f"step {step:>4}  loss {losses[-1]:.4f}  lr (adamw, muon) {lr_text}")
    accuracy = float(jnp.mean(jnp.argmax(forward(params, x), -1) == y))
    print(f"train accuracy {accuracy:.3f}")
    plot(np.array(losses), np.array(lrs), args)
    return {"final_loss": losses[-1], "accuracy": accuracy}


def plot(losses, lrs, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    top.semilogy(losses)
    top.set_ylabel("training loss")
    top.set_title("Muon (hidden matrices) + AdamW (rest), one schedule")
    bottom.plot(lrs[:, 0], label="AdamW group lr")
    bottom.plot(lrs[:, 1], label="Muon group lr")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
