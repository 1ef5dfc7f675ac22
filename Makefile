# fuselab: every target creates/updates .venv itself, idempotently (a stamp file records the install).
# CPU torch is installed first so pip never resolves a multi-GB CUDA build on a CPU machine;
# on a GPU machine run e.g. `make install TORCH=torch` (and `pip install -e ".[vllm]"`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fuselab-installed
PYTEST_ARGS ?= -n 2

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export IPYTHONDIR := $(CURDIR)/.ipython
export MPLCONFIGDIR := $(CURDIR)/.mpl

.PHONY: install demo test docs bench export clean

install: $(STAMP)

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $@

demo: $(STAMP)          ## the main job: a miniature end-to-end run, table + plot
	$(BIN)/fuselab demo

test: $(STAMP)          ## pytest over tests/ and every notebook, sync + layering + docs checks
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

docs: $(STAMP)          ## offline docs site in _docs/ (nbdev processing + smalldocs, KaTeX vendored)
	$(BIN)/python tools/build_docs.py

bench: $(STAMP)         ## benchmarks: ratios against named comparators, JSON in bench/results/
	$(BIN)/python bench/run.py

export: $(STAMP)        ## notebooks -> fuselab/, clean notebooks
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

clean:
	rm -rf _docs _proc _site_src .cache/katex
