"""The three loss implementations agree in value and gradient; a model they cannot serve keeps `full`."""

import pytest
import torch
import torch.nn.functional as F

from lite_sft.config import LoraConfig, ModelConfig
from lite_sft.tasks.causal_lm.loss import FusedLinearCrossEntropy, check_loss_path, token_loss_sum
from lite_sft.tasks.causal_lm.masking import IGNORE_INDEX
from lite_sft.model import add_lora, load_base_model
from lite_sft.tasks.causal_lm.packing import Row, collate

CPU = torch.device("cpu")


def test_fused_linear_cross_entropy_matches_autograd_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,), generator=gen)

    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (expected,) = torch.autograd.grad(reference * 0.3, hidden)
    fused = FusedLinearCrossEntropy.apply(hidden, weight, targets, 8)  # 8 does not divide 37: a ragged chunk
    (got,) = torch.autograd.grad(fused * 0.3, hidden)

    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _lora_model(model_dir):
    cfg = ModelConfig(name_or_path=str(model_dir))
    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg, str(model_dir), CPU), LoraConfig(r=4, alpha=8, dropout=0.0), cfg)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _batch(vocab: int, packed: bool):
    gen = torch.Generator().manual_seed(1)

    def example(n: int, prompt: int):
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        return ids, [IGNORE_INDEX] * prompt + ids[prompt:]

    (a, la), (b, lb), (c, lc) = example(9, 4), example(6, 2), example(11, 7)
    if packed:
        rows = [Row(a + b, la + lb, list(range(9)) + list(range(6)), 2, True), Row(c, lc, list(range(11)), 1, True)]
    else:
        rows = [Row(ids, lab, list(range(len(ids))), 1, False) for ids, lab in ((a, la), (b, lb), (c, lc))]
    return collate(rows, pad_id=0)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("impl", ["trained", "fused"])
def test_trained_only_losses_equal_the_full_loss_and_its_lora_gradients(tiny_model_dir, impl, packed):
    model = _lora_model(tiny_model_dir)
    batch = _batch(model.get_input_embeddings().num_embeddings, packed)

    def loss_and_grads(which: str):
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, batch, CPU, which, chunk=5)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = loss_and_grads("full")
    loss, grads = loss_and_grads(impl)

    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert grads.keys() == full_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the real head is back


def test_a_model_with_soft_capped_logits_falls_back_to_the_full_loss(tmp_path, capsys):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.1)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), attn_implementation="eager")
    model = add_lora(load_base_model(cfg, str(tmp_path), CPU), LoraConfig(r=2, alpha=4), cfg)

    assert check_loss_path(model, CPU, "fused") == "full"
    assert "using train.loss=full" in capsys.readouterr().out


def test_a_plain_llama_keeps_the_fused_loss(tiny_model_dir):
    assert check_loss_path(_lora_model(tiny_model_dir), CPU, "fused") == "fused"


def test_the_automatic_chunk_holds_a_fixed_number_of_logits_within_bounds():
    from lite_sft.tasks.causal_lm.loss import AUTO_CHUNK_LOGITS, chunk_tokens

    assert chunk_tokens(300, 128_256) == 300  # an explicit setting wins
    assert chunk_tokens(0, 32_000) == AUTO_CHUNK_LOGITS // 32_000 == 1048
    assert chunk_tokens(0, 128_256) * 128_256 <= AUTO_CHUNK_LOGITS
    assert chunk_tokens(0, 305) == 4096 and chunk_tokens(0, 10**7) == 128


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_added_template_tokens_train_the_same_under_every_loss(tmp_path, tokenizer_factory, chat_jsonl, tied):
    """Tokens the default template adds get trainable rows (peft trainable_token_indices); with a tied
    output layer those rows are in the head too, so the fused loss must step aside for `trained`."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from lite_sft.config import load_config
    from lite_sft.train import tune

    tokenizer = tokenizer_factory(chat_template=None, chatml=False)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there how are you"},
                                            {"role": "assistant", "content": "fine thanks"}]}) + "\n")
    losses = {}
    for impl in ("full", "fused"):
        out = tmp_path / impl
        tune(load_config(None, {"model.name_or_path": str(model_dir), "data.path": str(data), "train.loss": impl,
                                "data.validation_fraction": 0.0, "train.max_steps": 2, "lora.r": 2, "train.lr": 1e-2,
                                "train.save_every": 0, "output_dir": str(out)}))
        losses[impl] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["fused"] == pytest.approx(losses["full"], rel=1e-4)
