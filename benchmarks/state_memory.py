"""Optimizer state bytes per parameter: torch's default vs the precision options.

    python benchmarks/state_memory.py

For a 1M-parameter tree, counts every state array (buffers, plus the master
copy where there is one), divided by the number of parameters. Modes:
float32 params; bf16 params (torch's behaviour: state in bf16); bf16 params
with ``precision_policy`` (first buffer bf16, the others float32);
bf16 params with ``master_weights`` (float32 copy + float32 buffers).
"""

import jax
import jax.numpy as jnp
import numpy as np

import funcopt as fo

N = 1 << 20
OPTS = {
    "sgd(momentum)": lambda: fo.sgd(lr=0.1, momentum=0.9),
    "adam": fo.adam,
    "adamw(amsgrad)": lambda: fo.adamw(amsgrad=True),
    "rmsprop(centered)": lambda: fo.rmsprop(centered=True, momentum=0.9),
    "adafactor": fo.adafactor,
}


def state_bytes(state, params) -> float:
    shapes = jax.eval_shape(lambda: state)
    total = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    return total / N


def main():
    p32 = {"w": jnp.zeros((1024, 1024), jnp.float32)}
    p16 = {"w": jnp.zeros((1024, 1024), jnp.bfloat16)}
    print(f"{'optimizer':20s} {'f32':>6s} {'bf16':>6s} {'policy':>7s} {'master':>7s}")
    for name, make in OPTS.items():
        opt = make()
        slots = list(opt.init(p32).slots)
        policy = {
            k: jnp.bfloat16 if i == 0 else jnp.float32 for i, k in enumerate(slots)
        }
        row = [
            state_bytes(opt.init(p32), p32),
            state_bytes(opt.init(p16), p16),
            state_bytes(fo.precision_policy(opt, policy).init(p16), p16),
            state_bytes(fo.master_weights(opt).init(p16), p16),
        ]
        print(f"{name:20s} " + " ".join(f"{b:6.2f}" for b in row))


if __name__ == "__main__":
    main()
