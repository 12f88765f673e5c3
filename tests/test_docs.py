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


# --------------------------------------------------------------------------
# docstrings are Markdown (the API pages render them with mkdocstrings)
# --------------------------------------------------------------------------

PACKAGE = pathlib.Path(__file__).parent.parent / "funcopt"
REST_MARKUP = re.compile(
    r":(math|func|class|meth|data|mod|attr|obj|exc|ref|doc):`"  # roles
    r"|^\s*\.\. [a-z-]+::"  # directives
    r"|[^:\s]::\s*$"  # literal-block markers
    r"|^\s*={3,}(\s+={3,})+\s*$",  # simple-table borders
    re.M,
)


def _docstrings():
    import ast

    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                body = node.body
                if (
                    body
                    and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)
                ):
                    where = f"{path.relative_to(PACKAGE.parent)}:{body[0].lineno}"
                    literal = ast.get_source_segment(source, body[0].value) or ""
                    yield where, body[0].value.value, literal


def test_docstrings_have_no_rest_markup():
    found = [
        f"{where}: {m.group(0).strip()!r}"
        for where, text, _ in _docstrings()
        for m in REST_MARKUP.finditer(text)
    ]
    assert not found, "reST in docstrings (write Markdown):\n" + "\n".join(found)


def test_docstring_math_is_well_formed():
    """``$$`` blocks close, and TeX sits in raw strings (``"\\frac"`` would be a
    form feed and ``"\\b"`` a backspace in a plain one)."""
    bad = []
    for where, text, literal in _docstrings():
        display = [ln for ln in text.splitlines() if ln.strip() == "$$"]
        if len(display) % 2:
            bad.append(f"{where}: unclosed $$ block")
        if "$" in text and "\\" in literal and literal.lstrip("uU")[:1] not in "rR":
            bad.append(f"{where}: TeX in a docstring that is not a raw string")
    assert not bad, "\n".join(bad)
