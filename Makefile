# Two commands: `make train` and `make test`. Both create .venv from a Python >= 3.12 they find.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
EXTRAS ?= dev,notebooks,tpu-aot,gpu-aot,docs
# bench-gpu runs on a GPU machine with JAX (and its CUDA plugin) already installed: no venv, no pip.
PYTHON3 ?= python3
export PYTHONHASHSEED ?= 0

.PHONY: venv train test test-fast bench bench-gpu gpu-aot clean

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	@PYBIN=$$(.ci/find-python) || exit 1; \
	  echo "using $$PYBIN ($$($$PYBIN --version))"; \
	  [ -x $(PY) ] || $$PYBIN -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

venv: $(VENV)/.installed

# The venv holds the compile-only accelerator plugins (tpu-aot, gpu-aot extras); on a machine with no
# GPU or TPU device they would print their failed start-up before JAX falls back to the CPU.
train: venv
	@if [ -z "$${JAX_PLATFORMS+set}" ] && ! ls /dev/nvidia0 /dev/accel0 /dev/vfio/0 >/dev/null 2>&1; \
	  then export JAX_PLATFORMS=cpu; fi; \
	  $(VENV)/bin/mhc-jax train --preset default $(ARGS)

test: venv
	@JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadgroup --timeout 1500 --durations=20 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): the test setup is broken" >&2; exit 5; fi; \
	  exit $$rc

test-fast: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 -m "not slow and not notebook and not multiprocess and not torch" $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/mhc-jax bench kernels $(ARGS)

# One H100 / H200: kernels (xla vs pallas), bench step d2048 / seq 2048 (residual vs mHC n=4), peers.
# Writes experiments/results/bench_gpu_<date>.json as it goes; each section has a time budget.
bench-gpu:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON3) -m mhc_jax.tools.bench_gpu $(ARGS)

# Deviceless H100 compile sweep (kernels + 1b train step) -> experiments/results/h100_aot_<date>.json.
gpu-aot: venv
	JAX_PLATFORMS=cpu $(PY) -m mhc_jax.tools.gpu_aot $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
