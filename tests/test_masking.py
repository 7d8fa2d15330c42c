"""Labels, checked token by token. Ids are those of the word-level tokenizer in conftest.py:

    2 <s>  3 </s>  4 <|im_start|>  5 <|im_end|>  6 user  7 assistant  8 system  9 hello  10 there  11 hi
    12 how  13 are  14 you  15 fine  16 thanks  17 be  18 brief  19 what  20 is  21 two  22 plus  23 four
    24 the  25 answer

The template's newlines make no token, so ChatML's "<|im_start|>user\\nhello<|im_end|>\\n" is 4 6 9 5.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import processors

from lite_sft.config import DataConfig
from lite_sft.errors import DataError
from lite_sft.tasks.causal_lm.data import load_samples
from lite_sft.tasks.causal_lm.masking import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, Sample, build_examples,
                              ensure_chat_template, percentile, tokenize_sample)

X = IGNORE_INDEX


def one_sample(tmp_path, record: dict) -> Sample:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return load_samples(str(path))[1][0]


def chat(*turns: str) -> Sample:
    """chat("user: hello", "assistant: hi") -> a messages Sample."""
    messages = [dict(zip(("role", "content"), turn.split(": ", 1))) for turn in turns]
    return Sample("test", messages=messages)


def test_alpaca_with_system_and_input(tmp_path, tokenizer):
    sample = one_sample(tmp_path, {"system": "be brief", "instruction": "what is two plus two",
                                   "input": "the answer", "output": "four"})
    ex = tokenize_sample(sample, tokenizer)
    # system: be brief | user: what is two plus two \n\n the answer | assistant: four <|im_end|>, then </s>
    assert ex.input_ids == [4, 8, 17, 18, 5, 4, 6, 19, 20, 21, 22, 21, 24, 25, 5, 4, 7, 23, 5, 3]
    assert ex.labels == [X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, 23, 5, 3]


def test_messages_multi_turn_trains_every_reply_and_inserts_system_prompt(tokenizer):
    sample = chat("user: hello there", "assistant: hi", "user: how are you", "assistant: fine thanks")
    ex = tokenize_sample(sample, tokenizer, system_prompt="be brief")
    assert ex.input_ids == [4, 8, 17, 18, 5, 4, 6, 9, 10, 5, 4, 7, 11, 5, 4, 6, 12, 13, 14, 5, 4, 7, 15, 16, 5, 3]
    assert ex.labels == [X, X, X, X, X, X, X, X, X, X, X, X, 11, 5, X, X, X, X, X, X, X, X, 15, 16, 5, 3]


def test_system_prompt_is_not_added_when_the_conversation_has_one(tokenizer):
    ex = tokenize_sample(chat("system: be", "user: hello", "assistant: hi"), tokenizer, system_prompt="brief")
    assert ex.input_ids == [4, 8, 17, 5, 4, 6, 9, 5, 4, 7, 11, 5, 3]


def test_sharegpt_aliases(tmp_path, tokenizer):
    sample = one_sample(tmp_path, {"conversations": [{"from": "system", "value": "be brief"},
                                                     {"from": "human", "value": "hello"},
                                                     {"from": "gpt", "value": "hi there"}]})
    ex = tokenize_sample(sample, tokenizer)
    assert ex.input_ids == [4, 8, 17, 18, 5, 4, 6, 9, 5, 4, 7, 11, 10, 5, 3]
    assert ex.labels == [X, X, X, X, X, X, X, X, X, X, X, 11, 10, 5, 3]


def test_prompt_completion_trains_completion_and_eos(tmp_path, tokenizer):
    sample = one_sample(tmp_path, {"prompt": "what is two plus two", "completion": " four"})
    ex = tokenize_sample(sample, tokenizer)
    assert ex.input_ids == [2, 19, 20, 21, 22, 21, 23, 3]  # <s> ... four </s>
    assert ex.labels == [X, X, X, X, X, X, 23, 3]


def test_text_trains_everything_but_the_first_token(tmp_path, tokenizer):
    ex = tokenize_sample(one_sample(tmp_path, {"text": "hello there how are you"}), tokenizer)
    assert ex.input_ids == [2, 9, 10, 12, 13, 14, 3]
    assert ex.labels == [X, 9, 10, 12, 13, 14, 3]


def test_first_token_is_never_trained_even_without_bos(tokenizer_factory):
    ex = tokenize_sample(Sample("t", text="hello there"), tokenizer_factory(bos=False), train_on_prompt=True)
    assert ex.input_ids == [9, 10, 3]
    assert ex.labels == [X, 10, 3]


def test_pad_equals_eos_still_trains_every_end_of_turn(pad_eos_tokenizer):
    tok = pad_eos_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == 5
    ex = tokenize_sample(chat("user: hello", "assistant: hi", "user: how are you", "assistant: fine"), tok)
    # <|im_end|> is the eos here, already inside each reply's span: nothing is appended.
    assert ex.input_ids == [4, 6, 9, 5, 4, 7, 11, 5, 4, 6, 12, 13, 14, 5, 4, 7, 15, 5]
    assert ex.labels == [X, X, X, X, X, X, 11, 5, X, X, X, X, X, X, X, X, 15, 5]
    ex = tokenize_sample(Sample("t", prompt="what is", completion=" four"), tok)
    assert ex.input_ids == [2, 19, 20, 23, 5]
    assert ex.labels == [X, X, X, 23, 5]


def test_train_on_prompt_trains_every_token_but_the_first(tokenizer):
    ex = tokenize_sample(chat("user: hello", "assistant: hi"), tokenizer, train_on_prompt=True)
    assert ex.input_ids == [4, 6, 9, 5, 4, 7, 11, 5, 3]
    assert ex.labels == [X, 6, 9, 5, 4, 7, 11, 5, 3]


def test_eos_follows_the_last_reply_and_a_trailing_user_turn_is_cut(tokenizer):
    ex = tokenize_sample(chat("user: hello", "assistant: hi", "user: how are you"), tokenizer)
    assert ex.input_ids == [4, 6, 9, 5, 4, 7, 11, 5, 3]
    assert ex.labels == [X, X, X, X, X, X, 11, 5, 3]


def test_eos_added_by_the_tokenizer_is_not_doubled(tokenizer):
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    ex = tokenize_sample(Sample("t", text="hello there"), tokenizer)
    assert ex.input_ids == [2, 9, 10, 3]
    assert ex.labels == [X, 9, 10, 3]


def test_ensure_chat_template_adds_chatml_tokens_once(tokenizer_factory, tmp_path):
    tok = tokenizer_factory(chat_template=None, chatml=False)
    size = len(tok)
    assert ensure_chat_template(tok) is True
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and len(tok) == size + 2
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) == 1
    assert ensure_chat_template(tok) is False
    tok.save_pretrained(tmp_path)
    assert type(tok).from_pretrained(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE


def test_ensure_chat_template_keeps_own_template_unless_overridden(tokenizer_factory):
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = tokenizer_factory(chat_template=own)
    assert ensure_chat_template(tok) is False and tok.chat_template == own
    assert ensure_chat_template(tok, "{{ 'x' }}") is False and tok.chat_template == "{{ 'x' }}"


def test_template_that_rewrites_earlier_turns_is_rejected(tokenizer):
    # Like templates that strip reasoning from past replies: the last reply renders differently.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}hi{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match="test: the chat template renders the conversation up to message 1"):
        tokenize_sample(chat("user: hello", "assistant: fine", "user: how are you", "assistant: fine"), tokenizer)


def test_conversation_errors(tokenizer):
    with pytest.raises(DataError, match="test: the conversation starts with an assistant message"):
        tokenize_sample(chat("assistant: hi", "user: hello"), tokenizer)
    with pytest.raises(DataError, match="test: the conversation has no assistant message"):
        tokenize_sample(chat("user: hello"), tokenizer)


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(DataError, match="slow tokenizer"):
        tokenize_sample(Sample("t", text="hello"), Slow())


def test_no_trained_token_is_an_error(tokenizer_factory):
    with pytest.raises(DataError, match="t: no token would be trained"):
        build_examples([Sample("t", text="")], tokenizer_factory(bos=False), DataConfig())


def samples_for_truncation() -> list[Sample]:
    return [
        Sample("short", text="hello"),                                       # 2 9 3: 3 tokens
        Sample("long", text="hello there how are you fine thanks be brief"),  # 11 tokens
        # 14 tokens; the first 8 are all prompt, so truncation leaves nothing to train
        Sample("long prompt", messages=[{"role": "user", "content": "hello there how are you fine"},
                                        {"role": "assistant", "content": "hi"}]),
    ]


def test_truncate_counts_and_drops_examples_left_with_nothing_to_train(tokenizer):
    examples, stats = build_examples(samples_for_truncation(), tokenizer, DataConfig(max_seq_len=8))
    assert [ex.source for ex in examples] == ["short", "long"]
    assert examples[1].input_ids == [2, 9, 10, 12, 13, 14, 15, 16]
    assert examples[1].labels == [X, 9, 10, 12, 13, 14, 15, 16] and examples[1].truncated
    assert (stats.examples, stats.truncated, stats.dropped, stats.dropped_untrained) == (2, 1, 0, 1)
    assert (stats.tokens, stats.trained_tokens) == (3 + 8, 2 + 7)
    assert (stats.length_p50, stats.length_p90, stats.length_p99, stats.length_max) == (11, 14, 14, 14)


def test_drop_counts_overlong_examples(tokenizer):
    examples, stats = build_examples(samples_for_truncation(), tokenizer, DataConfig(max_seq_len=8, overlong="drop"))
    assert [ex.source for ex in examples] == ["short"]
    assert (stats.examples, stats.truncated, stats.dropped, stats.dropped_untrained, stats.tokens) == (1, 0, 2, 0, 3)


def test_percentile_nearest_rank():
    ordered = list(range(1, 101))
    assert [percentile(ordered, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 50) == 7 and percentile([], 50) == 0


# --- properties: random conversations ---------------------------------------------------------

WORD_IDS = {w: i for i, w in enumerate(["user", "assistant", "system", "hello", "there", "hi", "how", "are", "you",
                                        "fine", "thanks", "be", "brief", "what", "is", "two", "plus", "four",
                                        "the", "answer"], start=6)}
START, END, EOS = 4, 5, 3


@st.composite
def conversations(draw, words=st.sampled_from(sorted(WORD_IDS))):
    roles = draw(st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=2, max_size=7))
    roles[0] = draw(st.sampled_from(["system", "user"]))
    if "assistant" not in roles:
        roles[-1] = "assistant"
    return [{"role": r, "content": " ".join(draw(st.lists(words, max_size=6)))} for r in roles]


# The tokenizer is only read, so sharing the function-scoped fixture across examples is safe.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_property_only_assistant_content_and_end_of_turn_are_trained(messages, tokenizer):
    ex = tokenize_sample(Sample("p", messages=messages), tokenizer)
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pos = 0
    for m in messages[:last_reply + 1]:  # turns after the last reply are cut, EOS takes their place
        content = [WORD_IDS[w] for w in m["content"].split()]
        block = [START, WORD_IDS[m["role"]], *content, END]
        assert ex.input_ids[pos:pos + len(block)] == block
        labels = ex.labels[pos:pos + len(block)]
        if m["role"] == "assistant":
            assert labels == [X, X, *content, END]
        else:
            assert labels == [X] * len(block)
        pos += len(block)
    assert ex.input_ids[pos:] == [EOS] and ex.labels[pos:] == [EOS]


@settings(max_examples=100, deadline=None)
@given(messages=conversations(words=st.text(alphabet="abcdehlnopqrtuy ,?", min_size=1, max_size=12)))
def test_property_trained_tokens_decode_to_the_replies(messages, bpe_tokenizer):
    ex = tokenize_sample(Sample("p", messages=messages), bpe_tokenizer)
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    replies = [m["content"] + "<|im_end|>" for m in messages[:last_reply + 1] if m["role"] == "assistant"]
    trained = [tok for tok, label in zip(ex.input_ids, ex.labels) if label != X]
    assert bpe_tokenizer.decode(trained, skip_special_tokens=False) == "".join(replies) + "</s>"
