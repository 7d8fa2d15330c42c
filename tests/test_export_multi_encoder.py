"""Classifiers of one base exported together (export/multi_encoder.py): a tiny BERT sentiment run (seq-cls) and an
NER run (token-cls) give one trunk graph, a head and an adapter file each, the manifest, every gate per adapter
per graph and a mixed batch per graph; and the refusals, before anything is written."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lite_sft.adapters import MASK_INPUT, read_adapter_file, read_manifest
from lite_sft.cli import app
from lite_sft.export import ExportError
from lite_sft.export.multi import export_runs
from lite_sft.export.multi_gate import bank
from lite_sft.options import ExportOptions

from test_export_multi import edited
from test_export_tasks import tuned

pytest.importorskip("onnxruntime")
runner = CliRunner()
FAST = dict(parity_examples=8)
NER_TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, sentiment_csv, ner_conll):
    """A sentiment run (seq-cls, every Linear of the trunk, the pooler's included) and an NER run (token-cls, the
    attention's query and value at rank 4) on one tiny BERT."""
    root = tmp_path_factory.mktemp("multi-encoder")
    sentiment = tuned(root / "sentiment", 60, **{
        "task.name": "seq-cls", "model.name_or_path": str(tiny_bert_dir), "data.path": str(sentiment_csv / "train.csv"),
        "data.validation_path": str(sentiment_csv / "dev.csv"), "task.validation_text_column": "content",
        "data.max_seq_len": 32})
    ner = tuned(root / "ner", 60, **{
        "task.name": "token-cls", "task.tag_column": 1, "model.name_or_path": str(tiny_bert_dir),
        "data.path": str(ner_conll / "train.txt"), "data.validation_path": str(ner_conll / "valid.txt"),
        "data.max_seq_len": 32, "lora.r": 4, "lora.alpha": 8, "lora.target_modules": ["query", "value"]})
    return sentiment, ner


def test_a_seq_cls_and_a_token_cls_run_share_one_trunk_graph_and_every_gate_passes(runs, tiny_bert_dir, tmp_path):
    sentiment, ner = runs
    out = tmp_path / "team"
    lines = []
    report = export_runs([sentiment, ner], out, ExportOptions(quantize="int8", **FAST), say=lines.append)
    assert report["passed"], "\n".join(lines)
    assert report["task"] == "seq-cls" and report["tasks"] == {"sentiment": "seq-cls", "ner": "token-cls"}
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "adapters.json", "base", "heads", "onnx", "onnx-int8",
                                                     "parity.json"]
    manifest = read_manifest(out)
    assert manifest.base["kind"] == "encoder" and manifest.base["folder"] == "base"
    assert manifest.base["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.base["outputs"] == ["last_hidden_state", "pooler_output"]  # the seq-cls run's trunk: a pooler
    by_name = {a.name: a for a in manifest.adapters}
    assert [a.name for a in manifest.adapters] == ["sentiment", "ner"]
    assert (by_name["sentiment"].task, by_name["sentiment"].labels) == ("seq-cls", ["neg", "pos"])
    assert (by_name["ner"].task, by_name["ner"].labels, by_name["ner"].rank) == ("token-cls", NER_TAGS, 4)
    assert by_name["ner"].targets == ["attention.self.query", "attention.self.value"]
    assert "pooler.dense" in by_name["sentiment"].targets
    for entry in manifest.adapters:
        assert entry.head == f"heads/{entry.name}.onnx" and (out / entry.head).is_file()
        assert set(entry.gate) == {"merge", "onnx", "int8"} and all(g["passed"] for g in entry.gate.values())
    # The graph's sites are the union; each adapter file holds its own run's, named by module path in the trunk.
    sites = {s.name for s in manifest.sites}
    assert set(read_adapter_file(out / by_name["ner"].file)) == {f"encoder.layer.{i}.attention.self.{m}"
                                                                 for i in (0, 1) for m in ("query", "value")}
    assert "pooler.dense" in read_adapter_file(out / by_name["sentiment"].file)
    assert sites == set(read_adapter_file(out / by_name["sentiment"].file)) | set(read_adapter_file(
        out / by_name["ner"].file))
    parity = json.loads((out / "parity.json").read_text())
    assert [(g["stage"], g["adapter"]) for g in parity["gates"]] == [
        ("merge", "sentiment"), ("merge", "ner"), ("onnx", "sentiment"), ("onnx", "ner"), ("int8", "sentiment"),
        ("int8", "ner")]
    assert all(g["batch"]["passed"] and g["batch"]["rows"] == 8 for g in parity["gates"] if g["stage"] != "merge")
    fp = [g for g in parity["gates"] if g["stage"] == "onnx"]
    assert all(g["greedy_agreement"] == 1.0 and g["max_abs_diff"] < 1e-4 for g in fp)
    assert parity["adapters"]["ner"]["labels"] == NER_TAGS and parity["adapters"]["sentiment"]["examples"]["count"] == 8
    assert [(m["stage"], m["row_adapters"], m["passed"]) for m in parity["mixed"]] == [
        ("onnx", ["sentiment", "ner", "sentiment", "ner"], True),
        ("int8", ["sentiment", "ner", "sentiment", "ner"], True)]
    assert parity["mixed"][0]["vs_alone"]["greedy_agreement"] == 1.0
    assert parity["mixed"][0]["vs_alone"]["max_abs_diff"] < 1e-4
    assert "mixed batch (onnx-int8)" in "\n".join(lines)
    # int8: the trunk's weights are quantised, the LoRA branches are still float MatMuls on the bank inputs.
    import onnx

    graph = onnx.load(str(out / "onnx-int8" / "model.onnx")).graph
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    # base/ is the trunk itself, a Hugging Face folder of the base's weights (a 16/32-bit run: the checkpoint's).
    from safetensors.numpy import load_file

    config = json.loads((out / "base" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and (out / "onnx" / "config.json").is_file()
    saved, original = load_file(out / "base" / "model.safetensors"), load_file(tiny_bert_dir / "model.safetensors")
    assert set(saved) == set(original) and all(np.array_equal(saved[k], original[k]) for k in original)

    # What a server does with the folder: the trunk once with the sentiment bank, then its head, gives the merged
    # sentiment classifier's logits on new text.
    import onnxruntime as ort
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    texts = ["a very good film", "the plot was awful and slow"]
    inputs = tokenizer(texts, padding=True, return_tensors="np")
    entry = by_name["sentiment"]
    feed, _ = bank(manifest.sites, [read_adapter_file(out / entry.file)], [entry.rank])
    trunk = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    hidden = dict(zip(manifest.base["outputs"], trunk.run(manifest.base["outputs"], {
        **{name: inputs[name] for name in manifest.base["inputs"]}, **feed,
        MASK_INPUT: np.ones((2, entry.rank), np.float32)})))
    head = ort.InferenceSession(str(out / entry.head), providers=["CPUExecutionProvider"])
    given = {**hidden, **inputs}
    got = head.run(["logits"], {i.name: given[i.name] for i in head.get_inputs()})[0]
    model = AutoModelForSequenceClassification.from_pretrained(out / "base", num_labels=2)
    model = PeftModel.from_pretrained(model, str(sentiment)).merge_and_unload().eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_cli_exports_classifiers_together(runs, tmp_path):
    sentiment, ner = runs
    result = runner.invoke(app, ["export", str(sentiment), str(ner), "--out", str(tmp_path / "team"),
                                 "--name", f"{ner}=tags", "--parity-examples", "4"])
    assert result.exit_code == 0, result.output
    assert "sentiment (seq-cls): parity on" in result.output and "tags (token-cls): parity on" in result.output
    assert "mixed batch (onnx): sentiment, tags" in result.output
    assert "base/ onnx/ heads/ adapters/ adapters.json parity.json" in result.output
    assert [a.name for a in read_manifest(tmp_path / "team").adapters] == ["sentiment", "tags"]


def test_refusals_name_the_runs_and_write_nothing(runs, tmp_path, tiny_t5_dir, sentiment_csv):
    sentiment, ner = runs
    other = tmp_path / "other-bert"
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(1)  # the same architecture and tokenizer, other weights
    tokenizer = AutoTokenizer.from_pretrained(sentiment)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    t5 = tuned(tmp_path / "t5-cls", 2, **{
        "task.name": "seq-cls", "model.name_or_path": str(_t5_base(tiny_t5_dir, tmp_path)),
        "data.path": str(sentiment_csv / "train.csv"), "data.validation_fraction": 0.1})
    cases = [
        ([edited(sentiment, tmp_path / "chat", **{"task.name": "causal-lm"}), ner], [],
         r"chat is a causal-lm run and .*ner a token-cls run: .*export them separately"),
        ([sentiment, edited(ner, tmp_path / "moved", **{"model.name_or_path": str(other)})], [],
         r"sentiment and .*moved were tuned on different bases"),
        ([sentiment, edited(sentiment, tmp_path / "s2s", **{"task.name": "seq2seq"})], [],
         r"s2s is a seq2seq run: an encoder-decoder's adapters are not exported onto one shared graph"),
        ([t5, shutil.copytree(t5, tmp_path / "t5-copy")], [],
         r"t5-cls .* is an encoder-decoder \(t5\): its classifiers run a decoder too"),
        ([sentiment, edited(ner, tmp_path / "dora", **{"lora.use_dora": True})], [], r"dora is a DoRA run"),
    ]
    out = tmp_path / "out"
    out.mkdir()
    (out / "parity.json").write_text("{}")  # an earlier export, which a refusal leaves as it was
    for run_dirs, names, message in cases:
        with pytest.raises(ExportError, match=message):
            export_runs(run_dirs, out, ExportOptions(names=names, overwrite=True, **FAST), say=lambda _: None)
        assert sorted(p.name for p in out.iterdir()) == ["parity.json"] and not list(tmp_path.glob("out.*"))
    with pytest.raises(ExportError, match="--dtype fp16: classifiers export in fp32"):
        export_runs([sentiment, ner], out, ExportOptions(dtype="fp16", overwrite=True), say=lambda _: None)
    with pytest.raises(ExportError, match="--no-onnx: several classifiers"):
        export_runs([sentiment, ner], out, ExportOptions(onnx=False, overwrite=True), say=lambda _: None)


def _t5_base(tiny_t5_dir, tmp_path):
    """The tiny T5 with a tokenizer that gives no token_type_ids (as test_export_tasks makes it)."""
    base = tmp_path / "t5"
    shutil.copytree(tiny_t5_dir, base)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings["model_input_names"] = ["input_ids", "attention_mask"]
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    return base


def test_int4_quantises_the_trunk_and_keeps_the_branches_and_heads_float(runs, tmp_path):
    sentiment, ner = runs
    lines = []
    report = export_runs([sentiment, ner], tmp_path / "team", ExportOptions(quantize="int4", **FAST), say=lines.append)
    assert report["passed"], "\n".join(lines)
    assert [g["stage"] for g in report["gates"]] == ["merge", "merge", "onnx", "onnx", "int4", "int4"]
    assert [m["passed"] for m in report["mixed"]] == [True, True]
    import onnx

    graph = onnx.load(str(tmp_path / "team" / "onnx-int4" / "model.onnx")).graph
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
    head = onnx.load(str(tmp_path / "team" / "heads" / "sentiment.onnx")).graph
    assert not any(n.op_type == "MatMulNBits" for n in head.node)


def test_a_classifiers_head_and_lora_outside_the_trunk_go_to_its_head_and_anything_else_in_the_trunk_is_refused():
    from lite_sft.export.multi_runs import Run, _read_classifier_adapter

    def state(*keys):
        return {key: torch.ones(2, 4) for key in keys}

    lora = ("base_model.model.distilbert.transformer.layer.0.attention.q_lin.lora_A.weight",
            "base_model.model.distilbert.transformer.layer.0.attention.q_lin.lora_B.weight")
    cfg = SimpleNamespace(task=SimpleNamespace(name="seq-cls"))
    run = Run(Path("runs/topics"), "topics", cfg, "", scale=2.0, prefix="distilbert")
    # DistilBERT's pre_classifier (LoRA outside the trunk) and the classifier saved whole: the head's.
    _read_classifier_adapter(run, state(*lora, "base_model.model.pre_classifier.lora_A.weight",
                                        "base_model.model.pre_classifier.lora_B.weight",
                                        "base_model.model.classifier.weight"))
    assert list(run.sites) == ["transformer.layer.0.attention.q_lin"] and run.targets == ["attention.q_lin"]
    assert np.array_equal(run.sites["transformer.layer.0.attention.q_lin"]["B"], np.full((4, 2), 2.0))
    with pytest.raises(ExportError, match=r"runs/topics trains base_model.model.distilbert.embeddings.word_embeddings"
                                          r".* inside the shared trunk \(distilbert\)"):
        _read_classifier_adapter(run, state(*lora, "base_model.model.distilbert.embeddings.word_embeddings."
                                                   "token_adapter.trainable_tokens_delta"))


def test_runs_exported_together_are_served_each_as_its_own_merged_classifier_alone_and_mixed(runs, tmp_path):
    """tune -> `lite-sft export A B` -> the server's backend and HTTP app: each adapter answers as its own run's
    merged PyTorch classifier, alone and with rows of the other adapter in the same trunk pass."""
    from fastapi.testclient import TestClient
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from lite_sft.options import ServerSettings
    from lite_sft.serve.backends.factory import load_backend
    from lite_sft.serve.backends.lora_encoder import LoraEncoderBackend
    from lite_sft.serve.server import create_app

    sentiment, ner = runs
    out = tmp_path / "team"
    assert export_runs([sentiment, ner], out, ExportOptions(**FAST), say=lambda _: None)["passed"]
    backend, tokenizer = load_backend(out, "cpu", threads=1)
    assert isinstance(backend, LoraEncoderBackend) and set(backend.served_adapters()) == {"sentiment", "ner"}
    merged = {name: PeftModel.from_pretrained(auto.from_pretrained(out / "base", num_labels=len(labels)),
                                              str(run)).merge_and_unload().eval()
              for name, auto, labels, run in (("sentiment", AutoModelForSequenceClassification, ["neg", "pos"],
                                               sentiment),
                                              ("ner", AutoModelForTokenClassification, NER_TAGS, ner))}
    texts = ["a very good film", "Peter flew to Paris with the ORG team", "awful", "the plot was slow"]
    rows = [{k: list(v) for k, v in tokenizer(text).items() if k in ("input_ids", "token_type_ids")}
            for text in texts]

    def expected(name: str, row: dict) -> np.ndarray:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            return merged[name](input_ids=ids, attention_mask=torch.ones_like(ids),
                                token_type_ids=torch.tensor([row["token_type_ids"]])).logits[0].numpy()

    names = ["sentiment", "ner", "ner", "sentiment"]
    mixed = backend.logits(rows, names)
    for row, name, got in zip(rows, names, mixed):
        np.testing.assert_allclose(got, expected(name, row), atol=1e-4, rtol=1e-4)
        alone = backend.logits([row], [name])[0]
        assert np.array_equal(alone.argmax(-1), got.argmax(-1))
    with TestClient(create_app(backend, tokenizer, ServerSettings("team"))) as http:
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert models == ["base", "sentiment", "ner"]
        answer = http.post("/v1/classify", json={"model": "sentiment", "input": texts[0]}).json()
        want = ["neg", "pos"][int(expected("sentiment", rows[0]).argmax())]
        assert answer["data"][0]["label"] == want and answer["model"] == "sentiment"
        assert http.post("/v1/ner", json={"model": "ner", "input": texts[1]}).status_code == 200
        refused = http.post("/v1/ner", json={"model": "sentiment", "input": texts[1]})
        assert refused.status_code == 400 and "sentiment" in refused.json()["error"]["message"]
