# Two entry points: `make demo` and `make test`. Both bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench

venv: $(STAMP)

# torch first, pinned, and everything after it under a constraints file that pins the same torch, so no
# dependency (transformers, torchvision, ...) makes pip swap in a multi-GB CUDA build for `torch>=2.3`.
$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	WANDB_MODE=offline $(PY) examples/digits/run.py

bench: $(STAMP)
	$(PY) benchmarks/scoring_pass.py

clean:
	rm -rf $(VENV) .pytest_cache
