"""seq-cls end to end on a tiny random BERT: tune with LoRA and a fresh head, metrics, the run directory,
loading it back, and the errors a user sees."""

import json

import pytest
import torch

from lite_sft.config import ConfigError, load_config
from lite_sft.train import tune


def seq_cls_cfg(model_dir, data_dir, out, **overrides):
    return load_config(None, {
        "task.name": "seq-cls", "model.name_or_path": str(model_dir), "data.path": str(data_dir / "train.csv"),
        "data.validation_path": str(data_dir / "dev.csv"), "task.validation_text_column": "content",
        "data.max_seq_len": 32, "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "train.max_steps": 200,
        "train.micro_batch_size": 8, "train.lr": 3e-3, "train.warmup_ratio": 0.0, "train.eval_every": 100,
        "train.save_every": 0, "output_dir": str(out), **overrides})


@pytest.fixture(scope="module")
def seq_cls_run(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    out = tmp_path_factory.mktemp("runs") / "sentiment"
    summary = tune(seq_cls_cfg(tiny_bert_dir, sentiment_csv, out))
    return out, summary


def test_a_classifier_learns_and_reports_its_metrics(seq_cls_run):
    out, summary = seq_cls_run
    final = summary["final_evaluation"]
    assert summary["task"] == "seq-cls" and summary["examples"] > 0
    assert final["accuracy"] >= 0.9, final
    assert set(final["per_class"]) == {"neg", "pos"} and final["labels"] == ["neg", "pos"]
    assert sum(map(sum, final["confusion_matrix"])) == 24
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [100, 200] and all("val_accuracy" in e and "val_macro_f1" in e for e in evals)


def test_the_run_directory_loads_back_with_its_head_and_labels(seq_cls_run, tiny_bert_dir):
    from lite_sft.model import load_tuned

    out, _ = seq_cls_run
    assert json.loads((out / "labels.json").read_text()) == {"names": ["neg", "pos"], "ids": False}
    adapter = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "adapter_model.safetensors"))
    assert any("classifier" in name for name in adapter)  # the head trains whole and is saved with the adapter
    model, tokenizer, cfg = load_tuned(out, torch.device("cpu"))
    assert model.config.id2label == {0: "neg", 1: "pos"}
    enc = tokenizer(["a very good film", "an awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1).tolist()
    assert predicted == [1, 0]


def test_class_weights_weigh_the_mean_loss():
    import torch.nn.functional as F

    from lite_sft.tasks.classification import SequenceClassificationTask, class_weights

    assert class_weights("balanced", [0, 0, 0, 1], 2) == [4 / 6, 4 / 2]
    assert class_weights("1,3", [0, 1], 2) == [1.0, 3.0]
    with pytest.raises(ConfigError, match="2 labels"):
        class_weights("1,2,3", [0, 1], 2)
    task = SequenceClassificationTask()
    task.weights = [1.0, 3.0]
    logits, labels = torch.tensor([[2.0, 0.0], [0.5, 0.1], [0.0, 1.0]]), torch.tensor([0, 1, 1])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert task.units({"labels": labels}) == 7.0  # 1 + 3 + 3: the step divides by the summed weights
    assert task._loss(logits, labels).item() == pytest.approx((ce[0] + 3 * ce[1] + 3 * ce[2]).item())
    # torch's own weighted mean is the same ratio
    assert (task._loss(logits, labels) / 7).item() == pytest.approx(
        F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 3.0])).item())


@pytest.mark.parametrize("overrides, message", [
    ({"task.label_column": "stars"}, "no column 'stars'"),
    ({"task.validation_text_column": None}, "no column 'text'"),
    ({"model.name_or_path": "builtin:tiny-llama"}, "needs --model"),
    ({"task.class_weights": "heavy"}, "task.class_weights"),
])
def test_bad_input_is_refused_before_the_run_directory_is_made(tiny_bert_dir, sentiment_csv, tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises((ConfigError, ValueError), match=message):
        tune(seq_cls_cfg(tiny_bert_dir, sentiment_csv, out, **overrides))
    assert not out.exists()


def test_an_unknown_label_in_the_validation_file_names_its_line(tiny_bert_dir, sentiment_csv, tmp_path):
    bad = tmp_path / "dev.csv"
    bad.write_text("content,label\ngood film,pos\nodd film,meh\n")
    with pytest.raises(ValueError, match=r"dev.csv line 3: unknown label 'meh'"):
        tune(seq_cls_cfg(tiny_bert_dir, sentiment_csv, tmp_path / "run", **{"data.validation_path": str(bad)}))


def test_the_cli_tunes_then_evaluates_a_file(tiny_bert_dir, sentiment_csv, tmp_path):
    from typer.testing import CliRunner

    from lite_sft.cli import app

    runner, out = CliRunner(), tmp_path / "run"
    result = runner.invoke(app, ["tune", "--task", "seq-cls", "--model", str(tiny_bert_dir), "--data",
                                 str(sentiment_csv / "train.csv"), "--validation-fraction", "0.1", "--max-steps", "20",
                                 "--micro-batch-size", "8", "--lr", "3e-3", "--lora-r", "8", "--save-every", "0",
                                 "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and f"lite-sft eval {out}" in result.output
    result = runner.invoke(app, ["eval", str(out), "--data", str(sentiment_csv / "dev.csv"), "--text-column", "content"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval-dev.csv.json").read_text())
    assert report["task"] == "seq-cls" and report["examples"] == 24 and 0 <= report["accuracy"] <= 1
    assert len(report["confusion_matrix"]) == 2 and "macro f1" in result.output
    result = runner.invoke(app, ["eval", str(out), "--data", str(sentiment_csv / "dev.csv")])  # text column is `content`
    assert result.exit_code == 2 and "no column 'text'" in result.output and "text_column" in result.output


def test_generate_refuses_a_classifier_run_and_says_what_to_use(seq_cls_run):
    from typer.testing import CliRunner

    from lite_sft.cli import app

    out, _ = seq_cls_run
    result = CliRunner().invoke(app, ["generate", str(out), "--prompt", "a good film"])
    assert result.exit_code == 2 and "seq-cls run" in result.output and "lite-sft eval" in result.output
