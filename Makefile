# `make demo` and `make test` each do all of their own set-up on a fresh machine.
PYTHON ?= python3
# The CPU build of torch goes in first, so that nothing below pulls a CUDA build onto a machine without a GPU.
TORCH_VERSION ?= 2.13.0
# The oldest supported transformers, the one on the GPU machine; override to test another 5.x.
TRANSFORMERS_VERSION ?= 5.17.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH_VERSION)"
	$(PIP) "transformers==$(TRANSFORMERS_VERSION)"
	$(PIP) -e ".[examples]"

install-test: install
	$(PIP) -e ".[test,examples]"

demo: install
	$(PYTHON) examples/quickstart.py

# ruff first: a lint error fails in seconds. A test that runs past 25 minutes fails with the stacks of its threads,
# instead of hanging CI (the slowest, the DDP test, takes ~1 minute; its launches have limits of their own).
test: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q --timeout 1500 tests
