# vaegen: common paths. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where there is no NVIDIA GPU, setup installs this CPU build of torch first; the package itself asks only for
# a range (torch>=2.3), so a GPU user's CUDA build satisfies it untouched. Elsewhere, e.g.
#   make setup TORCH_CPU='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH_CPU ?= torch==2.13.0

DATASET ?= fmnist
SUBSET ?=
SUBSET_SEED ?= 0
SCALE ?= 10
PRESET ?= small
SEED ?= 0
EPOCHS ?= 1000
DM ?= runs/dm/$(DATASET)$(if $(SUBSET),-n$(SUBSET)-s$(SUBSET_SEED))-$(PRESET)
SHARDS ?= shards/$(DATASET)$(if $(SUBSET),-n$(SUBSET)-s$(SUBSET_SEED))/$(notdir $(DM))-seed$(SEED)
VAE ?= runs/vae/$(DATASET)$(if $(SUBSET),-n$(SUBSET)-s$(SUBSET_SEED))-dmaapx-k$(SCALE)-seed$(SEED)
SUBSET_ARGS := $(if $(SUBSET),--subset $(SUBSET) --subset-seed $(SUBSET_SEED))

.PHONY: help setup test test-slow lint data dm shards train eval demo

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: ## create .venv and install vaegen (editable, with dev extras); CPU torch where there is no GPU
	$(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install $(TORCH_CPU); fi
	$(BIN)/pip install -e '.[dev]'

test: ## the fast test suite (the README's test command; CI runs it)
	$(BIN)/pytest

test-slow: ## the long tests only
	$(BIN)/pytest -m slow

lint: ## ruff
	$(BIN)/ruff check vaegen generator trainer evaluator tests bench

data: ## data/<DATASET>.zarr from the official files (SUBSET=N for a seeded balanced subset)
	$(BIN)/vaegen data $(DATASET) $(if $(SUBSET),--subset $(SUBSET) --seed $(SUBSET_SEED))
