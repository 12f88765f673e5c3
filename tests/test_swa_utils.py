"""Weight averaging against live torch.optim.swa_utils."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt import swa_utils

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    return model.to(TORCH_DTYPE[dtype])


def as_trees(model):
    """(params, buffers) as lists of arrays, in torch's parameters()/buffers() order."""
    params = [jnp.asarray(p.detach().numpy()) for p in model.parameters()]
    buffers = [jnp.asarray(b.detach().numpy()) for b in model.buffers()]
    return params, buffers


def train_a_bit(model, rng, dtype):
    """Move the params and run a train-mode forward (updates the BN buffers)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.tensor(rng.normal(size=tuple(p.shape)).astype(dtype)))
        model.train()
        model(torch.tensor(rng.normal(size=(6, 3)).astype(dtype)))


def compare(torch_swa, ours, rtol, atol=0.0):
    for a, e in zip(ours.params, torch_swa.module.parameters()):
        assert a.dtype == e.detach().numpy().dtype
        np.testing.assert_allclose(a, e.detach().numpy(), rtol=rtol, atol=atol)
    for a, e in zip(ours.buffers, torch_swa.module.buffers()):
        e = e.detach().numpy()
        if np.issubdtype(e.dtype, np.integer):
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    assert int(ours.n_averaged) == int(torch_swa.n_averaged)


AVERAGERS = {
    "swa-default": lambda: {},
    "swa-avg_fn": lambda: {"avg_fn": swa_utils.get_swa_avg_fn()},
    "ema-avg_fn": lambda: {"avg_fn": swa_utils.get_ema_avg_fn(0.9)},
    "ema-multi": lambda: {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.7)},
}
TORCH_AVERAGERS = {
    "swa-default": lambda: {},
    "swa-avg_fn": lambda: {"avg_fn": torch.optim.swa_utils.get_swa_avg_fn()},
    "ema-avg_fn": lambda: {"avg_fn": torch.optim.swa_utils.get_ema_avg_fn(0.9)},
    "ema-multi": lambda: {
        "multi_avg_fn": torch.optim.swa_utils.get_ema_multi_avg_fn(0.7)
    },
}


def run_both(kind, use_buffers, dtype, jit, updates=6, ours_kwargs=None, torch_kw=None):
    rng = np.random.default_rng(0)
    model = make_model(dtype)
    torch_kw = TORCH_AVERAGERS[kind]() if torch_kw is None else torch_kw
    ours_kwargs = AVERAGERS[kind]() if ours_kwargs is None else ours_kwargs
    torch_swa = torch.optim.swa_utils.AveragedModel(
        model, use_buffers=use_buffers, **torch_kw
    )
    params, buffers = as_trees(model)
    ours = swa_utils.averaged_model(
        params, buffers, use_buffers=use_buffers, **ours_kwargs
    )
    update = lambda s, p, b: s.update_parameters(p, b)  # noqa: E731
    if jit:
        update = jax.jit(update)
    for _ in range(updates):
        train_a_bit(model, rng, dtype)
        torch_swa.update_parameters(model)
        ours = update(ours, *as_trees(model))
    return torch_swa, ours


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("kind", list(AVERAGERS))
def test_averaged_model_float64(kind, use_buffers, jit, x64):
    torch_swa, ours = run_both(kind, use_buffers, np.float64, jit)
    compare(torch_swa, ours, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("kind", list(AVERAGERS))
def test_averaged_model_float32(kind, use_buffers):
    torch_swa, ours = run_both(kind, use_buffers, np.float32, jit=True)
    compare(torch_swa, ours, rtol=1e-6, atol=1e-7)


def test_swa_multi_avg_fn_float32_weight(x64):
    """torch's foreach SWA weight is 1/(n+1) rounded to float32, even in float64."""
    kw = {"multi_avg_fn": swa_utils.get_swa_multi_avg_fn()}
    tkw = {"multi_avg_fn": torch.optim.swa_utils.get_swa_multi_avg_fn()}
    torch_swa, ours = run_both(None, False, np.float64, True, 6, kw, tkw)
    compare(torch_swa, ours, rtol=1e-13, atol=1e-15)
    # and it is not the float64 running mean of get_swa_avg_fn
    torch_mean, _ = run_both("swa-avg_fn", False, np.float64, True)
    diffs = [
        np.max(np.abs(a.detach().numpy() - b.detach().numpy()))
        for a, b in zip(torch_swa.module.parameters(), torch_mean.module.parameters())
    ]
    assert max(diffs) > 1e-10


def test_swa_multi_avg_fn_integer_buffers_raise(x64):
    tkw = {"multi_avg_fn": torch.optim.swa_utils.get_swa_multi_avg_fn()}
    kw = {"multi_avg_fn": swa_utils.get_swa_multi_avg_fn()}
    with pytest.raises(RuntimeError) as torch_err:
        run_both(None, True, np.float64, False, 2, kw, tkw)
    params, buffers = [jnp.ones(2)], [jnp.ones(1, jnp.int64)]
    swa = swa_utils.averaged_model(params, buffers, use_buffers=True, **kw)
    swa = swa.update_parameters(params, buffers)  # the first call only copies
    with pytest.raises(RuntimeError) as ours:
        swa.update_parameters(params, buffers)
    assert str(ours.value) == str(torch_err.value)


def test_custom_avg_fns(x64):
    def torch_avg(avg, p, n):
        return avg * 0.25 + p * 0.75 + n

    def ours_avg(avg, p, n):
        return avg * 0.25 + p * 0.75 + n.astype(avg.dtype)

    torch_swa, ours = run_both(
        None, False, np.float64, True, 5, {"avg_fn": ours_avg}, {"avg_fn": torch_avg}
    )
    compare(torch_swa, ours, rtol=1e-12, atol=1e-14)

    def torch_multi(avg_list, p_list, n):
        for a, p in zip(avg_list, p_list):
            a.mul_(0.5).add_(p, alpha=0.5)

    def ours_multi(avg_list, p_list, n):
        return [a * 0.5 + p * 0.5 for a, p in zip(avg_list, p_list)]

    torch_swa, ours = run_both(
        None,
        False,
        np.float64,
        True,
        5,
        {"multi_avg_fn": ours_multi},
        {"multi_avg_fn": torch_multi},
    )
    compare(torch_swa, ours, rtol=1e-12, atol=1e-14)


def test_multi_avg_fn_gets_dtype_groups(x64):
    """Like torch, multi_avg_fn is called once per dtype, in first-seen order."""
    seen = []

    def multi(avg_list, p_list, n):
        seen.append([a.dtype for a in avg_list])
        return [a + p for a, p in zip(avg_list, p_list)]

    params = [jnp.ones(2), jnp.ones(3, jnp.float32), jnp.ones(1)]
    swa = swa_utils.averaged_model(params, multi_avg_fn=multi)
    swa = swa.update_parameters(params).update_parameters(params)  # eager
    assert seen == [[jnp.float64, jnp.float64], [jnp.float32]]
    np.testing.assert_array_equal(swa.params[1], 2.0)


def test_ema_starts_from_first_model(x64):
    """1 -> (2) -> (3) with decay .9: the first call copies, then lerps."""
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    module = torch.nn.Module()
    module.p = p
    ema = torch.optim.swa_utils.AveragedModel(
        module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    ours = swa_utils.averaged_model(
        {"p": jnp.asarray([1.0])}, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9)
    )
    for value in (2.0, 3.0):
        with torch.no_grad():
            p.fill_(value)
        ema.update_parameters(module)
        ours = ours.update_parameters({"p": jnp.asarray([value])})
    np.testing.assert_array_equal(ours.params["p"], ema.module.p.detach().numpy())


@pytest.mark.parametrize("decay", [-0.1, 1.5])
@pytest.mark.parametrize("name", ["get_ema_multi_avg_fn", "get_ema_avg_fn"])
def test_decay_validation(name, decay):
    with pytest.raises(ValueError) as torch_err:
        getattr(torch.optim.swa_utils, name)(decay)
    with pytest.raises(ValueError) as ours:
        getattr(swa_utils, name)(decay)
    assert str(ours.value) == str(torch_err.value)


def test_both_avg_fns_raise():
    fn = swa_utils.get_swa_avg_fn()
    with pytest.raises(AssertionError) as torch_err:
        torch.optim.swa_utils.AveragedModel(
            torch.nn.Linear(1, 1), avg_fn=fn, multi_avg_fn=fn
        )
    with pytest.raises(AssertionError) as ours:
        swa_utils.averaged_model([jnp.ones(1)], avg_fn=fn, multi_avg_fn=fn)
    assert str(ours.value) == str(torch_err.value)


def test_structure_mismatch_raises():
    swa = swa_utils.averaged_model({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="structure"):
        swa.update_parameters({"b": jnp.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        swa.update_parameters({"a": jnp.ones(3)})


def test_is_a_pytree_of_arrays():
    swa = swa_utils.averaged_model({"a": jnp.ones(2)}, [jnp.zeros(1)])
    leaves = jax.tree.leaves(swa)
    assert all(isinstance(x, jax.Array) for x in leaves) and len(leaves) == 3
    assert fo.swa_utils is swa_utils


def test_update_bn(x64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model = model.double()
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(7, 3)), rng.normal(size=(7,))) for _ in range(5)]
    with torch.no_grad():  # stale stats that update_bn must reset
        model.train()
        model(torch.tensor(rng.normal(size=(4, 3))))
    model.eval()
    loader = [(torch.tensor(x), torch.tensor(y)) for x, y in batches]
    torch.optim.swa_utils.update_bn(loader, model)
    assert not model.training

    params = {
        "w": jnp.asarray(model[0].weight.detach().numpy()),
        "b": jnp.asarray(model[0].bias.detach().numpy()),
    }

    def stats_fn(p, x):
        h = x @ p["w"].T + p["b"]
        return {"running_mean": jnp.mean(h, 0), "running_var": jnp.var(h, 0, ddof=1)}

    stats, count = swa_utils.update_bn(
        [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches], stats_fn, params
    )
    bn = model[1]
    assert count == int(bn.num_batches_tracked)
    np.testing.assert_allclose(
        stats["running_mean"], bn.running_mean.numpy(), rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        stats["running_var"], bn.running_var.numpy(), rtol=1e-12, atol=1e-14
    )
    assert swa_utils.update_bn([], stats_fn, params) == (None, 0)


def test_swalr_reexport():
    """fo.swa_utils.swalr is funcopt.lr_scheduler.swalr when the latter exists."""
    from funcopt.lr_scheduler import swalr

    assert swa_utils.swalr is swalr


# --------------------------------------------------------------------------
# AveragedModel.state_dict() both ways (funcopt.torch_interop)
# --------------------------------------------------------------------------

KINDS = {
    "swa": (lambda: {}, lambda: {}),
    "ema": (
        lambda: {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.8)},
        lambda: {"multi_avg_fn": torch.optim.swa_utils.get_ema_multi_avg_fn(0.8)},
    ),
}


def named_trees(model):
    """params and buffers as nested OrderedDicts named like the model's."""
    from funcopt import torch_interop as fti

    return (
        fti.module_state_dict_to_params(dict(model.named_parameters())),
        fti.module_state_dict_to_params(dict(model.named_buffers())),
    )


def assert_same(torch_swa, ours, rtol=1e-12, atol=1e-14):
    from funcopt import torch_interop as fti

    theirs = torch_swa.state_dict()
    exported = fti.averaged_model_state_dict(ours)
    assert set(exported) == set(theirs) and next(iter(exported)) == "n_averaged"
    for key, value in theirs.items():
        got = exported[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        if value.is_floating_point():
            np.testing.assert_allclose(got, value, rtol=rtol, atol=atol, err_msg=key)
        else:
            assert torch.equal(got, value), key


def side_by_side(torch_swa, ours, model, rng, updates, jit=True):
    update = lambda s, p, b: s.update_parameters(p, b)  # noqa: E731
    update = jax.jit(update) if jit else update
    for _ in range(updates):
        train_a_bit(model, rng, np.float64)
        torch_swa.update_parameters(model)
        ours = update(ours, *named_trees(model))
    return ours


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_averaged_model_state_dict_round_trips(kind, use_buffers, x64):
    """Side by side with torch; export -> a fresh torch AveragedModel loads it
    and goes on; torch's dict -> import into a fresh funcopt one and go on."""
    from funcopt import torch_interop as fti

    ours_kw, torch_kw = KINDS[kind]
    rng = np.random.default_rng(0)
    model = make_model(np.float64)
    torch_swa = torch.optim.swa_utils.AveragedModel(
        model, use_buffers=use_buffers, **torch_kw()
    )
    ours = swa_utils.averaged_model(
        *named_trees(model), use_buffers=use_buffers, **ours_kw()
    )
    ours = side_by_side(torch_swa, ours, model, rng, 3)
    assert_same(torch_swa, ours)
    assert int(torch_swa.n_averaged) == 3

    # funcopt -> torch: a torch AveragedModel of another model loads the
    # export (strict) and continues as torch_swa does
    other = make_model(np.float64, seed=1)
    loaded = torch.optim.swa_utils.AveragedModel(
        other, use_buffers=use_buffers, **torch_kw()
    )
    exported = fti.averaged_model_state_dict(ours)
    loaded.load_state_dict(exported)
    # torch -> funcopt: a fresh averaged model of the other model takes torch's
    like = swa_utils.averaged_model(
        *named_trees(other), use_buffers=use_buffers, **ours_kw()
    )
    imported = fti.load_averaged_model_state_dict(like, torch_swa.state_dict())
    assert int(imported.n_averaged) == 3 and imported.n_averaged.dtype == jnp.int32
    assert_same(torch_swa, imported, rtol=0, atol=0)  # exact copies

    update = jax.jit(lambda s, p, b: s.update_parameters(p, b))
    for _ in range(3):
        train_a_bit(model, rng, np.float64)
        torch_swa.update_parameters(model)
        loaded.update_parameters(model)
        ours = update(ours, *named_trees(model))
        imported = update(imported, *named_trees(model))
    for swa in (ours, imported):
        assert_same(torch_swa, swa)
        assert_same(loaded, swa)
    # the three more updates moved the averages: the continuations are compared,
    # not copies of the exported state
    after = fti.averaged_model_state_dict(ours)
    assert not np.allclose(after["module.0.weight"], exported["module.0.weight"])
    assert int(after["n_averaged"]) == 6


def test_averaged_model_state_dict_before_any_update(x64):
    """n_averaged = 0: torch's first update copies; so does the imported one."""
    from funcopt import torch_interop as fti

    rng = np.random.default_rng(1)
    model = make_model(np.float64)
    torch_swa = torch.optim.swa_utils.AveragedModel(model)
    like = swa_utils.averaged_model(*named_trees(make_model(np.float64, seed=3)))
    ours = fti.load_averaged_model_state_dict(like, torch_swa.state_dict())
    assert int(ours.n_averaged) == 0
    ours = side_by_side(torch_swa, ours, model, rng, 2)
    assert_same(torch_swa, ours)


def test_averaged_model_state_dict_names_for_lists(x64):
    """Trees that are lists (parameters()/buffers() order) take explicit names."""
    from funcopt import torch_interop as fti

    rng = np.random.default_rng(2)
    model = make_model(np.float64)
    torch_swa = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.8)
    )
    params, buffers = as_trees(model)
    ours = swa_utils.averaged_model(
        params, buffers, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.8)
    )
    names = {
        "param_names": [n for n, _ in model.named_parameters()],
        "buffer_names": [n for n, _ in model.named_buffers()],
    }
    for _ in range(2):
        train_a_bit(model, rng, np.float64)
        torch_swa.update_parameters(model)
        ours = ours.update_parameters(*as_trees(model))
    sd = fti.averaged_model_state_dict(ours, **names)
    assert set(sd) == set(torch_swa.state_dict())
    back = fti.load_averaged_model_state_dict(ours, torch_swa.state_dict(), **names)
    for a, e in zip(back.params, torch_swa.module.parameters()):
        np.testing.assert_array_equal(a, e.detach().numpy())
    with pytest.raises(ValueError, match="2 names for the 6 leaves"):
        fti.averaged_model_state_dict(ours, param_names=["a", "b"])


def test_load_averaged_model_state_dict_errors(x64):
    from funcopt import torch_interop as fti

    model = make_model(np.float64)
    sd = torch.optim.swa_utils.AveragedModel(model).state_dict()
    params, buffers = named_trees(model)
    # built without buffers: torch's dict has them
    with pytest.raises(
        ValueError, match="unexpected key.*module.1.running_mean.*buffers"
    ):
        fti.load_averaged_model_state_dict(swa_utils.averaged_model(params), sd)
    loaded = fti.load_averaged_model_state_dict(
        swa_utils.averaged_model(params), sd, strict=False
    )
    assert loaded.buffers is None
    # a key missing, and a shape that does not fit
    like = swa_utils.averaged_model(params, buffers)
    partial = {k: v for k, v in sd.items() if k != "module.2.bias"}
    with pytest.raises(ValueError, match=r"missing key\(s\): \['module.2.bias'\]"):
        fti.load_averaged_model_state_dict(like, partial)
    bad = dict(sd, **{"module.2.bias": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"module.2.bias: shape \(5,\)"):
        fti.load_averaged_model_state_dict(like, bad, strict=False)
    with pytest.raises(TypeError, match="AveragedModel"):
        fti.averaged_model_state_dict(params)
    # a tree whose names collide between params and buffers
    with pytest.raises(ValueError, match="used twice"):
        fti.averaged_model_state_dict(
            swa_utils.averaged_model({"a": jnp.ones(1)}, {"a": jnp.ones(1)})
        )


def test_averaged_model_state_dict_tied_weights(x64):
    """A head tied to the embedding: one leaf, both names in torch's dict."""
    from funcopt import torch_interop as fti

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
    )
    model[1].weight = model[0].weight
    model = model.double()
    torch_swa = torch.optim.swa_utils.AveragedModel(model)
    tied = fti.tied_names(model.state_dict())
    assert tied == {"1.weight": "0.weight"}
    params = fti.module_state_dict_to_params(dict(model.named_parameters()))
    ours = swa_utils.averaged_model(params)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    torch_swa.update_parameters(model)
    torch_swa.update_parameters(model)
    params = fti.module_state_dict_to_params(dict(model.named_parameters()))
    ours = ours.update_parameters(params).update_parameters(params)
    sd = fti.averaged_model_state_dict(ours, tied=tied)
    assert set(sd) == set(torch_swa.state_dict())
    fresh = torch.optim.swa_utils.AveragedModel(model)
    fresh.load_state_dict(sd)  # strict
    back = fti.load_averaged_model_state_dict(ours, torch_swa.state_dict())
    np.testing.assert_array_equal(
        back.params["0"]["weight"], torch_swa.module[0].weight.detach().numpy()
    )
