# siteadapt: `make demo` (set up + run the main job on the embedded synthetic sites), `make test` (set up + run tests),
# `make test-fast` (the tests without the `slow` ones).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
BIN     = $(CURDIR)/$(VENV)/bin
# DVC stages call the `siteadapt` command: the project's environment comes first on PATH
RUN     = PATH="$(BIN):$$PATH"
PROFILE ?= quick

.PHONY: demo demo-nodvc test test-fast setup dvc-gen remote mlflow-ui clean-outputs study-real-cxr

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of PyTorch first (a plain 'torch' requirement would pull a multi-GB CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	# DVC's S3 stack next: it fixes botocore to what aiobotocore accepts (resolved together with moto, pip backtracks)
	$(PY) -m pip install --quiet 'dvc[s3]>=3.60,<4' 'boto3<1.43.118'
	$(PY) -m pip install --quiet -e '.[test,metrics-ref]'
	touch $@

setup: $(VENV)/.installed

# The main job: `dvc repro` of dvc.yaml (generated from params.yaml) on the embedded synthetic sites, then the summary.
demo: setup
	@$(RUN) siteadapt dvc-gen --check
	@t0=$$(date +%s); $(RUN) dvc repro && echo "== dvc repro finished in $$(( $$(date +%s) - t0 )) s =="
	@$(RUN) siteadapt summary

# The same stages in one process without DVC (always recomputes everything), tracked and registered in MLflow like dvc repro.
demo-nodvc: setup
	$(RUN) siteadapt demo --profile $(PROFILE)

test: setup
	$(RUN) $(PY) -m pytest -q

# The quick loop (issue 28): everything but the tests marked `slow` (whole DVC/Kubeflow pipelines, real-data runs,
# long training; each over ~10 s). Under 3 minutes on 2 idle cores; `make test` (CI) still runs them all.
test-fast: setup
	$(RUN) $(PY) -m pytest -q -m "not slow"

# The real chest X-ray study (issue 26): needs ../shared/data/cxr_lungs; writes docs/study-real-cxr.md (aggregates only)
study-real-cxr: setup
	$(RUN) $(PY) benchmarks/study_real_cxr.py $(STUDY_ARGS)

dvc-gen: setup
	$(RUN) siteadapt dvc-gen

# DVC remote on an S3-compatible store: make remote URL=s3://bucket/prefix. Endpoint from $AWS_ENDPOINT_URL (or
# $S3_ENDPOINT_URL), written to the git-ignored .dvc/config.local; credentials stay in the environment.
remote: setup
	@test -n "$(URL)" || { echo "usage: make remote URL=s3://bucket/prefix"; exit 1; }
	$(RUN) dvc remote add --force --default storage $(URL)
	@ep="$${AWS_ENDPOINT_URL:-$$S3_ENDPOINT_URL}"; if [ -n "$$ep" ]; then \
		$(RUN) dvc remote modify --local storage endpointurl "$$ep"; echo "endpoint $$ep (in .dvc/config.local)"; fi

mlflow-ui: setup
	$(RUN) mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean-outputs:
	rm -rf data metrics reports runs models registry
