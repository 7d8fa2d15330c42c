"""token-cls end to end on a tiny random BERT: tune with LoRA and a fresh token head, entity F1, the run
directory, loading it back, the CLI, labels on sub-words, truncation, and the errors a user sees.

The fixture's WordPiece vocabulary (conftest.ENCODER_WORDS) has "##s" and "##ed", so "Marys" is
mary ##s and "Londoned" london ##ed: words of two sub-tokens, of which only the first is labelled.
"""

import json
from pathlib import Path

import pytest
import torch

from lite_sft.config import load_config
from lite_sft.errors import DataError
from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.model import ModelError
from lite_sft.train import tune

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
X = IGNORE_INDEX
TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]  # build_tag_map's order for the fixture


def token_cls_cfg(model_dir, data_dir, out, **overrides):
    return load_config(None, {
        "task.name": "token-cls", "task.tag_column": 1, "model.name_or_path": str(model_dir),
        "data.path": str(data_dir / "train.txt"), "data.validation_path": str(data_dir / "valid.txt"),
        "data.max_seq_len": 32, "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "train.max_steps": 200,
        "train.micro_batch_size": 8, "train.lr": 3e-3, "train.warmup_ratio": 0.0, "train.eval_every": 100,
        "train.save_every": 0, "output_dir": str(out), **overrides})


@pytest.fixture(scope="module")
def token_cls_run(tmp_path_factory, tiny_bert_dir, ner_conll):
    out = tmp_path_factory.mktemp("runs") / "ner"
    summary = tune(token_cls_cfg(tiny_bert_dir, ner_conll, out))
    return out, summary


@pytest.fixture
def bert_tokenizer(tiny_bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def task_with(tags=TAGS):
    from lite_sft.tasks.labels import LabelMap
    from lite_sft.tasks.token_cls import TokenClassificationTask

    task = TokenClassificationTask()
    task.labels = LabelMap(tuple(tags))
    return task


def test_a_tagger_learns_and_reports_entity_scores(token_cls_run):
    out, summary = token_cls_run
    final = summary["final_evaluation"]
    assert summary["task"] == "token-cls" and summary["validation_examples"] == 32
    # Every fixture word is one sub-token, so the labelled tokens are the words: 200 steps of 8 sentences.
    assert summary["labelled_tokens"] == sum(json.loads(line).get("labelled_tokens", 0)
                                             for line in (out / "metrics.jsonl").read_text().splitlines())
    assert final["f1"] >= 0.9 and final["unread_words"] == 0, final
    assert set(final["per_type"]) == {"LOC", "ORG", "PER"} and final["true_entities"] == 75
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [100, 200] and all("val_f1" in e and "val_precision" in e for e in evals)


def test_the_run_directory_loads_back_with_its_head_and_tags(token_cls_run):
    from safetensors.torch import load_file

    from lite_sft.model import load_tuned
    from lite_sft.tasks.ner import word_predictions

    out, _ = token_cls_run
    assert json.loads((out / "labels.json").read_text()) == {"names": TAGS, "ids": False}
    assert any("classifier" in name for name in load_file(str(out / "adapter_model.safetensors")))
    model, tokenizer, cfg = load_tuned(out, torch.device("cpu"))
    assert model.config.id2label == dict(enumerate(TAGS)) and cfg.task.name == "token-cls"
    words = ["Mary", "works", "for", "Globex", "in", "Paris"]
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits[0].argmax(-1).tolist()
    tags = word_predictions(enc.word_ids(), [TAGS[i] for i in ids], len(words), fill="O")
    assert tags == ["B-PER", "O", "O", "B-ORG", "O", "B-LOC"]


def test_only_the_first_sub_token_of_each_word_is_labelled(bert_tokenizer):
    from lite_sft.tasks.ner import TaggedSentence

    task = task_with()
    sentence = TaggedSentence("t line 1", ["Marys", "met", "Peter", "in", "Londoned"], ["B-PER", "O", "B-PER", "O", "B-LOC"])
    cfg = load_config(None, {"data.max_seq_len": 32})
    (row,), truncated = task.tokenize([sentence], bert_tokenizer, cfg)
    assert bert_tokenizer.convert_ids_to_tokens(row.input_ids) == [
        "[CLS]", "mary", "##s", "met", "peter", "in", "london", "##ed", "[SEP]"]
    assert row.labels == [X, 5, X, 0, 5, 0, 1, X, X]
    assert row.tags == [5, 0, 5, 0, 1] and truncated == 0 and row.token_type_ids == [0] * 9
    batch = task.collate([row, row], bert_tokenizer)
    assert task.units(batch) == 10  # the words, not the sub-tokens


def test_the_loss_is_summed_over_labelled_sub_tokens(bert_tokenizer):
    import torch.nn.functional as F

    from lite_sft.tasks.ner import TaggedSentence

    task = task_with()
    rows, _ = task.tokenize([TaggedSentence("a", ["Marys", "met", "Peter"], ["B-PER", "O", "B-PER"]),
                             TaggedSentence("b", ["in", "Londoned"], ["O", "B-LOC"])],
                            bert_tokenizer, load_config(None, {}))
    batch = task.collate(rows, bert_tokenizer)
    assert batch["labels"].tolist() == [[X, 5, X, 0, 5, X], [X, 0, 1, X, X, X]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 1, 0]]
    torch.manual_seed(0)
    logits = torch.randn(2, 6, len(TAGS))

    class Fixed(torch.nn.Module):
        def forward(self, **inputs):
            return type("Output", (), {"logits": logits})

    mean = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())  # torch's mean over non-ignored
    loss_sum = task.loss_sum(Fixed(), batch, torch.device("cpu"))
    assert loss_sum.item() == pytest.approx(mean.item() * task.units(batch))


def test_words_cut_off_by_truncation_count_as_predicted_o(token_cls_run, ner_conll, bert_tokenizer):
    from accelerate import Accelerator

    from lite_sft.model import load_tuned
    from lite_sft.tasks.ner import read_ner
    from lite_sft.tasks.token_cls import tokenize_sentences

    out, summary = token_cls_run
    model, tokenizer, _ = load_tuned(out, torch.device("cpu"))
    task = task_with()
    sentences = read_ner(ner_conll / "valid.txt", tag_column=1)
    rows, truncated = tokenize_sentences(sentences, task.labels, tokenizer, max_len=4)  # [CLS] w0 w1 [SEP]
    assert truncated == 32 and all(len(r) == 4 and len(r.tags) > 2 for r in rows)
    figures = task.evaluate(model, rows, tokenizer, Accelerator(cpu=True), 8)
    assert figures["unread_words"] == sum(len(s.tokens) - 2 for s in sentences)
    assert figures["true_entities"] == summary["final_evaluation"]["true_entities"]  # the whole sentences
    assert figures["precision"] == 1.0 and figures["recall"] < 0.7  # what was read is right; the rest is missed


def test_byte_level_bpe_reads_each_word_with_its_leading_space(tmp_path):
    """RoBERTa-style byte-level BPE knows a word by the space before it; loaded without add_prefix_space
    (RoBERTa's default), the task turns it on, and the run directory's tokenizer keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lite_sft.tasks.ner import TaggedSentence

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Peter visited New York", "Mary met Peter"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    sentence = TaggedSentence("t line 1", ["Peter", "visited", "York"], ["B-PER", "O", "B-LOC"])
    task = task_with(["O", "B-LOC", "I-LOC", "B-PER", "I-PER"])
    (row,), _ = task.tokenize([sentence], tokenizer, load_config(None, {}))
    assert tokenizer.convert_ids_to_tokens(row.input_ids) == ["ĠPeter", "Ġvisited", "ĠYork"]
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(sentence.tokens, is_split_into_words=True)["input_ids"] == row.input_ids


def test_prepare_reads_jsonl_converts_iob1_and_holds_out_a_seeded_split(tmp_path, bert_tokenizer):
    lines = [{"words": ["Mary", "visited", "Paris"], "ner": ["I-PER", "O", "I-LOC"]},
             {"words": ["John", "met", "Mary"], "ner": ["I-PER", "O", "I-PER"]}] * 10
    path = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_config(None, {"task.name": "token-cls", "data.path": path, "task.tokens_key": "words",
                             "task.tags_key": "ner", "task.tag_scheme": "iob1", "data.validation_fraction": 0.2})
    task = task_with([])
    data = task.prepare(cfg, bert_tokenizer)
    assert data.labels.names == ("O", "B-LOC", "I-LOC", "B-PER", "I-PER") and data.format == "jsonl"
    assert (len(data.train), len(data.validation)) == (16, 4) and data.train[0].tags[0] == 3  # I-PER -> B-PER
    assert data.summary.startswith("16 train / 4 validation sentences, 48 labelled tokens, entities LOC 8, PER 24;")
    again = task_with([]).prepare(cfg, bert_tokenizer)
    assert [r.input_ids for r in again.validation] == [r.input_ids for r in data.validation]


def test_a_causal_lm_is_refused_before_anything_loads(tiny_model_dir, tmp_path):
    cfg = token_cls_cfg(tiny_model_dir, tmp_path / "absent", tmp_path / "run")  # the data does not even exist
    with pytest.raises(ModelError, match=r"causal language model \(llama\): it reads left to right, so each word's "
                                         r"tag would be predicted without the words after it; use an encoder"):
        tune(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("train, valid, message", [
    ("mary B-PER 0\nvisited O 0\nparis I-LOC 0\n", None, r"train\.txt line 3 \('paris'\): tag 'I-LOC' follows 'O'"),
    (None, "mary B-PER 0\nat O 0\nparis B-MISC 0\n", r"valid\.txt line 3 \('paris'\): unknown label 'B-MISC'"),
    (None, "mary 0 B-PER\n", r"valid\.txt line 1: tag '0' is not O, .* column 2 holds 'B-PER': set --tag-column 2 \(task\.tag_column=2\)"),
])
def test_bad_tags_name_the_file_and_line(tiny_bert_dir, ner_conll, tmp_path, train, valid, message):
    data = tmp_path / "data"
    data.mkdir()
    for name, text in (("train.txt", train), ("valid.txt", valid)):
        write(data / name, text if text is not None else (ner_conll / name).read_text())
    with pytest.raises(DataError, match=message):
        tune(token_cls_cfg(tiny_bert_dir, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_cli_tunes_then_evaluates_a_file(tiny_bert_dir, ner_conll, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from lite_sft.cli import app

    runner, out = CliRunner(), tmp_path / "run"
    args = ["tune", "--task", "token-cls", "--tag-column", "1", "--data", str(ner_conll / "train.txt"),
            "--validation-fraction", "0.1", "--max-steps", "20", "--micro-batch-size", "8", "--lr", "3e-3",
            "--lora-r", "8", "--save-every", "0"]
    result = runner.invoke(app, [*args, "--model", str(tiny_bert_dir), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "labelled tokens" in result.output and "f1" in result.output and f"lite-sft eval {out}" in result.output
    result = runner.invoke(app, ["eval", str(out), "--data", str(ner_conll / "valid.txt")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval-valid.txt.json").read_text())
    assert report["task"] == "token-cls" and report["examples"] == 32 and 0 <= report["f1"] <= 1
    assert set(report["per_type"]) <= {"LOC", "ORG", "PER"} and "unread_words" in report and "PER:" in result.output

    bad = write(tmp_path / "test.txt", "mary B-PER 0\nat O 0\nwimbledon B-EVENT 0\n")
    result = runner.invoke(app, ["eval", str(out), "--data", bad])
    assert result.exit_code == 2 and "test.txt line 3 ('wimbledon'): unknown label 'B-EVENT'" in result.output
    bad = write(tmp_path / "test.jsonl", json.dumps({"tokens": ["mary", "met"], "tags": ["B-PER"]}) + "\n")
    result = runner.invoke(app, ["eval", str(out), "--data", bad])
    assert result.exit_code == 2 and "test.jsonl line 1: 2 tokens but 1 tags" in result.output
    result = runner.invoke(app, [*args, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "llama")])
    assert result.exit_code == 2 and "use an encoder for token-cls (BERT, RoBERTa, DeBERTa)" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.skipif(not (SHARED_DATA / "conll2003").is_dir(),
                    reason="the shared CoNLL-2003 files (../shared/data/conll2003) are not beside the project")
def test_a_slice_of_conll2003_reads_and_tokenises(tmp_path, bert_tokenizer):
    from lite_sft.tasks.ner import build_tag_map, read_ner

    lines = (SHARED_DATA / "conll2003" / "train.txt").read_text(encoding="utf-8").splitlines()[:20000]
    path = write(tmp_path / "train.txt", "\n".join(lines) + "\n")
    sentences = read_ner(path, tag_column=1)
    task = task_with(build_tag_map(sentences, path).names)
    assert len(task.labels.names) == 9
    rows, truncated = task.tokenize(sentences, bert_tokenizer, load_config(None, {"data.max_seq_len": 16}))
    assert len(rows) == len(sentences) and 0 < truncated < len(rows)
    for row, sentence in zip(rows, sentences):
        labelled = [label for label in row.labels if label != X]
        read = len({w for w in row.word_ids if w is not None})
        assert len(row) <= 16 and labelled == row.tags[:read] and len(row.tags) == len(sentence.tokens)
