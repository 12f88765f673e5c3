"""The parity table through the multi-tensor path (funcopt.flat + packed trees).

Every elementwise optimizer in ``OPT_CASES`` (a quarter of its flag
combinations, all flags on included) runs against live torch through:

* ``flat`` (float64, ``None`` gradients as ``has_grad`` flags): params,
  grads and state live packed (``funcopt.flat``);
* ``tree`` (float32, ``None`` gradient leaves): ``opt.step`` on the params
  tree, packing per step (``policy("always")``);
* ``flat`` in bfloat16 and float16, bit for bit (leaves that torch's CPU
  loop splits into vectorised blocks and a scalar tail, packed across rows).

Both are compared with ``_compare`` of test_optim.py, the same checks as the
per-leaf path. Non-elementwise optimizers run per leaf only: they refuse
``FlatParams``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcopt.flat as ff
from funcopt import _math, _multi_tensor
from tests.parity import test_optim
from tests.parity.cases import OPT_CASES, OPT_PARAMS_16BIT
from tests.torch_ref import make_params, run_funcopt_flagged, using_torch_cpu_block


def _elementwise(case) -> bool:
    definition = getattr(case.factory(), "definition", None)
    return definition is not None and definition.elementwise


ELEMENTWISE = [c for c in OPT_CASES if _elementwise(c)]
PER_LEAF = [
    c for c in OPT_CASES if hasattr(c.factory(), "definition") and not _elementwise(c)
]
# every 4th flag combination and the last (all flags on) of every elementwise
# optimizer through the flat layout; the last through the packed tree
FLAT_PARAMS = [
    p
    for case in ELEMENTWISE
    for k, p in enumerate(case.params())
    if k % 4 == 0 or k == len(case.combos()) - 1
]
TREE_PARAMS = [case.params()[-1] for case in ELEMENTWISE]
# the rows whose 16-bit rounding depends on where an element sits in its leaf
# (add with alpha: weight decay, SGD's and RMSprop's updates)
FLAT_16BIT_PARAMS = [
    p
    for p in OPT_PARAMS_16BIT
    if p.id.startswith(("sgd-momentum=0.9-dampening=0.3", "rmsprop"))
]


def _run_flat(case, kwargs, params, grads_seq, jit):
    opt = case.factory(**kwargs)
    params = jax.tree.map(jnp.asarray, params)
    layout = ff.layout(params, opt)
    fparams = layout.pack(params)
    state = opt.init(fparams)
    step = jax.jit(opt.step) if jit else opt.step
    for grads in grads_seq:
        leaves = layout.treedef.flatten_up_to(grads)
        has_grad = layout.treedef.unflatten([g is not None for g in leaves])
        zeros = [
            jnp.zeros_like(p) if g is None else jnp.asarray(g)
            for g, p in zip(leaves, layout.treedef.flatten_up_to(params))
        ]
        fgrads = layout.pack(layout.treedef.unflatten(zeros))
        fparams, state = step(fparams, fgrads, state, has_grad=has_grad)
    return layout.unpack(fparams), layout.unpack_state(state)


def _run_tree(case, kwargs, params, grads_seq, jit):
    with ff.policy("always"):
        return _ORIGINAL_RUN(case, kwargs, params, grads_seq, jit)


_ORIGINAL_RUN = test_optim.run_funcopt


@pytest.mark.parametrize("case,kwargs", FLAT_PARAMS)
def test_flat_float64_parity(case, kwargs, x64, monkeypatch):
    monkeypatch.setattr(test_optim, "run_funcopt", _run_flat)
    test_optim._compare(case, kwargs, np.float64, True, True, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case,kwargs", TREE_PARAMS)
def test_packed_tree_float32_parity(case, kwargs, monkeypatch):
    monkeypatch.setattr(test_optim, "run_funcopt", _run_tree)
    test_optim._compare(
        case, kwargs, np.float32, True, True, rtol=case.f32_rtol, atol=case.f32_atol
    )


@pytest.mark.parametrize("case,kwargs", FLAT_16BIT_PARAMS)
def test_flat_16bit_parity_is_bit_exact(case, kwargs, x64, monkeypatch, torch_cpu_loop):
    def run_flat(case, kwargs, params, grads_seq):
        return _run_flat(case, kwargs, params, grads_seq, True)

    monkeypatch.setattr(test_optim, "run_funcopt_flagged", run_flat)
    test_optim._compare_bits(case, kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ELEMENTWISE, ids=lambda c: c.name)
def test_flat_matches_the_per_leaf_path(case, dtype):
    """The per-leaf path's numbers, to a few ulp (all flags on).

    Mostly bit-identical; XLA CPU compiles the same ops differently by shape
    (vectorised vs scalar ``pow``, FMA contraction), e.g. NAdam's float32
    ``0.96 ** (step * momentum_decay)`` and SGD's float64 momentum differ by
    one ulp.
    """
    kwargs = case.combos()[-1]
    rng = np.random.default_rng(1)
    with jax.enable_x64(dtype == np.float64):
        _check_same(case, kwargs, rng, dtype)


def _check_same(case, kwargs, rng, dtype):
    params = make_params(rng, dtype)
    grads_seq = test_optim.make_grads(rng, params, 6, True)
    with ff.policy("never"):
        expected = _ORIGINAL_RUN(case, kwargs, params, grads_seq, True)
    got = _run_flat(case, kwargs, params, grads_seq, True)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        if np.issubdtype(a.dtype, np.inexact):
            eps = np.finfo(a.dtype).eps
            np.testing.assert_allclose(a, e, rtol=8 * eps, atol=8 * eps)
        else:
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("case", PER_LEAF, ids=lambda c: c.name)
def test_per_leaf_only_optimizers_refuse_flat(case):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    opt = case.factory(**case.combos()[0])
    layout = ff.layout(params, opt)
    with pytest.raises(TypeError, match="not elementwise"):
        opt.init(layout.pack(params))


@pytest.mark.parametrize("block,tail_of_70", [(32, 6), (16, 6), (None, 70)])
def test_scalar_loop_mask_marks_each_leafs_tail(block, tail_of_70):
    """Leaves over several rows: the mask is torch's scalar tail of each leaf,
    for torch's x86 loop (blocks of 32) and others (16; None: scalar only)."""
    with using_torch_cpu_block(block):
        _check_scalar_loop_mask()
        assert _math.scalar_loop_elements(70) == tail_of_70
        assert _math.scalar_loop_elements(5) == 5


def _check_scalar_loop_mask():
    sizes = [70, 5, 64, 33, 0]
    rows = [max(1, -(-s // 16)) for s in sizes]
    first = np.concatenate([[0], np.cumsum(rows)[:-1]]).tolist()
    row_leaf = np.repeat(np.arange(len(sizes), dtype=np.int32), rows)
    bucket = _multi_tensor.Bucket(
        0,
        np.dtype(jnp.bfloat16),
        tuple(range(5)),
        tuple(sizes),
        16,
        tuple(first),
        tuple(rows),
        row_leaf,
    )
    mask = np.asarray(bucket.scalar_loop_mask()).reshape(-1)
    for size, r0 in zip(sizes, first):
        own = mask[r0 * 16 : r0 * 16 + size]
        tail = size - _math.scalar_loop_elements(size)
        np.testing.assert_array_equal(own, np.arange(size) >= tail)


def test_width_choice():
    assert ff.choose_width([1_000] * 2_000) == 1_000
    assert 10_000_000 % ff.choose_width([10_000_000]) == 0
    assert ff.choose_width([]) >= 1


def _many_small_leaves(rng, dtype) -> dict:
    """A tree the default policy packs: 10 small leaves of one group, of
    four shapes (few per-leaf programs to compile), a 0-d one included."""
    shapes = [(7,), (4, 5), (7,), (), (4, 5), (129,), (7,), (4, 5), (129,), (7,)]
    return {f"w{i:02d}": rng.normal(size=s).astype(dtype) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("mode", ["exact-float32", "bfloat16"])
@pytest.mark.parametrize("case", ELEMENTWISE, ids=lambda c: c.name)
def test_the_packed_default_gives_the_per_leaf_bits(case, mode, x64):
    """The choice of path changes no bit where funcopt is bit-exact with
    torch: the exact float32 mode and 16-bit leaves, all flags on, with
    missing gradients (``has_grad`` flags). (Plain float32 and float64
    programs can differ by an ulp between the paths: XLA compiles the same
    ops per shape; see ``funcopt.flat.set_policy``.)"""
    dtype = np.dtype(np.float32 if mode == "exact-float32" else jnp.bfloat16)
    rng = np.random.default_rng(2)
    params = _many_small_leaves(rng, dtype)
    grads_seq = test_optim.make_grads(rng, params, 4, True)
    _math.set_exact_float32(mode == "exact-float32")
    try:
        runs = []
        for path in ("never", "auto"):
            with ff.policy(path):
                runs.append(
                    run_funcopt_flagged(case, case.combos()[-1], params, grads_seq)
                )
    finally:
        _math.set_exact_float32(False)
    # the auto run's state is packed (the layout init chose), the other per leaf
    (p0, s0), (p1, s1) = runs
    assert ff.FlatParams in {type(v) for v in s1.slots.values()}
    assert ff.FlatParams not in {type(v) for v in s0.slots.values()}
    got, expected = (p1, s1.unpacked()), (p0, s0)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
