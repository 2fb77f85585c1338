# Each target builds the environment it needs from nothing (a fresh clone is enough).
PYTHON ?= python3
VENV ?= .venv
# CPU machines take the local CPU wheel; GPU users run e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= onnx,eval,lmeval,triton,dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.lp-deploy-installed
OUT ?= out/demo
DATA_DIR ?= ../shared/data
export LP_DEPLOY_DATA_DIR ?= $(abspath $(DATA_DIR))

# Separate environment for the ecosystem check (optimum-onnx pins transformers<4.58).
COMPAT ?= .venv-compat
COMPAT_STAMP := $(COMPAT)/.lp-deploy-installed

# Triton Inference Server for `lp-deploy triton serve` and the serving tests: the tritonserver
# binary (python backend only) from the PyPI wheel nvidia-pytriton, unpacked without its
# dependencies (pytriton's Python API pins numpy<2), and the environment that runs the python
# backend's model.py: numpy<2 (the 2.51 stub corrupts tensors with numpy 2), onnxruntime,
# and lp-deploy itself (tokenizer, sampling, the ONNX Runtime runtime and the batching engine).
TRITON ?= .triton
TRITON_STAMP := $(TRITON)/.lp-deploy-installed
TRITON_VENV ?= .venv-triton
TRITON_VENV_STAMP := $(TRITON_VENV)/.lp-deploy-installed
PYTRITON_SPEC ?= nvidia-pytriton==0.7.0

.PHONY: venv compat triton test test-all test-fast lint demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

$(COMPAT_STAMP): Makefile
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(COMPAT)/bin/pip install --quiet "transformers==4.57.6" "optimum-onnx==0.1.0" onnxruntime
	touch $@

$(TRITON_VENV_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet "numpy>=1.26,<2" "$(TORCH_SPEC)"
	$(TRITON_VENV)/bin/pip install --quiet "numpy>=1.26,<2" -e ".[onnx]"
	touch $@

$(TRITON_STAMP): Makefile $(TRITON_VENV_STAMP)
	rm -rf $(TRITON)
	$(TRITON_VENV)/bin/pip install --quiet --no-deps --target $(TRITON) "$(PYTRITON_SPEC)"
	touch $@

venv: $(STAMP)

compat: $(COMPAT_STAMP)

triton: $(TRITON_STAMP) $(TRITON_VENV_STAMP)

test: $(STAMP) $(COMPAT_STAMP) $(TRITON_STAMP)
	$(BIN)/python -m pytest -q -ra -m "not heavy"

test-all: $(STAMP) $(COMPAT_STAMP) $(TRITON_STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lp_deploy exporters runtimes serving benchmarks

# The whole pipeline on the built-in model; one torch/ORT thread keeps timings stable on
# shared machines (THREADS=2 ... to change).
THREADS ?= 1
demo: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/lp-deploy patch smollm2-135m --prune 5 --select cosine \
		--patch rotate --calib wikitext-2/valid.txt --samples 32 --seqlen 512 --seed 0 \
		--eval-ppl wikitext-2/test.txt --ppl-limit 16 --out $(OUT)/patched
	OMP_NUM_THREADS=$(THREADS) $(BIN)/lp-deploy fold $(OUT)/patched --out $(OUT)/folded
	OMP_NUM_THREADS=$(THREADS) $(BIN)/lp-deploy export onnx $(OUT)/folded --out $(OUT)/onnx
	OMP_NUM_THREADS=$(THREADS) $(BIN)/lp-deploy generate $(OUT)/onnx --runtime onnxruntime \
		--max-new-tokens 24 "The history of the city of Paris"
	OMP_NUM_THREADS=$(THREADS) $(BIN)/lp-deploy bench --candidate $(OUT)/folded \
		--runtime torch --runtime onnxruntime --tasks copa,arc_easy,piqa --limit 40 \
		--ppl wikitext-2/test.txt --ppl-limit 8 --latency --prompt-lengths 128 \
		--decode-tokens 16 --repeats 3 --memory --threads $(THREADS) --out $(OUT)/report
	@echo "report: $(OUT)/report/report.md (plots: $(OUT)/report/*.png)"

clean:
	rm -rf $(VENV) $(COMPAT) $(TRITON) $(TRITON_VENV) out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
