"""Each factory takes torch's arguments, in torch's order, with torch's defaults."""

import inspect

import pytest

from tests.parity.cases import OPT_CASES

FUNCOPT_ONLY = {"param_groups"}


@pytest.mark.parametrize("case", OPT_CASES, ids=[c.name for c in OPT_CASES])
def test_signature_matches_torch(case):
    torch_sig = inspect.signature(case.torch_cls.__init__)
    ours = inspect.signature(case.factory)
    expected = [
        (p.name, p.kind, p.default)
        for p in torch_sig.parameters.values()
        if p.name not in ("self", "params")
        # pytorch-optimizer's classes take **kwargs (extra group keys such as
        # adanorm); funcopt's factories have no catch-all
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    actual = [
        (p.name, p.kind, p.default)
        for p in ours.parameters.values()
        if p.name not in FUNCOPT_ONLY
    ]
    assert actual == expected
