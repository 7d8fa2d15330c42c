"""Classifiers of one base served together (serve/backends/lora_encoder.py): every adapter's logits equal its
PyTorch model's, alone and mixed in one trunk run with the other adapters, through the backend and over HTTP;
/v1/classify takes only seq-cls adapters and /v1/ner only token-cls ones, a request's `model` picks the adapter
(none: the only one of the route's task), an unknown name is a 404; hot load of another export's adapter,
unload, and a bad adapter file is a 400 naming it while the others keep serving.

The export folders are built here as the multi-adapter encoder export lays them out (lite_sft/adapters.py,
export/encoder_lora.py): the tiny BERT's trunk graph with LoRA branches, a head graph, an adapter file (random
LoRA) and an adapters.json entry per classifier, and a parity.json so that the folder is an export OUT. Each
adapter's reference is its classifier with the LoRA deltas merged into the trunk's weights."""

from __future__ import annotations

import copy
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from lite_sft.adapters import AdapterEntry, Manifest, site_targets, write_adapter_file, write_manifest
from lite_sft.artifacts import copy_model_files
from lite_sft.errors import ServeError, UnknownAdapter
from lite_sft.export.encoder_lora import export_head, export_trunk, trunk_sites
from lite_sft.options import ServerSettings
from lite_sft.serve.backends.factory import load_backend
from lite_sft.serve.backends.lora_encoder import LoraEncoderBackend
from lite_sft.serve.http.classify import entities, ranked
from lite_sft.serve.server import create_app
from lite_sft.tasks.ner import split_words

ort = pytest.importorskip("onnxruntime")
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
Q0, V1, OUT0, POOLER = ("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value",
                        "encoder.layer.0.output.dense", "pooler.dense")
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# name -> (task, seed, rank, sites, labels): two served from the start, topic in an export of its own (loaded hot)
ADAPTERS = {"sentiment": ("seq-cls", 0, 4, [Q0, V1, POOLER], ["neg", "pos"]),
            "ner": ("token-cls", 1, 2, [Q0, OUT0], NER_LABELS),
            "topic": ("seq-cls", 2, 3, [V1, POOLER], ["sport", "news", "tech"])}
TEXTS = ["a great film", "peter visited paris", "the plot was very bad and sad", "mary met john in berlin"]


def classifier(bert, task: str, labels: list[str], seed: int):
    from transformers import BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(seed)
    auto = BertForSequenceClassification if task == "seq-cls" else BertForTokenClassification
    return auto.from_pretrained(bert, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                label2id={label: i for i, label in enumerate(labels)}).eval()


def random_lora(model, sites: list[str], rank: int, seed: int) -> dict[str, dict]:
    """{site: {"A": (in, r), "B": (r, out)}}, large enough that each adapter answers differently."""
    generator = torch.Generator().manual_seed(100 + seed)
    out = {}
    for site in sites:
        linear = model.base_model.get_submodule(site)
        out[site] = {"A": (torch.randn(linear.in_features, rank, generator=generator) * 0.3).numpy(),
                     "B": (torch.randn(rank, linear.out_features, generator=generator) * 0.3).numpy()}
    return out


def merged(model, weights: dict[str, dict]):
    """The classifier with its LoRA deltas in its trunk's weights: y = x W^T + x A B, so W += (A B)^T."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for site, pair in weights.items():
            model.base_model.get_submodule(site).weight += torch.from_numpy(pair["A"] @ pair["B"]).T
    return model


def entry(name: str, rank: int, sites: list[str], task: str, labels: list[str]) -> AdapterEntry:
    return AdapterEntry(name, f"adapters/{name}.onnx_adapter", rank, float(rank), 1.0,
                        site_targets(sites), run_dir=f"runs/{name}", task=task,
                        gate={"passed": True}, labels=labels, head=f"heads/{name}.onnx")


def write_export(out, bert, names, sites, outputs, models, weights, tokens) -> None:
    """An export's adapters, heads and adapters.json (and parity.json) for `names`."""
    entries = []
    for name in names:
        task, _, rank, own, labels = ADAPTERS[name]
        write_adapter_file(out / "adapters" / f"{name}.onnx_adapter", weights[name])
        export_head(copy.deepcopy(models[name]), outputs, out / "heads" / f"{name}.onnx")
        entries.append(entry(name, rank, own, task, labels))
    base = {"name_or_path": str(bert), "folder": "base", "digest": "tiny-bert", "quant": None, "dtype": "fp32",
            "kind": "encoder", "inputs": tokens, "outputs": outputs}
    write_manifest(out, Manifest(base, sites, entries))
    (out / "parity.json").write_text(json.dumps({
        "task": entries[0].task, "tasks": {e.name: e.task for e in entries},
        "gates": {e.name: {"onnx": {"passed": True}} for e in entries}, "passed": True}))


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_bert_dir):
    """(OUT, OUT2, {name: (its merged reference model, task, labels)}): OUT serves sentiment and ner, OUT2 holds
    topic; both exports share the trunk graph's sites."""
    from transformers import BertModel

    root = tmp_path_factory.mktemp("encoder-adapters")
    out, out2 = root / "team", root / "topic"
    tokens = ["input_ids", "attention_mask", "token_type_ids"]
    trunk = BertModel.from_pretrained(tiny_bert_dir).eval()
    sites = trunk_sites(trunk, [Q0, V1, OUT0, POOLER])
    outputs = export_trunk(trunk, sites, tokens, out / "onnx" / "model.onnx")
    copy_model_files(tiny_bert_dir, out / "onnx")
    shutil.copytree(tiny_bert_dir, out / "base")
    models, weights, refs = {}, {}, {}
    for name, (task, seed, rank, own, labels) in ADAPTERS.items():
        models[name] = classifier(tiny_bert_dir, task, labels, seed)
        weights[name] = random_lora(models[name], own, rank, seed)
        refs[name] = (merged(models[name], weights[name]), task, labels)
    write_export(out, tiny_bert_dir, ["sentiment", "ner"], sites, outputs, models, weights, tokens)
    write_export(out2, tiny_bert_dir, ["topic"], sites, outputs, models, weights, tokens)
    return out, out2, refs


def reference(refs, name: str, tokenizer, text: str) -> np.ndarray:
    """The adapter's PyTorch logits for one text: (labels,), or (tokens, labels) read as /v1/ner reads words."""
    model, task, _ = refs[name]
    enc = tokenizer(split_words(text)[0], is_split_into_words=True) if task == "token-cls" else tokenizer(text)
    with torch.no_grad():
        logits = model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0]
    return logits.numpy()


def rows_of(tokenizer, refs, names: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        text = TEXTS[i % len(TEXTS)]
        enc = tokenizer(split_words(text)[0], is_split_into_words=True) if refs[name][1] == "token-cls" \
            else tokenizer(text)
        rows.append({k: list(enc[k]) for k in ("input_ids", "token_type_ids")})
    return rows


def test_each_adapter_alone_and_mixed_gives_its_pytorch_logits(export):
    out, out2, refs = export
    backend, tokenizer = load_backend(out, "cpu", threads=1)
    assert isinstance(backend, LoraEncoderBackend)
    assert set(backend.served_adapters()) == {"sentiment", "ner"}
    backend.load_adapter("topic", out2 / "adapters" / "topic.onnx_adapter")
    assert backend.bank.width == 4 + 2 + 3
    answers = {name: [reference(refs, name, tokenizer, TEXTS[i % len(TEXTS)]) for i in range(len(TEXTS))]
               for name in ADAPTERS}
    assert not np.allclose(answers["sentiment"][0], reference(refs, "topic", tokenizer, TEXTS[0])[:2])
    for name in ADAPTERS:  # alone: every row of one adapter
        got = backend.logits(rows_of(tokenizer, refs, [name] * len(TEXTS)), [name] * len(TEXTS))
        for i, logits in enumerate(got):
            assert logits.shape == answers[name][i].shape and np.abs(logits - answers[name][i]).max() < 1e-4, name
    mixed = ["ner", "sentiment", "topic", "sentiment", "ner", "topic", "ner", "sentiment"]  # rows of differing length
    got = backend.logits(rows_of(tokenizer, refs, mixed), mixed)
    for i, (name, logits) in enumerate(zip(mixed, got)):
        want = answers[name][i % len(TEXTS)]
        assert logits.shape == want.shape and np.abs(logits - want).max() < 1e-4, (i, name)
    with pytest.raises(UnknownAdapter, match="'delta' is not loaded"):
        backend.logits(rows_of(tokenizer, refs, ["ner"]), ["delta"])
    with pytest.raises(UnknownAdapter, match="names no adapter"):
        backend.logits(rows_of(tokenizer, refs, ["ner"]))
    backend.unload_adapter("sentiment")  # its columns leave the middle of the bank; topic's move down
    got = backend.logits(rows_of(tokenizer, refs, ["ner", "topic"]), ["ner", "topic"])
    assert np.abs(got[1] - answers["topic"][1]).max() < 1e-4 and np.abs(got[0] - answers["ner"][0]).max() < 1e-4


class Recording:
    """A backend whose every pass records the adapters of its rows and takes `delay` seconds longer: requests
    sent together then share a pass, and one stays in flight long enough to be seen."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.passes = inner, delay, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def logits(self, rows, adapters=None):
        self.passes.append(list(adapters))
        time.sleep(self.delay)
        return self.inner.logits(rows, adapters)


@pytest.fixture
def client(export):
    out, _, _ = export
    backend, tokenizer = load_backend(out, "cpu", threads=1)
    recording = Recording(backend, 0.0)
    with TestClient(create_app(recording, tokenizer, ServerSettings("team", api_key=KEY, max_batch=16))) as http:
        yield http, recording, tokenizer


def classify(http, text, model=None, path="/v1/classify"):
    return http.post(path, headers=AUTH, json={"input": text, **({"model": model} if model else {})})


def check_classify(response, refs, name, tokenizer, text) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    want = ranked(reference(refs, name, tokenizer, text), refs[name][2])
    got = body["data"][0]
    assert body["model"] == name and got["label"] == want["label"]
    assert [x["label"] for x in got["labels"]] == [x["label"] for x in want["labels"]]
    assert np.allclose([x["score"] for x in got["labels"]], [x["score"] for x in want["labels"]], atol=1e-5)


def check_ner(response, refs, tokenizer, text) -> None:
    assert response.status_code == 200, response.text
    words, offsets = split_words(text)
    enc = tokenizer(words, is_split_into_words=True)
    want = entities(text, offsets, enc.word_ids(), reference(refs, "ner", tokenizer, text), NER_LABELS)
    got = response.json()["data"][0]["entities"]
    assert response.json()["model"] == "ner"
    assert [(e["entity"], e["start"], e["end"]) for e in got] == [(e["entity"], e["start"], e["end"]) for e in want]
    assert np.allclose([e["score"] for e in got], [e["score"] for e in want], atol=1e-5)


def test_each_adapter_over_http_alone_and_in_one_pass_with_the_others(export, client):
    _, _, refs = export
    http, recording, tokenizer = client
    for text in TEXTS:
        check_classify(classify(http, text, "sentiment"), refs, "sentiment", tokenizer, text)
        check_ner(classify(http, text, "ner", "/v1/ner"), refs, tokenizer, text)
    # no `model`: the only adapter of the route's task
    check_classify(classify(http, TEXTS[0]), refs, "sentiment", tokenizer, TEXTS[0])
    check_ner(classify(http, TEXTS[1], path="/v1/ner"), refs, tokenizer, TEXTS[1])
    recording.delay, recording.passes[:] = 0.3, []
    work = [(TEXTS[k % 4], ("sentiment", "ner")[k % 2], ("/v1/classify", "/v1/ner")[k % 2]) for k in range(6)]
    with ThreadPoolExecutor(len(work)) as pool:
        got = list(pool.map(lambda job: classify(http, *job), work))
    for (text, name, _), response in zip(work, got):
        check_classify(response, refs, name, tokenizer, text) if name == "sentiment" else \
            check_ner(response, refs, tokenizer, text)
    assert any(len(set(names)) == 2 for names in recording.passes), recording.passes  # one pass, both adapters


def test_routes_are_refused_per_task_and_model_picks_the_adapter(client):
    http, _, _ = client
    wrong = classify(http, "peter", "ner")
    assert wrong.status_code == 400
    error = wrong.json()["error"]
    assert error["code"] == "unsupported_endpoint" and error["param"] == "model"
    assert "'ner' is a token classifier (NER) (token-cls): it serves POST /v1/ner, not /v1/classify" in \
        error["message"]
    wrong = classify(http, "peter", "sentiment", "/v1/ner")
    assert wrong.status_code == 400 and "(seq-cls): it serves POST /v1/classify" in wrong.json()["error"]["message"]
    missing = classify(http, "peter", "delta")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and "sentiment (seq-cls), ner (token-cls)" in error["message"]
    base = classify(http, "peter", "base")
    assert base.status_code == 400 and "no head of its own" in base.json()["error"]["message"]
    assert classify(http, "a great film", "team").json()["model"] == "sentiment"  # the server's name: as no model
    models = http.get("/v1/models", headers=AUTH).json()["data"]
    assert [(m["id"], m["task"]) for m in models] == [("base", None), ("sentiment", "seq-cls"), ("ner", "token-cls")]
    assert models[1]["adapter"] == {"rank": 4, "targets": ["attention.self.query", "attention.self.value",
                                                           "pooler.dense"], "task": "seq-cls", "num_labels": 2}
    assert models[2]["adapter"]["num_labels"] == len(NER_LABELS)
    health = http.get("/health", headers=AUTH).json()
    assert health["adapters"] == ["sentiment", "ner"] and "2 classifier adapters" in health["backend"]
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/ner", "/v1/adapters"} <= set(paths) and "/v1/completions" not in paths
    assert http.post("/v1/completions", headers=AUTH, json={"prompt": "hi"}).status_code == 400


def test_hot_load_from_another_export_then_unload(export, client):
    out, out2, refs = export
    http, _, tokenizer = client
    path = str(out2 / "adapters" / "topic.onnx_adapter")
    loaded = http.post("/v1/adapters", headers=AUTH, json={"name": "topic", "path": path})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["adapter"] == {"rank": 3, "targets": ["attention.self.value", "pooler.dense"],
                                         "task": "seq-cls", "num_labels": 3}
    check_classify(classify(http, TEXTS[2], "topic"), refs, "topic", tokenizer, TEXTS[2])
    several = classify(http, TEXTS[0])  # two seq-cls adapters now: `model` must say which
    assert several.status_code == 400 and "2 adapters here serve /v1/classify: name one in `model` (sentiment, " \
        "topic)" in several.json()["error"]["message"]
    check_ner(classify(http, TEXTS[3], path="/v1/ner"), refs, tokenizer, TEXTS[3])  # still the only token-cls one
    again = http.post("/v1/adapters", headers=AUTH, json={"name": "topic", "path": path})
    assert again.status_code == 409
    gone = http.delete("/v1/adapters/sentiment", headers=AUTH)
    assert gone.json() == {"id": "sentiment", "object": "model", "deleted": True}
    check_classify(classify(http, TEXTS[1], "topic"), refs, "topic", tokenizer, TEXTS[1])  # its columns moved
    check_classify(classify(http, TEXTS[1]), refs, "topic", tokenizer, TEXTS[1])  # the only seq-cls one again
    assert classify(http, TEXTS[0], "sentiment").status_code == 404
    assert http.delete("/v1/adapters/sentiment", headers=AUTH).status_code == 404
    assert [m["id"] for m in http.get("/v1/models", headers=AUTH).json()["data"]] == ["base", "ner", "topic"]


def test_unload_with_requests_waiting_is_409_or_drains(export, client):
    """A pass ends before the engine changes the banks, so a classifier's requests in flight are those waiting:
    while a slow pass runs, one waits for the next."""
    _, _, refs = export
    http, recording, tokenizer = client
    recording.delay = 0.6
    with ThreadPoolExecutor(3) as pool:
        pool.submit(classify, http, TEXTS[1], "ner", "/v1/ner")  # the pass that runs
        time.sleep(0.2)
        waiting = pool.submit(classify, http, TEXTS[0], "sentiment")
        time.sleep(0.1)
        busy = http.delete("/v1/adapters/sentiment", headers=AUTH)  # answered when the first pass ends
        assert busy.status_code == 409 and "1 request in flight" in busy.json()["error"]["message"]
        later = pool.submit(classify, http, TEXTS[2], "sentiment")  # waits while `waiting` runs
        time.sleep(0.2)
        draining = http.delete("/v1/adapters/sentiment", params={"drain": "true"}, headers=AUTH)
        assert draining.status_code == 202 and draining.json()["draining"] == 1, draining.text
        assert classify(http, TEXTS[0], "sentiment").status_code == 404  # no new request for a draining name
        check_classify(waiting.result(), refs, "sentiment", tokenizer, TEXTS[0])
        check_classify(later.result(), refs, "sentiment", tokenizer, TEXTS[2])
    recording.delay = 0.0
    deadline = time.monotonic() + 10
    while "sentiment" in recording.served_adapters() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(recording.served_adapters()) == {"ner"}


def bad_exports(root, export) -> dict[str, tuple]:
    """name -> (path, what the 400 says) for each way a classifier adapter can be wrong."""
    out, out2, _ = export
    loose = root / "loose"
    loose.mkdir()
    (loose / "corrupt.onnx_adapter").write_bytes(b"not an adapter at all")
    shutil.copy(out2 / "adapters" / "topic.onnx_adapter", loose / "topic.onnx_adapter")
    untargeted = {"encoder.layer.1.output.dense": {"A": np.ones((64, 2), np.float32),
                                                   "B": np.ones((2, 32), np.float32)}}
    other_base = {Q0: {"A": np.ones((48, 2), np.float32), "B": np.ones((2, 32), np.float32)}}
    cases = {"missing": (loose / "gone.onnx_adapter", "no such adapter file"),
             "corrupt": (loose / "corrupt.onnx_adapter", "is not an onnxruntime adapter file"),
             "untargeted": (write_adapter_file(loose / "u.onnx_adapter", untargeted), "no LoRA branch"),
             "otherbase": (write_adapter_file(loose / "o.onnx_adapter", other_base), "trained on another base"),
             "loose": (loose / "topic.onnx_adapter", "is not in a classifier export")}
    for name, change, says in (("nohead", None, "head graph"), ("tags", ["sport", "news", "tech"], "IOB2"),
                               ("digest", "other", "tuned on another base")):
        copy_of = root / name
        shutil.copytree(out2, copy_of)
        manifest = json.loads((copy_of / "adapters.json").read_text())
        if name == "nohead":
            (copy_of / "heads" / "topic.onnx").unlink()
        elif name == "tags":
            manifest["adapters"][0].update(task="token-cls")
        else:
            manifest["base"]["digest"] = change
        (copy_of / "adapters.json").write_text(json.dumps(manifest))
        cases[name] = (copy_of / "adapters" / "topic.onnx_adapter", says)
    return cases


def test_bad_adapter_files_are_a_400_naming_the_adapter_and_the_others_keep_serving(export, client, tmp_path):
    _, _, refs = export
    http, _, tokenizer = client
    for name, (path, says) in bad_exports(tmp_path, export).items():
        response = http.post("/v1/adapters", headers=AUTH, json={"name": name, "path": str(path)})
        assert response.status_code == 400, (name, response.text)
        message = response.json()["error"]["message"]
        assert f"adapter {name!r}" in message and says in message, message
    check_classify(classify(http, TEXTS[0], "sentiment"), refs, "sentiment", tokenizer, TEXTS[0])
    assert [m["id"] for m in http.get("/v1/models", headers=AUTH).json()["data"]] == ["base", "sentiment", "ner"]


def test_a_broken_export_is_one_clear_error_at_start(export, tmp_path):
    out, _, _ = export
    copy_of = tmp_path / "team"
    shutil.copytree(out, copy_of)
    manifest = json.loads((copy_of / "adapters.json").read_text())
    manifest["adapters"][1]["labels"] = ["O", "PER"]
    (copy_of / "adapters.json").write_text(json.dumps(manifest))
    with pytest.raises(ServeError, match="adapter 'ner': .*adapters.json labels 'PER': .*IOB2"):
        load_backend(copy_of, "cpu", threads=1)
    manifest["adapters"][1]["labels"] = NER_LABELS[:3]
    (copy_of / "adapters.json").write_text(json.dumps(manifest))
    with pytest.raises(ServeError, match="gives 5 logits, .* names 3 labels"):
        load_backend(copy_of, "cpu", threads=1)


def test_the_start_up_lines_name_the_adapters_and_their_tasks(export, monkeypatch):
    import uvicorn

    from lite_sft.serve.server import serve

    out, _, _ = export
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    lines: list[str] = []
    serve(out, say=lines.append, port=0, device="cpu", threads=1)
    said = "\n".join(lines)
    assert ("adapters: sentiment (seq-cls, rank 4: attention.self.query, attention.self.value, pooler.dense), "
            "ner (token-cls, rank 2: attention.self.query, output.dense)") in said
    assert "one-pass batching" in said

