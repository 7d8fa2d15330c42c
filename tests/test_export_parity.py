"""The parity gate's arithmetic, its batched run and its choice of held-out prompts."""

import json
from types import SimpleNamespace

import pytest
import torch

from lite_sft.config import load_config
from lite_sft.export import ExportError
from lite_sft.export.parity import (THRESHOLDS, Reference, batch_check, compare, format_report, make_reference,
                                    ort_batch_logits, ort_logits)
from lite_sft.export.prompts import held_out_prompts


def reference(prompt_len=4, length=10, vocab=8, seed=0):
    logits = torch.randn(length, vocab, generator=torch.Generator().manual_seed(seed))
    return Reference([torch.zeros(1, length, dtype=torch.long)], [prompt_len], [logits])


def judge(ref, candidate, precision="float32", **kwargs):
    return compare(ref, [candidate], stage="onnx", artefact="onnx", precision=precision, reference="test", **kwargs)


def test_identical_logits_pass_every_precision():
    ref = reference()
    for precision in THRESHOLDS:
        gate = judge(ref, ref.logits[0].clone(), precision)
        assert gate.passed and gate.greedy_agreement == 1.0 and gate.max_abs_diff == 0.0


def test_one_changed_greedy_token_fails_fp32_but_not_a_looser_threshold():
    ref = reference(prompt_len=4, length=10)
    candidate = ref.logits[0].clone()
    row = 6  # a continuation position: its runner-up overtakes the top token by a hair
    runner_up = ref.logits[0][row].topk(2).indices[1]
    candidate[row, runner_up] = ref.logits[0][row].max() + 1e-4
    gate = judge(ref, candidate)
    # Positions 3..9 are compared (the last prompt position predicts the first new token): 6 of 7 agree.
    assert gate.positions == 7 and gate.greedy_agreement == pytest.approx(6 / 7)
    assert not gate.passed and "FAIL" in format_report([gate], "test prompts")
    assert judge(ref, candidate, "int4").passed  # 6/7 > 70%, and on average the logits hardly moved
    assert judge(ref, candidate, min_agreement=0.99, precision="int4").passed is False


def test_a_flip_between_tied_tokens_is_a_tie_not_a_disagreement():
    """Two tokens whose reference logits are equal to within rounding: which one a candidate picks is rounding,
    not the model, so on a short prompt one such flip must not decide the gate. A flip past a real margin still
    counts, at every precision."""
    ref = reference(prompt_len=4, length=10)
    row = 6
    top2 = ref.logits[0][row].topk(2).indices
    ref.logits[0][row, top2[1]] = ref.logits[0][row, top2[0]] - 1e-5  # a near-tie in the reference itself
    candidate = ref.logits[0].clone()
    candidate[row, top2[1]] += 2e-5  # the runner-up wins by a hair
    gate = judge(ref, candidate)
    assert gate.passed and gate.greedy_agreement == 1.0 and gate.ties == 1
    assert json.loads(json.dumps(gate.to_dict()))["ties"] == 1  # parity.json says how many positions were ties
    ref = reference(prompt_len=4, length=10)
    ref.logits[0][row, top2[1]] = ref.logits[0][row, top2[0]] - 0.1  # a margin of 3% of the logit scale
    clear = ref.logits[0].clone()
    clear[row, top2[1]] += 0.11
    for precision in THRESHOLDS:
        gate = judge(ref, clear, precision)
        assert gate.ties == 0 and gate.greedy_agreement == pytest.approx(6 / 7), precision


def test_prompt_positions_count_for_the_logit_difference_not_for_agreement():
    ref = reference(prompt_len=4, length=10)
    candidate = ref.logits[0].clone()
    candidate[0] = candidate[0].flip(0)  # the first prompt position predicts a token the prompt already has
    gate = judge(ref, candidate, min_agreement=1.0)
    assert gate.greedy_agreement == 1.0 and gate.max_abs_diff > 0


def test_lower_precisions_are_judged_on_the_mean_difference_not_one_extreme_logit():
    ref = reference(length=10, vocab=8)
    candidate = ref.logits[0].clone()
    candidate[0, 0] += 1.0  # one prompt-position logit far off: agreement unaffected, the mean barely moves
    assert judge(ref, candidate, "int8").passed and not judge(ref, candidate, "float32").passed
    assert not judge(ref, ref.logits[0] + 0.1, "int8").passed  # every logit off by 0.1: over the int8 mean bound


def test_max_abs_threshold_scales_with_the_logits():
    small, large = reference(), reference()
    large.logits[0] *= 30  # logits of a trained model are tens, not tenths
    noise = torch.full_like(small.logits[0], 5e-3)
    assert not judge(small, small.logits[0] + noise).passed  # 5e-3 > 1e-3 x 1
    assert judge(large, large.logits[0] + noise).passed  # 5e-3 < 1e-3 x max|logit| (about 60)


class LikeOrt:
    """A PyTorch decoder called the way the gate calls an exported decoder (ort_decoder.OnnxDecoder);
    `mask_padding=False` lets the padding of a left-padded batch into attention, the bug a server's batches
    would show."""

    input_names = ("input_ids", "attention_mask", "position_ids")

    def __init__(self, model, mask_padding=True):
        self.model, self.mask_padding = model, mask_padding

    def __call__(self, input_ids, attention_mask, use_cache, past_key_values=None, position_ids=None):
        mask = attention_mask if self.mask_padding else torch.ones_like(attention_mask)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=past_key_values,
                         use_cache=use_cache)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def test_the_batch_run_passes_a_model_that_masks_padding_and_fails_one_that_does_not(tiny_llama):
    from lite_sft.export.prompts import Prompt

    prompts = [Prompt([5, 6, 7]), Prompt([9, 10, 11, 12, 13, 14, 15, 16]), Prompt([20, 21])]
    ref = make_reference(tiny_llama, prompts, new_tokens=5, pad_id=0)
    assert ref.batch_rows() == [2, 1]  # the shortest and the longest prompt: 6 tokens of left padding

    def gate_of(candidate):
        gate = compare(ref, ort_logits(candidate, ref), stage="onnx", artefact="onnx", precision="float32",
                       reference="test")
        batch_check(gate, ref, ort_batch_logits(candidate, ref.subset(ref.batch_rows())))
        return gate

    good = gate_of(LikeOrt(tiny_llama))
    assert good.passed and good.extra["batch"]["passed"] and good.extra["batch"]["greedy_agreement"] == 1.0
    assert good.extra["batch"]["prompt_lengths"] == [2, 8] and good.extra["batch"]["left_padding"] == 6
    leaky = gate_of(LikeOrt(tiny_llama, mask_padding=False))
    assert leaky.extra["passed_alone"] and not leaky.extra["batch"]["passed"] and not leaky.passed
    text = format_report([good, leaky], "test prompts")
    alone, batched = text.splitlines()[-2:]
    assert alone.endswith("pass") and "FAIL  (left-padded: prompts of 2 and 8 tokens)" in batched


def split_file(run_dir, examples, source="held-out fraction 0.1 of data/train.jsonl, seed 42"):
    """RUN_DIR/validation_split.json as `lite-sft tune` writes it."""
    record = {"source": source, "data_sha256": None, "count": len(examples),
              "sources": [ex["source"] for ex in examples], "examples": examples}
    (run_dir / "validation_split.json").write_text(json.dumps(record))


def labelled(ids, trained):
    return [t if i in trained else -100 for i, t in enumerate(ids)]


def test_held_out_prompts_are_the_examples_the_run_wrote_down(tmp_path, tokenizer):
    # Word-level ids (conftest): <|im_start|> user hello <|im_end|> <|im_start|> assistant hi <|im_end|> ...
    two_turns = [4, 6, 9, 5, 4, 7, 11, 5, 4, 6, 12, 13, 14, 5, 4, 7, 15, 16, 5]
    one_turn = [4, 6, 19, 20, 21, 22, 23, 5, 4, 7, 25, 5]
    split_file(tmp_path, [
        {"source": "train.jsonl line 2", "input_ids": [4, 6, 9, 5], "labels": [-100] * 4},  # nothing trained
        {"source": "train.jsonl line 7", "input_ids": two_turns, "labels": labelled(two_turns, {6, 7, 16, 17, 18})},
        {"source": "train.jsonl line 9", "input_ids": one_turn, "labels": labelled(one_turn, {10, 11})},
    ])
    # The data file is gone, and the seed changed: the gate no longer needs either.
    cfg = load_config(None, {"data.path": str(tmp_path / "moved.jsonl"), "train.seed": 7})
    prompts, source = held_out_prompts(tmp_path, cfg, tokenizer, 2)
    assert source == "held-out examples in validation_split.json (held-out fraction 0.1 of data/train.jsonl, seed 42)"
    # The prompt ends where the last trained run (the last answer) starts.
    assert [p.prompt_ids for p in prompts] == [two_turns[:16], one_turn[:10]]
    prompts, source = held_out_prompts(tmp_path, cfg, tokenizer, 3)  # fewer held out than asked for
    assert len(prompts) == 3 and source.startswith("2 from held-out examples in validation_split.json")
    assert source.endswith("+ 1 fixed prompts")


def test_a_malformed_split_file_is_named_with_its_field(tmp_path, tokenizer):
    cfg = load_config(None, {"data.path": str(tmp_path / "x.jsonl")})
    split_file(tmp_path, [{"source": "a", "input_ids": [4, 6, 9], "labels": [-100, 9, 5]},
                          {"source": "b", "input_ids": [4, 6, 9], "labels": [-100]}])
    with pytest.raises(ExportError, match=r"validation_split.json: examples\[1\] needs 'input_ids' and 'labels'"):
        held_out_prompts(tmp_path, cfg, tokenizer, 2)
    (tmp_path / "validation_split.json").write_text("{not json")
    with pytest.raises(ExportError, match="validation_split.json cannot be read as JSON"):
        held_out_prompts(tmp_path, cfg, tokenizer, 2)


def test_a_run_without_the_split_file_re_derives_it_and_says_so(tmp_path, bpe_tokenizer, chat_jsonl):
    from lite_sft.tasks.causal_lm.data import load_samples
    from lite_sft.tasks.split import split_validation

    cfg = load_config(None, {"data.path": str(chat_jsonl), "data.validation_fraction": 0.1, "train.seed": 3})
    prompts, source = held_out_prompts(tmp_path, cfg, bpe_tokenizer, 3)
    held = split_validation(load_samples(str(chat_jsonl))[1], 0.1, 3)[1]
    assert len(prompts) == 3 and source.startswith("no validation_split.json in the run (made by an older lite-sft), "
                                                   "so re-derived: held-out split of") and "seed 3" in source
    first = bpe_tokenizer.decode(prompts[0].prompt_ids)
    assert first.endswith("<|im_start|>assistant\n")  # rendered with the generation prompt
    assert held[0].messages[0]["content"] in first


def test_a_split_file_without_examples_falls_back_and_says_so(tmp_path, bpe_tokenizer):
    cfg = load_config(None, {"data.path": str(tmp_path / "x.jsonl"), "data.validation_fraction": 0})
    split_file(tmp_path, [], source="none")
    prompts, source = held_out_prompts(tmp_path, cfg, bpe_tokenizer, 2)
    assert len(prompts) == 2 and source == ("validation_split.json holds no held-out example (split: none), so "
                                            "re-derived: fixed prompts (the run held out no validation data)")


def test_missing_validation_data_falls_back_to_fixed_prompts_and_says_so(bpe_tokenizer, tmp_path):
    cfg = load_config(None, {"data.path": str(tmp_path / "moved.jsonl")})
    prompts, source = held_out_prompts(tmp_path, cfg, bpe_tokenizer, 2)
    assert len(prompts) == 2 and "moved.jsonl" in source
    assert "so re-derived: fixed prompts (validation data unavailable" in source
