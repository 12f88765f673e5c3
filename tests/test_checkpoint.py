"""funcopt.checkpoint: bit-identical resume in a fresh process, and crash safety.

A TrainState (AdamW, two parameter groups) plus a StepLR state train N steps,
are saved, restored in another Python process that trains M more steps: the
result must be bit-identical to N+M uninterrupted steps, in both formats. A
process SIGKILLed while saving (after the new checkpoint is written, before
it replaces the old one) must leave the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcopt as fo
from funcopt import checkpoint
from tests._subprocess import HANG_GUARD_S

N, M = 4, 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ["npz", "orbax"]


def _path(tmp, fmt, name="ckpt"):
    return str(tmp / (f"{name}.npz" if fmt == "npz" else name))


def build():
    """The run: params, optimizer, TrainState, scheduler (all fresh)."""
    rng = np.random.default_rng(0)
    params = {
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
    groups = fo.param_groups({"b": "bias", "w": "default"}, {"bias": {"lr": 0.02}})
    opt = fo.adamw(lr=0.05, weight_decay=0.1, param_groups=groups)
    sched = fo.lr_scheduler.step_lr(step_size=2, gamma=0.7)
    ts, s = sched.init(fo.TrainState.create(params, opt))
    return {"train": ts, "sched": s}, sched


def _loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _batch(k):
    rng = np.random.default_rng(100 + k)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return x, (x @ np.ones((4, 3), np.float32)).astype(np.float32)


def train(tree, sched, start, steps):
    @jax.jit
    def one(tree, x, y):
        ts, s = tree["train"], tree["sched"]
        ts, _ = ts.backward(_loss, x, y)
        ts = ts.step().zero_grad()
        ts, s = sched.step(ts, s)
        return {"train": ts, "sched": s}

    for k in range(start, start + steps):
        tree = one(tree, *_batch(k))
    return tree


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# Two fresh processes (each start costs seconds): the first trains N steps
# and saves in both formats, the second restores both and trains M more. Each
# then also saves a checkpoint (the "last good one") and is SIGKILLed during
# the next save of it, between writing and replacing: npz in the first, orbax
# in the second.
WORKER = """
import os, signal, sys
import numpy as np
from funcopt import checkpoint
from tests.test_checkpoint import N, M, build, train, _leaves
mode, folder = sys.argv[1:3]
tree, sched = build()
def path(fmt, name="ckpt"):
    return os.path.join(folder, name + (".npz" if fmt == "npz" else ""))
if mode == "save":
    for fmt in ("npz", "orbax"):
        checkpoint.save(path(fmt), train(tree, sched, 0, N), format=fmt)
    kill_fmt = "npz"
else:
    for fmt in ("npz", "orbax"):
        restored = checkpoint.restore(path(fmt), like=tree, format=fmt)
        out = _leaves(train(restored, sched, N, M))
        np.savez(os.path.join(folder, "out_" + fmt), *out)
    kill_fmt = "orbax"
checkpoint.save(path(kill_fmt, "killed"), tree, format=kill_fmt)  # step 0
checkpoint._before_commit = lambda p: os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save(path(kill_fmt, "killed"), train(tree, sched, 0, 1), format=kill_fmt)
print("not killed")
"""


def _worker(mode, folder):
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(folder)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert b"not killed" not in proc.stdout


def test_resume_in_a_fresh_process_and_sigkill_mid_save(tmp_path):
    tree, sched = build()
    expected = _leaves(train(tree, sched, 0, N + M))
    _worker("save", tmp_path)
    _worker("resume", tmp_path)
    for f in FORMATS:
        with np.load(tmp_path / f"out_{f}.npz") as got:
            values = [got[f"arr_{i}"] for i in range(len(got.files))]
        assert len(values) == len(expected)
        for i, (a, e) in enumerate(zip(values, expected)):
            assert a.dtype == e.dtype, (f, i)
            np.testing.assert_array_equal(a, e, err_msg=f"{f}: leaf {i}")
        # the process killed while saving left the previous checkpoint
        restored = checkpoint.restore(_path(tmp_path, f, "killed"), tree, format=f)
        for a, e in zip(_leaves(restored), _leaves(tree)):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, fmt, monkeypatch):
    tree, sched = build()
    path = _path(tmp_path, fmt)
    checkpoint.save(path, tree, format=fmt)
    later = train(tree, sched, 0, 1)

    def boom(p):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint, "_before_commit", boom)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save(path, later, format=fmt)
    monkeypatch.undo()
    restored = checkpoint.restore(path, like=tree, format=fmt)
    for a, e in zip(_leaves(restored), _leaves(tree)):
        np.testing.assert_array_equal(a, e)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no litter
    # a later save replaces it
    checkpoint.save(path, later, format=fmt)
    restored = checkpoint.restore(path, like=tree, format=fmt)
    for a, e in zip(_leaves(restored), _leaves(later)):
        np.testing.assert_array_equal(a, e)


def test_orbax_recovers_a_checkpoint_moved_aside(tmp_path):
    """A crash between orbax's two renames leaves only ``<path>.old-*``."""
    tree, _ = build()
    path = _path(tmp_path, "orbax")
    checkpoint.save(path, tree, format="orbax")
    os.rename(path, path + ".old-deadbeef")
    restored = checkpoint.restore(path, like=tree, format="orbax")
    for a, e in zip(_leaves(restored), _leaves(tree)):
        np.testing.assert_array_equal(a, e)


def test_mismatched_like_is_an_error(tmp_path):
    tree, _ = build()
    path = _path(tmp_path, "npz")
    checkpoint.save(path, tree)
    manifest = checkpoint.read_manifest(path)
    assert manifest["format"] == "funcopt-npz"
    assert any("opt_state" in leaf["path"] for leaf in manifest["leaves"])
    params = {"b": jnp.zeros(3), "w": jnp.zeros((3, 4))}
    other = fo.TrainState.create(params, fo.adamw())
    with pytest.raises(ValueError, match=r"float32\(4, 3\), like has float32\(3, 4\)"):
        checkpoint.restore(path, like={"train": other, "sched": tree["sched"]})
    with pytest.raises(ValueError, match="only in the checkpoint"):
        checkpoint.restore(path, like={"train": tree["train"]})
    with pytest.raises(ValueError, match="format must be"):
        checkpoint.save(path, tree, format="pickle")


def test_bfloat16_and_scalars_round_trip(tmp_path):
    tree = {
        "bf16": jnp.arange(4, dtype=jnp.bfloat16) / 3,
        "count": jnp.asarray(7, jnp.int32),
        "flag": jnp.asarray(True),
    }
    path = _path(tmp_path, "npz")
    checkpoint.save(path, tree)
    back = checkpoint.restore(path, like=tree)
    for k in tree:
        assert back[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))


@pytest.mark.parametrize("saved_policy", ["always", "never"])
def test_a_train_state_restores_into_another_layout(tmp_path, saved_policy):
    """A `TrainState` saves its gradients and flags per leaf, under the key
    paths of `.grads` and `.grad_defined`: a state whose gradients were kept
    packed restores into a `like` that keeps them per leaf, and back, with
    the same values; the restored state has `like`'s layout."""
    other = "never" if saved_policy == "always" else "always"
    params = {f"p{i}": jnp.full((3,), 0.5 * i, jnp.float32) for i in range(4)}

    def state(policy):
        with fo.flat.policy(policy):
            ts = fo.TrainState.create(params, fo.adam(lr=0.1))
            ts, _ = ts.backward(lambda p: jnp.sum(p["p1"] ** 2 + p["p2"] ** 3))
            return ts.step()

    saved = state(saved_policy)
    path = _path(tmp_path, "npz")
    checkpoint.save(path, {"train": saved})
    names = [leaf["path"] for leaf in checkpoint.read_manifest(path)["leaves"]]
    assert "['train'].grads['p1']" in names
    assert "['train'].grad_defined['p3']" in names
    like = {"train": state(other)}
    back = checkpoint.restore(path, like=like)["train"]
    assert type(back.stored_grads) is type(like["train"].stored_grads)
    assert type(back.stored_grads) is not type(saved.stored_grads)
    for field in ("params", "grads", "grad_defined"):
        for x, y in zip(
            jax.tree.leaves(getattr(back, field)),
            jax.tree.leaves(getattr(saved, field)),
        ):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(
        jax.tree.leaves(back.opt_state.unpacked()),
        jax.tree.leaves(saved.opt_state.unpacked()),
    ):
        np.testing.assert_array_equal(x, y)
    stepped = [back.step(), saved.step()]
    np.testing.assert_array_equal(stepped[0].params["p2"], stepped[1].params["p2"])
