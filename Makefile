# Two commands for a fresh machine: `make serve` and `make test`. Both bootstrap .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.strata-installed

# llama-cpp-python compiles llama.cpp on install (about 5 minutes on 2 cores). We build it once into a
# wheelhouse outside the checkout, for a portable AVX2 CPU: llama.cpp's default -march=native build
# also enables AMX on CPUs that advertise it, which dies with SIGILL on VMs that do not allow it.
LLAMA_CPP_VERSION := 0.3.36
WHEELHOUSE ?= $(HOME)/.cache/strata-wheels/llama-cpp-$(LLAMA_CPP_VERSION)-avx2
LLAMA_LOG := $(WHEELHOUSE).build.log
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# The compiler's progress lines ([12/180] or [ 40%]) and pip's own steps, out of pip's verbose build log.
LLAMA_PROGRESS := '^\s*(\[ *[0-9]+(\/[0-9]+|%)\]|\*\*\*)|^(Collecting|Downloading|Building wheel|Created wheel|Successfully)'
# A compiler line shortened to its step and source file ("[12/193] ggml-cpu.c"); any other line to 100 columns.
LLAMA_SHORT := -e 's@^\s*(\[[^]]*\]).* -c .*/([^/ ]+)$$@\1 \2@' -e 's/^(.{100}).+/\1.../'

# The suite runs in parallel processes, one test file each at a time (module-scoped servers stay shared), in
# the order tests/conftest.py gives: the longest files first.
# Most tests wait on real servers rather than compute, so one worker more than the cores keeps them busy.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

.PHONY: serve test test-fast lint bench bootstrap system-deps clean-venv image grpc

bootstrap: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> [1/3] virtual environment $(VENV) (pip's own output follows)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --upgrade pip
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "==> [2/3] building llama-cpp-python $(LLAMA_CPP_VERSION) once (about 5 minutes on 2 cores; log: $(LLAMA_LOG))"; \
		mkdir -p $(WHEELHOUSE); \
		if ! CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -v --no-deps --no-cache-dir \
			-w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION) 2>&1 | tee $(LLAMA_LOG) \
			| { grep --line-buffered -E $(LLAMA_PROGRESS) || true; } | sed -u -E $(LLAMA_SHORT); then \
			tail -n 30 $(LLAMA_LOG); echo "llama-cpp-python did not build; the whole log: $(LLAMA_LOG)"; exit 1; \
		fi; \
	else \
		echo "==> [2/3] llama-cpp-python $(LLAMA_CPP_VERSION): built before, in $(WHEELHOUSE)"; \
	fi
	@echo "==> [3/3] installing Strata and its dependencies into $(VENV)"
	@$(PY) -m pip install --find-links $(WHEELHOUSE) -e '.[embedded,dev,bench]'
	@touch $(STAMP)
	@echo "==> ready. The strata command is $(VENV)/bin/strata; \`source $(VENV)/bin/activate\` puts it on PATH."

# The gRPC API's code, generated from its contract (proto/); never committed, never edited.
GRPC_GEN := src/strata/v1/strata_pb2.py
$(GRPC_GEN): proto/strata/v1/strata.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src --grpc_python_out=src --pyi_out=src $<
	@touch src/strata/v1/__init__.py

grpc: $(GRPC_GEN)

serve: $(STAMP) $(GRPC_GEN)
	$(VENV)/bin/strata serve

# What the suite needs from the machine (bwrap, promtool, PostgreSQL, Redis): installed or started as root,
# otherwise named in one line, before the minutes of bootstrap.
system-deps:
	@$(PYTHON) scripts/ensure_system_deps.py

# Two groups, one after the other: the default suite (under 10 minutes on 2 cores), then the slow group — the
# soak-style tests (`slow`), the image build (`image`), the real embedded model (`e2e`: CPU inference) and the
# HAProxy cluster (`cluster`: three replicas), minutes each. CI (`.ci/run`) runs both, through this.
DEFAULT_TESTS := not slow and not image and not e2e and not cluster
SLOW_TESTS := slow or image or e2e or cluster

test: system-deps $(STAMP) $(GRPC_GEN) lint
	@echo "==> the default suite"
	$(PYTEST) -m '$(DEFAULT_TESTS)'
	@echo "==> the slow group (soak-style tests, the image build, the embedded model, the cluster)"
	$(PYTEST) -m '$(SLOW_TESTS)'

# The default suite only.
test-fast: system-deps $(STAMP) $(GRPC_GEN) lint
	$(PYTEST) -m '$(DEFAULT_TESTS)'

lint: $(STAMP)
	$(PY) -m ruff check src tests bench scripts examples
	$(PY) -m ruff format --check src tests bench scripts examples

clean-venv:
	rm -rf $(VENV)

bench: $(STAMP)
	$(PY) -m bench

# The OCI image (podman; deploy/image/build.sh says how the base is made where no registry is reachable).
IMAGE ?= strata:0.1.0
image: $(STAMP) $(GRPC_GEN)
	IMAGE=$(IMAGE) WHEELHOUSE=$(WHEELHOUSE) PYTHON=$(PY) deploy/image/build.sh
