"""Params, grads and optimizer state that *live* packed: the multi-tensor layout.

One buffer per (parameter group, dtype) instead of one array per leaf, so an
elementwise optimizer's step is one fused kernel per bucket, with no packing
per step; the model reads its leaves as views (slices, fused by XLA under
`jit`). Per-parameter step counts, `None`/`has_grad` skipping and every
number are those of the per-leaf path (the parity table runs both):

```python
import funcopt.flat

opt = fo.adamw(lr=1e-3)
layout = funcopt.flat.layout(params, opt)    # static; build once
fparams = layout.pack(params)                 # FlatParams: a pytree
state = opt.init(fparams)                     # state buffers packed too

@functools.partial(jax.jit, donate_argnums=(0, 1))
def train_step(fparams, state, x, y):
    grads = jax.grad(lambda fp: loss_fn(fp.unpack(), x, y))(fparams)
    return opt.step(fparams, grads, state)    # grads are FlatParams

params = fparams.unpack()                     # the tree, when needed
torch_like_state = layout.unpack_state(state) # per-leaf buffers
```

`grads` of `FlatParams` are `FlatParams` of the same layout (the
gradient of the views lands packed). A tree with non-trainable leaves
(integers) needs `jax.grad(..., allow_int=True)`. torch's `p.grad is
None` is `opt.step(fparams, fgrads, state, has_grad=flags)` with
`flags` a tree of booleans of the *params'* structure (one per leaf), or a
`FlatParams` of flags (one per bucket, or one per leaf of each bucket).
Padding (a leaf's tail row) is zero in params and grads and is never read
back by `unpack`.

Optimizers whose rule is not elementwise (Adafactor, Muon, SparseAdam,
LBFGS) run per leaf only and refuse `FlatParams`.

On plain pytrees, `opt.step` also packs per step (`set_policy`): by
default the small leaves of a tree on one CPU device (two or more of one
group and dtype), their params and grads copied in and out natively each
step, their optimizer state packed for good by `opt.init` (`state.slots[name]`
is a `FlatParams` of this module; `state.unpacked()` gives per-leaf trees).
Adam/AdamW, SGD, Adagrad and RMSprop copy nothing for large leaves: their
native kernel steps a group's large leaves where they are, in one call.
Many large leaves under other optimizers: this layout, with no copies.
"""

from __future__ import annotations

from ._multi_tensor import (
    AUTO_MAX_LEAF_BYTES,
    AUTO_MIN_LEAVES,
    Bucket,
    FlatParams,
    Layout,
    choose_width,
    get_policy,
    make_layout,
    policy,
    set_policy,
)

__all__ = [
    "AUTO_MAX_LEAF_BYTES",
    "AUTO_MIN_LEAVES",
    "Bucket",
    "FlatParams",
    "Layout",
    "choose_width",
    "get_policy",
    "layout",
    "pack",
    "policy",
    "set_policy",
]


def layout(params, opt) -> Layout:
    """The packed layout of `params` for `opt` (its param groups decide
    the buckets: one per group and dtype)."""
    return make_layout(params, opt.definition)


def pack(params, opt) -> FlatParams:
    """`layout(params, opt).pack(params)`."""
    return layout(params, opt).pack(params)
