# Two entry points, each sets up what it needs first:
#   make demo   install what the demo needs (no torch, no test tools), then run the main job on the embedded
#               default: serve model_repository/ with the local tritonserver and validate the served policy in
#               CityLearn (KPIs, parity, plot) -> reports/demo/
#   make test   install everything (training, export, the test tools, their Debian packages, perf_analyzer), then
#               run the whole test suite
# Everything lands in .venv (override with VENV=...); the onnxruntime backend build in ~/.cache/maddpg-citylearn
# ($MADDPG_CITYLEARN_CACHE moves it). `make demo` then `make test` adds what the tests need to the same .venv.
# Offline machines: CITYLEARN_LOCAL_DATASETS_PATH is pointed at ../shared/citylearn/datasets and
# MADDPG_TRITON_SOURCES at ../shared/triton-src when those folders exist.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# One stamp per install: each is newer than pyproject.toml once that install is done (the full one covers the demo's).
DEMO_STAMP := $(VENV)/.maddpg-citylearn-demo
FULL_STAMP := $(VENV)/.maddpg-citylearn-full
SHARED_DATASETS := $(abspath ../shared/citylearn/datasets)

ifneq ($(wildcard $(SHARED_DATASETS)),)
export CITYLEARN_LOCAL_DATASETS_PATH ?= $(SHARED_DATASETS)
export CITYLEARN_OFFLINE ?= 1
endif
# Triton's onnxruntime backend is built from pinned archives: offline machines take them from ../shared/triton-src.
SHARED_TRITON_SOURCES := $(abspath ../shared/triton-src)
ifneq ($(wildcard $(SHARED_TRITON_SOURCES)),)
export MADDPG_TRITON_SOURCES ?= $(SHARED_TRITON_SOURCES)
endif

.PHONY: setup demo-setup demo test lint clean promtool perf-analyzer backend
PERF_ANALYZER := $(VENV)/perf_analyzer

# Everything: what `make test` and `make lint` need.
setup: $(FULL_STAMP) promtool perf-analyzer backend

# What the demo needs: the client, the env, the local tritonserver, onnxruntime.
demo-setup: $(DEMO_STAMP)
	# Triton's onnxruntime backend (~1 min the first time; nothing when current); without it the demo serves on
	# the python backend.
	$(BIN)/python -m maddpg_serving.onnxruntime_backend build || \
	  echo "make demo: Triton's onnxruntime backend could not be built (see above): serving on the python backend" >&2

backend: $(FULL_STAMP)
	# Triton's onnxruntime backend for the bundled tritonserver (~1 min the first time; nothing when current).
	$(BIN)/python -m maddpg_serving.onnxruntime_backend build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[demo]"
	# citylearn's declared dependencies (openstudio, doe_xstock, torchvision) are not needed to run the env.
	$(BIN)/python -m pip install --no-deps "citylearn==3.0.2"
	touch $@

$(FULL_STAMP): pyproject.toml | $(BIN)/python
	# The CPU build of torch first: the project's range accepts it and pip then keeps it.
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -m pip install --no-deps "citylearn==3.0.2"
	touch $@ $(DEMO_STAMP)

# Debian packages the tests and benchmarks run: `prometheus` (promtool and the live Prometheus of
# tests/test_prometheus_live.py), `nginx-light` (the production pods' admission proxy, tests/test_overload.py) and
# `libb64-0d` (perf_analyzer). None is on PyPI. Installed with apt-get as root or through sudo; elsewhere setup stops
# and says so.
promtool:
	@{ command -v promtool >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; }; } \
	  && test -e /usr/lib/x86_64-linux-gnu/libb64.so.0d -o -n "$$(ldconfig -p 2>/dev/null | grep libb64.so.0d)" || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    if [ "$$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi; \
	    if [ "$$SUDO" != "none" ]; then \
	      echo "installing Debian packages prometheus, nginx-light, libb64-0d ..."; \
	      $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	        --no-install-recommends prometheus nginx-light libb64-0d >/dev/null || true; \
	    fi; \
	  fi; \
	  command -v promtool >/dev/null 2>&1 || { \
	    echo "make setup: promtool is missing and could not be installed: install Debian's prometheus package (apt-get install prometheus) or put a promtool binary on PATH, then run make again" >&2; \
	    exit 1; }; \
	  { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || { \
	    echo "make setup: nginx is missing and could not be installed: apt-get install nginx-light, then run make again" >&2; \
	    exit 1; }; }

# Triton's own load generator for `maddpg-citylearn bench`: the tritonclient 2.41.0 wheel ships the binary, with the
# CUDA runtime library it links from PyPI (no GPU needed). Its own directory, not the venv's tritonclient.
perf-analyzer: $(PERF_ANALYZER)/bin/perf_analyzer
$(PERF_ANALYZER)/bin/perf_analyzer: $(FULL_STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(PERF_ANALYZER) "tritonclient==2.41.0" "nvidia-cuda-runtime-cu12==12.9.79"

demo: demo-setup
	$(BIN)/maddpg-citylearn evaluate --serve model_repository --start 0 --end 719 --out reports/demo

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) reports .pytest_cache
