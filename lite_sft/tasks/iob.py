"""IOB2 tags: checking them, converting IOB1 to them, and reading entities out of them as conlleval does.

    iob2_error(["O", "I-PER"])                  # (1, "tag 'I-PER' follows 'O'; ...")  or None when valid
    iob1_to_iob2(["I-PER", "I-PER", "B-PER"])   # ['B-PER', 'I-PER', 'B-PER']
    entities(["B-PER", "I-PER", "O", "I-LOC"])  # [('PER', 0, 2), ('LOC', 3, 4)]: (type, start, end), end exclusive

`entities` reads tags with conlleval's chunk rules (as seqeval's default mode does), because model
predictions need not be valid IOB2 and every published CoNLL score reads them this way: an entity
ends at O, at B-, or where the type changes; it starts at B-, or at an I- that does not continue an
entity of its own type (so "O I-LOC" is a LOC entity, not an error).

Written by hand: seqeval has these rules but pulls scikit-learn (see metrics.py), and no maintained
library converts IOB1 to IOB2 (nltk's conlltags2tree/tree2conlltags round trip does, through parse
trees with part-of-speech slots, for what is one pass over the tags).
"""

from __future__ import annotations

from collections.abc import Sequence


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("O", "") for "O"; ValueError for anything else."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if prefix in ("B", "I") and dash and kind:
        return prefix, kind
    hint = " (IOBES/BILOU tags are not supported; convert them to IOB2)" if prefix in ("E", "S", "L", "U") else ""
    raise ValueError(f"tag {tag!r} is not O, B-TYPE or I-TYPE{hint}")


def iob2_error(tags: Sequence[str]) -> tuple[int, str] | None:
    """The index of the first tag that breaks IOB2 and why, or None when the sequence is valid."""
    previous = "O"
    for i, tag in enumerate(tags):
        try:
            prefix, kind = split_tag(tag)
        except ValueError as err:
            return i, str(err)
        if prefix == "I" and previous not in (f"B-{kind}", f"I-{kind}"):
            return i, (f"tag {tag!r} follows {previous!r}, but in IOB2 every entity starts with B- "
                       f"(B-{kind} here); IOB1 data (I- everywhere, B- only between two adjacent entities of "
                       "one type) can be read with scheme='iob1', which converts it")
        previous = tag
    return None


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 marks an entity's first token I- unless it directly follows one of the same type; IOB2 always B-."""
    converted, previous_kind = [], ""
    for tag in tags:
        prefix, kind = split_tag(tag)
        converted.append(f"B-{kind}" if prefix == "I" and kind != previous_kind else tag)
        previous_kind = kind
    return converted


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The (type, start, end) entities in one sentence's tags under conlleval's rules; end is exclusive."""
    found: list[tuple[str, int, int]] = []
    start, current = None, ""
    for i, tag in enumerate([*tags, "O"]):  # the trailing O closes an entity that runs to the end
        prefix, kind = split_tag(tag)
        if start is not None and (prefix != "I" or kind != current):
            found.append((current, start, i))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, current = i, kind
    return found
