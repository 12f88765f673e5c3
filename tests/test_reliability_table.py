"""Every row of docs/reliability.md's table is run here, and the doc matches."""

import pathlib
import re

import pytest

from tests.reliability_table import BEGIN, END, ROWS, markdown

DOC = pathlib.Path(__file__).parents[1] / "docs" / "reliability.md"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_raises_documented_error(row):
    _, call, exc, msg = row
    with pytest.raises(Exception) as err:
        call()
    assert type(err.value) is exc, repr(err.value)
    assert re.search(msg, str(err.value)), str(err.value)


def test_doc_table_matches_the_rows():
    text = DOC.read_text()
    assert BEGIN + markdown() + END in text
