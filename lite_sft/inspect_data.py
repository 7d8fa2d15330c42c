"""The report behind `lite-sft inspect-data`: a few examples with the trained tokens marked, then counts.

    from lite_sft.data import prepare_data
    from lite_sft.inspect_data import render_report
    print(render_report(prepare_data(cfg.data, tokenizer, seed=0), tokenizer, n=3, color=True))

Seeing the mask is the cheapest check that a template or format was read as intended: a reply that
is not marked will not be learned, and a marked prompt will be.
"""

from __future__ import annotations

from itertools import groupby

from lite_sft.data import PreparedData
from lite_sft.masking import IGNORE_INDEX, DataStats, Example, stats_of

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
