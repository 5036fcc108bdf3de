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

test: install-test
	$(PYTHON) -m pytest -q tests
