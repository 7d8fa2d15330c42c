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
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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


# The pre-tokenizer patterns of Llama-3 (digits in runs of up to three) and Qwen2 (single digits), as in
# their tokenizer.json. Unlike GPT-2's, they let a space or punctuation lead a word (" Paris", "?Paris") and
# a run of newlines swallow the whitespace before it, so more tokens cross a prompt/answer boundary.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3-Instruct's template, less its date and tool handling: the reply is trimmed, and the generation
# prompt ends in a blank line.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Words the byte-level tokenizers below learn whole, so that expected token lists stay short.
QA_CORPUS = ["Question: what is the capital of France? Answer: Paris", "Question: and of Italy?\nAnswer: Rome",
             "Answer: 1\n\nAnswer: 42", "hello there, how are you?", "I am fine, thanks.",
             "user\nassistant\nsystem", "\n\n"] * 20


def byte_level_bpe(pattern: str | None, specials: list[str]) -> Tokenizer:
    """A byte-level BPE trained on QA_CORPUS; `pattern` None splits words with GPT-2's own regex."""
    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(QA_CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def _llama3_json() -> str:
    tok = byte_level_bpe(LLAMA3_PATTERN, LLAMA3_SPECIALS)
    # Llama-3 offsets are untrimmed (trim_offsets=False), and every plain text starts with BOS.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])])
    return tok.to_str()


@pytest.fixture(scope="session")
def _qwen2_json() -> str:
    tok = byte_level_bpe(QWEN2_PATTERN, ["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # and no BOS, as Qwen2
    return tok.to_str()


@pytest.fixture
def llama3_tokenizer(_llama3_json) -> PreTrainedTokenizerFast:
    """Llama-3 style: byte-level BPE with its pattern, BOS on plain text, eos <|eot_id|>, its own template."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_llama3_json),
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|end_of_text|>")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture
def qwen2_tokenizer(_qwen2_json) -> PreTrainedTokenizerFast:
    """Qwen2 style: byte-level BPE with its pattern, no BOS, eos <|endoftext|>, and no chat template or
    ChatML tokens, so that conversations get the default ChatML template and its tokens are added."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_qwen2_json), eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture
def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style on QA_CORPUS: GPT-2's regex joins a space to the word or number after it ("Answer: 1" ->
    'Answer', ':', 'Ġ1'), but never whitespace to a newline; no BOS, eos <|endoftext|>, no chat template."""
    tok = byte_level_bpe(None, ["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


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
