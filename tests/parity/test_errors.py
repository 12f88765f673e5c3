"""Every bad argument raises what torch raises, with torch's message."""

import pytest
import torch

from tests.parity.cases import ERROR_PARAMS


@pytest.mark.parametrize("case", ERROR_PARAMS)
def test_bad_argument_matches_torch(case):
    param = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(Exception) as torch_error:
        case.torch_cls([param], **case.kwargs)
    with pytest.raises(Exception) as our_error:
        case.factory(**case.funcopt_kwargs())
    assert type(our_error.value) is type(torch_error.value)
    if str(torch_error.value):
        assert str(our_error.value) == str(torch_error.value)
    else:  # a bare assert in the reference (lion-pytorch): ours names the value
        name, value = next(iter(case.kwargs.items()))
        assert f"{name} " in str(our_error.value), str(our_error.value)
        assert repr(value) in str(our_error.value), str(our_error.value)


@pytest.mark.parametrize(
    "torch_cls,factory",
    [
        (torch.optim.NAdam, "nadam"),
        (torch.optim.RAdam, "radam"),
        (torch.optim.ASGD, "asgd"),
    ],
    ids=["nadam", "radam", "asgd"],
)
def test_foreach_with_differentiable_is_refused_with_torchs_message(torch_cls, factory):
    """torch's `_multi_tensor_*` asserts at the first step ("_foreach ops
    don't support autograd"); funcopt refuses the arguments when the optimizer
    is built, as a `ValueError` (an argument error) with torch's message."""
    import funcopt as fo

    param = torch.zeros(3, requires_grad=True)
    opt = torch_cls([param], foreach=True, differentiable=True)
    param.grad = torch.ones(3)
    with pytest.raises(AssertionError) as torch_error:
        opt.step()
    with pytest.raises(ValueError) as our_error:
        getattr(fo, factory)(foreach=True, differentiable=True)
    assert str(our_error.value) == str(torch_error.value)
