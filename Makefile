# siteadapt: `make demo` (set up + run the main job on the embedded synthetic sites), `make test` (set up + run tests).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PROFILE ?= quick

.PHONY: demo test setup clean-outputs

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of PyTorch first (a plain 'torch' requirement would pull a multi-GB CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,metrics-ref]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/siteadapt demo --profile $(PROFILE)

test: setup
	$(PY) -m pytest -q

clean-outputs:
	rm -rf data metrics reports runs
