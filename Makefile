# The one entry point: `make run` serves with the embedded defaults, `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
RUST_SRC := $(wildcard rust/src/*.rs) Cargo.toml Cargo.lock

.PHONY: run build test lint format bench bench-load bench-compare bench-baseline wrk pacer system-deps image test-container clean help

help:
	@echo "make run    - build and serve on HOST:PORT (default 127.0.0.1:5000) with the embedded defaults"
	@echo "make test   - build, lint, cargo test, pytest (what CI runs)"
	@echo "make lint   - ruff, cargo fmt --check, cargo clippy -D warnings, stub check"
	@echo "make format - ruff format + cargo fmt"
	@echo "make bench  - micro benches (native vs Python, limits) and the load bench (benches/load.py)"
	@echo "make bench-compare  - the quick load subset, its ratios against benches/baseline.json (fails on a >10% fall)"
	@echo "make bench-baseline - the same subset, written to benches/baseline.json (on a quiet machine)"
	@echo "make image  - build the container image (Dockerfile) here, with no registry: see docker/"
	@echo "make test-container - make image, then check it under compose with host networking"

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.7,<2"
	touch $@

# maturin develop installs the project's dependencies (and the dev extras) and the extension,
# with python/ linked in place so that Python edits need no rebuild.
$(VENV)/.built: $(VENV)/.deps $(RUST_SRC)
	$(VENV)/bin/maturin develop --release --extras dev -q
	touch $@

build: $(VENV)/.built

run: build
	$(VENV)/bin/pwachat serve

lint: build
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/ruff check python tests benches
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	$(PY) -m mypy.stubtest pwachat._native

format: build
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches
	cargo fmt

# The tests start a real redis-server and drive Debian's chromium; on Debian/Ubuntu as root this
# installs them when missing (elsewhere the browser tests skip without /usr/bin/chromium).
system-deps:
	@command -v redis-server >/dev/null || { \
		echo "redis-server is needed by the tests; installing the Debian package"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }
	@test -x /usr/bin/chromium || { \
		echo "chromium is needed by the browser tests; installing the Debian package"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium || true; }

test: build lint system-deps
	cargo test --quiet
	$(PY) -m pytest -q

bench: build system-deps
	$(PY) -m pytest benches --benchmark-only --benchmark-columns=median,ops,rounds -q -s
	$(MAKE) bench-load

# One server worker pinned to core 0; wrk, the fake upstream and benches/pacer (the many-streams
# scenarios' native upstream and client) on core 1 (see benches/load.py).
# Every run also writes its figures and ratios as JSON (BENCH_JSON, git-ignored).
BENCH_JSON ?= benches/results/last.json
# benches/pacer: its own crate and lock file (cargo rebuilds it only when it changed).
pacer:
	cargo build --release --quiet --manifest-path benches/pacer/Cargo.toml

wrk:
	@command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk

bench-load: build wrk pacer
	$(PY) benches/load.py --json $(BENCH_JSON)

# Not part of `make test`: the quick subset (load.py --quick, about a minute), compared as ratios to
# the same run's references against the committed baseline (benches/compare.py).
bench-compare: build wrk pacer
	$(PY) benches/load.py --quick --json benches/results/compare.json
	$(PY) benches/compare.py benches/results/compare.json

# Refresh the committed baseline: on a quiet machine (nothing else busy; /tmp/bench.lock held).
bench-baseline: build wrk pacer
	$(PY) benches/load.py --quick --json benches/baseline.json

# The container image, built here where containers reach no registry or index: local base images
# made from Debian packages and this host's Rust toolchain, wheels and crates fetched on the host,
# then the very Dockerfile a user builds with `docker build .`, told so by build ARGs (see
# docker/build-image.sh). Needs, as root, a Docker daemon (docker/start-dockerd.sh) and mmdebstrap.
IMAGE ?= pwachat:latest
DEBIAN_SUITE ?= bookworm
CONTAINER_ENV = IMAGE=$(IMAGE) DEBIAN_SUITE=$(DEBIAN_SUITE) \
	LOCAL_PYTHON_IMAGE=pwachat-local/python:$(DEBIAN_SUITE) \
	LOCAL_BUILDER_IMAGE=pwachat-local/python-build:$(DEBIAN_SUITE) \
	LOCAL_REDIS_IMAGE=pwachat-local/redis:$(DEBIAN_SUITE) \
	LOCAL_RUST_IMAGE=pwachat-local/rust:$$(rustc --version | cut -d' ' -f2)

image:
	$(CONTAINER_ENV) PYTHON=$(PY) docker/build-image.sh

# Not part of `make test`: compose (compose.yaml + compose.hostnet.yaml: host networking, every
# address on 127.0.0.1) runs the image twice with one Redis, and tests/container checks it over HTTP.
test-container: build image
	$(CONTAINER_ENV) REDIS_IMAGE=pwachat-local/redis:$(DEBIAN_SUITE) PWACHAT_CONTAINER_TESTS=1 \
		PWACHAT_COMPOSE="$(CURDIR)/docker/compose.sh" PYTHON=$(PY) \
		$(PY) -m pytest tests/container -q -p no:cacheprovider

clean:
	rm -rf target $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis .benchmarks
