# Each target builds the environment it needs from nothing (a fresh clone is enough).
PYTHON ?= python3
VENV ?= .venv
# CPU machines take the local CPU wheel; GPU users run e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= onnx,eval,lmeval,dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.lp-deploy-installed
OUT ?= out/demo
DATA_DIR ?= ../shared/data
export LP_DEPLOY_DATA_DIR ?= $(abspath $(DATA_DIR))

.PHONY: venv test test-fast lint demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lp_deploy exporters runtimes benchmarks

demo: $(STAMP)
	$(BIN)/lp-deploy patch smollm2-135m --prune 5 --select cosine --patch rotate \
		--calib wikitext-2/valid.txt --samples 32 --seqlen 512 --seed 0 \
		--eval-ppl wikitext-2/test.txt --ppl-limit 32 --out $(OUT)/patched

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
