"""`lite-sft inspect-data --task ...`: each classic task's examples shown as they are trained, with exact output.

The fixtures' vocabularies are small and word-level enough that every line below can be written by hand:
the WordPiece of tiny_bert_dir splits "Marys" into mary ##s and "Londoned" into london ##ed; the T5-style
tokenizer of tiny_t5_dir has one token a word and appends </s> to every text.
"""

import json

import pytest
from typer.testing import CliRunner

from lite_sft.cli import app

runner = CliRunner()
GREEN, GREY, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def inspect(*args):
    result = runner.invoke(app, ["inspect-data", "--validation-fraction", "0", "--no-color", *args])
    return result.exit_code, result.output


@pytest.fixture
def conll(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("Marys B-PER\nmet O\nPeter B-PER\nin O\nLondoned B-LOC\n\nJohn B-PER\nworks O\nfor O\n"
                    "Acme B-ORG\n")
    return path


def test_seq_cls_shows_each_text_with_its_label_name(tiny_bert_dir, tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("review,stars\nthe film was good,pos\nan awful plot,neg\n")
    code, output = inspect("--task", "seq-cls", "--model", str(tiny_bert_dir), "--data", str(path),
                           "--text-column", "review", "--label-column", "stars")
    assert code == 0, output
    assert output.splitlines()[:9] == [
        "task: seq-cls (classification)",
        "legend: each example as the model reads it (special tokens included), then its label",
        "",
        "--- example 1: 6 tokens, label pos (id 1)",
        "[CLS] the film was good [SEP]",
        "",
        "--- example 2: 5 tokens, label neg (id 0)",
        "[CLS] [UNK] awful plot [SEP]",
        ""]
    assert output.splitlines()[9].startswith("data: 2 train / 0 validation examples, 2 labels (neg 1, pos 1)")


def test_token_cls_shows_each_sub_token_over_its_tag(tiny_bert_dir, conll):
    code, output = inspect("--task", "token-cls", "--model", str(tiny_bert_dir), "--data", str(conll), "-n", "1")
    assert code == 0, output
    assert output.splitlines()[2:6] == [
        "",
        "--- example 1: 5 words, 9 sub-tokens, 5 labelled",
        "[CLS]  mary   ##s   met  peter  in  london  ##ed  [SEP]",
        "-100   B-PER  -100  O    B-PER  O   B-LOC   -100  -100"]
    assert "-100: ignored (a word's later sub-tokens, special tokens)" in output
    assert "data: 2 train / 0 validation sentences, 9 labelled tokens, entities LOC 1, ORG 1, PER 3;" in output


def test_token_cls_says_which_words_truncation_cut_off_and_colours_the_tags(tiny_bert_dir, conll):
    result = runner.invoke(app, ["inspect-data", "--task", "token-cls", "--model", str(tiny_bert_dir), "--data",
                                 str(conll), "--validation-fraction", "0", "--max-seq-len", "8", "--color"],
                           color=True)  # else click strips the colours, as it does on any output but a terminal
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[4] == "[CLS]  mary   ##s   met  peter  in  london  [SEP]"
    assert lines[5] == (f"{GREY}-100 {RESET}  {GREEN}B-PER{RESET}  {GREY}-100{RESET}  {GREEN}O  {RESET}  "
                        f"{GREEN}B-PER{RESET}  {GREEN}O {RESET}  {GREEN}B-LOC {RESET}  {GREY}-100 {RESET}")
    assert lines[3] == "--- example 1: 5 words, 8 sub-tokens, 5 labelled"  # the last word's first piece is in
    assert "1 sentences truncated to 8 tokens" in result.output


def test_long_sentences_wrap_and_cut_off_words_are_named(tiny_bert_dir, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("".join(f"{w} {t}\n" for w, t in [("peter", "B-PER"), ("visited", "O"), ("paris", "B-LOC")] * 12))
    code, output = inspect("--task", "token-cls", "--model", str(tiny_bert_dir), "--data", str(path),
                           "--max-seq-len", "24")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[3] == "--- example 1: 36 words, 24 sub-tokens, 22 labelled, 14 words cut off by truncation (evaluated as O)"
    table = lines[4:lines.index("", lines.index("", 4) + 1)]  # two blocks of tokens over tags, a blank between
    assert [len(line) <= 100 for line in table] == [True] * 5 and table[2] == ""
    assert table[0].split() + table[3].split() == ["[CLS]", *"peter visited paris".split() * 7, "peter", "[SEP]"]
    assert table[1].split() + table[4].split() == ["-100", *"B-PER O B-LOC".split() * 7, "B-PER", "-100"]


def test_seq2seq_shows_the_source_and_the_target_tokens_trained(tiny_t5_dir, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"source": "translate : one two", "target": "un deux"}) + "\n")
    code, output = inspect("--task", "seq2seq", "--model", str(tiny_t5_dir), "--data", str(path))
    assert code == 0, output
    assert output.splitlines()[3:6] == [
        "--- example 1: source 5 tokens, target 3 tokens trained",
        "source: translate : one two </s>",
        "target: «un deux </s>»"]


def test_a_causal_lm_is_refused_for_token_cls(tiny_model_dir, conll):
    code, output = inspect("--task", "token-cls", "--model", str(tiny_model_dir), "--data", str(conll))
    assert code == 2 and "causal language model" in output and "use an encoder" in output


def test_bad_tags_name_their_line(tiny_bert_dir, tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("peter B-PER\nvisited O\nparis I-LOC\n")
    code, output = inspect("--task", "token-cls", "--model", str(tiny_bert_dir), "--data", str(path))
    assert code == 2 and f"{path} line 3 ('paris'): tag 'I-LOC' follows 'O'" in output and "--tag-scheme" not in output
