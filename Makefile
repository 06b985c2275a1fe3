# Two commands for a fresh machine: `make serve` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.strata-installed

# llama-cpp-python compiles llama.cpp on install (about 5 minutes on 2 cores). We build it once into a
# wheelhouse outside the checkout, for a portable AVX2 CPU: llama.cpp's default -march=native build
# also enables AMX on CPUs that advertise it, which dies with SIGILL on VMs that do not allow it.
LLAMA_CPP_VERSION := 0.3.36
WHEELHOUSE ?= $(HOME)/.cache/strata-wheels/llama-cpp-$(LLAMA_CPP_VERSION)-avx2
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: serve test lint bench bootstrap clean-venv

bootstrap: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (once; about 5 minutes on 2 cores)..."; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --quiet --no-deps --no-cache-dir \
			-w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi
	@$(PY) -m pip install --quiet --find-links $(WHEELHOUSE) -e '.[embedded,dev,bench]'
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/strata serve

test: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

clean-venv:
	rm -rf $(VENV)

bench: $(STAMP)
	$(PY) -m bench
