"""The model-builder exporter (export/exporters/builder.py): every tiny decoder of test_export.ARCHS that the
builder takes is exported in fp32 and must generate, through onnxruntime-genai and through lite-sft's server,
the greedy tokens transformers generates from the same merged folder; its int8 and int4 copies must load and
mostly agree; what it cannot export is refused up front, and a builder failure is one ExportError line."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lite_sft.export import ExportError
from lite_sft.export.exporters import builder
from test_export import build_base

og = pytest.importorskip("onnxruntime_genai")

BUILDER_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "phi3-gqa", "gemma", "gemma2"]
NEW_TOKENS = 6
TEXTS = ["hello there, how are you?", "the quick brown fox jumps over the lazy dog, a plan, a canal, panama"]
WINDOW = 8  # shorter than the long prompt, so the window decides what its last tokens attend to


@pytest.fixture(scope="session")
def folders(tmp_path_factory, bpe_tokenizer):
    """folders(arch, **dims) -> (merged folder, exported fp32 folder), built once per session."""
    made = {}

    def get(arch, **dims):
        key = (arch, tuple(sorted(dims.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"builder-{arch}")
            merged = build_base(root / "merged", arch, bpe_tokenizer, **dims)
            builder.export(None, merged, root / "onnx", "fp32")
            made[key] = merged, root / "onnx"
        return made[key]

    return get


@pytest.fixture(scope="session")
def quantized(folders, tmp_path_factory):
    """quantized(method) -> the llama export's int8 or int4 copy, made once per session."""
    made = {}

    def get(method):
        if method not in made:
            merged, onnx = folders("llama")
            made[method] = tmp_path_factory.mktemp(f"builder-{method}") / f"onnx-{method}"
            builder.quantize(onnx, made[method], method, 32, merged)
        return made[method]

    return get


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def until_stop(tokens: list[int], eos: int) -> list[int]:
    """The tokens up to and including the first EOS: onnxruntime-genai stops there, the server is not told to."""
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def transformers_greedy(merged: Path, prompt: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def genai_greedy(folder: Path, prompt: list[int]) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def served(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens from lite-sft's server runtime, the prompts batched together."""
    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.factory import load_backend

    backend, _ = load_backend(folder, device="cpu", threads=1)
    return generate_ids(backend, prompts, SamplingParams(max_new_tokens=NEW_TOKENS))


def op_types(folder: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


@pytest.mark.parametrize("arch", BUILDER_ARCHS)
def test_fp32_export_generates_what_transformers_does(arch, folders, bpe_tokenizer):
    from transformers import AutoConfig

    merged, onnx = folders(arch)
    assert builder.refuses(AutoConfig.from_pretrained(merged), "fp32") is None
    assert "GroupQueryAttention" in op_types(onnx)
    names = {p.name for p in onnx.iterdir()}
    assert {"genai_config.json", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    eos = bpe_tokenizer.eos_token_id
    short, long = prompts(bpe_tokenizer)
    expected = [until_stop(transformers_greedy(merged, p), eos) for p in (short, long)]
    assert until_stop(genai_greedy(onnx, short), eos) == expected[0]
    assert [until_stop(t, eos) for t in served(onnx, [short])] == expected[:1]
    # Two prompts of different lengths in one batch (right-padded: the graph's attention is GQA).
    assert [until_stop(t, eos) for t in served(onnx, [short, long])] == expected


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_shorter_than_the_prompt(arch, folders, bpe_tokenizer):
    """Mistral's config has a window but no layer_types (transformers slides every layer), Gemma-2 slides every
    other layer; a prompt longer than the window must see only the window there, and a generation shorter than
    the window must still run (onnxruntime refuses a windowed cache shorter than the window)."""
    import onnx as onnx_lib
    from onnx import helper

    merged, onnx = folders(arch, sliding_window=WINDOW)
    graph = onnx_lib.load(str(onnx / "model.onnx"), load_external_data=False).graph
    windows = [helper.get_attribute_value(a) for n in graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size"]
    assert windows == ([WINDOW, WINDOW] if arch == "mistral" else [WINDOW, -1])
    eos = bpe_tokenizer.eos_token_id
    short, long = prompts(bpe_tokenizer)
    assert len(long) > 2 * WINDOW
    expected = until_stop(transformers_greedy(merged, long), eos)
    assert until_stop(genai_greedy(onnx, long), eos) == expected
    assert until_stop(served(onnx, [short, long])[1], eos) == expected


def test_open_and_fp16_on_cpu(folders, tmp_path, bpe_tokenizer):
    """open() gives the parity gate's runner; the fp16 graph, built for CUDA, also runs on the CPU provider."""
    from transformers import AutoModelForCausalLM

    merged, onnx = folders("llama")
    builder.export(None, merged, tmp_path / "fp16", "fp16")
    assert builder._provider(tmp_path / "fp16") == "cuda" and builder._provider(onnx) == "cpu"
    ids = torch.tensor(prompts(bpe_tokenizer)[:1])
    expected = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    for folder, tolerance in ((onnx, 1e-4), (tmp_path / "fp16", 1e-2)):
        logits = builder.open(folder)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert (logits.float() - expected).abs().max() < tolerance
    # Its int4 copy is built for CUDA too (fp16 activations), as the export it comes from.
    builder.quantize(tmp_path / "fp16", tmp_path / "int4", "int4", 32, merged)
    assert builder._provider(tmp_path / "int4") == "cuda" and "MatMulNBits" in op_types(tmp_path / "int4")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_copies_load_and_mostly_agree(method, folders, quantized, bpe_tokenizer):
    merged, onnx = folders("llama")
    folder = quantized(method)
    assert ("MatMulNBits" if method == "int4" else "MatMulInteger") in op_types(folder)
    size = lambda f: sum(p.stat().st_size for p in f.iterdir() if ".onnx" in p.name)  # noqa: E731
    assert size(folder) < 0.6 * size(onnx)
    assert {"genai_config.json", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    short, long = prompts(bpe_tokenizer)
    # Close to the fp32 graph, within the quantised gates' mean bound (greedy tokens of a tiny random model are
    # near-ties, so which ones survive quantisation is chance: asymmetric int4 keeps 1 of 6 here, symmetric 5).
    ids = torch.tensor([long])
    fp, q = (builder.open(f)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits for f in (onnx, folder))
    bound = {"int8": 2e-2, "int4": 5e-2}[method] * max(1.0, fp.abs().max().item())
    assert 0 < (fp - q).abs().mean().item() < bound
    got = genai_greedy(folder, short)
    assert len(got) == NEW_TOKENS
    batched = served(folder, [short, long])
    assert batched[0] == got  # the server runs the same graph: the same tokens as onnxruntime-genai


def test_refuses_what_it_cannot_export():
    from transformers import GPT2Config, GraniteMoeHybridConfig, Lfm2Config, LlamaConfig, Phi3Config

    def named(config):
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
        return config

    assert builder.refuses(named(LlamaConfig()), "fp32") is None
    assert builder.refuses(named(LlamaConfig()), "fp16") is None
    assert "bf16" in builder.refuses(named(LlamaConfig()), "bf16")
    gpt2 = GPT2Config()
    gpt2.architectures = ["GPT2LMHeadModel"]
    assert "GPT2LMHeadModel" in builder.refuses(gpt2, "fp32")
    longrope = named(Phi3Config(max_position_embeddings=131072, original_max_position_embeddings=4096,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}))
    assert "Phi-3" in builder.refuses(longrope, "fp32")
    # Default rope with the two lengths apart (test_export's tiny Phi-3): export() aligns them, so it is taken.
    assert builder.refuses(named(Phi3Config(max_position_embeddings=256)), "fp32") is None
    # Hybrids: a convolution or recurrent state per layer beside (or instead of) keys and values.
    assert "conv" in builder.refuses(named(Lfm2Config(num_hidden_layers=2, layer_types=["conv", "full_attention"])),
                                     "fp32")
    assert "linear_attention" in builder.refuses(named(GraniteMoeHybridConfig()), "fp32")
    # onnxruntime's GroupQueryAttention kernel takes head sizes in multiples of 8 only (48 / 4 heads = 12).
    assert "multiple of 8" in builder.refuses(named(LlamaConfig(hidden_size=48, num_attention_heads=4)), "fp32")


def test_a_builder_failure_is_one_export_error(tmp_path, bpe_tokenizer):
    """Forced past refuses(), a LongRoPE Phi-3 fails inside the builder: one line, and no half-written folder."""
    merged = build_base(tmp_path / "merged", "phi3", bpe_tokenizer, max_position_embeddings=512,
                        original_max_position_embeddings=256,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    with pytest.raises(ExportError) as err:
        builder.export(None, merged, tmp_path / "onnx", "fp32")
    assert "model builder failed" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the builder's cache went too
