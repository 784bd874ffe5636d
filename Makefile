# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
export PYTHONUNBUFFERED := 1
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip prints a warning per package for index folders it cannot read; keep real errors.
QUIET_PIP := { grep -v "is ignored" || true; }

.PHONY: demo test lint format bench clean interop core-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | $(QUIET_PIP)

# One stamp per extras set, rebuilt when the dependency list changes.
$(VENV)/.installed-%: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[$*]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import gemmascope_jax" && touch $@

# The model tour (~1 min), then the main job: train two dictionaries on the embedded 270M.
demo: $(VENV)/.installed-demo
	$(BIN)/gemmascope-jax demo --max-new-tokens 24
	$(BIN)/gemmascope-jax train configs/demo.yaml
	$(BIN)/gemmascope-jax dashboard --dictionary runs/demo/export/resid_post_9_matryoshka/native --max-tokens 16384 --latents 200 --out runs/demo/dashboard --card runs/demo/report/cards/resid_post_9_matryoshka

# Peer libraries whose pins clash with ours (circuit-tracer 0.5.0 pins transformers 4.57.3)
# live in their own venv; tests run scripts/interop/*.py with it.
INTEROP := .venv-interop
interop: $(INTEROP)/.installed
$(INTEROP)/.installed: scripts/interop/requirements.txt
	$(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/interop/requirements.txt 2>&1 | $(QUIET_PIP)
	$(INTEROP)/bin/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision
	touch $@

# The jax CUDA PJRT plugin lives in its own venv (in .venv it would print a cuDNN traceback in
# every run without JAX_PLATFORMS); tests/test_gpu_compile.py runs scripts/gpu_aot_check.py
# with it: a deviceless H100/H200 compile of the Pallas GPU kernels (docs/gpu_compile.md).
GPU_AOT := .venv-gpu-aot
$(GPU_AOT)/.installed: constraints.txt
	$(PYTHON) -m venv $(GPU_AOT)
	$(GPU_AOT)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt jax==0.10.2 jaxlib==0.10.2 numpy 2>&1 | $(QUIET_PIP)
	$(GPU_AOT)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2 2>&1 | $(QUIET_PIP)
	touch $@

# Only `pip install gemmascope-jax`, no extras: tests/test_cli_core_install.py runs every
# CLI verb's --help with it (a missing core dependency fails there).
CORE := .venv-core
core-venv: $(CORE)/.installed
$(CORE)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(CORE)
	$(CORE)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e . 2>&1 | $(QUIET_PIP)
	touch $@

test: $(VENV)/.installed-test interop $(GPU_AOT)/.installed $(CORE)/.installed
	@# The dashboard test drives Debian's headless Chromium; install it when missing.
	@test -x /usr/bin/chromedriver || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# CPU backend for running; libtpu only compiles (several test processes may load it).
	@# Two workers, one test file each at a time (module fixtures compile once): the suite is
	@# mostly single-threaded compiles, so two cores finish it in about half the time.
	JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 $(BIN)/python -m pytest -q --durations=15 \
		-n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed-test
	$(BIN)/python scripts/bench_forward.py

clean:
	rm -rf $(VENV) $(GPU_AOT) .pytest_cache .ruff_cache
