"""The torch exporter for decoders (export/exporters/torch_decoder.py): each tiny model exported with a KV
cache must generate, under lite-sft's server runtime, the greedy tokens transformers generates from the same
folder (alone and two prompts of different lengths batched, so left padding), match PyTorch's logits on a
prompt and on a cached step, and export in fp16; hybrids with recurrent state are refused by name."""

import json

import numpy as np
import pytest
import torch

from lite_sft.export import ExportError
from lite_sft.export.exporters import torch_decoder
from test_export import DECODER, build_base

# GPT-2, Llama (which the builder also takes) and two families only transformers 5 has (test_export.ARCHS):
# Ministral 3, and Gemma 4 text with a 4-token window, shorter than the prompts, so the sliding layer's mask over
# the whole cache is tested against transformers' own sliding cache.
TORCH_ARCHS = ["gpt2", "llama", "ministral3", "gemma4"]
PROMPTS = [[5, 17, 42, 9, 77, 3, 120], [8, 61, 200]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe_tokenizer):
    """arch, dtype -> (the Hugging Face folder, its ONNX export), each made once."""
    from transformers import AutoModelForCausalLM

    made = {}

    def get(arch, dtype="fp32"):
        if (arch, dtype) not in made:
            root = tmp_path_factory.mktemp(f"torch-{arch}-{dtype}")
            merged = build_base(root / "merged", arch, bpe_tokenizer)
            torch_decoder.export(AutoModelForCausalLM.from_pretrained(merged), merged, root / "onnx", dtype)
            made[arch, dtype] = merged, root / "onnx"
        return made[arch, dtype]

    return get


def hf_greedy(merged, prompt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", TORCH_ARCHS)
def test_served_greedy_tokens_and_logits_match_transformers(arch, exported):
    from transformers import AutoModelForCausalLM

    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.factory import load_backend

    merged, onnx = exported(arch)
    backend, _ = load_backend(onnx, "cpu", threads=1)
    eos = json.loads((onnx / "generation_config.json").read_text())["eos_token_id"]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_ids=[eos])
    expected = [hf_greedy(merged, p) for p in PROMPTS]
    assert [generate_ids(backend, [p], params)[0] for p in PROMPTS] == expected
    assert generate_ids(backend, PROMPTS, params) == expected  # one batch: the short prompt left-padded

    # The prompt's logits, then one cached step's, against PyTorch's.
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = np.array([PROMPTS[0]])
    logits, state = backend.prefill(ids, np.ones_like(ids), ids.shape[1] + 1)
    step = backend.decode(state, np.array([11]))
    with torch.no_grad():
        reference = model(torch.tensor([PROMPTS[0] + [11]])).logits[0]
    assert np.abs(logits[0] - reference[-2].numpy()).max() < 1e-4
    assert np.abs(step[0] - reference[-1].numpy()).max() < 1e-4


def test_the_folder_holds_the_graph_config_and_tokenizer_in_the_runtimes_layout(exported):
    import onnx

    merged, out = exported("llama")
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(p.suffix == ".safetensors" for p in out.iterdir())
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["position_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past", 16]
    vocab = json.loads((merged / "config.json").read_text())["vocab_size"]
    assert dims["logits"][0] == "batch" and dims["logits"][2] == vocab
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                              "present.1.value"]
    assert any(n.op_type == "MultiHeadAttention" for n in graph.node)  # onnxscript fused the attention


def test_fp16_export_loads_and_runs(exported):
    from transformers import AutoModelForCausalLM

    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.factory import load_backend

    merged, onnx = exported("llama", "fp16")
    backend, _ = load_backend(onnx, "cpu", threads=1)
    assert backend.kv_dtype == torch.float16 and backend.logits_dtype == torch.float16
    generated = generate_ids(backend, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [len(ids) for ids in generated] == [NEW_TOKENS] * len(PROMPTS)
    ids = np.array([PROMPTS[0]])
    logits, _ = backend.prefill(ids, np.ones_like(ids), ids.shape[1] + 1)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor(ids)).logits[0, -1].numpy()
    assert np.abs(logits[0] - reference).max() < 1e-2  # fp16 rounding, not a different computation


def test_refuses_hybrids_and_other_cache_shapes():
    from transformers import (DeepseekV3Config, Gemma4TextConfig, LlamaConfig, Lfm2Config, MambaConfig,
                              NemotronHConfig, Qwen3_5TextConfig, T5Config)

    why = torch_decoder.refuses(Qwen3_5TextConfig(), "fp32")
    assert "qwen3_5_text is a hybrid" in why and "linear_attention" in why
    assert "nemotron_h is a hybrid" in torch_decoder.refuses(NemotronHConfig(), "fp32")
    assert "conv" in torch_decoder.refuses(Lfm2Config(num_hidden_layers=2, full_attn_idxs=[1]), "fp32")
    assert "no attention heads" in torch_decoder.refuses(MambaConfig(), "fp32")
    assert "(4, 256), (4, 512)" in torch_decoder.refuses(Gemma4TextConfig(), "fp32")  # its global head size
    assert "latent attention" in torch_decoder.refuses(DeepseekV3Config(), "fp32")
    assert "encoder-decoder" in torch_decoder.refuses(T5Config(), "fp32")
    assert "int8" in torch_decoder.refuses(LlamaConfig(), "int8")
    assert torch_decoder.refuses(LlamaConfig(), "fp16") is None


def test_what_cannot_be_exported_is_one_export_error(tmp_path, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    hybrid = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**{**DECODER, "head_dim": 16}, vocab_size=64))
    with pytest.raises(ExportError, match="qwen3_5_text is a hybrid"):
        torch_decoder.export(hybrid, tiny_model_dir, tmp_path / "hybrid", "fp32")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ExportError, match="already exists"):
        torch_decoder.export(model, tiny_model_dir, tmp_path, "fp32")
    # Every way failing (here: an attention transformers does not have) is one line naming each failure.
    monkeypatch.setattr(torch_decoder, "ATTENTION", ("no-such-attention",))
    with pytest.raises(ExportError, match=r"^torch.onnx could not export this llama model \(no-such-attention") as err:
        torch_decoder.export(model, tiny_model_dir, tmp_path / "out", "fp32")
    assert "\n" not in str(err.value)
