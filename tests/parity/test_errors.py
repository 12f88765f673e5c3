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
