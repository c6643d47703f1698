# FastServe: `make demo` runs the main job, `make test` the tests. Every target that needs the
# virtualenv builds it first, so both work on a fresh machine with only Python 3.11 and make.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SETUP_DONE := $(VENV)/.setup-done
PROTOS := $(shell find proto -name '*.proto' | sort)
STUBS_DONE := gen/python/.stubs-done

.PHONY: setup proto browser test screenshots lint up down status demo chaos compose-test clean

setup: $(SETUP_DONE) $(STUBS_DONE)

# Two packages, installed editable together: the light client (clients/python: client, CLI, stubs) and
# the server (the runtime, the model layer and the services), pinned by constraints.txt.
$(SETUP_DONE): pyproject.toml clients/python/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e 'clients/python[cli]' -e '.[dev]'
	touch $@

# Stubs are generated into a temporary folder and swapped in whole, never edited by hand.
proto: $(STUBS_DONE)
$(STUBS_DONE): $(SETUP_DONE) $(PROTOS)
	rm -rf gen/python.tmp && mkdir -p gen/python.tmp
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=gen/python.tmp --pyi_out=gen/python.tmp \
		--grpc_python_out=gen/python.tmp $(PROTOS)
	touch gen/python.tmp/.stubs-done
	rm -rf gen/python && mv gen/python.tmp gen/python

# tests/ui drive Debian's chromium through Playwright, which never downloads a browser of its own: installed
# here when missing (with sudo unless root); a failed install fails the target, so those tests never skip.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		echo "installing Debian's chromium for tests/ui"; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	fi
	@test -x $(CHROMIUM) || { echo "make browser: $(CHROMIUM) is missing and could not be installed" >&2; exit 1; }

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The dashboard's screenshots in docs/ui, taken by tests/ui on real jobs, models and artifacts.
screenshots: setup browser
	FASTSERVE_SCREENSHOTS=docs/ui $(BIN)/python -m pytest tests/ui $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check shared services clients tests bench
	$(BIN)/lint-imports
	cd proto && ../$(BIN)/buf lint
	@if git cat-file -e main:proto/buf.yaml 2>/dev/null; then \
		echo "buf breaking against main"; \
		$(BIN)/buf breaking proto --against '.git#branch=main,subdir=proto'; \
	else echo "main has no contracts yet: buf breaking skipped"; fi

up: setup
	$(BIN)/fastserve up

down: setup
	$(BIN)/fastserve down

# A stopped stack is an answer, not a failure (`fastserve status` exits 3 for it); a stack that runs in
# part (exit 4) or a status that could not be read fails the target.
status: setup
	@$(BIN)/fastserve status || test $$? -eq 3

demo: setup
	$(BIN)/fastserve demo

# Faults on a loopback stack (worker SIGKILLs, inference overload), bounded in time; not part of `test`.
chaos: setup
	$(BIN)/python -m bench.chaos

# The image and the compose stack built and run for real with podman, checked from the host
# (deploy/compose_test.py, docs/deploy.md); installs Debian's podman and tools when missing. Slow: not part of `test`.
compose-test: setup
	$(BIN)/python deploy/compose_test.py

# The generation benchmark with its CPU peers (vLLM CPU, CTranslate2), each installed the first time into a
# venv of its own under ~/.cache/fastserve-bench/peers (bench/peers.py); never part of `test`.
bench-generation-peers: setup
	BENCH_PEERS=1 $(BIN)/python -m bench.generation

# `make bench-<name>` runs bench/<name>.py, which prints its RESULT lines.
bench-%: setup
	$(BIN)/python -m bench.$*

clean:
	rm -rf $(VENV) gen .pytest_cache .ruff_cache
