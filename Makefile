# Two commands do everything on a fresh machine:
#   make demo   - set up .venv and run the fabric demo on the built-in tiny-fabric model (writes demo_output/)
#   make test   - set up .venv, lint (ruff) and run the whole test suite, slow tests included
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dreamloom-installed

.PHONY: venv demo lint test test-fast test-min-deps gpu-proof clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: venv
	$(PY) -m trainer demo --output-dir demo_output

lint: venv
	$(VENV)/bin/ruff check trainer nodes tests tools
	$(VENV)/bin/ruff format --check trainer nodes tests tools

# Two pytest-xdist workers of one thread each (tests/conftest.py); full-size-model tests share one worker.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

test: venv lint
	$(PY) -m pytest -q -p no:cacheprovider $(XDIST)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(XDIST)

# The fast suite on the lowest versions requirements.txt allows (pins made from its floors by tools/min_deps.py),
# in a venv of its own under build/ (rebuilt when the floors change).
test-min-deps: MIN_VENV ?= build/venv-min-deps
test-min-deps:
	$(PYTHON) tools/min_deps.py install --venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pytest -q -m "not slow and not cuda" -p no:cacheprovider $(XDIST)

# On a machine with an NVIDIA GPU: doctor, `pytest -m cuda` and bench at 512 px (tools/gpu_proof.sh).
# DIFFUSERS_SCRIPT=path/to/train_dreambooth_lora.py adds diffusers' example to the bench.
gpu-proof: venv
	PYTHON=$(PY) tools/gpu_proof.sh all build/gpu_proof $(DIFFUSERS_SCRIPT)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
