"""Model loading: paths, dtypes, quantisation, and gradients through 4-bit layers."""

import pytest
import torch

from lite_sft.config import ModelConfig
from lite_sft.model import ModelError, compute_dtype, load_base_model, resolve_model_path


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("./models/llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id is passed through


def test_compute_dtype_follows_the_device():
    assert compute_dtype(ModelConfig(), torch.device("cpu")) == torch.float32
    assert compute_dtype(ModelConfig(dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16


def test_missing_bitsandbytes_is_a_clear_error(tiny_model_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ModelError, match="--quant 4bit needs bitsandbytes.*--quant none"):
        load_base_model(ModelConfig(name_or_path=str(tiny_model_dir), quant="4bit"), str(tiny_model_dir),
                        torch.device("cpu"))


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_gradients_through_quantised_layers_survive_an_eval_pass(tiny_model_dir, quant):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel on the first eval-mode forward,
    and that kernel has no backward: training after an evaluation would silently drop gradients."""
    pytest.importorskip("bitsandbytes")
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=quant)
    ids = torch.tensor([[5, 9, 17, 30, 41, 7]])

    def input_grad(eval_first: bool) -> torch.Tensor:
        model = load_base_model(cfg, str(tiny_model_dir), torch.device("cpu"))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        x = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=x).logits.float().pow(2).sum().backward()
        return x.grad

    fresh, after_eval = input_grad(False), input_grad(True)
    assert fresh.abs().sum() > 0
    torch.testing.assert_close(after_eval, fresh, rtol=1e-3, atol=1e-5)


def test_qlora_keeps_frozen_16_bit_weights_in_16_bits(tiny_model_dir):
    """peft's k-bit preparation would upcast embeddings, head and norms to fp32 (2 GB on an 8B model)."""
    pytest.importorskip("bitsandbytes")
    from lite_sft.config import LoraConfig
    from lite_sft.model import add_lora

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant="4bit", dtype="bfloat16")
    model = add_lora(load_base_model(cfg, str(tiny_model_dir), torch.device("cpu")), LoraConfig(r=4), cfg)
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # adapters stay fp32


@pytest.mark.parametrize("dtype, cpu_bf16, device, fast_bf16, expected", [
    ("auto", "auto", "cpu", True, "bf16"), ("auto", "auto", "cpu", False, "no"), ("auto", "auto", "cuda", True, "no"),
    ("float32", "auto", "cpu", True, "no"), ("bfloat16", "auto", "cpu", False, "bf16"),
    ("float16", "auto", "cuda", False, "fp16"),
    # the setting forces either path on any CPU, and never touches a GPU's or 16-bit weights' precision
    ("auto", "on", "cpu", False, "bf16"), ("float32", "on", "cpu", False, "bf16"), ("auto", "off", "cpu", True, "no"),
    ("auto", "on", "cuda", False, "no"), ("float16", "off", "cpu", True, "fp16"),
])
def test_autocast_follows_the_dtype_the_setting_and_the_cpu(dtype, cpu_bf16, device, fast_bf16, expected, monkeypatch):
    from lite_sft import model
    from lite_sft.config import ModelConfig

    monkeypatch.setattr(model, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert model.mixed_precision(ModelConfig(dtype=dtype, cpu_bf16=cpu_bf16), device) == expected


@pytest.mark.parametrize("forced, expected", [("on", True), ("off", False), ("OFF", False)])
def test_the_environment_forces_the_cpu_detection(forced, expected, monkeypatch):
    from lite_sft.model import cpu_has_fast_bf16

    monkeypatch.setenv("LITE_SFT_CPU_BF16", forced)
    assert cpu_has_fast_bf16() is expected
