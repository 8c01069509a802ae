# One-command set-up: `make demo` and `make test` create .venv when it is missing,
# install with the pinned constraints, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedaudit-installed
PIP := $(BIN)/python -m pip

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned resolve would pull gigabytes of CUDA wheels.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet torch==2.13.0 -c constraints.txt
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedaudit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) fedaudit-runs .pytest_cache
