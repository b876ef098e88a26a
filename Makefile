# Two commands do everything on a fresh machine:
#   make demo   - set up .venv and run the fabric demo on the built-in tiny model (writes demo_output/)
#   make test   - set up .venv, lint (ruff) and run the whole test suite, slow tests included
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dreamloom-installed

.PHONY: venv demo lint test test-fast bench clean

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

test: venv lint
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_output .pytest_cache
