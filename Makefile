# The two commands of the README: `make up` and `make test`. Each sets up what it needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install up test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the dependency declarations change (make compares timestamps).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(VENV)/bin/unroll up

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/trainer.py

clean:
	rm -rf $(VENV) .pytest_cache
