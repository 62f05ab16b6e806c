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
SAMPLER_ARGS ?=
DM_NAME = $(DATASET)$(if $(SUBSET),-n$(SUBSET)-s$(SUBSET_SEED))-$(PRESET)
# A committed reference DM (models/, e.g. SUBSET=1000 PRESET=small) is used as it is; otherwise runs/dm/.
DM ?= $(if $(wildcard runs/dm/$(DM_NAME)),runs/dm/$(DM_NAME),$(if $(wildcard models/$(DM_NAME)/dm.json),models/$(DM_NAME),runs/dm/$(DM_NAME)))
SHARDS ?= shards/$(DATASET)$(if $(SUBSET),-n$(SUBSET)-s$(SUBSET_SEED))/$(notdir $(DM))-seed$(SEED)
VAE ?= runs/vae/$(DATASET)$(if $(SUBSET),-n$(SUBSET)-s$(SUBSET_SEED))-dmaapx-k$(SCALE)-seed$(SEED)
SUBSET_ARGS := $(if $(SUBSET),--subset $(SUBSET) --subset-seed $(SUBSET_SEED))
LAST_VAE = $(if $(filter command line,$(origin VAE)),,$(shell ls -td runs/vae/*/ 2>/dev/null | head -n 1))

.PHONY: help setup test test-slow lint data dm shards train eval frontier demo compare ablation overparam mix \
	dm-subsets regularizers dm-quality real-vs-synthetic controls robustness

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST_APT := apt-get install -y dataset-fashion-mnist

setup: ## create .venv and install vaegen (editable, with dev extras); CPU torch where there is no GPU; FashionMNIST
	$(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install $(TORCH_CPU); fi
	$(BIN)/pip install -e '.[dev]'
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(FMNIST_APT) -qq) \
		|| echo "setup: could not install FashionMNIST; run: $(FMNIST_APT)"; \
	elif command -v apt-get >/dev/null 2>&1; then echo "setup: FashionMNIST is missing; run: sudo $(FMNIST_APT)"; \
	else echo "setup: FashionMNIST is missing; vaegen downloads it on first use (or put the official files in ~/.cache/vaegen/fmnist)"; fi

test: ## the fast test suite (the README's test command; CI runs it)
	$(BIN)/pytest

test-slow: ## the long tests (all but the GPU ones); CI runs them after `make test`
	$(BIN)/pytest -m "slow and not gpu"

lint: ## ruff
	$(BIN)/ruff check vaegen generator trainer evaluator studies tests bench scripts

data: ## data/<DATASET>.zarr from the official files (SUBSET=N for a seeded balanced subset)
	$(BIN)/vaegen data $(DATASET) $(if $(SUBSET),--subset $(SUBSET) --subset-seed $(SUBSET_SEED))

dm: data ## train the diffusion model p_DM (PRESET=tiny|small|paper) into $(DM)
	$(BIN)/vaegen dm train --dataset $(DATASET) $(SUBSET_ARGS) --preset $(PRESET) --out $(DM) $(if $(wildcard $(DM)/checkpoints),--resume)

shards: ## SCALE x |D_train| DM samples into $(SHARDS); trains the DM first if there is none
	@if [ ! -f $(DM)/dm.json ]; then $(MAKE) dm; fi
	$(BIN)/vaegen generate --dm $(DM) --scale $(SCALE) --seed $(SEED) --out $(SHARDS) $(SAMPLER_ARGS)

train: data ## a VAE on the first SCALE x |D_train| shard samples (DMaaPx) into $(VAE)
	$(BIN)/vaegen train --dataset $(DATASET) $(SUBSET_ARGS) --shards $(SHARDS) --scale $(SCALE) --epochs $(EPOCHS) --seed $(SEED) --out $(VAE)

eval: ## the gaps of the most recently trained VAE (or VAE=runs/vae/NAME)
	$(BIN)/vaegen eval $(or $(LAST_VAE),$(VAE))

frontier: ## sample quality per network evaluation of every sampler, for $(DM) (trains it first if missing)
	@if [ ! -f $(DM)/dm.json ]; then $(MAKE) dm; fi
	$(BIN)/vaegen dm frontier --dm $(DM) --data-root data

# --- studies (STUDY_PRESET=smoke|demo|cpu|paper); each is resumable: rerunning skips finished runs ---------------
STUDY_PRESET ?= cpu
SCALES ?=
BUDGET ?=
JOBS ?=
STUDY_ARGS = --dataset $(DATASET) --preset $(STUDY_PRESET) $(if $(SCALES),--scales "$(SCALES)") \
	$(if $(BUDGET),--budget-minutes $(BUDGET)) $(if $(JOBS),--jobs $(JOBS))

demo: ## the method at work in minutes: Normal, Aug.*, DMaaPx k=5 on the committed reference DM; prints the report's path
	$(BIN)/vaegen study demo --preset demo --dataset fmnist

compare: ## Normal vs DMaaPx vs Aug.Naive vs Aug.Tuned, 3 seeds (paper Table 7; probes: Table 11)
	$(BIN)/vaegen study compare $(STUDY_ARGS)

ablation: ## sample-size ablation over SCALES="1 2 5 10 ..."
	$(BIN)/vaegen study ablation $(STUDY_ARGS)

overparam: ## m_z and n_c sweeps of the conv VAE (paper figures 6-8)
	$(BIN)/vaegen study overparam $(STUDY_ARGS)

mix: ## real/synthetic mixtures (appendix B.7)
	$(BIN)/vaegen study mix $(STUDY_ARGS)

dm-subsets: ## DMs trained on subsets of D_train (appendix B.8)
	$(BIN)/vaegen study dm-subsets $(STUDY_ARGS)

regularizers: ## Normal, Normal+RHA, Aug.Mollify, DMaaPx, DMaaPx+RHA, DMaaPx+Mollify, with gap curves
	$(BIN)/vaegen study regularizers $(STUDY_ARGS)

dm-quality: ## DMaaPx on DMs of graded quality: how much the DM matters
	$(BIN)/vaegen study dm-quality $(STUDY_ARGS)

real-vs-synthetic: ## Normal training on k x N real images vs DMaaPx on k x N samples, same compute
	$(BIN)/vaegen study real-vs-synthetic $(STUDY_ARGS)

controls: ## early stopping and weight decay for Normal training, beside DMaaPx
	$(BIN)/vaegen study controls $(STUDY_ARGS)

robustness: ## why G_r ranks the methods as it does: the four compare methods at several likelihood sigmas, float Aug.Naive
	$(BIN)/vaegen study robustness $(STUDY_ARGS)
