"""Tokens that cross the prompt/answer boundary, on byte-level BPE tokenizers built like GPT-2's, Llama-3's
and Qwen2's (conftest.py). A prompt that ends in a space, or a generation prompt that does, shares its
last character with the answer's first token ("Answer: " + "Paris" -> 'Answer', ':', 'ĠParis'); that token
must be trained, or the model never learns how an answer starts, and the example is counted.

Expected tokens are written as the tokenizer spells them (Ġ a space, Ċ a newline), trained ones in brackets.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lite_sft.config import DataConfig
from lite_sft.tasks.causal_lm.data import load_samples
from lite_sft.tasks.causal_lm.masking import IGNORE_INDEX, Example, Sample, build_examples, ensure_chat_template, tokenize_sample

# A template for base models whose generation prompt ends in a space, as many hand-written ones do.
QA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Answer: ' + m['content'] + eos_token }}"
               "{% elif m['role'] == 'user' %}{{ 'Question: ' + m['content'] }}{% else %}{{ m['content'] }}"
               "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}")
QUESTION = "what is the capital of France?"
RECORDS = {
    "messages": {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "Paris"}]},
    "alpaca": {"instruction": QUESTION, "output": "Paris"},
    "prompt_completion": {"prompt": f"Question: {QUESTION}\nAnswer: ", "completion": "Paris"},
}
QUESTION_TOKENS = ["Question", ":", "Ġwhat", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance"]


def marked(ex: Example, tokenizer) -> list[str]:
    """The example's tokens, trained ones in brackets; checks that each label is its token or ignored."""
    assert all(label in (tok, IGNORE_INDEX) for tok, label in zip(ex.input_ids, ex.labels))
    return [f"[{t}]" if label != IGNORE_INDEX else t
            for t, label in zip(tokenizer.convert_ids_to_tokens(ex.input_ids), ex.labels)]


def build(tmp_path, tokenizer, *records: dict, **settings):
    """Load records through their format's reader, then tokenise and label them as training does."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return build_examples(load_samples(str(path))[1], tokenizer, DataConfig(**settings))


@pytest.fixture(params=["gpt2", "llama3", "qwen2"])
def byte_level(request):
    """Each byte-level tokenizer, with how it spells the end of "...France?\\nAnswer:" and its eos."""
    tokenizer = request.getfixturevalue(f"{request.param}_tokenizer")
    if request.param == "gpt2":  # GPT-2's regex keeps the newline apart from the question mark
        return request.param, tokenizer, ["?", "Ċ", "Answer", ":"]
    return request.param, tokenizer, ["?Ċ", "Answer", ":"]


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_the_answers_first_token_is_trained_when_the_prompt_ends_in_a_space(tmp_path, byte_level, fmt):
    name, tok, question_end = byte_level
    if fmt != "prompt_completion":
        ensure_chat_template(tok, QA_TEMPLATE)
    examples, stats = build(tmp_path, tok, RECORDS[fmt])
    bos = ["<|begin_of_text|>"] if name == "llama3" and fmt == "prompt_completion" else []
    # The template writes the eos itself, so what follows it (a newline) is kept, untrained.
    after = [] if fmt == "prompt_completion" else ["Ċ"]
    assert marked(examples[0], tok) == [*bos, *QUESTION_TOKENS, *question_end, "[ĠParis]", f"[{tok.eos_token}]",
                                        *after]
    assert (stats.straddling, stats.examples) == (1, 1)


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_every_reply_of_a_multi_turn_chat_trains_its_first_token(tmp_path, gpt2_tokenizer, fmt):
    ensure_chat_template(gpt2_tokenizer, QA_TEMPLATE)
    turns = [("user", QUESTION), ("assistant", "Paris"), ("user", "and of Italy?"), ("assistant", "Rome")]
    record = ({"messages": [{"role": r, "content": c} for r, c in turns]} if fmt == "messages" else
              {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": c} for r, c in turns]})
    examples, stats = build(tmp_path, gpt2_tokenizer, record)
    assert marked(examples[0], gpt2_tokenizer) == [
        *QUESTION_TOKENS, "?", "Ċ", "Answer", ":", "[ĠParis]", "[<|endoftext|>]", "Ċ",
        "Question", ":", "Ġand", "Ġof", "ĠItaly", "?", "Ċ", "Answer", ":", "[ĠRome]", "[<|endoftext|>]", "Ċ"]
    assert stats.straddling == 1  # examples, not tokens


def test_a_prompt_without_trailing_space_straddles_nothing(tmp_path, gpt2_tokenizer, llama3_tokenizer):
    examples, stats = build(tmp_path, gpt2_tokenizer, {"prompt": "Answer:", "completion": " 1"},
                            {"prompt": "Answer: ", "completion": "1"})
    assert marked(examples[0], gpt2_tokenizer) == ["Answer", ":", "[Ġ1]", "[<|endoftext|>]"]
    assert marked(examples[1], gpt2_tokenizer) == ["Answer", ":", "[Ġ1]", "[<|endoftext|>]"]
    assert stats.straddling == 1
    # Llama-3's pattern never joins a space to a number, so nothing crosses the boundary there.
    examples, stats = build(tmp_path, llama3_tokenizer, {"prompt": "Answer: ", "completion": "1"})
    assert marked(examples[0], llama3_tokenizer) == ["<|begin_of_text|>", "Answer", ":", "Ġ", "[1]", "[<|eot_id|>]"]
    assert stats.straddling == 0


def test_text_trains_all_but_the_first_token_and_straddles_nothing(tmp_path, byte_level):
    name, tok, _ = byte_level
    examples, stats = build(tmp_path, tok, {"text": "hello there, how are you?"})
    trained = ["[Ġthere]", "[,]", "[Ġhow]", "[Ġare]", "[Ġyou]", "[?]", f"[{tok.eos_token}]"]
    first = ["<|begin_of_text|>", "[hello]"] if name == "llama3" else ["hello"]
    assert marked(examples[0], tok) == [*first, *trained]
    assert stats.straddling == 0


def test_llama3_template_trims_the_reply_so_nothing_straddles(llama3_tokenizer):
    sample = Sample("t", messages=[{"role": "user", "content": "hello there"},
                                   {"role": "assistant", "content": " Paris"}])
    ex = tokenize_sample(sample, llama3_tokenizer)
    assert marked(ex, llama3_tokenizer) == [
        "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ", "hello", "Ġthere",
        "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ", "[Par]", "[is]", "[<|eot_id|>]"]
    assert not ex.straddling


@pytest.mark.parametrize("reply, tokens, straddling", [
    # The generation prompt "<|im_start|>assistant\n" ends in a newline: a reply that starts with one
    # joins it ("ĊĊ"), and that token is trained.
    ("\nParis", ["[ĊĊ]", "[Par]", "[is]"], True),
    ("\n\nParis", ["[ĊĊ]", "[Ċ]", "[Par]", "[is]"], True),
    # A reply that starts with a space keeps it to itself: Qwen2's pattern splits off the newline.
    (" Paris", ["Ċ", "[ĠParis]"], False),
    ("Paris", ["Ċ", "[Par]", "[is]"], False),
])
def test_default_chatml_reply_that_starts_with_whitespace(qwen2_tokenizer, reply, tokens, straddling):
    assert ensure_chat_template(qwen2_tokenizer) is True  # no template of its own, and no ChatML tokens
    sample = Sample("t", messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply}])
    ex = tokenize_sample(sample, qwen2_tokenizer)
    assert marked(ex, qwen2_tokenizer) == ["<|im_start|>", "user", "Ċ", "hello", "<|im_end|>", "Ċ",
                                           "<|im_start|>", "assistant", *tokens, "[<|im_end|>]", "[<|endoftext|>]"]
    assert ex.straddling is straddling


def test_train_on_prompt_still_counts_straddling(tmp_path, gpt2_tokenizer):
    examples, stats = build(tmp_path, gpt2_tokenizer, {"prompt": "Answer: ", "completion": "1"}, train_on_prompt=True)
    assert marked(examples[0], gpt2_tokenizer) == ["Answer", "[:]", "[Ġ1]", "[<|endoftext|>]"]
    assert stats.straddling == 1  # the token is trained either way; how the prompt ends still differs at inference


# --- property: random prompts and completions --------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(alphabet="Qa1 :?\n", max_size=8), completion=st.text(alphabet="Pa1 :?\n", min_size=1, max_size=6))
def test_property_trained_tokens_cover_the_completion_and_straddling_says_when_they_cover_more(
        byte_level, prompt, completion):
    name, tok, _ = byte_level
    prompt = "Q" + prompt  # the example's first token is never trained; keep it in the prompt
    ex = tokenize_sample(Sample("p", prompt=prompt, completion=completion), tok)
    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    trained = text([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])
    ignored = text([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX and t != tok.bos_token_id])
    assert trained.endswith(completion + tok.eos_token)
    assert ignored + trained == prompt + completion + tok.eos_token  # the trained tokens are one run at the end
    assert ex.straddling == (trained != completion + tok.eos_token)
