"""Tokenizers built locally, so the data tests need no hub.

The word-level tokenizer makes token boundaries obvious: one word is one token, and whitespace
(including the template's newlines) makes no token. Its ids, used to write expected arrays by hand:

    0 <unk>  1 <pad>  2 <s>  3 </s>  4 <|im_start|>  5 <|im_end|>
    6 user  7 assistant  8 system  9 hello  10 there  11 hi  12 how  13 are  14 you  15 fine
    16 thanks  17 be  18 brief  19 what  20 is  21 two  22 plus  23 four  24 the  25 answer
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lite_sft.masking import DEFAULT_CHAT_TEMPLATE

# The test models are tiny: one thread is fastest, and a second OpenMP thread spin-waits badly
# (hundreds of times slower) whenever anything else shares the two cores.
torch.set_num_threads(1)

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
CHATML = ["<|im_start|>", "<|im_end|>"]
WORDS = ("user assistant system hello there hi how are you fine thanks be brief what is two plus four "
         "the answer").split()


def make_tokenizer(eos: str = "</s>", pad: str = "<pad>", chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
                   chatml: bool = True, bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; `bos` adds <s> in front of plain text as Llama's tokenizer does."""
    specials = SPECIALS + (CHATML if chatml else [])
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token=pad,
                                        unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, BOS for plain text, eos </s>, pad <pad>, the project's default (ChatML) template."""
    return make_tokenizer()


@pytest.fixture
def pad_eos_tokenizer() -> PreTrainedTokenizerFast:
    """pad == eos == <|im_end|>, as in Qwen's tokenizers: masking by pad id would hide every end of turn."""
    return make_tokenizer(eos="<|im_end|>", pad="<|im_end|>")


@pytest.fixture
def tokenizer_factory():
    """make_tokenizer itself, for tests that need a variant (no BOS, no template, no ChatML tokens)."""
    return make_tokenizer


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: real sub-word merges, exact decoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS + CHATML,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "hello there, how are you?",
              "user assistant system", "a plan, a canal, panama"] * 20
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A Hugging Face folder: a random-weight 2-layer Llama and the byte-level BPE tokenizer (ChatML)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), bos_token_id=bpe_tokenizer.bos_token_id,
                         eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id,
                         **TINY_LLAMA)
    LlamaForCausalLM(config).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """48 two- and four-turn conversations of varied length, in OpenAI `messages` format."""
    import json
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog hello there how are you a plan a canal panama".split()
    lines = []
    for i in range(48):
        turns = []
        for _ in range(1 + i % 2):
            turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 8)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 10)))})
        lines.append(json.dumps({"messages": turns}))
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def builtin_home(tmp_path_factory):
    """Build the embedded default model into a temporary home, never into the user's cache."""
    import os

    home = tmp_path_factory.mktemp("lite-sft-home")
    old = os.environ.get("LITE_SFT_HOME")
    os.environ["LITE_SFT_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("LITE_SFT_HOME", None)
    else:
        os.environ["LITE_SFT_HOME"] = old


@pytest.fixture(autouse=True)
def data_cache_dir(tmp_path, monkeypatch):
    """Each test gets its own prepared-data cache: no test reuses rows another test prepared."""
    from lite_sft import data_cache

    folder = tmp_path / "data-cache"
    monkeypatch.setattr(data_cache, "cache_dir", lambda: folder)
    return folder
