# Two commands for a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
VENV_ARGS ?=
TORCH ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

PACKAGES := data_loader sharding train evaluate scmodels launch scpretrain
.PHONY: setup demo test lint clean bench-loader bench-corpus bench-annotation bench-gpu bench-real bench-integrate bench-downstream

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or 3.12, or run make PYTHON=/path/to/python3.12"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch: the one the venv already sees is kept (yours: make VENV_ARGS=--system-site-packages);
	# else pinned first, as an unpinned resolve would pull the newest multi-GB CUDA build
	$(PY) -c "import torch; print('keeping torch', torch.__version__)" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m launch.demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check $(PACKAGES)

clean:
	rm -rf demo_out bench_out

# Benchmarks (scripts that print figures; not tests). Results go to BENCHMARKS.md by hand, with date and machine.
bench-loader: setup
	$(PY) -m benchmarks.bench_loader --rss-scale

bench-corpus: setup
	$(PY) -m benchmarks.bench_corpus

bench-annotation: setup
	$(PY) -m benchmarks.bench_annotation

# the prepared device check (stages 0-4, JSON per stage); here it runs the CPU dry run
bench-gpu: setup
	bash benchmarks/gpu_check.sh $(if $(shell command -v nvidia-smi),,--cpu-dry-run) --out bench_out/gpu_check

# Real cells (Kang 2018 PBMCs, downloaded once into ~/.cache/scpretrain): pretrain on CTRL, annotate STIM
bench-real: setup
	$(PY) -m benchmarks.bench_real

# the Kang exports of bench-real judged by scIB metrics, kNN F1, GenePT-w/-s and marker ranks (run bench-real first)
bench-integrate: setup
	$(PY) -m benchmarks.bench_integrate

# evaluate annotate's defaults on a dataset the demo exports never saw (run make demo first)
bench-downstream: setup
	$(PY) -m benchmarks.bench_downstream --exports demo_out/exports/mae_demo demo_out/exports/performer_demo
