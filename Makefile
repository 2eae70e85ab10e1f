# Two commands: `make run` (set up + default suite) and `make test` (set up + whole test suite).
# `make install` is the set-up alone; it is idempotent and fast when nothing changed.
PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.vlab-installed
SOURCES := $(shell find native vlab experiments -type f \( -name '*.c' -o -name '*.h' -o -name '*.S' -o -name '*.ld' -o -name '*.py' -o -name '*.toml' \) -not -name '_native.c' 2>/dev/null) pyproject.toml setup.py

.PHONY: install run test test-svm sysdeps clean bench

install: $(STAMP)

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# System packages (Debian's bcc, kernel headers, chromium) only when missing and only as root.
sysdeps:
	@bash scripts/sysdeps.sh

$(STAMP): $(VENV)/bin/python $(SOURCES)
	@bash scripts/sysdeps.sh
	$(VPY) -m pip install -q -e '.[test,fleet]'
	@bash scripts/bcc_shim.sh $(VENV)
	@touch $(STAMP)

run: install
	$(VENV)/bin/vlab run

test: install
	$(VPY) -m pytest -q

# The SVM/NPT lane: a KVM host emulated by QEMU's TCG, booted with this checkout (scripts/svm/).
test-svm: install
	@bash scripts/svm/lane.sh

# Speed goals live here, not in tests: the numba models, and what the exit tracer costs.
bench: install
	$(VPY) -m vlab.analysis.benchmarks
	$(VPY) -m vlab.trace.bench

clean:
	rm -rf $(VENV) build *.egg-info vlab/vmm/_native*.so vlab/vmm/_native.c native/guest/out native/bench/out

# The independent bare measurement of exit costs (no Python in the loop); see native/bench/.
native/bench/out/exitbench: native/bench/exitbench.c $(wildcard native/vmm/*.c native/vmm/*.h native/include/*.h)
	@mkdir -p native/bench/out
	gcc -O2 -Wall -std=gnu11 -Inative/include -Inative/vmm native/bench/exitbench.c native/vmm/*.c -lrt -o $@
