# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.inductor-cache

.PHONY: test demo install clean bench-zoo

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch==2.13.0 only when the venv has no torch (a CPU build lies on this machine's disk).
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Two pytest-xdist workers, one per core (each with one torch thread: tests/conftest.py), taking tests
# one by one (--dist loadgroup), but for the files whose module-level results must be computed once,
# each run whole by one worker (tests/conftest.py: WHOLE_FILES).
# `make test PYTEST_WORKERS=0` runs the suite in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

demo: $(STAMP)
	$(VPY) bench/demo.py

bench-zoo: $(STAMP)
	$(VPY) bench/zoo.py --json bench/results/zoo.json --markdown bench/results/zoo.md

clean:
	rm -rf $(VENV) .inductor-cache .pytest_cache
