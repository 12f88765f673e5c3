"""The README's torch -> funcopt table stays true."""

import inspect
import pathlib
import re

import torch.optim

import funcopt as fo
from tests.parity.cases import OPT_CASES

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
ROW = re.compile(r"^\| `(\w+)` \| `fo\.(\w+)` \| (.+?) \|$", re.M)
# tested in their own files rather than the generic table
SEPARATELY_TESTED = {"lbfgs", "sparse_adam"}


def _rows():
    return {
        torch_name: (ours, status) for torch_name, ours, status in ROW.findall(README)
    }


def test_every_torch_optimizer_is_listed():
    optimizers = {
        name
        for name in torch.optim.__all__
        if inspect.isclass(getattr(torch.optim, name))
        and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
        and name != "Optimizer"
    }
    assert optimizers <= set(_rows())


def test_status_is_true():
    tested = {case.factory.__name__ for case in OPT_CASES} | SEPARATELY_TESTED
    for ours, status in _rows().values():
        if status.startswith("✅"):
            assert hasattr(fo, ours), f"{ours} is marked done but does not exist"
            assert ours in tested, f"{ours} is marked done but not parity-tested"
        else:
            assert not hasattr(fo, ours), f"{ours} exists: update its status"


SCHED_ROW = re.compile(
    r"^\| `(?:swa_utils\.)?(\w+)` \| `(\w+)`[^|]* \| (.+?) \|$", re.M
)


def test_every_torch_scheduler_is_listed_and_exists():
    import torch.optim.lr_scheduler as torch_sched

    rows = {t: (ours, status) for t, ours, status in SCHED_ROW.findall(README)}
    schedulers = {
        name
        for name in torch_sched.__all__
        if inspect.isclass(getattr(torch_sched, name)) and name != "LRScheduler"
    }
    assert schedulers | {"SWALR"} <= set(rows)
    for ours, status in rows.values():
        assert status.startswith("✅")
        assert hasattr(fo.lr_scheduler, ours), ours
