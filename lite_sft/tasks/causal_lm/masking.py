"""Turn canonical samples into token ids and labels, deciding by position which tokens are trained.

    from lite_sft.tasks.causal_lm.masking import Sample, tokenize_sample
    ex = tokenize_sample(Sample("demo", messages=[{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello"}]), tokenizer)
    ex.input_ids, ex.labels      # labels[t] is the target at position t (the loss shifts), or IGNORE_INDEX

How the trained tokens are found:
  * Chat samples are rendered to one string with the chat template. Each assistant turn's character
    span is found by rendering prefixes of the conversation: it starts where
    render(messages[:i], add_generation_prompt=True) ends and stops where render(messages[:i+1]) ends
    (trailing whitespace stripped), so it covers the reply and its end-of-turn token.
  * The whole string is tokenised once with offsets; a token is trained iff its characters overlap a
    trained span. A byte-level BPE (GPT-2, Llama-3, Qwen) joins a prompt's trailing space to the
    answer's first word ("Answer: " + "Paris" -> 'Answer', ':', 'ĠParis'); that token starts in the
    prompt but is how the answer begins, so it is trained, and the example is counted as straddling
    (DataStats.straddling): at inference the prompt ends in a space the model never saw before an answer.
    Masking is by position, never by token id: when pad == eos, masking by pad id would teach the
    model never to stop.
  * The first token of every example is never trained: nothing before it in the example predicts it,
    and it keeps packed examples from training across their boundary.

This module sits at the bottom of the data pipeline (data.py loads files into Samples; packing.py
packs Examples); the one error type for bad data, DataError, comes from lite_sft.errors, and IGNORE_INDEX
from lite_sft.tasks.base, where every task finds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lite_sft.config import DataConfig, setting
from lite_sft.errors import DataError
from lite_sft.tasks.base import IGNORE_INDEX


# ChatML, used when the tokenizer has no chat template of its own and the config names none:
#   <|im_start|>{role}\n{content}<|im_end|>\n    for each message
#   <|im_start|>assistant\n                      as the generation prompt
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")

ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    """One record in canonical form: `messages`, or `prompt` and `completion`, or `text`.

    `source` says where it came from ("train.jsonl line 3") so errors can point at it.
    """

    source: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None


@dataclass
class Example:
    """A tokenised sample: ids and labels of equal length, labels IGNORE_INDEX where not trained."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated: bool = False
    straddling: bool = False
    """A token crosses the edge of a trained span (a prompt that ends in a space, say); it is trained."""

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class DataStats:
    """Counts for one split. Lengths are in tokens, measured before truncation so that they tell
    you what max_seq_len would keep everything."""

    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    """Examples longer than max_seq_len dropped because overlong = "drop"."""
    dropped_untrained: int = 0
    """Examples truncated until no trained token was left, and so dropped."""
    straddling: int = 0
    """Examples with a token that crosses the prompt/answer boundary (trained; see the module docstring)."""
    length_p50: int = 0
    length_p90: int = 0
    length_p99: int = 0
    length_max: int = 0

    def straddling_warning(self) -> str:
        """What to tell the user when some example straddles (see `straddling`); empty when none does."""
        if not self.straddling:
            return ""
        return (f"{self.straddling} of {self.examples} examples have a token that straddles the prompt/answer "
                "boundary: the prompt (or the chat template's generation prompt) ends in whitespace that the "
                "answer's first token takes in, as 'Answer: ' + 'Paris' gives 'Answer', ':', ' Paris'. That token "
                "is trained, but at inference the prompt ends in that whitespace as a token of its own, which the "
                "model never saw before an answer. Move whitespace from the end of the prompts to the start of the "
                "completions, strip it from the start of the replies, or use a chat template whose generation "
                "prompt does not end in a space.")


def ensure_chat_template(tokenizer, override: str | None = None) -> bool:
    """Give `tokenizer` the chat template to train with and return whether tokens were added.

    The template is `override` if given, else the tokenizer's own, else DEFAULT_CHAT_TEMPLATE. It is
    set on `tokenizer.chat_template` so that it is saved with the tokenizer and serving renders
    prompts exactly as training did. When the default template is used its markers must each be one
    token; missing ones are added as special tokens, and then (return True) the model's embedding
    must be resized: `model.resize_token_embeddings(len(tokenizer))`.
    """
    if override:
        tokenizer.chat_template = override
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.chat_template != DEFAULT_CHAT_TEMPLATE:
        return False
    missing = [t for t in DEFAULT_TEMPLATE_TOKENS if tokenizer.tokenize(t) != [t]]  # not one token of its own
    if not missing:
        return False
    before = len(tokenizer)
    _add_special_tokens(tokenizer, missing)
    return len(tokenizer) > before


def _add_special_tokens(tokenizer, tokens: list[str]) -> None:
    """Add `tokens` as special tokens, keeping those the tokenizer has (transformers 5's `extra_special_tokens`,
    which 4.x called `additional_special_tokens`)."""
    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)


def tokenize_sample(sample: Sample, tokenizer, train_on_prompt: bool = False,
                    system_prompt: str | None = None) -> Example:
    """Tokenise one sample (untruncated) and label it; see the module docstring for the rules."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is a slow tokenizer: masking needs the character offsets "
                        "only a fast tokenizer gives; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token, so the model cannot learn to stop; set tokenizer.eos_token")
    if sample.messages is not None:
        (text, spans), special = _render_chat(sample, tokenizer, system_prompt), False
    elif sample.prompt is not None:
        text, special = sample.prompt + (sample.completion or ""), True
        spans = [(len(sample.prompt), len(text))]
    else:
        text, special = sample.text or "", True
        spans = [(0, len(text))]
    # Completions and raw text start with BOS where the tokenizer adds one; chat templates write their own.
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    trained = [train_on_prompt or _overlaps(start, end, spans) for start, end in offsets]
    straddling = any(_crosses(start, end, spans) for start, end in offsets)

    eos_id, last_start, last_end = tokenizer.eos_token_id, *spans[-1]
    if ids and ids[-1] == eos_id and offsets[-1][0] == offsets[-1][1]:
        trained[-1] = True  # the tokenizer's post-processor already appends EOS; train that one
    elif tokenizer.eos_token not in text[last_start:last_end]:
        # Drop what the template writes after the last trained span (ChatML's "\n", or a trailing
        # user turn) so EOS directly follows the final end-of-turn token, as it will at inference.
        keep = next((k for k, (start, end) in enumerate(offsets) if start >= last_end and end > start), len(ids))
        ids, trained = ids[:keep] + [eos_id], trained[:keep] + [True]
    labels = [tok if train else IGNORE_INDEX for tok, train in zip(ids, trained)]
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(ids, labels, sample.source, straddling=straddling)


# Overlap, not TRL SFTTrainer's rule (leave untrained as many tokens as the prompt alone tokenises to,
# warning when those differ): the prompt alone ends in a token of its own there ('Answer', ':', 'Ġ'),
# so that rule leaves 'ĠParis' untrained as well, and it needs a second tokenisation per turn. Overlap
# reads the answer off the one tokenisation, for every turn and at either edge of a span.
def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # Zero-width tokens are ones the tokenizer inserted (BOS), never text that was written.
    return end > start and any(start < e and s < end for s, e in spans)


def _crosses(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return any(start < edge < end for span in spans for edge in span)


def _render_chat(sample: Sample, tokenizer, system_prompt: str | None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return (text, assistant character spans)."""
    messages = sample.messages
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template; call ensure_chat_template(tokenizer, cfg.chat_template) first")

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja errors, or a template's own raise_exception()
            raise DataError(f"{sample.source}: the chat template failed on this conversation: {err}") from err

    def prefix(msgs: list[dict[str, str]], generation_prompt: bool, i: int) -> int:
        rendered = render(msgs, generation_prompt)
        if not full.startswith(rendered):
            raise DataError(
                f"{sample.source}: the chat template renders the conversation up to message {i} differently "
                "from the start of the whole conversation, so the assistant tokens cannot be located. "
                "Templates that rewrite earlier turns depending on later ones are not supported; "
                f"set {setting('data.chat_template')} to one that renders each turn on its own.")
        return len(rendered)

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{sample.source}: the conversation starts with an assistant message; "
                            "put the user's message (or a system message) before the first reply")
        start = prefix(messages[:i], True, i)
        end = start + len(full[start:prefix(messages[:i + 1], False, i)].rstrip())
        spans.append((start, end))
    if not spans:
        raise DataError(f"{sample.source}: the conversation has no assistant message, so nothing would be trained")
    return full, spans


def build_examples(samples: list[Sample], tokenizer, cfg: DataConfig) -> tuple[list[Example], DataStats]:
    """Tokenise and label every sample, then truncate or drop the overlong ones per `cfg.overlong`.

    An example with no trained token is an error (the data is wrong); one left with no trained token
    only because truncation cut it is dropped and counted in `dropped_untrained`.
    """
    examples, stats, lengths = [], DataStats(), []
    for sample in samples:
        ex = tokenize_sample(sample, tokenizer, cfg.train_on_prompt, cfg.system_prompt)
        if ex.num_trained == 0:
            raise DataError(f"{sample.source}: no token would be trained (empty completion or reply?); "
                            "fix or remove this record")
        lengths.append(len(ex.input_ids))
        if len(ex.input_ids) > cfg.max_seq_len:
            if cfg.overlong == "drop":
                stats.dropped += 1
                continue
            ex = Example(ex.input_ids[:cfg.max_seq_len], ex.labels[:cfg.max_seq_len], ex.source, truncated=True,
                         straddling=ex.straddling)
            if ex.num_trained == 0:
                stats.dropped_untrained += 1
                continue
            stats.truncated += 1
        examples.append(ex)
    _finish_stats(stats, examples, lengths)
    return examples, stats


def _finish_stats(stats: DataStats, examples: list[Example], lengths: list[int]) -> None:
    stats.examples = len(examples)
    stats.tokens = sum(len(ex.input_ids) for ex in examples)
    stats.trained_tokens = sum(ex.num_trained for ex in examples)
    stats.straddling = sum(ex.straddling for ex in examples)
    ordered = sorted(lengths)
    stats.length_p50, stats.length_p90, stats.length_p99 = (percentile(ordered, p) for p in (50, 90, 99))
    stats.length_max = ordered[-1] if ordered else 0


def stats_of(examples: list[Example]) -> DataStats:
    """Stats of already-built examples (lengths as they are now; nothing known about drops)."""
    stats = DataStats(truncated=sum(ex.truncated for ex in examples))
    _finish_stats(stats, examples, [len(ex.input_ids) for ex in examples])
    return stats


def percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list: the smallest value with p% of the data at or below it."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
