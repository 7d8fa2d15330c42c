"""The embedded default: a tiny random-weight Llama, a tokenizer trained here, and a skill to learn.

    python -m lite_sft.tiny --write-assets     # regenerate lite_sft/assets/skill_{train,eval}.jsonl
    lite-sft tune                              # tunes builtin:tiny-llama on builtin:skill

The skill is reversing a string of digits ("Write 40817 backwards." -> "71804"). It won an
experiment (LoRA only, frozen random base, 2 CPU cores) against echoing a name into a template (84%
held-out exact match after 600 steps), reversing capital letters (99% after 600) and sorting digits
(100% after 100, but every sorted answer is also a training answer, so it can be memorised);
reversing digits reached 99% after 300. It cannot be memorised: no held-out string, nor its
reverse, is in the training set. The tokenizer splits digits one per token (as Llama's does), so
reversing is a reordering of tokens, which attention can learn.

Nothing here needs the network: the model is built from a config with seeded random weights, so the
same call always gives bit-identical weights and export can rebuild the exact base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from lite_sft.config import lite_sft_home
from lite_sft.stops import stop_ids as decide_stop_ids
from lite_sft.tasks.causal_lm.masking import DEFAULT_CHAT_TEMPLATE

# Bump when anything that shapes the built model changes in code (not data or config: those are
# hashed into the folder name), so a stale cached folder is never reused.
RECIPE_VERSION = 1
SEED = 0  # seeds both the bundled data and the random weights

PAD, IM_START, IM_END = "<|pad|>", "<|im_start|>", "<|im_end|>"

N_TRAIN, N_EVAL = 2000, 200
DIGITS_MIN, DIGITS_MAX = 3, 6
# Three phrasings, each with the number followed by a short suffix. Two more ("Reverse this number:
# {x}", "Read {x} from right to left.") cut held-out exact match after 500 steps to 78-98%.
PROMPTS = (
    "Reverse the digits of {x}.",
    "Write {x} backwards.",
    "What is {x} reversed?",
)



def _record(rng: random.Random, digits: str) -> dict:
    prompt = rng.choice(PROMPTS).format(x=digits)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": digits[::-1]}]}


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(DIGITS_MIN, DIGITS_MAX)))


def generate_skill_data(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[dict], list[dict]]:
    """Train and held-out records in `messages` format; no held-out string or its reverse is in train."""
    rng = random.Random(seed)
    held_out: list[str] = []
    while len(held_out) < n_eval:
        d = _digits(rng)
        if d not in held_out:
            held_out.append(d)
    # A train string equal to a held-out one's reverse would show its answer in a training prompt.
    banned = set(held_out) | {d[::-1] for d in held_out}
    train: list[str] = []
    while len(train) < n_train:
        d = _digits(rng)
        if d not in banned:
            train.append(d)
    return [_record(rng, d) for d in train], [_record(rng, d) for d in held_out]


def _assets() -> Path:
    return Path(__file__).parent / "assets"


def _read_jsonl(name: str) -> list[dict]:
    text = (resources.files("lite_sft.assets") / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_skill_train() -> list[dict]:
    """The bundled training records (lite_sft/assets/skill_train.jsonl)."""
    return _read_jsonl("skill_train.jsonl")


def load_skill_eval() -> list[dict]:
    """The bundled held-out records (lite_sft/assets/skill_eval.jsonl)."""
    return _read_jsonl("skill_eval.jsonl")


def write_assets(folder: Path | None = None) -> tuple[Path, Path]:
    folder = folder or _assets()
    train, held_out = generate_skill_data()
    paths = folder / "skill_train.jsonl", folder / "skill_eval.jsonl"
    for path, records in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on `texts`, digits one per token, ChatML special tokens.

    Byte-level means any text encodes and decodes exactly (no unknown token). Digits are split off
    before BPE so no merge ever spans two of them: the skill then sees one token per digit.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=IM_END,
                                        additional_special_tokens=[IM_START],
                                        model_input_names=["input_ids", "attention_mask"])  # no token_type_ids
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _tokenizer_texts(records: list[dict]) -> list[str]:
    # The chat template's own words ("user", "assistant") and newlines, without its special tokens,
    # which the BPE trainer would otherwise split into bytes and merge.
    return [f"{m['role']}\n{m['content']}\n" for r in records for m in r["messages"]]


# The demo model's shape: 2 layers of width 128 learn the skill as well as 4 (measured) and twice as
# fast. Grouped-query attention (2 KV heads for 4) is there so export meets what real Llamas use.
TINY_LLAMA = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.05)


def tiny_llama_config(vocab_size: int, *, pad_token_id: int | None = None, eos_token_id: int | None = None,
                      **overrides):
    """A Llama small enough to tune on two CPU cores in under a minute; `overrides` change TINY_LLAMA.

    initializer_range is 0.05, not Llama's 0.02: the output head stays frozen and random, and at
    0.02 its logits are so small that the loss stalled near 3.1 nats even at 99% exact match, with
    the top logits close together (fragile under a quantised export). At 0.05 it ends near 0.5.
    """
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=None,
                       eos_token_id=eos_token_id, tie_word_embeddings=False, dtype="float32",
                       **{**TINY_LLAMA, **overrides})


def builtin_home() -> Path:
    return lite_sft_home() / "builtin"


def builtin_version(records: list[dict]) -> str:
    """RECIPE_VERSION and a digest of what the build reads, so editing the data or sizes rebuilds."""
    digest = hashlib.sha256(json.dumps([SEED, TINY_LLAMA, records], sort_keys=True).encode())
    return f"{RECIPE_VERSION}-{digest.hexdigest()[:10]}"


_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def materialize_builtin_model(cache_dir: Path | None = None) -> Path:
    """Build `builtin:tiny-llama` once into `<cache_dir>/tiny-llama-<version>` and return that folder.

    cache_dir defaults to $LITE_SFT_HOME/builtin (LITE_SFT_HOME defaults to ~/.cache/lite-sft). The
    folder is written under a temporary name and renamed into place, so one that exists is complete;
    two processes racing both build and the loser's copy is dropped.
    """
    records = load_skill_train()
    parent = Path(cache_dir) if cache_dir is not None else builtin_home()
    target = parent / f"tiny-llama-{builtin_version(records)}"
    if all((target / name).is_file() for name in _REQUIRED):
        return target

    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer(_tokenizer_texts(records))
    tokenizer.model_max_length = TINY_LLAMA["max_position_embeddings"]
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32)

    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder should read like any other
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if all((target / name).is_file() for name in _REQUIRED):
            return target  # another process finished first; its copy is bit-identical
        if target.exists():  # left by something other than this function: never reuse it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not all((target / name).is_file() for name in _REQUIRED):
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def generate_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 16,
                     batch_size: int = 64, stop_ids: list[int] | None = None) -> list[str]:
    """Greedy answers to each record's prompt (its messages but the last), stopped at end of turn.

    `stop_ids` defaults to what lite_sft.stops decides for this tokenizer and model, the list the run
    saves in its generation_config.json. Works on a plain Hugging Face model or a peft one; the
    model's train/eval mode and the tokenizer's padding side are put back afterwards.
    """
    import torch

    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False)
               for r in records]
    stop = stop_ids or decide_stop_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    # Left padding puts every prompt's last token at the same position, where generation continues.
    tokenizer.padding_side = "left"
    model.eval()
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            # The template writes its own special tokens; the tokenizer must not add a BOS as well.
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=pad_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 16, batch_size: int = 64,
                stop_ids: list[int] | None = None) -> float:
    """Fraction of records whose greedy answer, stripped, equals the reference answer, stripped."""
    if not records:
        return 0.0
    answers = generate_answers(model, tokenizer, records, max_new_tokens, batch_size, stop_ids)
    hits = sum(a.strip() == r["messages"][-1]["content"].strip() for a, r in zip(answers, records))
    return hits / len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lite_sft.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--write-assets", action="store_true", help="regenerate lite_sft/assets/skill_*.jsonl")
    parser.add_argument("--materialize", action="store_true", help="build the tiny model and print its folder")
    args = parser.parse_args(argv)
    if not (args.write_assets or args.materialize):
        parser.error("nothing to do: pass --write-assets and/or --materialize")
    if args.write_assets:
        for path in write_assets():
            print(path)
    if args.materialize:
        print(materialize_builtin_model())


if __name__ == "__main__":
    main()
