# `make test` is the one command CI runs (see .ci/run): it creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact, tested set of every package (`make lock` refreshes it); setup.py keeps the ranges for library users.
LOCK := constraints.txt
PIP_VERSION := 26.3
# torch 2.14.1 + torchvision 0.29.1 install from local disk here; elsewhere pip fetches them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
TEST_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# Files whose assertions compare floating-point results of different computations (chunked vs whole, ranks vs one
# process, float32 vs float64 references). test-numerics re-runs them with 2 threads, ATen's portable kernels and
# MKL's compatibility code path, so every reduction sums in another order, as on another CPU.
NUMERICS_TESTS := tests/test_distill_kl.py tests/test_hard_negative_infonce.py tests/test_grad_cache.py \
	tests/test_modeling.py tests/test_collators.py tests/test_distill_trainer.py tests/test_hardneg_trainer.py \
	tests/test_export.py tests/test_teacher.py tests/test_metrics.py tests/test_tiny.py
OTHER_KERNELS := MM_EMBED_TRL_TEST_THREADS=2 OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE

.PHONY: install lint test test-fast test-numerics test-newest train train-distill lock clean

$(BIN)/.installed: setup.py $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The lint gate: ruff (pinned by the lock) with pyproject.toml's rules and line length.
LINT_PATHS := src tests examples benchmarks .ci
lint: install
	$(BIN)/ruff check $(LINT_PATHS)

# Lint, the full suite (slow end-to-end tests included), then the numerics-sensitive files again on other kernels
# (CI runs this).
test: lint
	$(TEST_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-numerics

# The numerics-sensitive files (fast tests) with other reduction orders: 2 threads, portable ATen and MKL kernels.
test-numerics: install
	$(TEST_ENV) $(OTHER_KERNELS) $(BIN)/python -m pytest -q -m "not slow" $(NUMERICS_TESTS)

# The fast suite on the newest releases setup.py's ranges allow, in a fresh .venv-newest (not from the lock): reports
# which package's release broke what (.ci/newest_releases.py). Exits 0 unless NEWEST_STRICT=1.
test-newest:
	$(PYTHON) .ci/newest_releases.py --venv .venv-newest --lock $(LOCK) --pip-version $(PIP_VERSION) \
		--torch-spec "$(TORCH_SPEC)" $(if $(NEWEST_STRICT),--strict)

# Everything but the tests marked slow.
test-fast: install
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The main job: UniME stage-2 contrastive training of the tiny built-in backbone on generated data.
train: install
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --num_processes 1 examples/train_hardneg.py

# UniME stage 1: distil the offline MiniLM teacher into the tiny backbone on a generated text corpus.
train-distill: install
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --num_processes 1 examples/train_distill.py

# Re-resolve every dependency from setup.py's ranges in a scratch venv and pin the result in $(LOCK). Run the suite
# (`make test`) on the new set before committing it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q pip==$(PIP_VERSION)
	.venv-lock/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	{ echo "# The exact package set the test suite was run with: make test / make train install it (pip -c)."; \
	  echo "# Refresh with \`make lock\` (re-resolves setup.py's ranges), then run \`make test\` before committing."; \
	  echo "# Generated on $$(date -u +%Y-%m-%d) with Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())') on $$(uname -m)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock .venv-newest outputs .pytest_cache
