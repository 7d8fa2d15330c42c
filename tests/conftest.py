"""Tokenizers built locally, so the data tests need no hub.

The word-level tokenizer makes token boundaries obvious: one word is one token, and whitespace
(including the template's newlines) makes no token. Its ids, used to write expected arrays by hand:

    0 <unk>  1 <pad>  2 <s>  3 </s>  4 <|im_start|>  5 <|im_end|>
    6 user  7 assistant  8 system  9 hello  10 there  11 hi  12 how  13 are  14 you  15 fine
    16 thanks  17 be  18 brief  19 what  20 is  21 two  22 plus  23 four  24 the  25 answer
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lite_sft.tasks.causal_lm.masking import DEFAULT_CHAT_TEMPLATE

# Whether `cpu_bf16: auto` trains under bf16 autocast must not depend on the CPU that runs the suite: auto
# resolves as this says (off unless the run sets it), in this process and in the CLI subprocesses it starts.
# `make test` runs the suite again with it on; tests of exact numerics pin cpu_bf16 off in their configs.
os.environ.setdefault("LITE_SFT_CPU_BF16", "off")

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
    from lite_sft.tasks.causal_lm import cache as data_cache

    folder = tmp_path / "data-cache"
    monkeypatch.setattr(data_cache, "cache_dir", lambda: folder)
    return folder


# Words of the classic-task fixtures: sentiment words, names and places, filler.
ENCODER_WORDS = ("good great fine nice love bad awful poor sad hate the movie was film plot is a very not quite "
                 "peter mary john paris london berlin acme globex visited met in at and works for").split()


def make_wordpiece(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], token_type_ids, lowercasing) on ENCODER_WORDS."""
    from tokenizers import normalizers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ENCODER_WORDS, *extra, "##s", "##ed", "."]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
                                   # BERT's own names; transformers 5's plain fast tokenizer has no token_type_ids
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A Hugging Face folder: a random-weight 2-layer BERT encoder (no head) and a WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = make_wordpiece()
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    """120 short reviews labelled pos / neg by their sentiment word; 24 more in a dev file whose text column
    is named `content` (as SST-2's dev.tsv names it)."""
    import csv
    import random

    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("sentiment")
    for name, n, column in (("train.csv", 120, "text"), ("dev.csv", 24, "content")):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([column, "label"])
            for i in range(n):
                label = "pos" if i % 2 else "neg"
                word = rng.choice(("good", "great", "nice", "love") if label == "pos" else ("bad", "awful", "poor", "hate"))
                filler = rng.sample(("the", "movie", "was", "film", "plot", "is", "very", "quite"), k=3)
                words = filler[:rng.randint(0, 3)] + [word] + filler[rng.randint(0, 3):]
                writer.writerow([" ".join(words), label])
    return folder


SEQ2SEQ_WORDS = "zero one two three four five six seven eight nine reverse copy translate : null un deux trois".split()


def make_t5_tokenizer() -> PreTrainedTokenizerFast:
    """T5's conventions on a word-level vocabulary: <pad> 0, </s> 1, <unk> 2, EOS appended to every text."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *SEQ2SEQ_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=128, model_input_names=["input_ids", "attention_mask"])


def make_bart_tokenizer() -> PreTrainedTokenizerFast:
    """BART's conventions on a byte-level BPE: <s> 0, <pad> 1, </s> 2, <unk> 3, texts as <s> ... </s>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(SEQ2SEQ_WORDS)] * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=128)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A Hugging Face folder: a random-weight 2+2-layer T5 and a word-level tokenizer with T5's special ids."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = make_t5_tokenizer()
    path = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory):
    """A Hugging Face folder: a random-weight 2+2-layer BART and a byte-level BPE tokenizer with BART's ids."""
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = make_bart_tokenizer()
    path = tmp_path_factory.mktemp("tiny-bart")
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=2)
    BartForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ner_conll(tmp_path_factory):
    """A CoNLL-2003-style train.txt / valid.txt (`token TAG 0` lines, tag in column 1): people, places and
    companies in short sentences, IOB2."""
    import random

    rng = random.Random(0)
    people, places, orgs = (["peter"], ["mary"], ["john"]), (["paris"], ["london"], ["berlin"]), (["acme"], ["globex"])
    folder = tmp_path_factory.mktemp("ner")
    for name, n in (("train.txt", 160), ("valid.txt", 32)):
        lines = ["-DOCSTART- -X- O", ""]
        for _ in range(n):
            who, where, org = rng.choice(people), rng.choice(places), rng.choice(orgs)
            shape = rng.randrange(3)
            if shape == 0:
                words = [(w, "PER") for w in who] + [("visited", None)] + [(w, "LOC") for w in where]
            elif shape == 1:
                words = [(w, "PER") for w in who] + [("works", None), ("for", None)] + [(w, "ORG") for w in org]
            else:
                words = [(w, "PER") for w in who] + [("met", None)] + [(w, "PER") for w in rng.choice(people)] + \
                        [("in", None)] + [(w, "LOC") for w in where]
            previous = None
            for word, kind in words:
                tag = "O" if kind is None else ("I-" if previous == kind else "B-") + kind
                previous = kind
                lines.append(f"{word} {tag} 0")
            lines.append("")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


class Slow:
    """A backend whose every decode step takes `delay` seconds longer: makes queueing observable, and requests
    sent together batch."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, state, tokens):
        time.sleep(self.delay)
        return self.inner.decode(state, tokens)


@contextmanager
def uvicorn_running(application):
    """Serve `application` with a real uvicorn on 127.0.0.1 and a free port; yields its base URL, and stops it
    (closing its engine) afterwards."""
    import uvicorn

    from lite_sft.serve.server import bind

    with server_running(uvicorn.Server(uvicorn.Config(application, log_level="warning")), bind("127.0.0.1", 0)) as url:
        yield url


@contextmanager
def server_running(server, sock):
    """Run a uvicorn.Server on its bound socket in a thread until the block ends; yields its base URL."""
    import threading
    import time

    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def fuzz_posts(url: str, mode: str, max_examples: int) -> set[str]:
    """Fuzz every POST operation of the server at `url` from its own /openapi.json with schemathesis: valid
    requests (`positive`) must get no 5xx, invalid ones (`negative`) must be refused with a 4xx. Returns the
    paths fuzzed."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import negative_data_rejection

    checks = [not_a_server_error] + ([negative_data_rejection] if mode == "negative" else [])
    api = schemathesis.openapi.from_url(url + "/openapi.json")
    posts = [r.ok() for r in api.get_all_operations() if r.ok().method.upper() == "POST"]
    for operation in posts:
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=checks, timeout=30)

        check()
    return {op.path for op in posts}


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """A tiny random decoder whose attention is onnxruntime's GroupQueryAttention (rotary inside, 4 query heads
    over 2 key-value heads), wired as onnxruntime-genai's builder wires it: the mask's sum gives each row's
    length, its width the total length, and there is no position_ids input."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    vocab, hidden, heads, kv_heads, dim, layers, positions = 64, 32, 4, 2, 16, 2, 128  # GQA: head size 16k
    weights = {"embed": rng.normal(0, 1, (vocab, hidden)), "head": rng.normal(0, 0.3, (hidden, vocab))}
    angles = np.outer(np.arange(positions), 1.0 / 10000 ** (np.arange(0, dim, 2) / dim))
    weights |= {"cos": np.cos(angles), "sin": np.sin(angles), "one": np.array([1]), "axis": np.array([1])}
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    nodes = [helper.make_node("ReduceSum", ["attention_mask", "axis"], ["lengths"], keepdims=0),
             helper.make_node("Sub", ["lengths", "one"], ["last"]),
             helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
             helper.make_node("Shape", ["attention_mask"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["width"], axis=0),
             helper.make_node("Squeeze", ["width"], ["width0"]),
             helper.make_node("Cast", ["width0"], ["total_len"], to=TensorProto.INT32),
             helper.make_node("Gather", ["embed", "input_ids"], ["x0"])]
    for layer in range(layers):
        weights[f"qkv{layer}"] = rng.normal(0, 0.3, (hidden, (heads + 2 * kv_heads) * dim))
        weights[f"out{layer}"] = rng.normal(0, 0.3, (heads * dim, hidden))
        past, present = f"past_key_values.{layer}", f"present.{layer}"
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"{past}.{kind}", TensorProto.FLOAT,
                                                        ["batch", kv_heads, "past", "kv_cache_dim"]))
            outputs.append(helper.make_tensor_value_info(f"{present}.{kind}", TensorProto.FLOAT,
                                                         ["batch", kv_heads, "total", dim]))
        nodes += [helper.make_node("MatMul", [f"x{layer}", f"qkv{layer}"], [f"qkv_out{layer}"]),
                  helper.make_node("GroupQueryAttention", [f"qkv_out{layer}", "", "", f"{past}.key", f"{past}.value",
                                                           "seqlens_k", "total_len", "cos", "sin"],
                                   [f"att{layer}", f"{present}.key", f"{present}.value"], domain="com.microsoft",
                                   num_heads=heads, kv_num_heads=kv_heads, do_rotary=1),
                  helper.make_node("MatMul", [f"att{layer}", f"out{layer}"], [f"proj{layer}"]),
                  helper.make_node("Add", [f"x{layer}", f"proj{layer}"], [f"x{layer + 1}"])]
    nodes.append(helper.make_node("MatMul", [f"x{layers}", "head"], ["logits"]))
    initializers = [numpy_helper.from_array(w.astype(np.int64 if name in ("one", "axis") else np.float32), name)
                    for name, w in weights.items()]
    model = helper.make_model(helper.make_graph(nodes, "gqa", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)  # what onnxruntime 1.31 reads (onnx may write a newer one)
    folder = tmp_path_factory.mktemp("gqa")
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": dim,
        "max_position_embeddings": positions}))  # the head size axis is symbolic, as the builder writes it
    return folder
