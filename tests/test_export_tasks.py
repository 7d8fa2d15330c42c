"""Export of the classic tasks end to end: tiny seq-cls, token-cls and seq2seq runs (BERT, T5, BART) tuned for
a few seconds, exported to fp32 and int8 ONNX through torch.onnx, each stage gated on the run's held-out
examples; what a user runs from the export (onnxruntime on the graph, lite-sft's server runtime) agrees with
the merged model; and the errors a user sees."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lite_sft.cli import app
from lite_sft.config import load_config
from lite_sft.export import ExportError
from lite_sft.export.pipeline import export_run
from lite_sft.options import ExportOptions
from lite_sft.train import tune

runner = CliRunner()
TRAIN = {"lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "train.micro_batch_size": 8, "train.lr": 3e-3,
         "train.warmup_ratio": 0.0, "train.eval_every": 0, "train.save_every": 0}
SEQ2SEQ_FILES = {"encoder_model.onnx", "decoder_model.onnx"}


def ort_run(folder, batch) -> torch.Tensor:
    """The exported graph's logits under onnxruntime, fed as a user feeds it: the tokenizer's tensors as numpy."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(["logits"], feed)[0])


def tuned(out, steps: int, **settings):
    tune(load_config(None, {**TRAIN, "train.max_steps": steps, "output_dir": str(out), **settings}))
    return out


def export(run, out, **options):
    return export_run(run, out, ExportOptions(**options), say=lambda _: None)


def stages(report) -> list[str]:
    return [g["stage"] for g in report["gates"] if g["passed"]]


def graph_ops(path) -> set[str]:
    """Every op of an ONNX graph, those in its If branches included (the merged seq2seq decoder)."""
    import onnx

    def ops(graph):
        found = set()
        for node in graph.node:
            found.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    found |= ops(attr.g)
        return found

    return ops(onnx.load(str(path)).graph)


@pytest.fixture(scope="module")
def seq_cls_run(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    return tuned(tmp_path_factory.mktemp("runs") / "sentiment", 120, **{
        "task.name": "seq-cls", "model.name_or_path": str(tiny_bert_dir), "data.path": str(sentiment_csv / "train.csv"),
        "data.validation_path": str(sentiment_csv / "dev.csv"), "task.validation_text_column": "content",
        "data.max_seq_len": 32})


@pytest.fixture(scope="module")
def token_cls_run(tmp_path_factory, tiny_bert_dir, ner_conll):
    return tuned(tmp_path_factory.mktemp("runs") / "ner", 80, **{
        "task.name": "token-cls", "task.tag_column": 1, "model.name_or_path": str(tiny_bert_dir),
        "data.path": str(ner_conll / "train.txt"), "data.validation_path": str(ner_conll / "valid.txt"),
        "data.max_seq_len": 32})


@pytest.fixture(scope="module")
def reverse_jsonl(tmp_path_factory):
    """Sources `reverse : <2-5 digit words>`, targets the words reversed; 96 to train on, 12 held out."""
    import random

    rng, folder = random.Random(0), tmp_path_factory.mktemp("reverse")
    digits = "zero one two three four five six seven eight nine".split()
    for name, n in (("train.jsonl", 96), ("dev.jsonl", 12)):
        with open(folder / name, "w") as f:
            for _ in range(n):
                words = rng.choices(digits, k=rng.randint(2, 5))
                f.write(json.dumps({"source": "reverse : " + " ".join(words), "target": " ".join(words[::-1])}) + "\n")
    return folder


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, tiny_t5_dir, tiny_bart_dir, reverse_jsonl):
    runs = {}

    def make(arch: str):
        if arch not in runs:
            runs[arch] = tuned(tmp_path_factory.mktemp("runs") / arch, 40, **{
                "task.name": "seq2seq", "model.name_or_path": str(tiny_t5_dir if arch == "t5" else tiny_bart_dir),
                "data.path": str(reverse_jsonl / "train.jsonl"),
                "data.validation_path": str(reverse_jsonl / "dev.jsonl"),
                "data.max_seq_len": 32, "task.max_target_len": 16, "task.max_new_tokens": 7})
        return runs[arch]

    return make


def test_seq_cls_exports_through_the_cli_with_its_labels_and_every_gate_passes(seq_cls_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(seq_cls_run), "--out", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "parity examples: validation data" in result.output and "FAIL" not in result.output
    assert result.output.count("batch of 24") == 2  # onnx/ and onnx-int8/ each ran the 24 examples padded together
    report = json.loads((out / "parity.json").read_text())
    assert report["task"] == "seq-cls" and report["passed"] and stages(report) == ["merge", "onnx", "int8"]
    assert report["labels"] == ["neg", "pos"] and report["examples"]["count"] == 24
    merge, fp, int8 = report["gates"]
    assert merge["greedy_agreement"] == fp["greedy_agreement"] == 1.0 and fp["positions"] == 24
    assert merge["max_abs_diff"] < 1e-5 and fp["max_abs_diff"] < 1e-5 and fp["batch"]["padding"] > 0
    assert int8["greedy_agreement"] >= int8["thresholds"]["min_agreement"] == 0.90
    # int8 weights are 7-bit: full-range ones saturate on CPUs without VNNI and missed the mean bound by 3x.
    assert int8["mean_abs_diff"] <= int8["thresholds"]["mean_abs_rel"] * max(1, int8["logit_scale"])
    assert int8["size_bytes_after"] < int8["size_bytes_before"]
    assert "MatMulInteger" in graph_ops(out / "onnx-int8" / "model.onnx")

    # What a user loads: the labels are in config.json, and onnxruntime on the graph gives the merged model's logits.
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    batch = tokenizer(["a very good film", "the plot was awful", "love it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModelForSequenceClassification.from_pretrained(out / "merged")(**batch).logits
    torch.testing.assert_close(ort_run(out / "onnx", batch), expected, atol=1e-4, rtol=1e-4)
    assert [config["id2label"][str(i)] for i in expected.argmax(-1).tolist()] == ["pos", "neg", "pos"]
    assert ort_run(out / "onnx-int8", batch).argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_token_cls_exports_int8_and_int4_with_its_tags(token_cls_run, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    for method in ("int8", "int4"):
        out = tmp_path / method
        report = export(token_cls_run, out, quantize=method)
        assert report["task"] == "token-cls" and stages(report) == ["merge", "onnx", method]
        assert report["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
        fp, quantized = report["gates"][1:]
        # Every token of the 32 held-out sentences is a compared position.
        assert fp["greedy_agreement"] == 1.0 and fp["positions"] > 32 and fp["batch"]["rows"] == 32
        assert quantized["size_bytes_after"] < quantized["size_bytes_before"]
        op = "MatMulNBits" if method == "int4" else "MatMulInteger"
        assert op in graph_ops(out / f"onnx-{method}" / "model.onnx")
    assert json.loads((out / "onnx" / "config.json").read_text())["id2label"]["5"] == "B-PER"
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    batch = tokenizer([["peter", "visited", "paris"], ["mary", "works", "for", "acme"]], is_split_into_words=True,
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModelForTokenClassification.from_pretrained(out / "merged")(**batch).logits
    got = ort_run(out / "onnx", batch)  # (batch, tokens, tags)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_exports_encoder_and_decoders_that_generate_as_the_merged_model(arch, seq2seq_run, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.factory import load_backend

    run, out = seq2seq_run(arch), tmp_path / "export"
    report = export(run, out, quantize="int8", parity_tokens=6)
    assert report["task"] == "seq2seq" and stages(report) == ["merge", "onnx", "int8"]
    assert report["exporter"]["name"] == "torch"
    assert report["examples"]["count"] == 8 and report["examples"]["new_tokens"] == 6
    merge, fp, int8 = report["gates"]
    assert fp["greedy_agreement"] == 1.0 and fp["positions"] == 8 * 7 and fp["max_abs_diff"] < 1e-4
    assert fp["batch"]["rows"] == 2 and fp["batch"]["padding"] > 0  # the shortest and longest sources together
    assert int8["size_bytes_after"] < int8["size_bytes_before"]
    for folder in ("onnx", "onnx-int8"):
        assert SEQ2SEQ_FILES <= {p.name for p in (out / folder).iterdir()}
    for name in SEQ2SEQ_FILES:  # every graph is quantised
        assert "MatMulInteger" in graph_ops(out / "onnx-int8" / name), name

    # The run's generation settings travel with the model: merged/, onnx/ and the report say the same.
    saved = GenerationConfig.from_pretrained(run)
    for folder in ("merged", "onnx", "onnx-int8"):
        gen = GenerationConfig.from_pretrained(out / folder)
        assert (gen.max_new_tokens, gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == \
               (7, saved.decoder_start_token_id, saved.eos_token_id, saved.pad_token_id)
    assert report["generation"]["max_new_tokens"] == 7

    # What the server decodes from onnx/, the two sources in one batch, is the merged model's greedy output.
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    texts = ["reverse : one two three four five", "reverse : six"]
    merged = AutoModelForSeq2SeqLM.from_pretrained(out / "merged")
    eos = [saved.eos_token_id]
    expected = []
    with torch.no_grad():
        for text in texts:
            made = merged.generate(**tokenizer([text], return_tensors="pt", return_token_type_ids=False),
                                   forced_eos_token_id=None)[0, 1:].tolist()
            expected.append(made[:next((i + 1 for i, t in enumerate(made) if t in eos), len(made))])
    backend, _ = load_backend(out, "cpu", threads=1, variant="fp")
    sources = [tokenizer(t)["input_ids"] for t in texts]
    assert generate_ids(backend, sources, SamplingParams(max_new_tokens=7, stop_ids=eos)) == expected


def test_a_4bit_classifier_merges_onto_its_dequantised_weights_with_its_head(tiny_bert_dir, sentiment_csv, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = tuned(tmp_path / "run", 10, **{
        "task.name": "seq-cls", "model.name_or_path": str(tiny_bert_dir), "model.quant": "4bit",
        "data.path": str(sentiment_csv / "train.csv"), "data.validation_fraction": 0.1, "data.max_seq_len": 32})
    report = export(run, tmp_path / "export", onnx=False)
    merge = report["gates"][0]
    assert merge["passed"] and merge["precision"] == "float16" and merge["merge_onto"] == "dequantized"
    assert merge["greedy_agreement"] == 1.0 and report["examples"]["source"].startswith("held-out split of")
    config = json.loads((tmp_path / "export" / "merged" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and "quantization_config" not in config


def test_an_architecture_no_exporter_takes_for_the_task_is_one_line(tiny_t5_dir, sentiment_csv, tmp_path):
    import shutil

    # A T5 classifier trains (T5ForSequenceClassification), but the encoder exporter takes encoders and decoders.
    base = tmp_path / "t5"
    shutil.copytree(tiny_t5_dir, base)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings["model_input_names"] = ["input_ids", "attention_mask"]  # T5's own tokenizer has no token_type_ids
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    run = tuned(tmp_path / "run", 2, **{"task.name": "seq-cls", "model.name_or_path": str(base),
                                        "data.path": str(sentiment_csv / "train.csv"), "data.validation_fraction": 0.1})
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.output.strip()
    assert "\n" not in line and "no ONNX exporter takes this t5 model for seq-cls" in line
    assert "encoder-decoder" in line and "--no-onnx" in line and not (tmp_path / "out").exists()


def test_a_failure_inside_torch_onnx_is_one_line_and_leaves_nothing(seq_cls_run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported ONNX opset\n  deep inside a trace")

    monkeypatch.setattr(torch.onnx, "export", broken)
    result = runner.invoke(app, ["export", str(seq_cls_run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bert" in errors[0] and "Unsupported ONNX opset" in errors[0], result.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="fp16 exports causal-lm runs only"):
        export(seq_cls_run, tmp_path / "out", dtype="fp16")
