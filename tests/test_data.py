from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lite_sft
from lite_sft.config import BUILTIN_DATA, DataConfig
from lite_sft.errors import DataError
from lite_sft.inspect_data import render_report
from lite_sft.tasks.causal_lm import cache as data_cache
from lite_sft.tasks.causal_lm import data as data_module
from lite_sft.tasks.causal_lm.data import load_samples, prepare_data
from lite_sft.tasks.causal_lm.masking import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, Sample
from lite_sft.tasks.split import split_validation

CHAT = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
PC = {"prompt": "what is two plus two", "completion": " four"}


def jsonl(path: Path, *records) -> str:
    """Write records (dicts, or raw strings for broken lines) one per line; return the path as a str."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


# --- sources --------------------------------------------------------------------------------------

def test_jsonl_json_csv_parquet_give_the_same_samples(tmp_path):
    records = [PC, {"prompt": "hello", "completion": " hi"}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    jsonl(tmp_path / "d.jsonl", *records)
    for suffix, where in [("jsonl", "line 2"), ("json", "index 1"), ("csv", "row 2"), ("parquet", "row 2")]:
        path = str(tmp_path / f"d.{suffix}")
        fmt, samples = load_samples(path)
        assert fmt == "prompt_completion"
        assert [(s.prompt, s.completion) for s in samples] == [(r["prompt"], r["completion"]) for r in records]
        assert samples[1].source == f"{path} {where}"


def test_saved_dataset_folder_and_dataset_dict_split(tmp_path):
    ds = datasets.Dataset.from_list([CHAT, CHAT])
    ds.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert load_samples(str(tmp_path / "flat"))[0] == "messages"
    fmt, samples = load_samples(str(tmp_path / "dict"), split="test")
    assert (fmt, len(samples), samples[0].source) == ("messages", 1, f"{tmp_path / 'dict'} split test row 1")
    with pytest.raises(DataError, match="no split 'dev'; it has train, test"):
        load_samples(str(tmp_path / "dict"), split="dev")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir: a folder, but not one written by datasets' save_to_disk"):
        load_samples(str(tmp_path / "empty_dir"))


def test_hub_id_loads_through_load_dataset_and_failure_is_a_data_error(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([PC])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    fmt, samples = load_samples("org/name", split="validation")
    assert calls == [("org/name", "validation")] and fmt == "prompt_completion"
    assert samples[0].source == "org/name split validation row 1"

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"org/name: not a local file or folder.*split 'train'.*no network"):
        load_samples("org/name")


def test_builtin_resolves_to_packaged_files(tmp_path, monkeypatch, tokenizer):
    # The packaged files are owned elsewhere; point importlib.resources at stand-ins.
    jsonl(tmp_path / "skill_train.jsonl", CHAT, CHAT, CHAT)
    jsonl(tmp_path / "skill_eval.jsonl", CHAT)
    monkeypatch.setattr(data_module.resources, "files", lambda package: tmp_path)
    assert len(load_samples(BUILTIN_DATA)[1]) == 3
    assert len(load_samples(BUILTIN_DATA, role="validation")[1]) == 1
    prepared = prepare_data(DataConfig(path=BUILTIN_DATA), tokenizer, seed=0)  # eval file, not a fraction
    assert (prepared.train_stats.examples, prepared.validation_stats.examples) == (3, 1)
    assert prepared.validation_examples[0].source == f"{tmp_path / 'skill_eval.jsonl'} line 1"


def test_builtin_data_when_packaged():
    if not (Path(lite_sft.__file__).parent / "assets" / "skill_train.jsonl").is_file():
        pytest.skip("lite_sft/assets/skill_train.jsonl not there yet")
    fmt, samples = load_samples(BUILTIN_DATA)
    assert fmt == "messages" and samples


# --- formats --------------------------------------------------------------------------------------

def test_alpaca_becomes_a_conversation(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"instruction": "add", "input": "2 2", "output": "4", "system": "be brief"},
                 {"instruction": "say hi", "output": "hi", "input": ""})
    fmt, samples = load_samples(path)
    assert fmt == "alpaca"
    assert samples[0].messages == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "add\n\n2 2"},
                                   {"role": "assistant", "content": "4"}]
    assert samples[1].messages == [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]


def test_sharegpt_and_messages_keep_extra_keys_out(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", {"id": 7, "conversations": [
        {"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}, {"from": "human", "value": "c"},
        {"from": "gpt", "value": "d"}]})
    fmt, samples = load_samples(path)
    assert fmt == "sharegpt"
    assert [m["role"] for m in samples[0].messages] == ["user", "assistant", "user", "assistant"]


def test_named_format_is_used_without_detection(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", {"text": "hello", "prompt": "ignored"})
    assert load_samples(path, fmt="text")[0] == "text"


# --- bad input: each names the file, the record and the field ------------------------------------

@pytest.mark.parametrize("lines, fmt, message", [
    ([PC, '{"prompt": "a", "completion": '], "auto", r"bad.jsonl line 2: not valid JSON \(Expecting value"),
    ([PC, {"question": "a", "answer": "b"}], "auto",
     r"bad.jsonl line 2: cannot tell the format from the fields \['answer', 'question'\]"),
    ([PC, PC, CHAT], "auto",
     r"bad.jsonl line 3: this record is messages but .*bad.jsonl line 1 is prompt_completion; .*"
     r"mixes formats: prompt_completion \(2 records\), messages \(1 record\)"),
    ([PC, {"prompt": "a"}], "prompt_completion", r"bad.jsonl line 2: missing field 'completion'"),
    ([{"prompt": "a", "completion": 3}], "auto", r"bad.jsonl line 1: field 'completion' must be a string, got int"),
    ([{"messages": [{"role": "user", "content": ["a"]}]}], "auto",
     r"bad.jsonl line 1: field 'messages\[0\].content' must be a string, got list"),
    ([CHAT, {"messages": [{"role": "bot", "content": "a"}]}], "auto",
     r"bad.jsonl line 2: field 'messages\[0\].role': unknown role 'bot'; use one of system, user, assistant"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]}], "auto",
     r"bad.jsonl line 1: field 'conversations\[1\].from': unknown role 'tool'"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "auto",
     r"bad.jsonl line 1: field 'messages' has no assistant turn"),
    ([{"messages": []}], "auto", r"bad.jsonl line 1: field 'messages' must be a non-empty list"),
    ([PC, {"prompt": "a", "completion": ""}], "auto", r"bad.jsonl line 2: field 'completion' is empty"),
    ([{"instruction": "a", "output": " "}], "auto", r"bad.jsonl line 1: field 'output' is empty"),
    (["[1, 2]"], "auto", r"bad.jsonl line 1: expected an object with named fields, got list"),
    ([], "auto", r"bad.jsonl: no records"),
])
def test_bad_jsonl_is_a_data_error_naming_line_and_field(tmp_path, lines, fmt, message):
    path = jsonl(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(DataError, match=message):
        load_samples(path, fmt=fmt)


def test_bad_rows_in_json_csv_parquet_are_located(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([PC, {"prompt": "a", "completion": None}]))
    with pytest.raises(DataError, match=r"bad.json index 1: missing field 'completion'"):
        load_samples(str(tmp_path / "bad.json"))
    (tmp_path / "bad.csv").write_text("prompt,completion\na,b\nc,\n")
    with pytest.raises(DataError, match=r"bad.csv row 2: field 'completion' is empty"):
        load_samples(str(tmp_path / "bad.csv"))
    pq.write_table(pa.Table.from_pylist([PC, {"prompt": "a", "completion": None}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 2: missing field 'completion'"):
        load_samples(str(tmp_path / "bad.parquet"))
    (tmp_path / "lines.json").write_text(json.dumps(PC) + "\n" + json.dumps(PC) + "\n")
    with pytest.raises(DataError, match=r"lines.json: not valid JSON .*rename it to .jsonl"):
        load_samples(str(tmp_path / "lines.json"))


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_samples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type '.txt'; use one of .jsonl, .json"):
        load_samples(str(tmp_path / "data.txt"))


# --- prepare_data ---------------------------------------------------------------------------------

def no_tokenising(*args, **kwargs):
    raise AssertionError("tokenised again although the inputs did not change")


def many(n: int) -> list[dict]:
    return [{"prompt": "what is two plus two", "completion": " four" * (i % 3 + 1)} for i in range(n)]


def test_validation_split_from_fraction_is_seeded(tmp_path, tokenizer):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", *many(20)), validation_fraction=0.25, max_seq_len=32)
    a, b = prepare_data(cfg, tokenizer, seed=1), prepare_data(cfg, tokenizer, seed=1)
    assert (a.train_stats.examples, a.validation_stats.examples) == (15, 5)
    assert [e.source for e in a.validation_examples] == [e.source for e in b.validation_examples]
    other = prepare_data(cfg, tokenizer, seed=2)
    assert [e.source for e in other.validation_examples] != [e.source for e in a.validation_examples]
    assert a.format == "prompt_completion" and a.added_tokens is False
    assert sum(row.num_examples for row in a.train) == 15 and all(row.packed for row in a.train)
    assert all(len(row) <= 32 for row in a.train + a.validation)


def test_validation_from_file_and_no_packing(tmp_path, tokenizer):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", *many(4)), validation_path=jsonl(tmp_path / "v.jsonl", CHAT),
                     packing=False, max_seq_len=32)
    prepared = prepare_data(cfg, tokenizer, seed=0)
    assert (len(prepared.train), len(prepared.validation)) == (4, 1)
    assert not prepared.train[0].packed and prepared.train[0].num_examples == 1
    assert prepared.validation_examples[0].source.endswith("v.jsonl line 1")


def test_no_validation_when_fraction_is_zero(tmp_path, tokenizer):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", PC), validation_fraction=0.0)
    prepared = prepare_data(cfg, tokenizer, seed=0)
    assert prepared.validation == [] and prepared.validation_stats.examples == 0


def test_fraction_needs_two_examples(tmp_path, tokenizer):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", PC), validation_fraction=0.1)
    with pytest.raises(DataError, match="validation_fraction=0.1 needs at least 2 examples"):
        prepare_data(cfg, tokenizer, seed=0)


def test_split_validation_keeps_every_sample_once():
    samples = [Sample(str(i), text="x") for i in range(10)]
    train, validation = split_validation(samples, 0.3, seed=0)
    assert len(validation) == 3 and sorted(s.source for s in train + validation) == sorted(s.source for s in samples)


def test_empty_after_dropping_is_an_error(tmp_path, tokenizer):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", {"text": "hello there how are you fine thanks be brief"}),
                     validation_fraction=0.0, max_seq_len=8, overlong="drop")
    with pytest.raises(DataError, match=r"training set is empty after dropping: 1 of 1 examples were longer than "
                                        r"data.max_seq_len=8"):
        prepare_data(cfg, tokenizer, seed=0)


def test_chat_data_gets_the_default_template_and_reports_added_tokens(tmp_path, tokenizer_factory):
    tok = tokenizer_factory(chat_template=None, chatml=False)
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", CHAT), validation_fraction=0.0, system_prompt="be brief")
    prepared = prepare_data(cfg, tok, seed=0)
    assert prepared.added_tokens and prepared.format == "messages"
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert prepared.train_examples[0].input_ids[:2] == [im_start, tok.convert_tokens_to_ids("system")]


@pytest.mark.parametrize("record", [PC, {"text": "hello there"}])
def test_plain_data_gets_no_template_and_no_tokens(tmp_path, tokenizer_factory, record):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", record), validation_fraction=0.0)
    for _ in ("fresh", "from the cache"):
        tok = tokenizer_factory(chat_template=None, chatml=False)
        size = len(tok)
        prepared = prepare_data(cfg, tok, seed=0)
        assert (prepared.added_tokens, tok.chat_template, len(tok)) == (False, None, size)


def test_a_cache_hit_templates_a_fresh_tokenizer_as_preparing_did(tmp_path, tokenizer_factory, monkeypatch):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", CHAT), validation_fraction=0.0)
    first = tokenizer_factory(chat_template=None, chatml=False)
    assert prepare_data(cfg, first, seed=0).added_tokens
    with monkeypatch.context() as patch:
        patch.setattr(data_module, "build_examples", no_tokenising)
        fresh = tokenizer_factory(chat_template=None, chatml=False)
        assert prepare_data(cfg, fresh, seed=0).added_tokens
    assert fresh.get_vocab() == first.get_vocab()
    assert fresh.chat_template == first.chat_template == DEFAULT_CHAT_TEMPLATE

    # Text to train on, a conversation to validate on: the template is needed though the format is text.
    cfg = DataConfig(path=jsonl(tmp_path / "t.jsonl", {"text": "hello there"}),
                     validation_path=jsonl(tmp_path / "v.jsonl", CHAT))
    prepared = prepare_data(cfg, tokenizer_factory(chat_template=None), seed=0)  # has the ChatML tokens: none added
    assert (prepared.format, prepared.added_tokens) == ("text", False)
    with monkeypatch.context() as patch:
        patch.setattr(data_module, "build_examples", no_tokenising)
        fresh = tokenizer_factory(chat_template=None)
        assert prepare_data(cfg, fresh, seed=0).added_tokens is False
    assert fresh.chat_template == DEFAULT_CHAT_TEMPLATE


def test_inspect_data_adds_no_template_tokens_for_plain_data(tmp_path, gpt2_tokenizer, monkeypatch):
    from typer.testing import CliRunner

    from lite_sft import model
    from lite_sft.cli import app

    gpt2_tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")  # a model folder; inspect-data reads only the tokenizer
    loaded = []
    load_tokenizer = model.load_tokenizer
    monkeypatch.setattr(model, "load_tokenizer", lambda *args: loaded.append(load_tokenizer(*args)) or loaded[-1])
    result = CliRunner().invoke(app, ["inspect-data", "--data", jsonl(tmp_path / "d.jsonl", PC), "--model",
                                      str(tmp_path / "m"), "--validation-fraction", "0", "--no-color"])
    assert result.exit_code == 0, result.output
    assert (len(loaded[0]), loaded[0].chat_template) == (len(gpt2_tokenizer), None)


# --- inspect-data report --------------------------------------------------------------------------

def test_report_marks_trained_text_and_shows_counts(tmp_path, tokenizer):
    cfg = DataConfig(path=jsonl(tmp_path / "d.jsonl", CHAT, CHAT), validation_fraction=0.0)
    prepared = prepare_data(cfg, tokenizer, seed=0)
    plain = render_report(prepared, tokenizer, n=1, color=False)
    assert "format: messages" in plain and "«text in guillemets»: trained" in plain
    assert "<|im_start|> user hello <|im_end|> <|im_start|> assistant«hi <|im_end|> </s>»" in plain
    assert "--- example 2" not in plain
    assert ("training: 2 examples, 18 tokens, 6 trained tokens (33%); truncated 0, dropped 0 (overlong), "
            "0 (nothing left to train); 0 with a token straddling the prompt/answer boundary (trained); "
            "length p50 9, p90 9, p99 9, max 9") in plain
    assert "note:" not in plain
    colored = render_report(prepared.train_examples, tokenizer, n=5, color=True)
    assert "\x1b[32mhi <|im_end|> </s>\x1b[0m" in colored and "--- example 2" in colored
    assert str(IGNORE_INDEX) in colored


def test_report_shows_the_answers_first_token_trained_and_counts_the_straddling_example(tmp_path, gpt2_tokenizer):
    # GPT-2's regex joins "Answer: " and "1" into 'Ġ1': it is trained, and the example counted.
    path = jsonl(tmp_path / "d.jsonl", {"prompt": "Answer: ", "completion": "1"},
                 {"prompt": "Answer:", "completion": " 1"})
    plain = render_report(prepare_data(DataConfig(path=path, validation_fraction=0.0), gpt2_tokenizer, seed=0),
                          gpt2_tokenizer, n=2)
    assert plain.count("Answer:« 1<|endoftext|>»") == 2
    assert "1 with a token straddling the prompt/answer boundary (trained)" in plain
    assert "note: 1 of 2 examples have a token that straddles the prompt/answer boundary" in plain


def test_prepared_data_is_cached_and_the_cache_follows_its_inputs(tmp_path, tokenizer, tokenizer_factory, data_cache_dir,
                                                                   monkeypatch):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"},
                                             {"role": "assistant", "content": "hi how are you"}]}) + "\n")
    cfg = DataConfig(path=str(path), validation_fraction=0.0)
    first = prepare_data(cfg, tokenizer, seed=0)
    assert len(list(data_cache_dir.glob("*.pkl"))) == 1

    monkeypatch.setattr(data_module, "build_examples", no_tokenising)
    again = prepare_data(cfg, tokenizer, seed=0)
    assert (again.train, again.validation, again.train_examples, again.train_stats, again.format) == (
        first.train, first.validation, first.train_examples, first.train_stats, first.format)

    # Any input that changes the rows misses the cache: the file's bytes, a data setting, the tokenizer, the code.
    for changed_cfg, changed_tokenizer in (
        (DataConfig(path=str(path), validation_fraction=0.0, train_on_prompt=True), tokenizer),
        (cfg, tokenizer_factory(eos="<|im_end|>", pad="<|im_end|>")),
    ):
        with pytest.raises(AssertionError, match="tokenised again"):
            prepare_data(changed_cfg, changed_tokenizer, seed=0)
    with monkeypatch.context() as patch:
        patch.setattr(data_cache, "code_digest", lambda: b"the labels are built another way")
        with pytest.raises(AssertionError, match="tokenised again"):
            prepare_data(cfg, tokenizer, seed=0)
    path.write_text(path.read_text().replace("hi how", "hi there how"))
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_data(cfg, tokenizer, seed=0)


def test_the_code_digest_follows_the_source_of_the_modules_that_build_rows(tmp_path):
    for name in data_cache.CODE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((data_cache.TASKS_FOLDER / name).read_bytes())
    assert data_cache.source_digest(tmp_path) == data_cache.source_digest(data_cache.TASKS_FOLDER)
    for name in data_cache.CODE_FILES:
        before = data_cache.source_digest(tmp_path)
        (tmp_path / name).write_text((tmp_path / name).read_text() + "# a change\n")
        assert data_cache.source_digest(tmp_path) != before


def test_a_damaged_or_foreign_cache_entry_is_rebuilt_and_says_so(tmp_path, tokenizer, data_cache_dir, caplog):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "hello there", "completion": "hi"}) + "\n")
    cfg = DataConfig(path=str(path), validation_fraction=0.0)
    fresh = prepare_data(cfg, tokenizer, seed=0)
    (entry,) = data_cache_dir.glob("*.pkl")
    for content, why in ((b"not a pickle", "it cannot be read (UnpicklingError"),
                         (pickle.dumps({"code": b"older", "data": fresh}), "other lite-sft code wrote it")):
        entry.write_bytes(content)
        caplog.clear()
        assert prepare_data(cfg, tokenizer, seed=0).train == fresh.train
        assert f"data cache: rebuilding {entry}: {why}" in caplog.text
        caplog.clear()
        prepare_data(cfg, tokenizer, seed=0)  # rebuilt, so read back without a word
        assert caplog.text == ""
    entry.unlink()
    prepare_data(DataConfig(path=str(path), validation_fraction=0.0, cache=False), tokenizer, seed=0)
    assert not list(data_cache_dir.glob("*.pkl"))
