# Two commands do everything: `make stages` (install + the whole pipeline) and `make test`.
CONFIG ?= configs/default.yaml
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WSSS := $(PY) -m stages.cli

.PHONY: install stages test test-fast lint bench clean train_classifier_ddp train_segmenter_ddp bench_executors

install: $(VENV)/.installed

# Re-installs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,sam,saliency]'
	touch $@

stages: install
	$(WSSS) all --config $(CONFIG)
	@$(PY) -m pipeline.report $(CONFIG)

# Any other target names a stage (make train_classifier, make refine, ...): the CLI checks the name
# (pipeline/stage_names.py lists them) and runs the stage. Makefile and pyproject.toml are files, not stages.
%: install
	$(WSSS) $@ --config $(CONFIG)

Makefile pyproject.toml: ;

test: install
	$(PY) -m pytest

# The tests but those marked slow (pyproject.toml's markers: a run of the whole pipeline or of a long part of it).
test-fast: install
	$(PY) -m pytest -m "not slow"

# Refinement images/s (bench/refine.json), the salient-object maps against onnxruntime (bench/saliency.json), then the
# map methods against their peer libraries (bench/results.json); e.g. BENCH_MAPS_ARGS='--threads 1' on a CPU that
# other jobs share.
bench: install
	$(PY) -m bench.bench_refine
	$(PY) -m bench.bench_saliency
	$(PY) -m bench.bench_maps $(BENCH_MAPS_ARGS)

# Data-parallel training of the classifier or the segmenter on NPROC processes (GPUs, or CPU with gloo);
# README "Scaling".
NPROC ?= 2
train_classifier_ddp train_segmenter_ddp: install
	$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m stages.cli $(@:_ddp=) --config $(CONFIG)

# make_maps and refine, local against Ray, on a finished run; e.g.
# BENCH_EXECUTORS_ARGS='--config configs/msrc21.yaml --source runs/msrc21 --images 48'
bench_executors: install
	OMP_NUM_THREADS=1 $(PY) scripts/bench_executors.py $(BENCH_EXECUTORS_ARGS)

# docs/configuration.md, generated from pipeline/config.py (tests/test_docs.py fails when it is stale).
.PHONY: docs
docs: install
	$(PY) scripts/config_docs.py

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
