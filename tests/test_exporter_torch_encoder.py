"""The classifier exporter (export/exporters/torch_encoder.py): tiny random BERT (seq-cls and token-cls), RoBERTa
and Llama classifiers exported by torch.onnx give PyTorch's logits on a padded batch; int8 quantises every
projection, attention's included; the server's ONNX backend labels as PyTorch does; bad input is one line."""

import json
from pathlib import Path

import onnx
import pytest
import torch

from lite_sft.export import ExportError
from lite_sft.export.exporters import candidates, torch_encoder
from lite_sft.export.quantize import quantize

from conftest import make_wordpiece

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]  # IOB2, as /v1/ner reads them
TEXTS = ["a great film", "peter visited paris and met mary in london at acme", "not good", "the plot is very sad ."]


def head(kind: str, tiny_bert_dir: Path, tiny_model_dir: Path):
    """(model, tokenizer) of one tiny classifier, seeded: its head is random too."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "bert-seq":
        return (T.BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2,
                                                                id2label={0: "neg", 1: "pos"},
                                                                label2id={"neg": 0, "pos": 1}),
                T.AutoTokenizer.from_pretrained(tiny_bert_dir))
    if kind == "bert-token":
        return (T.BertForTokenClassification.from_pretrained(tiny_bert_dir, num_labels=len(TAGS),
                                                             id2label=dict(enumerate(TAGS)),
                                                             label2id={t: i for i, t in enumerate(TAGS)}),
                T.AutoTokenizer.from_pretrained(tiny_bert_dir))
    if kind == "roberta-seq":
        # The WordPiece tokenizer without token_type_ids, as RoBERTa's gives none: the graph must not ask for them.
        tokenizer = make_wordpiece()
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
        config = T.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=160, pad_token_id=0, num_labels=3)
        return T.RobertaForSequenceClassification(config), tokenizer
    # A decoder with a classification head: it reads the last non-pad token of each row.
    return (T.LlamaForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3),
            T.AutoTokenizer.from_pretrained(tiny_model_dir))


KINDS = {"bert-seq": "seq-cls", "bert-token": "token-cls", "roberta-seq": "seq-cls", "llama-seq": "seq-cls"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bert_dir, tiny_model_dir):
    """kind -> (model, tokenizer, OUT): OUT/merged, OUT/onnx by the exporter, parity.json naming the task, as
    `lite-sft export` lays them out. Built once per kind, on first use."""
    built = {}

    def get(kind: str):
        if kind not in built:
            model, tokenizer = head(kind, tiny_bert_dir, tiny_model_dir)
            out = tmp_path_factory.mktemp(kind) / "export"
            model.eval().save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
            torch_encoder.export(model, out / "merged", out / "onnx", "fp32")
            (out / "parity.json").write_text(json.dumps({"task": KINDS[kind], "passed": True}))
            built[kind] = model, tokenizer, out
        return built[kind]

    return get


def padded(tokenizer) -> dict:
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(TEXTS)  # every row its own length, so three of them are padded
    return batch


@pytest.mark.parametrize("kind", KINDS)
def test_exported_logits_match_pytorch_on_a_padded_batch(kind, exported):
    model, tokenizer, out = exported(kind)
    batch = padded(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    got = torch_encoder.open(out / "onnx")(**batch).logits
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=0)
    # One row alone (batch 1, its own length) too: nothing of the example shapes was frozen into the graph.
    one = {k: v[1:2, :int(batch["attention_mask"][1].sum())] for k, v in batch.items()}
    with torch.no_grad():
        assert torch.allclose(torch_encoder.open(out / "onnx")(**one).logits, model(**one).logits, atol=1e-4, rtol=0)

    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    takes_types = "token_type_ids" in tokenizer.model_input_names
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] + ["token_type_ids"] * takes_types
    assert [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size"] + ["sequence_length"] * (KINDS[kind] == "token-cls") + [model.config.num_labels]
    # The folder is servable on its own: the labels in config.json, the tokenizer beside the graph.
    files = {p.name for p in (out / "onnx").iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith(".safetensors") for name in files)
    assert json.loads((out / "onnx" / "config.json").read_text())["id2label"] == \
        {str(i): name for i, name in model.config.id2label.items()}


@pytest.mark.parametrize("kind", ["bert-seq", "llama-seq"])
def test_int8_quantises_every_projection_attention_included(kind, exported, tmp_path):
    model, tokenizer, out = exported(kind)
    quantize(out / "onnx", tmp_path / "int8", "int8", 32)
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    weights = {t.name for t in graph.initializer}
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # Q, K, V, output, MLP, head
    assert sum(n.op_type == "MatMulInteger" for n in graph.node) == linears
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    batch = padded(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    got = torch_encoder.open(tmp_path / "int8")(**batch).logits
    scale = expected.abs().max()
    assert 0 < (got - expected).abs().max() < 0.1 * scale  # quantised, and close
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < (out / "onnx" / "model.onnx").stat().st_size


@pytest.mark.parametrize("kind", ["bert-seq", "bert-token"])
def test_the_server_labels_the_export_as_pytorch_does(kind, exported):
    from lite_sft.serve.backends.encoder import OrtEncoderBackend
    from lite_sft.serve.backends.factory import load_backend

    model, tokenizer, out = exported(kind)
    backend, served_tokenizer = load_backend(out, device="cpu", threads=1)
    assert isinstance(backend, OrtEncoderBackend) and backend.task == KINDS[kind]
    rows = [dict(served_tokenizer(text)) for text in TEXTS]
    got = backend.logits(rows)  # one padded batch on onnxruntime
    for text, logits in zip(TEXTS, got):
        with torch.no_grad():
            expected = model(**tokenizer(text, return_tensors="pt")).logits[0]  # (labels,) or (tokens, labels)
        assert logits.shape == tuple(expected.shape)
        assert (logits.argmax(-1) == expected.argmax(-1).numpy()).all()
        assert abs(logits - expected.numpy()).max() < 1e-4


def test_what_it_refuses_is_said_before_any_work(tiny_t5_dir):
    from transformers import AutoConfig, BertConfig

    assert torch_encoder.refuses(BertConfig(), "fp32") is None
    assert "--quantize" in torch_encoder.refuses(BertConfig(), "fp16")
    t5 = AutoConfig.from_pretrained(tiny_t5_dir)
    assert "encoder-decoder" in torch_encoder.refuses(t5, "fp32")
    with pytest.raises(ExportError, match="no ONNX exporter takes this t5 model for seq-cls.*--no-onnx"):
        candidates("seq-cls", t5, "fp32")


def test_a_failure_inside_torch_onnx_is_one_line_and_writes_nothing(exported, tmp_path, monkeypatch):
    model, _, out = exported("bert-seq")

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export.\n\n<class 'ValueError'>: no such op\n"
                           "  deep inside a trace")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError) as caught:
        torch_encoder.export(model, out / "merged", tmp_path / "onnx", "fp32")
    assert str(caught.value) == ("torch.onnx could not export this bert classifier (ValueError: no such op); the "
                                 "merged model is fine: export it alone with --no-onnx")
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(ExportError, match="onnxruntime could not load .*model.onnx"):
        torch_encoder.open(tmp_path)
    # A merged folder without its tokenizer: the graph's inputs depend on what the tokenizer gives.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((out / "merged" / "config.json").read_text())
    with pytest.raises(ExportError, match="holds no tokenizer.*merge again"):
        torch_encoder.export(model, tmp_path / "bare", tmp_path / "onnx", "fp32")
