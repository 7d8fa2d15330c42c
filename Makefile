# Two set-up commands, both idempotent: `make demo` (the whole job on the embedded
# default) and `make test` (the test suite). Each creates .venv and installs the
# pinned versions from constraints.txt the first time, and again when either file changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lite-sft-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lite-sft tune --output-dir runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
