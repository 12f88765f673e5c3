# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: venv demo test lint docs docs-check bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[test,examples,docs,lint]"
	# the native fused CPU kernels (no compiler: the pure JAX path)
	$(PY) -m funcopt._native.build
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/digits_side_by_side.py

test: venv
	$(PY) -m pytest -n 2 --dist loadgroup -q

lint: venv
	$(VENV)/bin/ruff check funcopt tests examples benchmarks docs/check_site.py hatch_build.py
	$(VENV)/bin/ruff format --check funcopt tests examples benchmarks docs/check_site.py hatch_build.py
	$(VENV)/bin/mypy

docs: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir out/site

# every page in headless Chromium, no network: formulas typeset, no reST or
# unresolved references left (needs chromium: apt-get install chromium)
docs-check: docs
	$(PY) docs/check_site.py out/site

bench: venv
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/in_jit_grads.py --xla-region-analysis
	$(PY) benchmarks/targets.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
