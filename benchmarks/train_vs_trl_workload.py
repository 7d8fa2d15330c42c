"""The workload of benchmarks/train_vs_trl.py: a random-weight model from an architecture's config, a
word-level tokenizer whose every entry is a synthetic word, and one-turn chats of lognormal length.

    workload = prepare_workload("llama35m", None, None, Path("/tmp/work"), cuda=False)
    workload["model_dir"], workload["paths"]["train_messages"], workload["length"]["mean"]

The words are drawn with Zipfian frequencies (rank r with weight 1/r, shortest words most frequent,
as in real text), so every vocabulary entry is in use and the output layer's work is real. Each chat
is written twice with the same content: `{"messages": [...]}` for lite-sft and conversational
`{"prompt": [...], "completion": [...]}` for TRL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PRESETS = {
    # The CPU default: ~35M parameters, most of them in the untied 32k embedding and output layer.
    "llama35m": {"config": {"model_type": "llama", "hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1024,
                            "num_attention_heads": 6, "num_key_value_heads": 6, "tie_word_embeddings": False},
                 "vocab": 32000, "max_seq_len": 1024, "train": 512, "validation": 64, "median": 200},
    "quick": {"config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
              "vocab": 4000, "max_seq_len": 256, "train": 48, "validation": 16, "median": 50},
    # Qwen/Qwen2.5-0.5B's config.json, written out.
    "qwen0.5b": {"config": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
                            "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24},
                 "vocab": 151936, "max_seq_len": 2048, "train": 2000, "validation": 200, "median": 200},
    # meta-llama/Llama-3.1-8B's config.json, written out.
    "llama8b": {"config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                           "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
                "vocab": 128256, "max_seq_len": 2048, "train": 1000, "validation": 100, "median": 200},
}


def word_types(n: int) -> list[str]:
    """n distinct pronounceable words, shortest first (consonant-vowel syllables)."""
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    words, layer = [], [""]
    while len(words) < n:
        layer = [w + s for w in layer for s in syllables]
        words += layer[:n - len(words)]
    return words


def build_tokenizer(vocab_size: int):
    """Word-level, one token per word; ChatML template, eos <|im_end|>, pad <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lite_sft.tasks.causal_lm.masking import DEFAULT_CHAT_TEMPLATE

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    head = specials + ["system", "user", "assistant"]
    vocab = {t: i for i, t in enumerate(head + word_types(vocab_size - len(head)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def write_data(work: Path, preset: dict, tokenizer, n_train: int, n_val: int) -> dict:
    """train/validation JSONL in both formats; lengths lognormal around the preset's median."""
    import itertools
    import random

    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w not in ("system", "user", "assistant")]
    words.sort(key=lambda w: (len(w), w))  # shortest first: rank = frequency order, as in real text
    cum = list(itertools.accumulate(1 / (r + 1) for r in range(len(words))))  # Zipf, s = 1
    max_len, paths = preset["max_seq_len"], {}
    for split, n, seed in (("train", n_train, 1), ("validation", n_val, 2)):
        rng = random.Random(seed)
        chats = []
        for _ in range(n):
            total = max(16, min(round(rng.lognormvariate(math.log(preset["median"]), 0.75)), 2 * max_len))
            body = total - 6  # the template's tokens: <|im_start|> role ... <|im_end|>, twice
            prompt = min(max(2, round(body * rng.uniform(0.15, 0.6))), max_len // 2)
            text = lambda k: " ".join(rng.choices(words, cum_weights=cum, k=k))  # noqa: E731
            chats.append(({"role": "user", "content": text(prompt)},
                          {"role": "assistant", "content": text(max(2, body - prompt))}))
        for fmt, record in (("messages", lambda u, a: {"messages": [u, a]}),
                            ("prompt_completion", lambda u, a: {"prompt": [u], "completion": [a]})):
            path = paths[f"{split}_{fmt}"] = work / f"{split}.{fmt}.jsonl"
            path.write_text("".join(json.dumps(record(u, a)) + "\n" for u, a in chats))
        if split == "train":
            lengths = sorted(min(len(tokenizer.apply_chat_template(list(c), return_dict=False)), max_len) for c in chats)
    pick = lambda p: lengths[min(len(lengths) - 1, math.ceil(p / 100 * len(lengths)) - 1)]  # noqa: E731
    return {"paths": {k: str(v) for k, v in paths.items()},
            "length": {"p50": pick(50), "p90": pick(90), "p99": pick(99), "max": lengths[-1],
                       "mean": sum(lengths) / len(lengths), "at_limit": sum(n >= max_len for n in lengths)}}


def build_model(preset: dict, tokenizer, out: Path, cuda: bool) -> int:
    """A random-weight model from the preset's config, saved with the tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(preset["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, vocab_size=len(tokenizer), bos_token_id=None,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # 8B parameters initialise in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    params = model.num_parameters()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return params


def prepare_workload(model: str, n_train: int | None, n_val: int | None, work: Path, cuda: bool) -> dict:
    """Build (or reuse, when the same settings built it before) the model, tokenizer and data in `work`."""
    preset = PRESETS[model]
    key = {"model": model, "preset": preset, "train": n_train or preset["train"],
           "validation": n_val or preset["validation"], "cuda": cuda, "version": 1}
    stamp = work / "workload.json"
    if stamp.is_file() and json.loads(stamp.read_text())["key"] == key:
        return json.loads(stamp.read_text())["workload"]
    tokenizer = build_tokenizer(preset["vocab"])
    data = write_data(work, preset, tokenizer, key["train"], key["validation"])
    params = build_model(preset, tokenizer, work / "model", cuda)
    workload = {"model": model, "model_dir": str(work / "model"), "params": params, "vocab": len(tokenizer),
                "max_seq_len": preset["max_seq_len"], "train_examples": key["train"],
                "validation_examples": key["validation"], **data}
    stamp.write_text(json.dumps({"key": key, "workload": workload}, indent=2))
    return workload
