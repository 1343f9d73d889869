# Every target works on a fresh clone: the first use creates .venv and installs what it
# needs; later uses reuse it. Pass Hydra overrides with ARGS, e.g.
#   make pretrain ARGS="model=small device=cuda max_minutes=30"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0
ARGS ?=

.PHONY: install install-dev pretrain sft rm ppo dpo grpo align ablate sample bench export serve serve-bench gpu-check gpu-deps test lint format clean

# torch first, chosen by machine: with an NVIDIA GPU, PyPI's default (CUDA) build; without
# one, the CPU build (a local wheel when the machine has one, else PyTorch's CPU index),
# so a CPU-only machine never downloads gigabytes of CUDA libraries.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "installing torch $(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
		echo "installing torch $(TORCH_VERSION) (CPU build)"; \
		$(PIP) install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu \
			--extra-index-url https://pypi.org/simple; \
	fi
	@touch $@

$(VENV)/.runtime: $(VENV)/.torch pyproject.toml
	$(PIP) install -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime pyproject.toml
	$(PIP) install -e '.[dev,hf,serve]'
	@touch $@

# transformers (a pretrained GPT-2 with init_from=gpt2, the export to Hugging Face)
$(VENV)/.hf: $(VENV)/.runtime pyproject.toml
	$(PIP) install -e '.[hf]'
	@touch $@

# fastapi and uvicorn (python -m train.serve: the chat API and page)
$(VENV)/.serve: $(VENV)/.runtime pyproject.toml
	$(PIP) install -e '.[serve]'
	@touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

pretrain: $(VENV)/.runtime
	$(PY) -m train.pretrain $(ARGS)

sft: $(VENV)/.runtime
	$(PY) -m train.sft $(ARGS)

rm: $(VENV)/.runtime
	$(PY) -m train.reward $(ARGS)

ppo: $(VENV)/.runtime
	$(PY) -m train.ppo $(ARGS)

dpo: $(VENV)/.runtime
	$(PY) -m train.dpo $(ARGS)

grpo: $(VENV)/.runtime
	$(PY) -m train.grpo $(ARGS)

align: $(VENV)/.runtime
	$(PY) -m train.align $(ARGS)

# each change since GPT-2 added in turn, several seeds each: hours of CPU (docs/model.md, section 13)
ablate: $(VENV)/.runtime
	$(PY) -m train.ablate $(ARGS)

sample: $(VENV)/.runtime
	$(PY) -m train.sample checkpoint=out/pretrain $(ARGS)

bench: $(VENV)/.dev
	$(PY) -m train.bench $(ARGS)

export: $(VENV)/.hf
	$(PY) -m train.export $(ARGS)

# The chat API and page on http://127.0.0.1:8000/ (conf/serve.yaml); ARGS="checkpoint=out/dpo"
serve: $(VENV)/.serve
	$(PY) -m train.serve $(ARGS)

# Many streaming clients against a live server (train/serve_bench.py; the openai client: dev)
serve-bench: $(VENV)/.dev
	$(PY) -m train.serve_bench $(ARGS)

# The CUDA paths in one short run (scripts/gpu_check.py). It installs nothing from the network:
# on a GPU machine it runs with that machine's torch (python3, or .venv when there is one)
# and takes the other packages and the corpus from .gpu-deps/, which `make gpu-deps` makes
# here (needs network); carry .gpu-deps with the working tree.
GPU_PYTHON := $(shell [ -x $(PY) ] && echo $(PY) || echo $(PYTHON))
GPU_DEPS := hydra-core==1.3.8 omegaconf==2.3.1 PyYAML tqdm sentencepiece pytest pluggy iniconfig packaging \
	exceptiongroup tomli pygments typing_extensions

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(ARGS)

gpu-deps: $(VENV)/.runtime
	rm -rf .gpu-deps/wheels && mkdir -p .gpu-deps/wheels
	$(PIP) wheel --no-deps -w .gpu-deps/wheels antlr4-python3-runtime==4.9.3
	for v in 3.10 3.11 3.12 3.13; do \
		$(PIP) download --no-deps --only-binary=:all: --python-version $$v \
			--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
			-d .gpu-deps/wheels $(GPU_DEPS) || exit 1; \
	done
	$(PY) -m data.prepare data.root=.gpu-deps/data data.cache_dir=out/data/cache
	du -sh .gpu-deps

test: $(VENV)/.dev
	$(PY) -m pytest $(ARGS)

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
