# Two commands do everything: `make stages` (install + the whole pipeline) and `make test`.
CONFIG ?= configs/default.yaml
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WSSS := $(PY) -m pipeline.cli
STAGE_NAMES := train_classifier make_maps refine export evaluate

.PHONY: install stages $(STAGE_NAMES) test lint bench clean

install: $(VENV)/.installed

# Re-installs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

stages: install
	$(WSSS) all --config $(CONFIG)

$(STAGE_NAMES): install
	$(WSSS) $@ --config $(CONFIG)

test: install
	$(PY) -m pytest

# Refinement images/s (bench/refine.json), then the map methods against their peer libraries
# (bench/results.json); e.g. BENCH_MAPS_ARGS='--threads 1' on a CPU that other jobs share.
bench: install
	$(PY) -m bench.bench_refine
	$(PY) -m bench.bench_maps $(BENCH_MAPS_ARGS)

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
