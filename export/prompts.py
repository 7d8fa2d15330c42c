"""The held-out prompts causal-lm's parity gate continues, and where they came from.

    lite-sft export runs/demo --out exports/demo --parity-prompts 4   # parity.json's "prompts": {"source": ...}
    prompts, source = held_out_prompts(Path("runs/demo"), cfg, tokenizer, 4)

They are the held-out examples `lite-sft tune` wrote to RUN_DIR/validation_split.json, exactly as validation
tokenised them, each cut before its last answer. A run without that file (an older lite-sft), or whose file holds
no examples, re-derives its split from the data files instead; too few are topped up with FIXED_PROMPTS, and
the source line says so in its first words. parity.py runs them through every model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lite_sft.artifacts import VALIDATION_SPLIT_FILE
from lite_sft.config import BUILTIN_DATA
from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.tasks.causal_lm.data import load_samples
from lite_sft.tasks.causal_lm.masking import Sample
from lite_sft.tasks.split import held_out

from . import ExportError

SPLIT_FILE = VALIDATION_SPLIT_FILE  # written by `lite-sft tune` when a run starts
# When a run has no such file and its validation data cannot be found: rendered with the run's chat template.
FIXED_PROMPTS = (
    "What is two plus four?",
    "Write one sentence about the sea.",
    "Name three colours.",
    "How are you today?",
)
MAX_PROMPT_TOKENS = 64


@dataclass
class Prompt:
    prompt_ids: list[int]
    """What the reference continues (rendered with the run's chat template, generation prompt added)."""


def held_out_prompts(run_dir: Path, cfg, tokenizer, n: int) -> tuple[list[Prompt], str]:
    """`n` held-out prompts and where they came from: the examples `lite-sft tune` wrote to
    RUN_DIR/validation_split.json, exactly as validation tokenised them (topped up with FIXED_PROMPTS when
    fewer were held out). A run without that file (an older lite-sft), or whose file holds no examples,
    re-derives the split from the data files instead, and the source says so in its first words."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        prompts, source = _derived_prompts(cfg, tokenizer, n)
        return prompts, f"no {SPLIT_FILE} in the run (made by an older lite-sft), so re-derived: {source}"
    split = read_split(path)
    prompts = [p for p in (_split_prompt(ex) for ex in split["examples"]) if p][:n]
    if not prompts:
        prompts, source = _derived_prompts(cfg, tokenizer, n)
        return prompts, (f"{SPLIT_FILE} holds no held-out example (split: {split.get('source')}), "
                         f"so re-derived: {source}")
    source = f"held-out examples in {SPLIT_FILE} ({split.get('source')})"
    return _top_up(prompts, source, cfg, tokenizer, n)


def read_split(path: Path) -> dict:
    """validation_split.json, checked field by field (a malformed file is named, never a traceback)."""
    try:
        split = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} cannot be read as JSON ({err}); delete it to have the parity gate re-derive "
                          "the held-out split from the data files") from err
    examples = split.get("examples") if isinstance(split, dict) else None
    if not isinstance(examples, list):
        raise ExportError(f"{path}: field 'examples' must be a list of held-out examples; delete the file to "
                          "have the parity gate re-derive the split")
    for i, ex in enumerate(examples):
        ids, labels = (ex.get("input_ids"), ex.get("labels")) if isinstance(ex, dict) else (None, None)
        if (not isinstance(ids, list) or not isinstance(labels, list) or len(ids) != len(labels)
                or not all(isinstance(t, int) for t in ids + labels)):
            raise ExportError(f"{path}: examples[{i}] needs 'input_ids' and 'labels', lists of token ids of the "
                              "same length; delete the file to have the parity gate re-derive the split")
    return split


def _split_prompt(example: dict) -> Prompt | None:
    """Prompt = the ids before the example's last trained run (its last answer)."""
    ids, labels = example["input_ids"], example["labels"]
    trained = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return None
    start = trained[-1]
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start == 0:
        return None
    return Prompt(ids[:start][-MAX_PROMPT_TOKENS:])


def _derived_prompts(cfg, tokenizer, n: int) -> tuple[list[Prompt], str]:
    """The split re-derived from the data files by seed, topped up from FIXED_PROMPTS (older runs)."""
    d = cfg.data
    rule = held_out(d, cfg.train.seed)  # the rule training split by (lite_sft/tasks/split.py)
    try:
        if rule.kind == "file":
            _, samples = load_samples(rule.path, d.format, d.split, role="validation")
            source = f"validation data {rule.path}"
        elif rule.kind == "builtin":
            _, samples = load_samples(BUILTIN_DATA, d.format, d.split, role="validation")
            source = "the bundled validation set"
        elif rule.kind == "fraction":
            # The same seeded split training made, if the data file has not changed since.
            samples = rule.split(load_samples(rule.path, d.format, d.split)[1])[1]
            source = f"held-out split of {rule.path} (fraction {rule.fraction}, seed {rule.seed})"
        else:
            samples, source = [], "fixed prompts (the run held out no validation data)"
        prompts = [p for p in (_render(s, tokenizer, d.system_prompt) for s in samples[:n]) if p]
    except Exception as err:  # a moved data file, a hub set offline: the gate still runs, and says so
        prompts, source = [], f"fixed prompts (validation data unavailable: {err})"
    return _top_up(prompts, source, cfg, tokenizer, n)


def _top_up(prompts: list[Prompt], source: str, cfg, tokenizer, n: int) -> tuple[list[Prompt], str]:
    """Too few held out (or none): make up the number with FIXED_PROMPTS, and say so in the source."""
    if len(prompts) >= n:
        return prompts, source
    d = cfg.data
    chat = bool(tokenizer.chat_template) and d.format not in ("prompt_completion", "text")
    extra = [Sample("fixed", messages=[{"role": "user", "content": q}]) if chat else Sample("fixed", text=q)
             for q in FIXED_PROMPTS[:n - len(prompts)]]
    source = (f"{len(prompts)} from {source} + {len(extra)} fixed prompts" if prompts
              else source if source.startswith("fixed") else "fixed prompts")
    return prompts + [_render(s, tokenizer, d.system_prompt) for s in extra], source


def _render(sample, tokenizer, system_prompt: str | None) -> Prompt | None:
    """Prompt = everything before the last assistant turn, rendered as generation would render it."""
    def encode(text: str, special: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]

    if sample.messages is not None:
        messages = list(sample.messages)
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        if last == 0:
            return None
        text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        prompt = encode(text, False)  # the template writes its own special tokens
    elif sample.prompt is not None:
        prompt = encode(sample.prompt, True)
    else:
        text = encode(sample.text or "", True)
        prompt = text[:max(1, min(len(text) // 2, 32))]
    if not prompt:
        return None
    return Prompt(prompt[-MAX_PROMPT_TOKENS:])
