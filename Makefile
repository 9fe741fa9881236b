# Quick start targets. `make demo` trains and evaluates the ECLIPSE prior on the built-in shapes world;
# `make test` runs the test suite. Both create ./.venv on first use.
PY ?= python3
VENV ?= .venv
PYBIN := $(VENV)/bin/python
WORKDIR ?= workdirs/eclipse_prior

.PHONY: venv venv-test demo test bench clean

$(VENV)/.core-installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.core-installed
	$(PYBIN) -m pip install -q torch==2.13.0
	$(PYBIN) -m pip install -q -e ".[test]"
	# Eval parity references (tests/eval): their torchvision dependency cannot be met beside the CPU torch
	# wheel, so they come without dependencies; the tests re-state the torchvision layers they use.
	$(PYBIN) -m pip install -q --no-deps pytorch-fid==0.3.0 lpips==0.1.4 clean-fid==0.1.35
	touch $@

venv: $(VENV)/.core-installed
venv-test: $(VENV)/.test-installed

demo: venv
	$(PYBIN) -m diffusion_jax.main --config configs/eclipse_prior.py --workdir $(WORKDIR)

test: venv-test
	$(PYBIN) -m pytest -q -n 2 --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV) workdirs
