"""What the generic parity table cannot drive: schedule-free's train/eval switch.

torch's ``optimizer.eval()``/``train()`` move the parameters in place between
the training point ``y`` and the average ``x``; funcopt gives them as pure
functions (``opt.eval_params``/``opt.train_params``). Checked against the live
reference: eval-mode parameters after training, and a training loop that
switches to eval and back every few steps (so the round trip's rounding feeds
later steps), with some ``None`` gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import schedulefree
import torch

import funcopt as fo
from funcopt import contrib
from tests.parity.noise_floor import assert_close
from tests.torch_ref import (
    make_grads,
    make_params,
    torch_params,
    trainable_leaves,
)

SCHEDULE_FREE = [
    (schedulefree.AdamWScheduleFree, contrib.adamw_schedule_free,
     {"lr": 0.02, "betas": (0.8, 0.95), "weight_decay": 0.1, "warmup_steps": 5}),
    (schedulefree.SGDScheduleFree, contrib.sgd_schedule_free,
     {"lr": 0.05, "momentum": 0.7, "weight_decay": 0.1, "r": 0.5}),
]  # fmt: skip


@pytest.mark.parametrize(
    "torch_cls,factory,kwargs", SCHEDULE_FREE, ids=["adamw", "sgd"]
)
def test_schedulefree_train_eval_switch(torch_cls, factory, kwargs, x64):
    rng = np.random.default_rng(0)
    params = make_params(rng, np.float64)
    grads_seq = make_grads(rng, params, 20, with_none=True)
    tparams = torch_params(params)
    topt = torch_cls(tparams, **kwargs)
    opt = factory(**kwargs)
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    step = jax.jit(opt.step)
    treedef = jax.tree.structure(params)
    leaves = jax.tree.leaves(params)
    topt.train()
    for t, grads in enumerate(grads_seq):
        flat = treedef.flatten_up_to(grads)
        train_grads = [
            g for g, q in zip(flat, leaves) if np.issubdtype(q.dtype, np.inexact)
        ]
        for tp, g in zip(tparams, train_grads):
            tp.grad = None if g is None else torch.tensor(np.array(g))
        topt.step()
        p, state = step(p, jax.tree.map(jnp.asarray, grads), state)
        if t % 6 == 5:  # evaluate, then resume training
            topt.eval()
            x = opt.eval_params(p, state)
            for i, (a, e) in enumerate(zip(trainable_leaves(x), tparams)):
                assert_close(a, e.detach().numpy(), 1e-10, 1e-12, f"eval param {i}")
            topt.train()
            p = contrib.schedulefree_train_params(opt, x, state)
            for i, (a, e) in enumerate(zip(trainable_leaves(p), tparams)):
                assert_close(a, e.detach().numpy(), 1e-10, 1e-12, f"train param {i}")
    topt.eval()
    x = contrib.schedulefree_eval_params(opt, p, state)
    for i, (a, e) in enumerate(zip(trainable_leaves(x), tparams)):
        assert_close(a, e.detach().numpy(), 1e-10, 1e-12, f"final eval param {i}")
    # the group scalars live in the state, as in torch's param_groups
    for name in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        ours = np.asarray(state.hparams[name])[0]
        np.testing.assert_allclose(ours, topt.param_groups[0][name], rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d0=1e-6),
        dict(
            d0=1e-4,
            growth_rate=1.05,
            use_bias_correction=True,
            slice_p=2,
            weight_decay=0.01,
        ),
        dict(
            d0=1e-5,
            betas=(0.0, 0.99),
            decouple=False,
            weight_decay=0.05,
            safeguard_warmup=True,
            beta3=0.9,
            d_coef=0.5,
        ),
    ],
    ids=["plain", "growth-slice-biascorr", "coupled-safeguard-beta3"],
)
def test_prodigy_step_size_grows_like_the_reference(kwargs, x64):
    """Gradients of a quadratic loss, so Prodigy's ``d`` really grows from d0
    (random gradients keep it at d0); two groups, one switched to lr 0."""
    import prodigyopt

    rng = np.random.default_rng(0)
    p = {
        "a": rng.normal(size=(7,)),
        "b": rng.normal(size=(3, 4)),
        "c": np.asarray(rng.normal()),
    }
    tp = [torch.tensor(p[k], requires_grad=True) for k in "abc"]
    topt = prodigyopt.Prodigy(
        [{"params": tp[:2]}, {"params": tp[2:], "eps": 1e-6}], **kwargs
    )
    groups = fo.param_groups(
        {"a": "default", "b": "default", "c": "g1"}, {"g1": {"eps": 1e-6}}
    )
    opt = contrib.prodigy(**kwargs, param_groups=groups)
    params = jax.tree.map(jnp.asarray, p)
    state = opt.init(params)
    step = jax.jit(opt.step)
    for t in range(60):
        if t == 40:
            topt.param_groups[1]["lr"] = 0.0
            state = fo.set_lr(state, [1.0, 0.0])
        g = {
            k: np.asarray(params[k]) * 2 + 0.1 * rng.normal(size=np.shape(p[k]))
            for k in "abc"
        }
        for tensor, k in zip(tp, "abc"):
            tensor.grad = torch.tensor(g[k])
        topt.step()
        params, state = step(params, jax.tree.map(jnp.asarray, g), state)
    d_torch = topt.param_groups[0]["d"]
    assert d_torch > 10 * kwargs["d0"]  # the estimate moved
    np.testing.assert_allclose(float(state.hparams["d"][0]), d_torch, rtol=1e-10)
    for tensor, k in zip(tp, "abc"):
        np.testing.assert_allclose(
            np.asarray(params[k]), tensor.detach().numpy(), rtol=1e-10, atol=1e-12
        )
