"""Train one MLP on scikit-learn's bundled digits with torch.optim and with funcopt.

Both runs start from the same weights, see the same minibatches in the same
order and use the same optimizer settings. The script prints both loss columns
per epoch with their largest difference, and writes a PNG of both loss curves.

    python examples/digits_side_by_side.py                 # float32, Adam
    python examples/digits_side_by_side.py --float64       # agree to ~1e-9
    python examples/digits_side_by_side.py --optimizer sgd
"""

from __future__ import annotations

import argparse
import os

import numpy as np

OPTIMIZERS = {
    # name: (torch class name, funcopt factory name, kwargs shared by both)
    "adam": ("Adam", "adam", dict(lr=1e-2)),
    "adamw": ("AdamW", "adamw", dict(lr=1e-2, weight_decay=1e-2)),
    "sgd": ("SGD", "sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
}


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_load_digits

    x, y = sk_load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def init_params(seed: int, sizes=(64, 32, 10)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1 / np.sqrt(n_in)
        params[f"w{i}"] = rng.uniform(-bound, bound, size=(n_in, n_out))
        params[f"b{i}"] = rng.uniform(-bound, bound, size=(n_out,))
    return params


def batches(n: int, batch_size: int, epochs: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        yield [order[i : i + batch_size] for i in range(0, n, batch_size)]


def torch_trainer(params, x, y, optimizer, dtype):
    """The torch loop; returns ``run_epoch(batches) -> losses``."""
    import torch

    cls_name, _, kwargs = OPTIMIZERS[optimizer]
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    weights = {
        k: torch.tensor(v, dtype=torch_dtype, requires_grad=True)
        for k, v in sorted(params.items())  # jax.tree.leaves order: sorted keys
    }
    opt = getattr(torch.optim, cls_name)(list(weights.values()), **kwargs)
    x_t, y_t = torch.tensor(x, dtype=torch_dtype), torch.tensor(y)

    def loss_fn(xb, yb):
        h = torch.tanh(xb @ weights["w0"] + weights["b0"])
        logits = h @ weights["w1"] + weights["b1"]
        return torch.nn.functional.cross_entropy(logits, yb)

    def run_epoch(epoch):
        losses = []
        for idx in epoch:
            opt.zero_grad()
            loss = loss_fn(x_t[idx], y_t[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return np.array(losses)

    return run_epoch


def funcopt_trainer(params, x, y, optimizer, dtype):
    """The same loop in funcopt; returns ``run_epoch(batches) -> losses``."""
    import jax
    import jax.numpy as jnp

    import funcopt as fo

    _, factory, kwargs = OPTIMIZERS[optimizer]
    opt = getattr(fo, factory)(**kwargs)

    def loss_fn(p, xb, yb):
        h = jnp.tanh(xb @ p["w0"] + p["b0"])
        logits = h @ p["w1"] + p["b1"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

    @jax.jit
    def train_step(ts, xb, yb):
        ts = ts.zero_grad()  # optimizer.zero_grad()
        ts, loss = ts.backward(loss_fn, xb, yb)  # loss.backward()
        return ts.step(), loss  # optimizer.step()

    ts = fo.TrainState.create(
        jax.tree.map(lambda v: jnp.asarray(v, dtype), params), opt
    )
    x_j, y_j = jnp.asarray(x, dtype), jnp.asarray(y)

    def run_epoch(epoch):
        nonlocal ts
        losses = []
        for idx in epoch:
            ts, loss = train_step(ts, x_j[idx], y_j[idx])
            losses.append(loss)
        return np.array(jax.device_get(losses), dtype=np.float64)

    return run_epoch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--float64", action="store_true", help="both sides in float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="out/digits_side_by_side.png")
    args = parser.parse_args(argv)

    import jax
    from tqdm import tqdm

    jax.config.update("jax_enable_x64", args.float64)
    dtype = np.float64 if args.float64 else np.float32
    x, y = load_digits(args.seed)
    params = init_params(args.seed)
    schedule = list(batches(len(x), args.batch_size, args.epochs, args.seed))

    run_torch = torch_trainer(params, x, y, args.optimizer, dtype)
    run_funcopt = funcopt_trainer(params, x, y, args.optimizer, dtype)
    torch_losses, funcopt_losses = [], []
    header = (
        f"{'epoch':>5} {'torch loss':>14} {'funcopt loss':>14} {'max rel diff':>12}"
    )
    print(header)
    for e, epoch in enumerate(
        tqdm(schedule, desc=f"{args.optimizer} {dtype.__name__}")
    ):
        t, f = run_torch(epoch), run_funcopt(epoch)
        torch_losses.append(t)
        funcopt_losses.append(f)
        tqdm.write(
            f"{e + 1:>5} {t.mean():>14.10f} {f.mean():>14.10f} "
            f"{(np.abs(t - f) / np.abs(t)).max():>12.2e}"
        )
    torch_losses = np.concatenate(torch_losses)
    funcopt_losses = np.concatenate(funcopt_losses)
    rel = np.abs(torch_losses - funcopt_losses) / np.abs(torch_losses)
    print(f"max relative loss difference over all {len(rel)} steps: {rel.max():.2e}")

    plot(torch_losses, funcopt_losses, args)
    return {"max_rel_diff": float(rel.max()), "steps": len(rel)}


def plot(torch_losses, funcopt_losses, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(torch_losses, label="torch.optim", lw=3, alpha=0.5)
    top.plot(funcopt_losses, label="funcopt", lw=1, ls="--")
    top.set_ylabel("training loss")
    top.set_yscale("log")
    top.legend()
    top.set_title(
        f"digits MLP, {args.optimizer}, {'float64' if args.float64 else 'float32'}"
    )
    diff = np.abs(torch_losses - funcopt_losses) / np.abs(torch_losses)
    bottom.semilogy(np.maximum(diff, 1e-18))
    bottom.set_ylabel("|relative difference|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
