# `make demo` and `make test` work on a fresh clone: they create .venv when absent,
# install torch first (pinned; override TORCH_SPEC for a CUDA build), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gspo-installed

.PHONY: install demo test lint bench bench-trl docs
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/gspo demo --output_dir outputs/demo

test: install
	$(PY) -m pytest -q

# ruff (pinned in the test extras; line length and rules in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts

bench: install
	$(PY) bench/bench_step.py

docs: install
	$(PY) scripts/gen_config_reference.py
