# Kit — every target runs inside the one environment declared in environment.yml.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ENV        ?= .venv
PY         := $(ENV)/bin/python
KIT        := $(ENV)/bin/kit
SERVICE    ?= demo
PYTHON     ?= python3
CONDA      := $(shell command -v micromamba || command -v mamba || command -v conda)
STAMP      := $(ENV)/.kit-installed
PYTEST_ARGS ?=
# The suite runs on several processes: most tests wait on subprocesses (gunicorn, kernels, nginx), so more
# workers than cores pays; a file's tests stay on one worker (they share module fixtures).
TEST_WORKERS ?= 4
XDIST       := -n $(TEST_WORKERS) --dist loadfile
# More test workers than cores: torch's OpenMP threads then sleep when idle instead of spinning (measured on a
# 77-test slice of zoo, gate and guard tests with 4 workers on 2 cores: 7% less CPU, 5% less wall time).
TEST_ENV    := OMP_WAIT_POLICY=PASSIVE

.PHONY: help env lock demo test test-zoo test-s3-compat test-image test-image-if-changed typecheck lint test-unit test-integration test-e2e validate bench pack pack-verify lab clean browser-deps fleet-deps fuzz s3-server

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# pip's part of environment.yml, so the venv fallback installs exactly what conda would.
PIP_SPECS = $(shell $(PYTHON) -c "import re,sys;t=open('environment.yml').read().split('- pip:',1)[1];print(' '.join(re.findall(r'^\s+-\s+(\S.*?)\s*$$',t,re.M)))")

# conda/mamba/micromamba answer their own prompts through *_ALWAYS_YES (not every version takes -y).
$(STAMP): pyproject.toml environment.yml
ifneq ($(CONDA),)
	@echo "make env: creating the conda environment at $(ENV) with $(CONDA)"
	CONDA_ALWAYS_YES=true MAMBA_ALWAYS_YES=true $(CONDA) env create -p $(ENV) -f environment.yml \
	  || CONDA_ALWAYS_YES=true MAMBA_ALWAYS_YES=true $(CONDA) env update -p $(ENV) -f environment.yml --prune
else
	@echo "make env: no conda/mamba/micromamba on PATH; creating a venv at $(ENV) with environment.yml's pip packages"
	$(PYTHON) -m venv $(ENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_SPECS)
endif
	$(PY) -m ipykernel install --sys-prefix --name kit --display-name "Kit ($(notdir $(abspath $(ENV))))" >/dev/null
	$(KIT) env --write-lock >/dev/null
	@touch $@

env: $(STAMP) ## create the environment from environment.yml (conda if present, else .venv)

lock: $(STAMP) ## write .kit/environment.lock.json, the exact environment fingerprints compare against
	$(KIT) env --write-lock

demo: $(STAMP) ## the main job end to end on embedded defaults
	$(PY) -m kit.demo

test: $(STAMP) ## run the test suite (unit, integration, e2e) but the real-model zoo (make test-zoo) and the environment builds (make test-image)
	$(TEST_ENV) $(PY) -m pytest -m "not image and not zoo" $(XDIST) $(PYTEST_ARGS)

# The zoo's tests share no module fixtures: each model goes to the next free worker, longest first (conftest.py).
test-zoo: $(STAMP) ## the real-model zoo: twelve architectures deployed twice each from Kit's installed wheel, served on both backends
	$(TEST_ENV) $(PY) -m pytest -m zoo -n 3 --dist load $(PYTEST_ARGS)

# The S3 registry's integration tests again, against a second implementation of the S3 API: moto's model of AWS
# S3 (KIT_TEST_S3=moto: tests/s3_server.py's MotoServer, signatures and an IAM policy checked) instead of
# SeaweedFS. moto keeps objects in memory, so the outage tests (tests/e2e/test_s3_service.py, test_s3_fleet.py
# stop and restart the store) are not in this tier; none of these files restarts it. A file per worker, each
# worker with its own moto (measured on 2 cores: 36 s against 44 s on one process, 37-49 s on four).
S3_COMPAT_TESTS := tests/integration/test_s3_registry.py tests/integration/test_s3_upload.py \
                   tests/integration/test_s3_faces.py tests/integration/test_s3_store_checks.py
test-s3-compat: $(STAMP) ## the S3 registry's integration tests against a second S3 implementation, moto's model of AWS S3
	KIT_TEST_S3=moto $(TEST_ENV) $(PY) -m pytest $(S3_COMPAT_TESTS) -n 2 --dist loadfile $(PYTEST_ARGS)

test-image: $(STAMP) ## the environment builds: the container image (kit pack --image, buildah) and the conda prefix with torch
	$(TEST_ENV) $(PY) -m pytest -m image $(PYTEST_ARGS)
	@.ci/image-key > .ci/image-tested && echo "test-image: passed; recorded its inputs' key in .ci/image-tested (commit it)"

# CI: the environment builds run when what they test (pack, templates, environment, the tests) changed since
# the key recorded by the last passing `make test-image`; `make test-image` runs them on demand.
test-image-if-changed: $(STAMP)
	@if [ "$$(.ci/image-key)" = "$$(cat .ci/image-tested 2>/dev/null)" ]; then \
	  echo "test-image: skipped, its inputs (kit/pack, kit/templates, environment.yml, pyproject.toml, the tests; .ci/image-key) are unchanged since it last passed (.ci/image-tested); run make test-image to force it"; \
	else $(MAKE) test-image; fi

typecheck: $(STAMP) ## mypy over kit/ (types on public functions; CI runs it)
	$(PY) -m mypy

lint: $(STAMP) ## ruff over kit/, tests/ and benchmarks/: pyflakes, import order, likely bugs (CI runs it)
	$(ENV)/bin/ruff check kit tests benchmarks

# The unit tier waits on nothing: as many workers as cores, each test to the next free one (measured on 2
# cores: 45 s against 56 s with the suite's four file-bound workers, which collect everything four times).
test-unit: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests/unit -n 2 --dist worksteal $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests/integration $(XDIST) $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests/e2e $(XDIST) $(PYTEST_ARGS)

validate: $(STAMP) ## run the validation gate on the demo model (MODEL=name@version)
	$(KIT) validate $(or $(MODEL),demo-digits@latest)

# ~2,400 examples per operation: > 10,000 cases in all (the test suite sends about 1,000).
FUZZ_EXAMPLES ?= 2400
fuzz: $(STAMP) ## schemathesis vs a real service's /openapi.json with a JWT: >= 10,000 cases, 0 5xx, 0 worker deaths
	$(PY) tests/fuzz_service.py --max-examples $(FUZZ_EXAMPLES)

bench: $(STAMP) ## serving benchmark against the in-process forward and a naive Flask app
	$(PY) benchmarks/serving.py

pack: $(STAMP) ## build dist/<service>-<version>-<platform>.tar.gz (SERVICE=name)
	$(KIT) pack services/$(SERVICE)

pack-verify: $(STAMP) ## pack, then unpack in a temp folder, serve it and check the stored example
	$(KIT) pack services/$(SERVICE) --verify

lab: $(STAMP) ## JupyterLab in the same environment the service uses
	$(ENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

browser-deps: ## Debian's chromium for the browser test (root, apt)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

fleet-deps: ## Debian's nginx, prometheus, buildah (fleet tests), s3fs (a bucket mounted as a folder, refused) and wrk (make bench) (root, apt)
	@command -v nginx >/dev/null && command -v promtool >/dev/null && command -v buildah >/dev/null && command -v wrk >/dev/null \
	  && command -v s3fs >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx prometheus buildah wrk s3fs >/dev/null)

s3-server: $(STAMP) ## a local S3 server (SeaweedFS, 127.0.0.1) to try an s3:// registry; prints the AWS_* to export (tests start their own)
	$(PY) tests/s3_server.py test-artifacts/s3-data

clean: ## remove build outputs (keeps the environment and the registry)
	rm -rf dist build .pytest_cache test-artifacts
