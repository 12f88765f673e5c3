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
        case.factory(**case.kwargs)
    assert type(our_error.value) is type(torch_error.value)
    assert str(our_error.value) == str(torch_error.value)
