# `make test` is the one command CI runs (see .ci/run): it creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 install from local disk here; elsewhere pip fetches them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test test-fast train train-distill clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# Full suite, slow end-to-end tests included (CI runs this).
test: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the tests marked slow.
test-fast: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The main job: UniME stage-2 contrastive training of the tiny built-in backbone on generated data.
train: install
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --num_processes 1 examples/train_hardneg.py

# UniME stage 1: distil the offline MiniLM teacher into the tiny backbone on a generated text corpus.
train-distill: install
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --num_processes 1 examples/train_distill.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
