"""The server's OpenAPI schema and metric names, word for word, against the ones saved in tests/data/openapi/:
clients are generated from /openapi.json and dashboards read the metric names, so a reshaped HTTP layer must
not change either by accident. The schema differs by task (a model lists only the endpoints it serves) and with
an API key (the bearer scheme), so each is saved.

    LITE_SFT_WRITE_OPENAPI=1 pytest tests/test_serve_openapi.py    # after a deliberate change: save the new ones
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lite_sft.serve.server import ServerSettings, create_app

SAVED = Path(__file__).parent / "data" / "openapi"


class FakeBackend:
    """What create_app reads of a backend before any request: no model is loaded."""

    max_context, vocab_size, labels, decoder_prompt = 64, 100, ["O", "B-PER", "I-PER"], [0]

    def __init__(self, task: str):
        self.task = task

    def describe(self) -> str:
        return f"a fake {self.task} backend"


class FakeDecoder(FakeBackend):
    def prefill(self, ids, mask, capacity): ...
    def decode(self, state, tokens): ...
    def keep(self, state, rows): ...
    def join(self, state, other): ...
    def release(self, state): ...


class FakeAdapters(FakeDecoder):
    """A decoder serving several LoRA adapters (protocol.Adapters): its app has the adapter routes too."""

    def prefill(self, ids, mask, capacity, adapters=None): ...
    def served_adapters(self): return {"alpha": {"rank": 4, "targets": ["q_proj"]}}
    def read_adapter(self, name, path): ...
    def add_adapter(self, adapter): ...
    def load_adapter(self, name, path): ...
    def unload_adapter(self, name): ...


class FakeScoringAdapters(FakeBackend):
    """Classifier adapters of one base (protocol.ScoringAdapters): both classifier routes and the adapter routes."""

    def logits(self, rows, adapters=None): ...
    def adapter_task(self, name): return "seq-cls"
    def adapter_labels(self, name): return ["neg", "pos"]
    def served_adapters(self): return {"sentiment": {"rank": 4, "targets": ["query"], "task": "seq-cls",
                                                     "num_labels": 2}}
    def read_adapter(self, name, path): ...
    def add_adapter(self, adapter): ...
    def load_adapter(self, name, path): ...
    def unload_adapter(self, name): ...


def app_for(task: str, api_key: str | None = None):
    backend = FakeDecoder(task) if task == "causal-lm" else FakeBackend(task)
    return create_app(backend, None, ServerSettings("tiny", api_key=api_key))


def compare(name: str, text: str) -> None:
    saved = SAVED / name
    if os.environ.get("LITE_SFT_WRITE_OPENAPI"):
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(text)
    assert text == saved.read_text(), f"{name} changed; see {saved}"


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq", "seq-cls", "token-cls"])
@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_openapi_schema_is_unchanged(task, api_key):
    app = app_for(task, api_key)
    try:
        schema = json.dumps(app.openapi(), sort_keys=True, indent=1) + "\n"
    finally:
        app.state.engine.close()
    compare(f"{task}{'-key' if api_key else ''}.json", schema)


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_the_multi_adapter_schema_adds_the_adapter_routes(api_key):
    app = create_app(FakeAdapters("causal-lm"), None, ServerSettings("team", api_key=api_key))
    try:
        schema = app.openapi()
    finally:
        app.state.engine.close()
    assert {"/v1/adapters", "/v1/adapters/{name}"} <= set(schema["paths"])
    compare(f"causal-lm-adapters{'-key' if api_key else ''}.json", json.dumps(schema, sort_keys=True, indent=1) + "\n")


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_the_classifier_adapters_schema_has_both_classifier_routes_and_the_adapter_routes(api_key):
    app = create_app(FakeScoringAdapters("seq-cls"), None, ServerSettings("team", api_key=api_key))
    try:
        schema = app.openapi()
    finally:
        app.state.engine.close()
    assert {"/v1/classify", "/v1/ner", "/v1/adapters", "/v1/adapters/{name}"} <= set(schema["paths"])
    assert "/v1/completions" not in schema["paths"]
    compare(f"classifier-adapters{'-key' if api_key else ''}.json", json.dumps(schema, sort_keys=True, indent=1) + "\n")


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_metric_names_are_unchanged(task):
    app = app_for(task)
    try:
        text = TestClient(app).get("/metrics").text
    finally:
        app.state.engine.close()
    names = sorted({line.split()[2] + " " + line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")})
    compare(f"metrics-{task}.txt", "\n".join(names) + "\n")
