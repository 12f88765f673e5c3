"""Where optax's closest transform differs from torch.optim, measured.

For each torch optimizer, run torch, optax's nearest equivalent (with torch's
hyperparameters passed where optax has them) and funcopt on the same float64
gradients for 20 steps, and print the max |parameter difference| from torch.
This is why an optax port of a torch script does not reproduce its numbers.

    python benchmarks/optax_differences.py [--markdown]
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optax.contrib  # noqa: E402
import torch  # noqa: E402

import funcopt as fo  # noqa: E402

STEPS = 20

# torch class, torch kwargs, optax transform (or None), what differs
ROWS = [
    (
        "SGD",
        dict(lr=0.05, momentum=0.9, dampening=0.5),
        lambda: optax.sgd(0.05, momentum=0.9),
        "no dampening in optax",
    ),
    ("Adam", dict(lr=1e-2), lambda: optax.adam(1e-2), "none (same algorithm)"),
    (
        "Adam",
        dict(lr=1e-2, amsgrad=True),
        lambda: optax.amsgrad(1e-2),
        "optax.amsgrad takes the max of the bias-corrected v, torch of the raw v",
    ),
    (
        "AdamW",
        dict(lr=1e-2),
        lambda: optax.adamw(1e-2),
        "default weight_decay: optax 1e-4, torch 1e-2",
    ),
    ("Adamax", dict(lr=2e-3), lambda: optax.adamax(2e-3), "none (same algorithm)"),
    (
        "NAdam",
        dict(lr=2e-3),
        lambda: optax.nadam(2e-3),
        "optax has no momentum_decay schedule (mu_t = beta1)",
    ),
    (
        "RAdam",
        dict(lr=1e-2, eps=1e-3),
        lambda: optax.radam(1e-2, eps=1e-3),
        "eps added to the bias-corrected root in optax, to the raw root in torch",
    ),
    (
        "RMSprop",
        dict(lr=1e-2),
        lambda: optax.rmsprop(1e-2, decay=0.99),
        "eps inside the sqrt by default (eps_in_sqrt=True); default decay 0.9 vs 0.99",
    ),
    (
        "Adagrad",
        dict(lr=1e-2),
        lambda: optax.adagrad(1e-2),
        "initial accumulator 0.1 vs 0, eps 1e-7 inside the sqrt vs 1e-10 outside",
    ),
    (
        "Adadelta",
        dict(),
        lambda: optax.adadelta(),
        "learning_rate=None: no sign flip, optax's default ascends",
    ),
    (
        "Rprop",
        dict(lr=1e-2),
        lambda: optax.rprop(1e-2),
        "optax 0.2.8 emits the previous step's update and does not clamp at sign 0",
    ),
    ("ASGD", dict(lr=1e-2, t0=5), None, "no optax counterpart"),
    (
        "Adafactor",
        dict(lr=1e-2),
        lambda: optax.adafactor(1e-2),
        "factors the 2 largest dims (>=128), eps added to g^2, no min(lr, 1/sqrt t)",
    ),
    (
        "Muon",
        dict(lr=1e-2),
        lambda: optax.contrib.muon(1e-2),
        "bias-corrected momentum, NS in param dtype, transposed shape scale, wd 0",
    ),
]


def run_torch(name, kwargs, p0, grads):
    p = torch.tensor(p0, requires_grad=True)
    opt = getattr(torch.optim, name)([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().numpy()


def run_optax(make, p0, grads):
    opt = make()
    params = jnp.asarray(p0)
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


def run_funcopt(name, kwargs, p0, grads):
    factory = getattr(
        fo,
        {
            "SGD": "sgd",
            "AdamW": "adamw",
            "RMSprop": "rmsprop",
            "NAdam": "nadam",
            "RAdam": "radam",
            "ASGD": "asgd",
        }.get(name, name.lower()),
        None,
    )
    if factory is None:
        return None
    opt = factory(**kwargs)
    params = jnp.asarray(p0)
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, jnp.asarray(g), state)
    return np.asarray(params)


def main(markdown: bool = False) -> None:
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(16, 8))
    grads = rng.normal(size=(STEPS, 16, 8))
    header = ("torch", "arguments", "optax vs torch", "funcopt vs torch", "why")
    rows = []
    for name, kwargs, make, why in ROWS:
        ref = run_torch(name, kwargs, p0, grads)
        ours = run_funcopt(name, kwargs, p0, grads)
        theirs = None if make is None else run_optax(make, p0, grads)
        rows.append(
            (
                name,
                ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults",
                "-" if theirs is None else f"{np.abs(theirs - ref).max():.1e}",
                "-" if ours is None else f"{np.abs(ours - ref).max():.1e}",
                why,
            )
        )
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(f"float64, {STEPS} steps, 16x8 params: max |param - torch param|")
        for row in rows:
            print(f"{row[0]:<10} {row[1]:<36} {row[2]:>9} {row[3]:>9}  {row[4]}")


if __name__ == "__main__":
    main("--markdown" in sys.argv)
