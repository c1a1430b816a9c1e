# Two commands for a fresh machine; each makes .venv and installs what it needs first.
#   make search   # search mbv2_tiny on digits for this CPU, export, print the summary
#   make test     # the default test suite (fast); `make test-slow` runs the long tests
#   make gpu-check  # on a GPU node: cuda tables, mixed-precision search + retrain, weight step (docs/gpu.md)
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.hwnas-installed
ARGS   ?=

.PHONY: search test test-slow bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

search: $(STAMP)
	$(VENV)/bin/nas-search $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)  # pytest exits 5 when no test is marked slow: not a failure
	$(PY) -m pytest -q -m slow $(ARGS) || [ $$? -eq 5 ]

bench: $(STAMP)
	$(VENV)/bin/nas-bench $(ARGS)

gpu-check:  # the install is timed too (the check's 8-minute budget includes it); ARGS=--dry-run without a GPU
	HWNAS_PYTHON= VENV=$(VENV) launch/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun
