"""The parity gate's arithmetic and its choice of held-out prompts."""

import pytest
import torch

from lite_sft.config import load_config
from lite_sft.export.parity import THRESHOLDS, Reference, compare, format_report, held_out_prompts


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


def test_held_out_prompts_come_from_the_runs_own_validation_split(bpe_tokenizer, chat_jsonl):
    from lite_sft.data import load_samples, split_validation

    cfg = load_config(None, {"data.path": str(chat_jsonl), "data.validation_fraction": 0.1, "train.seed": 3})
    prompts, source = held_out_prompts(cfg, bpe_tokenizer, 3)
    held = split_validation(load_samples(str(chat_jsonl))[1], 0.1, 3)[1]
    assert len(prompts) == 3 and "held-out split" in source and "seed 3" in source
    first = bpe_tokenizer.decode(prompts[0].prompt_ids)
    assert first.endswith("<|im_start|>assistant\n")  # rendered with the generation prompt
    assert held[0].messages[0]["content"] in first
    full = bpe_tokenizer.decode(prompts[0].text_ids)
    assert full.startswith(first[:-len("assistant\n")]) and held[0].messages[-1]["content"] in full


def test_missing_validation_data_falls_back_to_fixed_prompts_and_says_so(bpe_tokenizer, tmp_path):
    cfg = load_config(None, {"data.path": str(tmp_path / "moved.jsonl")})
    prompts, source = held_out_prompts(cfg, bpe_tokenizer, 2)
    assert len(prompts) == 2 and "moved.jsonl" in source
    assert source.startswith("fixed prompts (validation data unavailable")
    cfg = load_config(None, {"data.path": str(tmp_path / "x.jsonl"), "data.validation_fraction": 0})
    assert held_out_prompts(cfg, bpe_tokenizer, 2)[1] == "fixed prompts (the run held out no validation data)"
