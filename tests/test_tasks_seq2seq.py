"""seq2seq end to end on tiny random T5 and BART: a counting task learnt through the one training loop, the loss
over target tokens only, the generation settings saved with the run, loading it back, the CLI, and refusals.

The task: a number word N (4-9) -> the words from one up to N; "reverse : N" -> from N down to one. The decoder
learns each next word from the one before it, and copies N from the source (as the first word when counting
down, as where to stop when counting up): a sequence task a 32-wide model learns in seconds, with every target
at least four words long so that BLEU's 4-grams exist.
"""

import json
import random
import shutil

import pytest
import torch
from typer.testing import CliRunner

from lite_sft.cli import app
from lite_sft.config import load_config
from lite_sft.model import ModelError
from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.tasks.seq2seq import Seq2SeqRecord, Seq2SeqTask, tokenize_pairs
from lite_sft.train import evaluate, fit, save, setup

DIGITS = "zero one two three four five six seven eight nine".split()
runner = CliRunner()


def counting_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        top = rng.randint(4, 9)
        up = DIGITS[1:top + 1]
        if rng.random() < 0.5:
            pairs.append({"source": DIGITS[top], "target": " ".join(up)})
        else:
            pairs.append({"source": f"reverse : {DIGITS[top]}", "target": " ".join(reversed(up))})
    return pairs


def write_jsonl(path, pairs: list[dict]):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("counting")
    write_jsonl(folder / "train.jsonl", counting_pairs(400, 0))
    write_jsonl(folder / "dev.jsonl", counting_pairs(32, 1))
    return folder


def seq2seq_cfg(model_dir, data_dir, out, **overrides):
    return load_config(None, {
        "task.name": "seq2seq", "model.name_or_path": str(model_dir), "data.path": str(data_dir / "train.jsonl"),
        "data.validation_path": str(data_dir / "dev.jsonl"), "data.max_seq_len": 16, "task.max_target_len": 12,
        "task.max_new_tokens": 12, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "train.max_steps": 200,
        "train.micro_batch_size": 8, "train.lr": 5e-3, "train.warmup_ratio": 0.0, "train.eval_every": 0,
        "train.save_every": 0, "output_dir": str(out),
        # fp32 unless a test asks for bf16: under bf16 autocast the 32-wide T5 reaches BLEU 55, not 80, in 200 steps
        "model.cpu_bf16": "off", **overrides})


def tune_measured(cfg) -> tuple[dict, dict]:
    """What tune() does, with the validation figures of the untrained model (LoRA's B is zero) first."""
    run = setup(cfg)
    before = evaluate(run)
    try:
        stopped = fit(run)
    finally:
        run.log.close()
    return before, save(run, stopped)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, tiny_t5_dir, counting):
    out = tmp_path_factory.mktemp("runs") / "t5"
    before, summary = tune_measured(seq2seq_cfg(tiny_t5_dir, counting, out))
    return out, before, summary


def test_t5_learns_to_count(t5_run):
    _, before, summary = t5_run
    after = summary["final_evaluation"]
    assert summary["task"] == "seq2seq" and summary["validation_examples"] == 32
    assert before["bleu"] < 5 and before["exact_match"] == 0, before
    assert after["bleu"] > 80 and after["exact_match"] > 0.5 and after["rougeL"] > 0.9, after
    assert after["val_loss"] < before["val_loss"] / 3
    sample = after["samples"][0]
    assert set(sample) == {"source", "prediction", "reference"} and "nrefs:1" in after["bleu_signature"]
    # Every row counts its source and target tokens, and the loss is averaged over the target tokens.
    assert summary["target_tokens"] > 0 and summary["tokens"] > summary["target_tokens"]


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory, tiny_bart_dir, counting):
    out = tmp_path_factory.mktemp("runs") / "bart"
    cfg = seq2seq_cfg(tiny_bart_dir, counting, out, **{"lora.r": 32, "lora.alpha": 128, "train.lr": 3e-3})
    before, summary = tune_measured(cfg)
    return out, before, summary


def test_bart_learns_the_next_word(bart_run):
    """The BART fixture (d_model 32, embeddings of std 0.02, a frozen output layer behind frozen LayerNorms)
    cannot make any token much likelier than another: its loss stays near log(vocabulary). Greedy decoding
    needs only the right argmax, which LoRA does learn."""
    out, before, summary = bart_run
    after = summary["final_evaluation"]
    assert before["bleu"] < 5, before
    assert after["bleu"] > 20 and after["rouge1"] > 0.5, after
    assert after["val_loss"] < before["val_loss"]
    # BART starts decoding at </s> and forces </s> last: its own settings, kept beside the run's.
    saved = json.loads((out / "generation_config.json").read_text())
    assert {k: saved[k] for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "forced_eos_token_id",
                                  "max_new_tokens", "num_beams")} == {
        "decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "forced_eos_token_id": 2,
        "max_new_tokens": 12, "num_beams": 1}
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}  # not lm_head, tied to the embedding


def test_loss_is_summed_over_target_tokens_only(tiny_t5_dir, tiny_bart_dir):
    """loss_sum equals a hand computation over the labels that are not IGNORE_INDEX, each row's padding changes
    nothing (a batch's loss is the sum of its rows' alone), and the units are the target tokens."""
    import torch.nn.functional as F
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    task = Seq2SeqTask()
    for folder, start in ((tiny_t5_dir, 0), (tiny_bart_dir, 2)):  # T5 starts decoding at pad, BART at </s>
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
        assert model.config.decoder_start_token_id == start
        rows, _, _ = tokenize_pairs([Seq2SeqRecord("a", "reverse : one two three", "three two one"),
                                     Seq2SeqRecord("b", "copy : four", "four")], tokenizer, 16, 12)
        batch = task.collate(rows, tokenizer)
        labels = batch["labels"]
        assert (labels[1, len(rows[1].labels):] == IGNORE_INDEX).all() and task.units(batch) == sum(
            len(r.labels) for r in rows)
        with torch.no_grad():
            loss = task.loss_sum(model, batch, torch.device("cpu"))
            # By hand: the decoder reads the labels shifted right behind its start token, pad where ignored.
            decoder_in = torch.cat([torch.full((2, 1), start), labels[:, :-1]], dim=1)
            decoder_in[decoder_in == IGNORE_INDEX] = tokenizer.pad_token_id
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=decoder_in).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)
            by_hand = -sum(log_probs[b, t, labels[b, t]] for b in range(2) for t in range(labels.shape[1])
                           if labels[b, t] != IGNORE_INDEX)
            alone = sum(task.loss_sum(model, task.collate([r], tokenizer), torch.device("cpu")) for r in rows)
        assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
        assert loss.item() == pytest.approx(alone.item(), rel=1e-4)


def test_rows_end_with_eos_and_truncation_is_counted(tiny_t5_dir, tiny_bart_dir):
    from transformers import AutoTokenizer

    t5 = AutoTokenizer.from_pretrained(tiny_t5_dir)
    records = [Seq2SeqRecord("a", "copy : one two three four five", "one two three four five"),
               Seq2SeqRecord("b", "copy : six", "six")]
    rows, cut_sources, cut_targets = tokenize_pairs(records, t5, 4, 3)
    assert (cut_sources, cut_targets) == (1, 1)
    assert rows[0].input_ids[-1] == rows[0].labels[-1] == t5.eos_token_id and len(rows[0].labels) == 3
    assert t5.decode(rows[0].labels) == "one two </s>" and rows[0].target == "one two three four five"
    assert len(rows[1]) == len(rows[1].input_ids) + 2  # `six </s>`: a row is its source and target tokens
    bart = AutoTokenizer.from_pretrained(tiny_bart_dir)
    row = tokenize_pairs(records[1:], bart, 16, 12)[0][0]
    assert row.labels[0] == bart.bos_token_id and row.labels[-1] == bart.eos_token_id  # BART's <s> ... </s>
    # A tokenizer that appends no EOS of its own gets one: without it the model never learns to stop.
    t5.backend_tokenizer.post_processor = None
    row = tokenize_pairs(records[1:], t5, 16, 12)[0][0]
    assert row.labels == [t5.convert_tokens_to_ids("six"), t5.eos_token_id]
    t5.eos_token = None
    with pytest.raises(ModelError, match="no eos_token"):
        tokenize_pairs(records, t5, 16, 12)


def test_collate_pads_sources_and_labels_as_its_docstring_shows():
    from lite_sft.tasks.seq2seq import Seq2SeqRow

    class Pad:
        pad_token_id = 0

    rows = [Seq2SeqRow([5, 6, 7, 1], [7, 6, 5, 1], ""), Seq2SeqRow([8, 1], [9, 4, 1], "")]
    batch = Seq2SeqTask().collate(rows, Pad())
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # the model makes decoder_input_ids itself
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[7, 6, 5, 1], [9, 4, 1, -100]]


def test_only_the_adapters_train_and_the_lm_head_stays_the_base_one(t5_run, tiny_t5_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    from lite_sft.model import load_tuned

    out, _, _ = t5_run
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_A" in name or "lora_B" in name for name in saved)
    # all-linear: every attention and feed-forward projection of encoder and decoder, not the output layer.
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q", "k", "v", "o", "wi", "wo"}
    model, _, _ = load_tuned(out, torch.device("cpu"))
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    assert type(model).__name__ == "PeftModelForSeq2SeqLM"
    assert torch.equal(model.get_base_model().shared.weight, base.shared.weight)
    assert torch.equal(model.get_base_model().lm_head.weight, base.lm_head.weight)


def test_generation_settings_are_saved_and_loaded_back(t5_run, counting, tmp_path):
    from lite_sft.evaluate import evaluate_run
    from lite_sft.tasks.seq2seq import load_generation_settings

    out, _, summary = t5_run
    saved = json.loads((out / "generation_config.json").read_text())
    expected = {"max_new_tokens": 12, "num_beams": 1, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    assert {k: saved[k] for k in expected} == expected
    assert "_from_model_config" not in saved
    gen = load_generation_settings(out)
    assert (gen.max_new_tokens, gen.num_beams, gen.decoder_start_token_id) == (12, 1, 0)
    # `lite-sft eval` restores the tuned model and generates as training's evaluation did ...
    report = evaluate_run(out, str(counting / "dev.jsonl"), tmp_path / "eval.json")
    final = summary["final_evaluation"]
    assert report["examples"] == 32 and report["bleu"] == pytest.approx(final["bleu"], abs=1e-6)
    assert report["samples"] == final["samples"]
    # ... with the settings the run directory holds: two new tokens make two-word predictions.
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "generation_config.json").write_text(json.dumps({**saved, "max_new_tokens": 2}))
    short = evaluate_run(copy, str(counting / "dev.jsonl"), tmp_path / "short.json")
    assert all(len(s["prediction"].split()) <= 2 for s in short["samples"]) and short["bleu"] < report["bleu"]


@pytest.mark.parametrize("cpu_bf16", ["on", "off"])
def test_eval_after_reload_equals_trainings_final_evaluation_in_either_precision(tiny_t5_dir, counting, tmp_path,
                                                                               cpu_bf16):
    """Training's final evaluation and `lite-sft eval` on the same file compute in the precision the run
    recorded: under bf16 autocast both do, so their figures and predictions are the same, not merely close."""
    from lite_sft.evaluate import evaluate_run
    from lite_sft.train import tune

    out = tmp_path / "run"
    summary = tune(seq2seq_cfg(tiny_t5_dir, counting, out, **{"train.max_steps": 40, "model.cpu_bf16": cpu_bf16}))
    report = evaluate_run(out, str(counting / "dev.jsonl"), tmp_path / "eval.json")
    final = summary["final_evaluation"]
    assert report["precision"] == ("bf16 autocast" if cpu_bf16 == "on" else "float32")
    assert report["samples"] == final["samples"]
    for key in ("bleu", "rougeL", "exact_match", "val_loss"):
        assert report[key] == final[key], key


def test_the_cli_tunes_with_beams_then_evaluates_a_csv(tiny_t5_dir, counting, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["tune", "--task", "seq2seq", "--model", str(tiny_t5_dir), "--data",
                                 str(counting / "train.jsonl"), "--validation-fraction", "0.05", "--max-steps", "10",
                                 "--micro-batch-size", "8", "--lr", "5e-3", "--lora-r", "8", "--save-every", "0",
                                 "--max-seq-len", "16", "--max-target-len", "12", "--max-new-tokens", "10",
                                 "--num-beams", "2", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "target tokens" in result.output and "bleu" in result.output and f"lite-sft eval {out}" in result.output
    assert "20 validation pairs" in result.output  # the seeded split: 5% of 400
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["num_beams"] == 2 and saved["max_new_tokens"] == 10
    csv = tmp_path / "dev.csv"
    csv.write_text("question,answer\n" + "".join(f"{p['source']},{p['target']}\n" for p in counting_pairs(6, 2)))
    result = runner.invoke(app, ["eval", str(out), "--data", str(csv), "--source-column", "question",
                                 "--target-column", "answer"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval-dev.csv.json").read_text())
    assert report["task"] == "seq2seq" and report["examples"] == 6
    assert {"val_loss", "bleu", "rouge1", "rouge2", "rougeL", "exact_match"} <= set(report)
    assert "bleu:" in result.output and "exact match:" in result.output
    result = runner.invoke(app, ["eval", str(out), "--data", str(csv)])  # the run's columns: source, target
    assert result.exit_code == 2 and "no column 'source'" in result.output and "source_column" in result.output


def tune_args(model_dir, data, out) -> list[str]:
    return ["tune", "--task", "seq2seq", "--model", str(model_dir), "--data", str(data), "--max-steps", "1",
            "--output-dir", str(out)]


@pytest.mark.parametrize("model, message", [
    ("tiny_model_dir", "is a decoder-only model (llama); --task seq2seq needs an encoder-decoder such as T5 or "
                       "BART. Tune a decoder-only model with the default task (--task causal-lm) on "
                       "prompt_completion data"),
    ("tiny_bert_dir", "(bert) is not an encoder-decoder; --task seq2seq needs one"),
])
def test_a_model_without_an_encoder_and_a_decoder_is_refused_in_one_line(request, model, message, counting, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, tune_args(request.getfixturevalue(model), counting / "train.jsonl", out))
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and not out.exists()  # refused before anything loads


@pytest.mark.parametrize("lines, message", [
    ('{"source": "one", "target": "one"}\n{"source": "two", "target": ""}\n',
     "train.jsonl line 2: column 'target' is empty"),
    ('{"source": "one", "target": "one"}\n{"source": " ", "target": "two"}\n',
     "train.jsonl line 2: column 'source' is empty"),
    ('{"source": "one", "target": "one"}\n{"input": "two", "target": "two"}\n',
     "train.jsonl line 2: no field 'source'; the line has input, target; set --source-column (task.source_column)"),
])
def test_bad_pairs_exit_2_naming_the_line(tiny_t5_dir, tmp_path, lines, message):
    data = tmp_path / "train.jsonl"
    data.write_text(lines)
    result = runner.invoke(app, tune_args(tiny_t5_dir, data, tmp_path / "run"))
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "run").exists()


def test_generate_transduces_with_the_settings_the_run_saved(t5_run):
    from lite_sft.generate import answer

    out, _, summary = t5_run
    sample = summary["final_evaluation"]["samples"][0]
    # The saved settings (greedy, max_new_tokens 12) decide: the answer is the one evaluation produced.
    assert answer(out, [sample["source"]]) == [sample["prediction"]]
