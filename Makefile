# The two commands of the README: `make up` and `make test`. Each sets up what it needs.
PYTHON ?= python3.11
# `make up VENV=/path/to/venv` runs this checkout with an existing environment, as it is
# (nothing is installed into it): the fresh-clone test uses that to skip the install.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install up test cluster-test bench clean dashboard browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the dependency declarations change (make compares timestamps).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The dashboard's assets, built from frontend/ (npm, pinned by package-lock.json) into
# service/api/dashboard/static/ (git-ignored). make rebuilds only when a source changes.
DASHBOARD := service/api/dashboard/static/app.js
NODE_MODULES := frontend/node_modules/.package-lock.json

$(NODE_MODULES): frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund

$(DASHBOARD): $(NODE_MODULES) frontend/tsconfig.json $(shell find frontend/src -type f)
	cd frontend && npm run build

dashboard: $(DASHBOARD)

# Debian's Chromium for tests/api/dashboard (which skip, saying so, without it). Never `playwright install`.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# The text examples' corpus: generated (deterministic), never committed.
CORPUS := examples/data/pets.txt

$(CORPUS): examples/make_corpus.py | $(PY)
	$(PY) examples/make_corpus.py

# The real-data examples' files (examples/text-stdlib.yaml, examples/timeseries-goog.yaml):
# made from this Python's standard library and matplotlib's sample data (the dev extras),
# deterministic, never committed. `touch`: make_data.py leaves a file with unchanged bytes alone.
REAL_DATA := examples/data/stdlib.txt examples/data/goog.csv

$(REAL_DATA): examples/make_data.py | $(STAMP)
	$(PY) examples/make_data.py --only $(notdir $@) && touch $@

install: $(STAMP) $(DASHBOARD) $(CORPUS) $(REAL_DATA)

# `python -m service.cli` is `unroll`, always from this checkout's code. UP_ARGS: e.g. --port 8001
up: $(if $(filter .venv,$(VENV)),install) $(CORPUS)
	$(PY) -m service.cli up $(UP_ARGS)

test: install browser
	$(PY) -m pytest --ignore=tests/cluster $(PYTEST_ARGS)

# The docker-compose.yml layout as processes on this machine (tests/cluster): API replicas,
# a Ray head and more nodes, dispatchers; killing any of them loses no job. About 4 minutes
# on 2 cores. Not in `make test`: with it the suite took 20 min 40 s here, past the budget.
cluster-test: install
	$(PY) -m pytest tests/cluster $(PYTEST_ARGS)

bench: install
	$(PY) bench/trainer.py

clean:
	rm -rf $(VENV) .pytest_cache
