# The two commands of the contract: `make demo` and `make test`. Both set up everything
# they need from a bare machine (system packages via apt-get when run as root).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so that pip takes the CPU wheel and never a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,lint,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/infenclave demo

test: $(STAMP)
	$(PY) -m pytest -q

# Lint (ruff) and format check on the whole tree, strict typing (mypy) on the library.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info
