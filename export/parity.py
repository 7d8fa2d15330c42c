"""The parity gate: does an exported artefact still behave like the model that was trained?

    lite-sft export runs/demo --out exports/demo          # every stage is gated; see parity.json

For each held-out prompt the reference model generates a greedy continuation; both models then score
the whole sequence (prompt + continuation) and we compare their logits position by position:

  * max and mean absolute logit difference over every position;
  * greedy agreement: the share of continuation positions where both pick the same next token. The
    candidate scores the sequence teacher-forced, so one early disagreement does not derail the rest.

An ONNX candidate reads the prompt in one call and then the continuation one token at a time through
its KV cache, so the gate checks the decoding path a server uses, not just one full forward pass; then
the shortest and the longest prompt again, together, left-padded into one batch as a server runs them,
judged with the same thresholds. Thresholds per artefact precision are in THRESHOLDS, with the
measurements behind them.

The prompts are the held-out examples `lite-sft tune` wrote to RUN_DIR/validation_split.json; a run
without them re-derives its split from the data files, and the prompts' source says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Precision of the artefact -> what it must reach against its reference. fp32 must decide every token as
# the reference does, with logits equal to rounding. Lower precisions are judged on greedy agreement and
# on the MEAN absolute difference: the max over every position and vocabulary entry is an extreme value
# that grows with vocabulary and length, and on a trained model one int4 logit moves by 0.65 of the logit
# scale while 97% of tokens still agree. Differences are relative to max(1, the reference's largest
# |logit|), so one rule serves logits of size 0.5 and of size 30. The thresholds leave a margin over what
# was measured (the README's export section lists the figures: nine tiny architectures in
# tests/test_export*.py, 10M-700M random-weight Llamas in benchmarks/export.py, the trained demo model).
# --min-agreement overrides the agreement threshold of every gate.
THRESHOLDS = {
    "float32": {"min_agreement": 1.0, "max_abs_rel": 1e-3},
    "float16": {"min_agreement": 0.95, "mean_abs_rel": 1e-3},
    "bfloat16": {"min_agreement": 0.90, "mean_abs_rel": 5e-3},
    "int8": {"min_agreement": 0.85, "mean_abs_rel": 2e-2},
    "int4": {"min_agreement": 0.70, "mean_abs_rel": 5e-2},
}

# Two tokens whose reference logits differ by less than this share of the logit scale are a tie: which one
# a candidate picks is rounding (fp32 summation order, bf16-trained adapters merged into fp16), not the model.
# Such a flip is counted as agreement, so one of them on a short prompt (14 positions: 93%) cannot fail a gate
# whose logits are otherwise equal; a flip past a real margin still counts at every precision.
TIE_REL = 1e-3

# Written by `lite-sft tune` when a run starts: the held-out examples as validation tokenised them.
SPLIT_FILE = "validation_split.json"
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


@dataclass
class Reference:
    """What the reference model did on the held-out prompts; small enough to keep while it is freed."""

    sequences: list[torch.Tensor]  # each (1, prompt + continuation)
    prompt_lens: list[int]
    logits: list[torch.Tensor]  # each (seq, vocab), fp32, teacher-forced
    perplexity: float | None = None
    """On the run's held-out examples (perplexity.py), set by the task's checks."""

    def subset(self, rows: list[int]) -> "Reference":
        return Reference([self.sequences[i] for i in rows], [self.prompt_lens[i] for i in rows],
                         [self.logits[i] for i in rows], self.perplexity)

    def batch_rows(self) -> list[int]:
        """The two prompts a batched check runs together: the shortest and the longest, so the shorter
        is left-padded (the first two when all are the same length; a single prompt runs alone)."""
        order = sorted(range(len(self.prompt_lens)), key=lambda i: (self.prompt_lens[i], i))
        return [order[0], order[-1]] if len(order) > 1 else order


@dataclass
class Gate:
    stage: str
    """merge, onnx, int8 or int4."""
    artefact: str
    """The folder it judges, relative to the output folder."""
    precision: str
    reference: str
    max_abs_diff: float
    mean_abs_diff: float
    greedy_agreement: float
    positions: int
    logit_scale: float
    """The reference's largest absolute logit; differences are judged relative to it."""
    thresholds: dict
    passed: bool
    ties: int = 0
    """Positions where the two picked tokens' reference logits are within TIE_REL of the scale: counted as agreeing."""
    extra: dict = field(default_factory=dict)
    """Sizes on disk, perplexities: whatever the stage measured besides parity."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


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
    from . import ExportError

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
    from lite_sft.tasks.base import IGNORE_INDEX

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
    from lite_sft.config import BUILTIN_DATA
    from lite_sft.tasks.causal_lm.data import load_samples
    from lite_sft.tasks.split import split_validation

    d = cfg.data
    try:
        if d.validation_path:
            _, samples = load_samples(d.validation_path, d.format, d.split, role="validation")
            source = f"validation data {d.validation_path}"
        elif d.validation_fraction > 0 and d.path == BUILTIN_DATA:
            _, samples = load_samples(BUILTIN_DATA, d.format, d.split, role="validation")
            source = "the bundled validation set"
        elif d.validation_fraction > 0:
            # The same seeded split training made, if the data file has not changed since.
            samples = split_validation(load_samples(d.path, d.format, d.split)[1], d.validation_fraction,
                                       cfg.train.seed)[1]
            source = f"held-out split of {d.path} (fraction {d.validation_fraction}, seed {cfg.train.seed})"
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
    from lite_sft.tasks.causal_lm.masking import Sample

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


@torch.no_grad()
def make_reference(model, prompts: list[Prompt], new_tokens: int, eos_ids=None, pad_id: int | None = None) -> Reference:
    """Greedy continuations of each prompt by `model` (PyTorch), and its logits over each whole sequence."""
    from transformers import GenerationConfig

    model.eval()
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=eos_ids, pad_token_id=pad_id)
    sequences, logits = [], []
    for p in prompts:
        ids = torch.tensor([p.prompt_ids])
        # min_new_tokens holds EOS back so every prompt yields the same number of compared positions.
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        sequences.append(seq)
        logits.append(model(input_ids=seq, use_cache=False).logits[0].float())  # (seq, vocab)
    return Reference(sequences, [len(p.prompt_ids) for p in prompts], logits)


@torch.no_grad()
def torch_logits(model, ref: Reference) -> list[torch.Tensor]:
    """A PyTorch candidate's logits over each reference sequence, one forward pass each."""
    model.eval()
    return [model(input_ids=seq, use_cache=False).logits[0].float() for seq in ref.sequences]


@torch.no_grad()
def ort_logits(ort_model, ref: Reference) -> list[torch.Tensor]:
    """An exported decoder's logits (ort_decoder.OnnxDecoder): the prompt in one call, then one token at a time
    via the KV cache."""
    out = []
    for seq, n in zip(ref.sequences, ref.prompt_lens):
        step = ort_model(input_ids=seq[:, :n], attention_mask=torch.ones_like(seq[:, :n]), use_cache=True)
        rows, past = [step.logits[0].float()], step.past_key_values
        for t in range(n, seq.shape[1]):
            step = ort_model(input_ids=seq[:, t:t + 1], attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                             past_key_values=past, use_cache=True)
            rows.append(step.logits[0].float())
            past = step.past_key_values
        out.append(torch.cat(rows))  # (seq, vocab)
    return out


@torch.no_grad()
def ort_batch_logits(ort_model, ref: Reference) -> list[torch.Tensor]:
    """ort_logits for the reference's sequences run together as a server runs them: padded to one length, the
    continuation one token per row per step. Left-padded, positions counting real tokens only; a
    GroupQueryAttention graph (`pad_right`) takes its rows padded on the right instead, each row's mask then
    covering its own tokens and the one it adds (ort_decoder.py says why). Every sequence has the same number of
    continuation tokens (make_reference generates a fixed number)."""
    seqs, lens = ref.sequences, ref.prompt_lens
    new = {s.shape[1] - n for s, n in zip(seqs, lens)}
    if len(new) != 1:
        raise ValueError(f"batched parity needs continuations of one length, got {sorted(new)}")
    right = getattr(ort_model, "pad_right", False)
    width = max(lens)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    spans = [slice(0, n) if right else slice(width - n, width) for n in lens]  # each row's prompt columns
    for row, (seq, n) in enumerate(zip(seqs, lens)):
        ids[row, spans[row]], mask[row, spans[row]] = seq[0, :n], 1
    # Graphs without position_ids (Gemma) count padding as positions; rotary embeddings make that a shift.
    positions = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)} if "position_ids" in ort_model.input_names else {}
    step = ort_model(input_ids=ids, attention_mask=mask, use_cache=True, **positions)
    rows = [[step.logits[row, spans[row]].float()] for row in range(len(seqs))]
    past = step.past_key_values
    for t in range(new.pop()):
        tokens = torch.stack([seq[0, n + t] for seq, n in zip(seqs, lens)]).unsqueeze(1)  # (batch, 1)
        if right:  # row r holds lens[r] + t tokens and adds one: ones over those, zeros after
            have = torch.tensor(lens) + t
            mask = (torch.arange(width + t + 1) <= have[:, None]).long()
        else:
            mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=torch.long)], dim=1)
        if positions:
            positions = {"position_ids": mask.sum(1, keepdim=True) - 1}
        step = ort_model(input_ids=tokens, attention_mask=mask, past_key_values=past, use_cache=True, **positions)
        for row in range(len(seqs)):
            rows[row].append(step.logits[row].float())
        past = step.past_key_values
    return [torch.cat(r) for r in rows]  # each (seq, vocab)


def compare(ref: Reference, candidate: list[torch.Tensor], *, stage: str, artefact: str, precision: str,
            reference: str, min_agreement: float | None = None, tolerance: str | None = None,
            thresholds: dict | None = None) -> Gate:
    """Judge `candidate` logits against the reference's with `thresholds`, by default the THRESHOLDS of
    `tolerance` (itself by default the candidate's precision); `min_agreement` overrides the agreement one."""
    thresholds = dict(thresholds or THRESHOLDS[tolerance or precision])
    if min_agreement is not None:
        thresholds["min_agreement"] = min_agreement
    max_abs, abs_sum, cells, agree, ties, positions = 0.0, 0.0, 0, 0, 0, 0
    scale = max((r.abs().max().item() for r in ref.logits), default=0.0)
    unit = max(scale, 1.0)
    for r, c, n in zip(ref.logits, candidate, ref.prompt_lens):
        if c.shape != r.shape:
            raise ValueError(f"{stage}: candidate logits {tuple(c.shape)} do not match the reference's "
                             f"{tuple(r.shape)}")
        diff = (r - c).abs()
        max_abs, abs_sum, cells = max(max_abs, diff.max().item()), abs_sum + diff.sum().item(), cells + diff.numel()
        # Position t predicts token t + 1: compare from the last prompt position through the continuation.
        judged = r[n - 1:]  # (positions, vocab)
        picked, theirs = judged.argmax(-1), c[n - 1:].argmax(-1)
        margin = judged.gather(-1, picked[:, None]) - judged.gather(-1, theirs[:, None])  # (positions, 1)
        tied = (picked != theirs) & (margin[:, 0] <= TIE_REL * unit)
        agree, ties = agree + int((picked == theirs).sum()) + int(tied.sum()), ties + int(tied.sum())
        positions += r.shape[0] - (n - 1)
    agreement, mean_abs = agree / max(positions, 1), abs_sum / max(cells, 1)
    passed = (agreement >= thresholds["min_agreement"] and max_abs <= thresholds.get("max_abs_rel", math.inf) * unit
              and mean_abs <= thresholds.get("mean_abs_rel", math.inf) * unit)
    return Gate(stage, artefact, precision, reference, max_abs, mean_abs, agreement, positions, scale, thresholds,
                passed, ties)


def batch_check(gate: Gate, ref: Reference, candidate: list[torch.Tensor], rows: list[int] | None = None,
                input_lengths: list[int] | None = None, side: str = "left") -> None:
    """Judge a batched run of ref's `rows` (default: ort_batch_logits on ref.batch_rows(), prompts padded on
    `side`) with the gate's own thresholds. The gate passes only if the batch does too; gate.extra gets the
    batch's figures and whether it passed alone. `input_lengths`: the rows' unpadded lengths, for inputs padded
    on the right (the classic tasks' encoders), reported as such."""
    rows = ref.batch_rows() if rows is None else rows
    batch = compare(ref.subset(rows), candidate, stage=gate.stage, artefact=gate.artefact, precision=gate.precision,
                    reference=gate.reference, thresholds=gate.thresholds)
    if input_lengths is None:
        lengths = [ref.prompt_lens[i] for i in rows]
        shape = {"prompt_lengths": lengths, f"{side}_padding": max(lengths) - min(lengths), "padding_side": side}
    else:
        shape = {"input_lengths": input_lengths, "padding": max(input_lengths) - min(input_lengths)}
    gate.extra["passed_alone"] = gate.passed
    gate.extra["batch"] = {"rows": len(rows), **shape, "max_abs_diff": batch.max_abs_diff,
                           "mean_abs_diff": batch.mean_abs_diff, "greedy_agreement": batch.greedy_agreement,
                           "positions": batch.positions, "ties": batch.ties, "passed": batch.passed}
    gate.passed = gate.passed and batch.passed


def format_report(gates: list[Gate], source: str, agreement: str = "greedy", perplexity_on: str | None = None) -> str:
    """The table printed after an export (and on failure, so the user sees why); `agreement` heads the
    agreement column (the classic tasks agree on labels, not greedy tokens); causal-lm: a last line with
    each model's perplexity on `perplexity_on`."""
    lines = [f"parity on {source}:",
             f"  {'stage':<6} {'artefact':<11} {'precision':<9} {'max |dlogit|':>12} {'mean':>9} "
             f"{agreement:>7} {'needs':>6}  result"]
    for g in gates:
        batch = g.extra.get("batch")
        alone = g.extra.get("passed_alone", g.passed)
        lines.append(f"  {g.stage:<6} {g.artefact:<11} {g.precision:<9} {g.max_abs_diff:>12.2e} "
                     f"{g.mean_abs_diff:>9.1e} {g.greedy_agreement:>7.1%} {g.thresholds['min_agreement']:>6.0%}  "
                     + ("pass" if alone else "FAIL"))
        if batch:
            if "prompt_lengths" in batch:
                shape = (f"{batch.get('padding_side', 'left')}-padded: prompts of "
                         f"{' and '.join(map(str, batch['prompt_lengths']))} tokens")
            else:
                shape = f"padded: inputs of {min(batch['input_lengths'])} to {max(batch['input_lengths'])} tokens"
            lines.append(f"  {'':<6} {'batch of ' + str(batch['rows']):<21} {batch['max_abs_diff']:>12.2e} "
                         f"{batch['mean_abs_diff']:>9.1e} {batch['greedy_agreement']:>7.1%} "
                         f"{g.thresholds['min_agreement']:>6.0%}  {'pass' if batch['passed'] else 'FAIL'}  ({shape})")
        if g.extra.get("size_bytes_before") is not None:
            lines.append(f"         size: {g.extra['size_bytes_before'] / 2**20:.2f} MiB -> "
                         f"{g.extra['size_bytes_after'] / 2**20:.2f} MiB")
    if perplexity_on is not None and gates:
        figures = [("adapter model", gates[0].extra.get("perplexity_reference"))]
        figures += [(f"{g.artefact}/", g.extra.get("perplexity")) for g in gates]
        measured = [f"{name} {value:.4f}" for name, value in figures if value is not None]
        lines.append(f"perplexity on {perplexity_on}: {', '.join(measured)}" if measured
                     else f"perplexity: {perplexity_on}")
    return "\n".join(lines)
