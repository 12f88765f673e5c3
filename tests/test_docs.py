"""The documentation's code runs: every ```python block of a page, in order."""

import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
RUNNABLE_PAGES = ["porting.md", "extending.md"]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_page_code_runs(page, tmp_path):
    code = "\n".join(BLOCK.findall((DOCS / page).read_text()))
    assert code.strip(), f"{page} has no python blocks"
    script = tmp_path / "page.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
