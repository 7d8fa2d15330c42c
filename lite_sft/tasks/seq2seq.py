"""seq2seq: a source text to a target text (translation, summarisation) with an encoder-decoder (T5, BART).

    lite-sft tune --task seq2seq --model google-t5/t5-small --data train.jsonl --source-column document \
        --target-column summary --max-target-len 64 --num-beams 4 --output-dir runs/summaries
    lite-sft eval runs/summaries --data test.jsonl          # val_loss, BLEU, ROUGE-1/2/L, exact match

    pairs = read_seq2seq("news.jsonl", source_column="document", target_column="summary")
    pairs[0]            # Seq2SeqRecord(where='news.jsonl line 1', source='...', target='...')

Both texts must be non-empty: an empty target teaches the model to stop at once, an empty source
gives it nothing to condition on. The encoder reads the source; the decoder is taught the target by
teacher forcing, the model itself shifting the labels right behind its decoder_start_token_id (T5's
pad, BART's </s>), and the loss counts target tokens only. The model keeps its own LM head: LoRA
adapts the attention and feed-forward layers, and the shared embedding and the output layer stay frozen.
Evaluation generates from each validation source with the run's generation settings, which the run
saves as RUN_DIR/generation_config.json for `lite-sft eval` and export to generate as training did.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from lite_sft.artifacts import GENERATION_CONFIG
from lite_sft.errors import ModelError
from lite_sft.tasks.base import IGNORE_INDEX, Task, TaskData, all_sum, gather, is_decoder_only
from lite_sft.tasks.metrics import bleu, rouge
from lite_sft.tasks.split import held_out
from lite_sft.tasks.table import read_table, text_field

SAVED_SETTINGS = ("max_new_tokens", "num_beams", "decoder_start_token_id", "eos_token_id", "pad_token_id")
# Validation examples shown in the evaluation's report, so a figure can be read against what it measures.
SHOWN_SAMPLES = 5


@dataclass
class Seq2SeqRecord:
    where: str
    """The file and line: "train.jsonl line 3"."""
    source: str
    target: str


def read_seq2seq(path: str | Path, *, source_column: str = "source",
                 target_column: str = "target") -> list[Seq2SeqRecord]:
    table = read_table(path)
    table.require(source_column, "task.source_column")
    table.require(target_column, "task.target_column")
    return [Seq2SeqRecord(row.where, text_field(row, source_column), text_field(row, target_column))
            for row in table.rows]


@dataclass
class Seq2SeqRow:
    """One tokenised pair: the encoder's input, the decoder's labels (ending with EOS), the reference text."""

    input_ids: list[int]
    labels: list[int]
    target: str
    """The target as the data wrote it: what BLEU and ROUGE compare the generated text with."""

    def __len__(self) -> int:
        return len(self.input_ids) + len(self.labels)


def tokenize_pairs(records: list[Seq2SeqRecord], tokenizer, max_source: int,
                   max_target: int) -> tuple[list[Seq2SeqRow], int, int]:
    """Rows, and how many sources and targets were truncated. A target always ends with EOS, truncated or not:
    without it the model never learns where to stop."""
    rows, cut_sources, cut_targets = [], 0, 0
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(f"{type(tokenizer).__name__} has no eos_token, so the decoder cannot learn where a target "
                         "ends; set tokenizer.eos_token in the model's tokenizer_config.json")
    for r in records:
        source = tokenizer(r.source, truncation=False, verbose=False)["input_ids"]
        if len(source) > max_source:
            source = tokenizer(r.source, truncation=True, max_length=max_source)["input_ids"]
            cut_sources += 1
        # text_target: tokenizers that mark the target language (mBART, Marian, NLLB) do so here.
        target = list(tokenizer(text_target=r.target, truncation=False, verbose=False)["input_ids"])
        if not target or target[-1] != eos:
            target.append(eos)  # a tokenizer that adds no EOS of its own (T5's and BART's both do)
        if len(target) > max_target:
            target = target[:max_target - 1] + [eos]
            cut_targets += 1
        rows.append(Seq2SeqRow(list(source), target, r.target))
    return rows, cut_sources, cut_targets


def generation_settings(model, max_new_tokens: int, num_beams: int):
    """The model's own GenerationConfig with the run's length and beams, and the ids every decoder needs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen = copy.deepcopy(base.generation_config)
    gen.update(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, use_cache=True)
    for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, name, None) is None:
            setattr(gen, name, getattr(base.config, name, None))
    if num_beams == 1:  # a base's beam settings (BART's early_stopping, length_penalty) mean nothing greedy
        gen.early_stopping, gen.length_penalty = False, 1.0
    return gen


def save_generation_settings(run_dir, gen) -> Path:
    """Write RUN_DIR/generation_config.json (only what differs from transformers' defaults, as it saves them)."""
    settings = gen.to_diff_dict()
    # Written even where they equal transformers' defaults (num_beams 1): readers other than transformers
    # (export's gate, the server) take them from this file as they are.
    settings.update({name: getattr(gen, name) for name in SAVED_SETTINGS})
    # Marked as made from config.json, transformers' generate() may rebuild it from there and drop our settings.
    settings.pop("_from_model_config", None)
    path = Path(run_dir) / GENERATION_CONFIG
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


def load_generation_settings(run_dir):
    """The GenerationConfig a finished run saved, or None for a folder without one."""
    from transformers import GenerationConfig

    if not (Path(run_dir) / GENERATION_CONFIG).is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(str(run_dir))
    except (OSError, ValueError) as err:
        raise ModelError(f"{Path(run_dir) / GENERATION_CONFIG} cannot be read ({err}); delete it to generate with "
                         "the base model's own settings") from err


class Seq2SeqTask(Task):
    """seq2seq: an encoder-decoder taught to write the target of each source, with its own LM head."""

    name = "seq2seq"
    head_names = ()
    unit_name = "target_tokens"

    def __init__(self):
        self.max_new_tokens, self.num_beams = 128, 1
        self.generation = None
        """The GenerationConfig evaluation uses: a finished run's saved one, or built from the model and cfg."""

    def check_model(self, config, name: str) -> None:
        if getattr(config, "is_encoder_decoder", False):
            return
        if is_decoder_only(config):
            raise ModelError(f"{name} is a decoder-only model ({config.model_type}); --task seq2seq needs an "
                             "encoder-decoder such as T5 or BART. Tune a decoder-only model with the default task "
                             "(--task causal-lm) on prompt_completion data: {\"prompt\": ..., \"completion\": ...}")
        raise ModelError(f"{name} ({config.model_type}) is not an encoder-decoder; --task seq2seq needs one, such as "
                         "T5 or BART")

    def prepare(self, cfg, tokenizer) -> TaskData:
        k, d = cfg.task, cfg.data
        self.max_new_tokens, self.num_beams = k.max_new_tokens, k.num_beams
        records = read_seq2seq(d.path, source_column=k.source_column, target_column=k.target_column)
        rule = held_out(d, cfg.train.seed)
        if rule.kind == "file":
            held = read_seq2seq(rule.path, source_column=k.source_column, target_column=k.target_column)
        else:
            records, held = rule.split(records)
        max_source, max_target = self.max_lens(cfg, tokenizer)
        train, src_cut, tgt_cut = tokenize_pairs(records, tokenizer, max_source, max_target)
        validation, src_cut_val, tgt_cut_val = tokenize_pairs(held, tokenizer, max_source, max_target)
        summary = (f"{len(train)} train / {len(validation)} validation pairs, "
                   f"{sum(len(r.labels) for r in train)} target tokens; {src_cut + src_cut_val} sources truncated "
                   f"to {max_source} tokens, {tgt_cut + tgt_cut_val} targets to {max_target}")
        return TaskData(train, validation, "seq2seq", summary, (len(train), len(validation)))

    def write_run_files(self, run_dir, cfg, tokenizer, model, data: TaskData) -> None:
        save_generation_settings(run_dir, generation_settings(model, cfg.task.max_new_tokens, cfg.task.num_beams))

    def eval_rows(self, cfg, tokenizer, path: str, run_dir) -> list:
        self.max_new_tokens, self.num_beams = cfg.task.max_new_tokens, cfg.task.num_beams
        self.generation = load_generation_settings(run_dir)
        records = read_seq2seq(path, source_column=cfg.task.source_column, target_column=cfg.task.target_column)
        return tokenize_pairs(records, tokenizer, *self.max_lens(cfg, tokenizer))[0]

    @staticmethod
    def max_lens(cfg, tokenizer) -> tuple[int, int]:
        """Longest source (data.max_seq_len) and target (task.max_target_len), each capped at the tokenizer's
        model_max_length: BART has no position beyond it (1024), and a longer row would fail inside the model."""
        return (min(cfg.data.max_seq_len, tokenizer.model_max_length),
                min(cfg.task.max_target_len, tokenizer.model_max_length))

    def collate(self, rows: list[Seq2SeqRow], tokenizer) -> dict:
        """Right-pad sources (attention_mask marks them) and labels (IGNORE_INDEX). No decoder_input_ids: the
        model shifts the labels right itself. Two rows, pad 0, EOS 1:

            input_ids      [[5, 6, 7, 1], [8, 1, 0, 0]]    attention_mask [[1, 1, 1, 1], [1, 1, 0, 0]]
            labels         [[7, 6, 5, 1], [9, 4, 1, -100]]
        """
        import torch

        source_width, target_width = max(len(r.input_ids) for r in rows), max(len(r.labels) for r in rows)
        pad = tokenizer.pad_token_id
        return {"input_ids": torch.tensor([r.input_ids + [pad] * (source_width - len(r.input_ids)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r.input_ids) + [0] * (source_width - len(r.input_ids))
                                                for r in rows]),
                "labels": torch.tensor([r.labels + [IGNORE_INDEX] * (target_width - len(r.labels)) for r in rows])}

    def units(self, batch: dict) -> float:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model, batch: dict, device, loss_impl: str = "full", chunk: int = 0):
        """Cross-entropy summed over the target tokens (labels that are not IGNORE_INDEX)."""
        import torch.nn.functional as F

        labels = batch["labels"].to(device)
        # Given labels, the model also builds decoder_input_ids from them (and a mean loss, unused: the loop
        # needs the sum, to divide by the whole step's target tokens).
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (batch, target, vocab)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def generate(self, model, batch: dict, tokenizer, device) -> list[str]:
        """The decoded text generated from each source of `batch`, with the run's generation settings."""
        if self.generation is None:
            self.generation = generation_settings(model, self.max_new_tokens, self.num_beams)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             generation_config=self.generation)
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    def evaluate(self, model, rows: list, tokenizer, accelerator, micro_batch_size: int,
                 loss_impl: str = "full", chunk: int = 0) -> dict:
        import torch

        model.eval()
        generator = accelerator.unwrap_model(model)  # DDP's wrapper has no generate()
        total, units, predictions, references, sources = 0.0, 0, [], [], []
        with torch.no_grad():
            for part, batch in self.shard_batches(rows, tokenizer, accelerator, micro_batch_size):
                with accelerator.autocast():
                    total += float(self.loss_sum(model, batch, accelerator.device))
                    predictions += [p.strip() for p in self.generate(generator, batch, tokenizer, accelerator.device)]
                units += self.units(batch)
                references += [r.target for r in part]
                sources += tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        predictions, references = gather(accelerator, predictions), gather(accelerator, references)
        sources = gather(accelerator, sources)
        scores = bleu(predictions, references)
        exact = sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references))
        return {"val_loss": all_sum(accelerator, total) / max(all_sum(accelerator, units), 1),
                "bleu": scores["bleu"], **rouge(predictions, references), "exact_match": exact / len(references),
                "bleu_signature": scores["signature"],
                "samples": [{"source": s, "prediction": p, "reference": r}
                            for s, p, r in list(zip(sources, predictions, references))[:SHOWN_SAMPLES]]}


TASK = Seq2SeqTask  # what lite_sft.tasks.base.get_task builds for the row of taskspec.TASKS naming this module
