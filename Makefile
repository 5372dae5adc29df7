# Two commands: `make train` and `make test`. Both create .venv from a Python >= 3.12 they find.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
EXTRAS ?= dev,notebooks,tpu-aot
export PYTHONHASHSEED ?= 0

.PHONY: venv train test test-fast bench clean

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	@PYBIN=$$(.ci/find-python) || exit 1; \
	  echo "using $$PYBIN ($$($$PYBIN --version))"; \
	  [ -x $(PY) ] || $$PYBIN -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

venv: $(VENV)/.installed

train: venv
	$(VENV)/bin/mhc-jax train --preset default $(ARGS)

test: venv
	@JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadgroup --timeout 1500 --durations=20 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): the test setup is broken" >&2; exit 5; fi; \
	  exit $$rc

test-fast: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 -m "not slow and not notebook and not multiprocess and not torch" $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/mhc-jax bench kernels $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
