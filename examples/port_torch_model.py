"""Porting a real torch model: registration order, BatchNorm, tied weights.

A small next-token model written in torch the way real scripts write it: a
token embedding, a convolution, BatchNorm (running statistics updated by the
forward pass) and an output head *tied* to the embedding (nanoGPT's
`lm_head.weight = wte.weight`). Its registration order (`wte`, `conv`, `bn`)
is not sorted order, and its AdamW has two groups built nanoGPT's way from
`named_parameters()`. The funcopt port:

1. `module_state_dict_to_params(model.state_dict())` gives the parameters in
   torch's registration order, with the tied head as the embedding's one
   leaf; the buffers (BatchNorm's statistics) come from `named_buffers()`;
2. `fo.TrainState` trains with `backward(..., has_aux=True)`, the loss
   function returning the updated statistics, side by side with torch from
   identical weights;
3. halfway, funcopt's state is exported to a NEW torch optimizer built from
   the new model's `parameters()` exactly as the script builds it, and both
   runs continue: no reordering by hand anywhere.

    python examples/port_torch_model.py [--steps 20]

Prints the largest relative difference of parameters and statistics (float64:
~1e-13: convolution sums in another order) before and after the hand-over.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import funcopt as fo  # noqa: E402
import funcopt.torch_interop as fti  # noqa: E402

VOCAB, WIDTH, SEQ, BATCH = 11, 8, 12, 4
BN_MOMENTUM, BN_EPS = 0.1, 1e-5


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, WIDTH)
        # no bias before BatchNorm (as ResNets): BatchNorm's mean would cancel it
        self.conv = torch.nn.Conv1d(WIDTH, WIDTH, kernel_size=3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm1d(WIDTH)
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying

    def forward(self, tokens):
        h = self.wte(tokens).transpose(1, 2)  # (batch, width, seq)
        h = torch.relu(self.bn(self.conv(h))).transpose(1, 2)
        return self.lm_head(h)


def torch_optimizer(model):
    """nanoGPT's groups: matrices decay, vectors do not."""
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for _, p in named if p.dim() >= 2]},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=3e-2,
        weight_decay=0.1,
    )


def funcopt_optimizer():
    def labels(params):
        return jax.tree.map(lambda p: "default" if p.ndim >= 2 else "no_decay", params)

    groups = fo.param_groups(labels, {"no_decay": {"weight_decay": 0.0}})
    return fo.adamw(lr=3e-2, weight_decay=0.1, param_groups=groups)


def loss_fn(params, buffers, tokens, targets):
    """TinyLM's training-mode forward and cross-entropy, in JAX; returns the
    loss and BatchNorm's updated running statistics (torch's forward writes
    them in place)."""
    wte = params["wte"]["weight"]
    h = wte[tokens].transpose(0, 2, 1)  # (batch, width, seq)
    h = jax.lax.conv_general_dilated(
        h, params["conv"]["weight"], window_strides=(1,), padding=((1, 1),),
        dimension_numbers=("NCH", "OIH", "NCH"),
    )  # fmt: skip
    mean, var = h.mean((0, 2)), h.var((0, 2))
    n = h.shape[0] * h.shape[2]
    bn = params["bn"]
    h = (h - mean[None, :, None]) / jnp.sqrt(var[None, :, None] + BN_EPS)
    h = h * bn["weight"][None, :, None] + bn["bias"][None, :, None]
    h = jax.nn.relu(h).transpose(0, 2, 1)
    logits = h @ wte.T  # the tied head
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
    stats = buffers["bn"]
    new = {
        "running_mean": (1 - BN_MOMENTUM) * stats["running_mean"] + BN_MOMENTUM * mean,
        "running_var": (1 - BN_MOMENTUM) * stats["running_var"]
        + BN_MOMENTUM * var * n / (n - 1),
        "num_batches_tracked": stats["num_batches_tracked"] + 1,
    }
    return loss, {"bn": new}


@jax.jit
def train_step(ts, buffers, tokens, targets):
    ts = ts.zero_grad()
    ts, (loss, buffers) = ts.backward(loss_fn, buffers, tokens, targets, has_aux=True)
    return ts.step(), buffers, loss


def torch_step(model, opt, tokens, targets):
    opt.zero_grad()
    logits = model(torch.tensor(tokens))
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1)
    )
    loss.backward()
    opt.step()
    return float(loss.detach())


def max_rel_diff(model, params, buffers):
    ours = fti.params_to_module_state_dict(params)
    ours.update(fti.params_to_module_state_dict(buffers))
    worst = 0.0
    for name, theirs in [*model.named_parameters(), *model.named_buffers()]:
        a, b = ours[name].double().numpy(), theirs.detach().double().numpy()
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
    return worst


def batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        seq = rng.integers(0, VOCAB, size=(BATCH, SEQ + 1))
        yield seq[:, :-1], seq[:, 1:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyLM().double()
    sd = model.state_dict()
    tied = fti.tied_names(sd)
    params = fti.module_state_dict_to_params(
        {k: v for k, v in sd.items() if k in dict(model.named_parameters())}
    )
    buffers = fti.module_state_dict_to_params(dict(model.named_buffers()))
    print("torch parameter order:  ", [n for n, _ in model.named_parameters()])
    print("funcopt parameter order:", fti.param_names(params))
    print("tied:", tied)

    opt = funcopt_optimizer()
    ts = fo.TrainState.create(params, opt)
    torch_opt = torch_optimizer(model)
    half = args.steps // 2
    data = list(batches(args.steps))
    for k, (tokens, targets) in enumerate(data[:half], start=1):
        ts, buffers, loss = train_step(ts, buffers, tokens, targets)
        tloss = torch_step(model, torch_opt, tokens, targets)
        print(f"step {k:3d}  loss torch {tloss:.6f} funcopt {float(loss):.6f}")
    before = max_rel_diff(model, ts.params, buffers)
    print(f"max relative difference before the hand-over: {before:.2e}")

    # hand funcopt's run to a torch model and optimizer built as the script does
    resumed = TinyLM().double()
    weights = fti.params_to_module_state_dict(ts.params, tied=tied)
    weights.update(fti.params_to_module_state_dict(buffers))
    resumed.load_state_dict(weights)
    resumed_opt = torch_optimizer(resumed)
    resumed_opt.load_state_dict(fti.state_dict(opt, ts))
    for tokens, targets in data[half:]:
        ts, buffers, loss = train_step(ts, buffers, tokens, targets)
        torch_step(model, torch_opt, tokens, targets)
        torch_step(resumed, resumed_opt, tokens, targets)
    after = max(
        max_rel_diff(model, ts.params, buffers),
        max_rel_diff(resumed, ts.params, buffers),
    )
    print(f"max relative difference after the hand-over: {after:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
