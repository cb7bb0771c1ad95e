# `make serve` starts the local stack; `make test` runs the suite; `make bench` runs the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[serving,gateway,shared-limits,test]'
	touch $(STAMP)

# Flags for `mosaic-serve dev` and the server, e.g. make serve SERVE_ARGS="--gateway-port 5001"
SERVE_ARGS ?=

serve: install
	$(PY) -m serving.cli dev $(SERVE_ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
