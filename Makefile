# servekit: the one entry point.  `make serve` to serve the default models, `make test` to test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVEKIT := $(VENV)/bin/servekit
STORE ?= model_store
RUN_DIR ?= .run
MODEL ?= digits
IMG ?= tests/data/digit-7.png
PYTEST_ARGS ?=

.PHONY: help install dev lock archive serve stop status rollout rollback versions predict test test-unit test-fast lint typecheck bench docker container-base docker-lint container-image container-test k8s-tools k8s-check soak clean

help:
	@echo "make serve      install, archive the default models if missing, start TorchServe + reload watcher"
	@echo "make stop       stop everything 'make serve' started"
	@echo "make test       install dev extras and run the whole test suite against real TorchServe"
	@echo "make test-unit  the fast layer: no Java, no server (under a minute)"
	@echo "make lint       ruff (lint and format check); make typecheck: mypy"
	@echo "make archive    build versioned .mar files into $(STORE)/ (WEIGHTS=path for resnet50)"
	@echo "make predict    IMG=path MODEL=name: classify an image"
	@echo "make status     health and model versions"
	@echo "make rollout    MODEL=name VERSION=v: make a version the default (rollback: MODEL=name)"
	@echo "make bench      benchmark our handler against stock TorchServe (JSON + PNG in bench-results/)"
	@echo "make docker     build the container image (VARIANT=gpu|cpu, TORCH_INDEX_URL=..., BASE_IMAGE=...)"
	@echo "make lock       rewrite requirements/*.txt (hash-locked) after changing a pin in pyproject.toml"
	@echo "make k8s-check  render and validate the Kubernetes overlays"

# Every dependency comes from a hash-locked file (requirements/, written by `make lock`); the
# project itself is installed on top without dependencies or an isolated build environment, so
# nothing unpinned is ever fetched.
$(VENV)/.installed: pyproject.toml requirements/local.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --requirement requirements/local.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements/dev.txt
	$(PY) -m pip install --quiet --require-hashes --requirement requirements/dev.txt
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

archive: install
	$(SERVEKIT) archive --model-store $(STORE)

serve: archive
	$(SERVEKIT) serve --model-store $(STORE) --run-dir $(RUN_DIR)

stop:
	@if [ -x $(SERVEKIT) ]; then $(SERVEKIT) stop --run-dir $(RUN_DIR); fi

status: install
	-$(SERVEKIT) health --model-store $(STORE) --run-dir $(RUN_DIR)
	-$(SERVEKIT) reload list --model-store $(STORE) --run-dir $(RUN_DIR)

rollout: install
	$(SERVEKIT) reload rollout $(MODEL) $(VERSION) --model-store $(STORE) --run-dir $(RUN_DIR)

rollback: install
	$(SERVEKIT) reload rollback $(MODEL) --model-store $(STORE) --run-dir $(RUN_DIR)

versions: install
	$(SERVEKIT) reload list --model-store $(STORE) --run-dir $(RUN_DIR)

predict: install
	$(SERVEKIT) predict $(IMG) --model $(MODEL) --model-store $(STORE) --run-dir $(RUN_DIR)

lock: dev
	bash scripts/lock.sh

k8s-tools: dev
	bash scripts/k8s_tools.sh

# The fast unit layer runs first, on its own, so a broken core fails in seconds, not after the
# servers (a PYTEST_ARGS filter that leaves one layer empty is no failure: pytest's exit 5). Two
# test processes (pytest-xdist), each taking whole files: a server test mostly waits
# (start, polls, TorchServe's 2 s graceful stop), one process kept 0.9 of 2 cores busy.
TEST_WORKERS ?= 2
test: dev k8s-tools
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests/unit $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests/integration $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-unit: dev k8s-tools
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Everything but the slow and the container tests (still starts TorchServe).
test-fast: dev
	$(PY) -m pytest -m "not heavy and not container" $(PYTEST_ARGS)

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: dev
	$(VENV)/bin/mypy

k8s-check: k8s-tools
	$(PY) -m pytest tests/unit/test_k8s.py -q

soak: dev
	$(PY) scripts/soak.py $(SOAK_ARGS)

bench: install
	$(SERVEKIT) bench $(BENCH_ARGS)

docker:
	VARIANT=$(or $(VARIANT),gpu) bash docker/build.sh

# Without an image registry: a Debian base made with debootstrap, imported into podman.
container-base:
	bash docker/podman-setup.sh

docker-lint: dev
	bash docker/lint.sh

container-image: container-base
	BASE_IMAGE=localhost/debian-base:bookworm VARIANT=cpu TORCH_INDEX_URL=$(or $(TORCH_INDEX_URL),pypi) \
		bash docker/build.sh

container-test: dev container-image
	$(PY) -m pytest -m container tests/integration/test_container.py $(PYTEST_ARGS)

clean: stop
	rm -rf build bench-results $(RUN_DIR) $(STORE)/*.mar
