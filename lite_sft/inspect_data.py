"""The report behind `lite-sft inspect-data`: a few examples with what each is trained on, then counts.

    from lite_sft.tasks.causal_lm.data import prepare_data
    from lite_sft.inspect_data import render_report, render_task_report
    print(render_report(prepare_data(cfg.data, tokenizer, seed=0), tokenizer, n=3, color=True))  # causal-lm
    print(render_task_report(task, task.prepare(cfg, tokenizer), tokenizer, n=3))   # seq-cls, token-cls, seq2seq

Seeing the mask is the cheapest check that a template or format was read as intended: a reply that
is not marked will not be learned, and a marked prompt will be. The classic tasks show their labels
the same way: a text and its label name, each sub-token and the tag it is trained on (a word's later
sub-tokens are ignored), a source and the target tokens the decoder learns.
"""

from __future__ import annotations

from itertools import groupby

from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.tasks.causal_lm.data import PreparedData
from lite_sft.tasks.causal_lm.masking import DataStats, Example, stats_of

GREEN, GREY, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "«", "»"


def render_report(data: PreparedData | list[Example], tokenizer, n: int = 3, color: bool = False) -> str:
    """Show `n` training examples with trained and ignored tokens told apart, then the counts.

    `data` is a PreparedData (its unpacked training examples and stats are shown) or a list of
    Examples (counts are then of those examples only: nothing is known about drops).
    """
    if isinstance(data, PreparedData):
        examples, stats, validation = data.train_examples, data.train_stats, data.validation_stats
        title = f"format: {data.format}"
    else:
        examples, stats, validation, title = list(data), stats_of(list(data)), None, "examples"
    legend = (f"{GREEN}green{RESET}: trained   {GREY}grey{RESET}: ignored (label {IGNORE_INDEX})" if color
              else f"{OPEN}text in guillemets{CLOSE}: trained   plain text: ignored (label {IGNORE_INDEX})")
    lines = [title, f"legend: {legend}", ""]
    for i, ex in enumerate(examples[:n]):
        note = ", truncated" if ex.truncated else ""
        lines.append(f"--- example {i + 1}: {ex.source} ({len(ex.input_ids)} tokens, {ex.num_trained} trained{note})")
        lines.append(_marked(ex, tokenizer, color))
        lines.append("")
    lines.append(_counts("training", stats))
    if validation is not None and validation.examples:
        lines.append(_counts("validation", validation))
    if stats.straddling:
        lines.append(f"note: {stats.straddling_warning()}")
    return "\n".join(lines)


def _marked(ex: Example, tokenizer, color: bool) -> str:
    """Decode runs of tokens that share a trained/ignored status, so multi-token characters survive."""
    parts = []
    pairs = zip(ex.input_ids, ex.labels)
    for trained, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([tok for tok, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            parts.append(f"{GREEN if trained else GREY}{text}{RESET}")
        else:
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(parts)


def _counts(split: str, s: DataStats) -> str:
    share = f" ({s.trained_tokens / s.tokens:.0%})" if s.tokens else ""
    return (f"{split}: {s.examples} examples, {s.tokens} tokens, {s.trained_tokens} trained tokens{share}; "
            f"truncated {s.truncated}, dropped {s.dropped} (overlong), {s.dropped_untrained} (nothing left to train); "
            f"{s.straddling} with a token straddling the prompt/answer boundary (trained); "
            f"length p50 {s.length_p50}, p90 {s.length_p90}, p99 {s.length_p99}, max {s.length_max}")


def render_task_report(task, data, tokenizer, n: int = 3, color: bool = False) -> str:
    """Show `n` training examples of a classic task (a TaskData of seq-cls, token-cls or seq2seq) as the model
    is trained on them, then the data's summary line (counts, labels, truncation)."""
    show = {"seq-cls": _classified, "token-cls": _tagged, "seq2seq": _pair}[task.name]
    ignored = f"{GREY}{IGNORE_INDEX}{RESET}" if color else str(IGNORE_INDEX)
    legend = {"seq-cls": "each example as the model reads it (special tokens included), then its label",
              "token-cls": f"each sub-token above the tag it is trained on; {ignored}: ignored (a word's later "
                           "sub-tokens, special tokens)",
              "seq2seq": "the source as the encoder reads it; the target tokens the decoder is trained on"
                         + (f" in {GREEN}green{RESET}" if color else f" in {OPEN}guillemets{CLOSE}")}[task.name]
    lines = [f"task: {task.name} ({data.format})", f"legend: {legend}", ""]
    for i, row in enumerate(data.train[:n]):
        lines += [f"--- example {i + 1}: " + show(row, tokenizer, data.labels, color), ""]
    lines.append(f"data: {data.summary}")
    return "\n".join(lines)


def _classified(row, tokenizer, labels, color: bool) -> str:
    name = labels.names[row.label]
    name = f"{GREEN}{name}{RESET}" if color else name
    text = tokenizer.decode(row.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{len(row)} tokens, label {name} (id {row.label})\n{text}"


# Characters per line of the token-cls table before it wraps: a long sentence stays readable in a terminal.
WIDTH = 100


def _tagged(row, tokenizer, labels, color: bool) -> str:
    """Sub-tokens over the tags they are trained on, one aligned column each, wrapped at WIDTH characters."""
    tokens = tokenizer.convert_ids_to_tokens(row.input_ids)
    tags = [labels.names[t] if t != IGNORE_INDEX else str(IGNORE_INDEX) for t in row.labels]
    read = len({w for w in row.word_ids if w is not None})
    cut = f", {len(row.tags) - read} words cut off by truncation (evaluated as O)" if read < len(row.tags) else ""
    head = (f"{len(row.tags)} words, {len(row)} sub-tokens, {sum(t != IGNORE_INDEX for t in row.labels)} "
            f"labelled{cut}")
    lines, top, bottom, used = [head], [], [], 0
    for token, tag, label in zip(tokens, tags, row.labels):
        width = max(len(token), len(tag))
        if top and used + width > WIDTH:
            lines += ["  ".join(top), "  ".join(bottom), ""]
            top, bottom, used = [], [], 0
        paint = (GREY if label == IGNORE_INDEX else GREEN) if color else ""
        top.append(token.ljust(width))
        bottom.append(f"{paint}{tag.ljust(width)}{RESET if color else ''}")
        used += width + 2
    lines += ["  ".join(top).rstrip(), "  ".join(bottom).rstrip()]
    return "\n".join(lines)


def _pair(row, tokenizer, labels, color: bool) -> str:
    source = tokenizer.decode(row.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    trained = [t for t in row.labels if t != IGNORE_INDEX]
    tokens = " ".join(tokenizer.convert_ids_to_tokens(trained))
    target = f"{GREEN}{tokens}{RESET}" if color else f"{OPEN}{tokens}{CLOSE}"
    return (f"source {len(row.input_ids)} tokens, target {len(trained)} tokens trained\n"
            f"source: {source}\ntarget: {target}")
