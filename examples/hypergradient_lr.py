"""Meta-learning a learning rate by differentiating through ``opt.step``.

torch.optim's ``step`` mutates tensors in place under ``no_grad``, so it cannot
be differentiated. funcopt's ``step`` is a pure function and its learning rate
is an array in the state, so ``jax.grad`` flows through a whole unrolled
training run: the hypergradient d(validation loss after K steps)/d(log lr).
This script tunes Adam's learning rate on scikit-learn's digits (softmax
regression) with that hypergradient and writes a PNG of the outer loop.

    python examples/hypergradient_lr.py [--outer-steps 25] [--plot PATH]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import funcopt as fo


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return (jnp.asarray(x[:1200]), jnp.asarray(y[:1200])), (
        jnp.asarray(x[1200:]),
        jnp.asarray(y[1200:]),
    )


def loss_fn(params, x, y):
    logits = x @ params["w"] + params["b"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def unrolled_validation_loss(log_lr, params, train, val, inner_steps, batch_size):
    """Validation loss after ``inner_steps`` Adam steps at lr = exp(log_lr)."""
    opt = fo.adam()
    state = fo.set_lr(opt.init(params), jnp.exp(log_lr))
    x, y = train
    n_batches = len(x) // batch_size
    xb = x[: n_batches * batch_size].reshape(n_batches, batch_size, -1)
    yb = y[: n_batches * batch_size].reshape(n_batches, batch_size)
    idx = jnp.arange(inner_steps) % n_batches

    def inner(carry, i):
        p, s = carry
        grads = jax.grad(loss_fn)(p, xb[i], yb[i])
        return opt.step(p, grads, s), None

    (params, _), _ = jax.lax.scan(inner, (params, state), idx)
    return loss_fn(params, *val)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=25)
    parser.add_argument("--inner-steps", type=int, default=30)
    parser.add_argument("--initial-lr", type=float, default=1e-4)
    parser.add_argument("--meta-lr", type=float, default=5.0)
    parser.add_argument("--plot", default="out/hypergradient_lr.png")
    args = parser.parse_args(argv)

    train, val = load_data()
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    value_and_hypergrad = jax.jit(
        jax.value_and_grad(unrolled_validation_loss),
        static_argnums=(4, 5),
    )
    log_lr = jnp.log(jnp.float32(args.initial_lr))
    history = []
    for k in range(args.outer_steps):
        val_loss, hypergrad = value_and_hypergrad(
            log_lr, params, train, val, args.inner_steps, 100
        )
        history.append((float(jnp.exp(log_lr)), float(val_loss)))
        print(
            f"outer {k:>3}  lr {float(jnp.exp(log_lr)):.3e}  "
            f"val loss after {args.inner_steps} steps {float(val_loss):.4f}  "
            f"d loss / d log lr {float(hypergrad):+.3e}"
        )
        log_lr = log_lr - args.meta_lr * hypergrad  # gradient descent on log lr
    plot(np.array(history), args)
    return {"first": history[0], "last": history[-1]}


def plot(history: np.ndarray, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    top.semilogy(history[:, 0], marker="o")
    top.set_ylabel("learning rate")
    top.set_title("Adam's lr tuned by hypergradient through funcopt's step")
    bottom.plot(history[:, 1], marker="o", color="C1")
    bottom.set_ylabel(f"val loss after {args.inner_steps} steps")
    bottom.set_xlabel("outer step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
