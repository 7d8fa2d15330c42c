"""What the benchmarks share: a small chat data set, a locally trained tokenizer, how a fresh process
measures its own peak memory, the CPU's name, and how a result is saved.

Random-weight models give honest time and memory figures (the arithmetic does not depend on the
weights' values); the data only has to exercise the chat template and the masking.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "the quick brown fox jumps over the lazy dog hello there how are you a plan a canal panama".split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
CHATML = ["<|im_start|>", "<|im_end|>"]


def write_chat_data(path: Path, n: int = 64) -> Path:
    """n one-turn conversations of 3-12 words a message, in OpenAI `messages` format."""
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))},
        {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))}]}) + "\n"
        for _ in range(n)))
    return path


def bpe_tokenizer():
    """A byte-level BPE trained on WORDS, with the default ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lite_sft.tasks.causal_lm.masking import DEFAULT_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS + CHATML, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def random_llama(dims: tuple[int, ...], path: Path, tokenizer, max_positions: int) -> int:
    """Save a random-weight Llama (hidden, layers, intermediate, heads, kv heads, vocabulary) with
    `tokenizer` into `path`, seeded; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab = dims
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.num_parameters()


def one_step_run(base: Path, data: Path, out: Path, quant: str = "none") -> Path:
    """A real run directory from one LoRA step on `base`: what export and serving start from."""
    from lite_sft.config import load_config
    from lite_sft.train import tune

    tune(load_config(None, {
        "model.name_or_path": str(base), "model.quant": quant, "data.path": str(data), "data.max_seq_len": 64,
        "data.validation_fraction": 0.1, "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0,
        "train.max_steps": 1, "train.micro_batch_size": 2, "train.lr": 1e-2, "train.warmup_ratio": 0.0,
        "train.eval_every": 0, "train.save_every": 0, "output_dir": str(out)}), overwrite=True)
    return out


def _status(field: str) -> int | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def reset_peak() -> int:
    """Start a fresh peak-RSS count (Linux: writing 5 to clear_refs resets VmHWM); returns the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak includes the imports; `working` is then an upper bound
    return _status("VmRSS") or peak_rss()


def peak_rss() -> int:
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def save_result(kind: str, result: dict) -> Path:
    """Print the one JSON line, then save it as benchmarks/results/<kind>-<UTC time>.json."""
    print(json.dumps(result))
    out = RESULTS / f"{kind}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved benchmarks/results/{out.name}", file=sys.stderr)
    return out
