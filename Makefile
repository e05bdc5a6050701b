# make run: the default pipeline (config/config.yaml) -> results/report/index.html
# make test: the test suite. Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
CORES ?= all
# GPUs a local run uses: at most this many GPU jobs run at once, each on its own GPU (docs/cluster.md,
# "GPUs"); empty = every GPU this machine shows (CUDA_VISIBLE_DEVICES honoured), counted without torch.
GPUS ?=
# torch 2.14.1 / torchvision 0.29.1: installed first so pip never resolves another torch build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# Each target installs what it needs: the pipeline with its language-model extra (RUN_STAMP), then
# the test, SLURM and timm extras on top for the tests, lint and cluster runs (STAMP).
RUN_STAMP := $(VENV)/.dnc-run-installed
STAMP := $(VENV)/.dnc-installed

.PHONY: run test lint dry-run slurm clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[data,lm]"
	touch $@

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,data,cluster,models,lm]"
	touch $@

run: $(RUN_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) \
		--resources gpu=$(or $(GPUS),$$($(BIN)/python -m dnc.device)) --workflow-profile none $(ARGS)
	@echo "report: $(CURDIR)/results/report/index.html"

dry-run: $(RUN_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake -n --workflow-profile none $(ARGS)

slurm: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --workflow-profile profiles/slurm $(ARGS)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(ARGS)

# ruff, then `snakemake --lint` (every lint but the per-rule conda env, which a venv project has none of)
lint: $(STAMP)
	$(BIN)/ruff check dnc scripts tests benchmarks
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_workflow.py::test_snakemake_lint_finds_nothing_but_the_missing_conda_envs

clean:
	rm -rf results logs .snakemake
