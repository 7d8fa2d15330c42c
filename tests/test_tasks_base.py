"""The task interface's shared pieces: which models are decoders, how long an encoder's rows may be."""

from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig

from lite_sft.config import load_config
from lite_sft.tasks.base import get_task, is_decoder_only, max_tokens


def test_decoders_are_known_by_architecture_or_by_type():
    assert is_decoder_only(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert is_decoder_only(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert is_decoder_only(LlamaConfig(architectures=["LlamaModel"]))  # saved from the bare model
    assert is_decoder_only(LlamaConfig())
    assert not is_decoder_only(BertConfig(architectures=["BertModel"]))
    assert not is_decoder_only(BertConfig())  # BERT has a causal-LM head class too, and a masked-LM one
    assert not is_decoder_only(BartConfig())


def test_rows_never_outgrow_the_encoder():
    class Tokenizer:
        model_max_length = 512

    cfg = load_config(None, {"data.max_seq_len": 1024})
    assert max_tokens(cfg, Tokenizer()) == 512
    cfg.data.max_seq_len = 64
    assert max_tokens(cfg, Tokenizer()) == 64


def test_every_task_name_has_its_task():
    for name in ("causal-lm", "seq-cls", "token-cls", "seq2seq"):
        assert get_task(name).name == name
