"""Decoders through torch's own exporter: every causal-lm the model builder does not take.

    lite-sft export runs/gpt2 --out exports/gpt2 --exporter torch      # onnx/model.onnx from torch.onnx

GPT-2 and kin, and the architectures only transformers 5 has (ministral3, gemma4 text, ...), are captured
with torch.onnx.export(dynamo=True) in the layout serve/backends/ort.py's OrtBackend feeds:
    inputs   input_ids (batch, seq), attention_mask (batch, past + seq), position_ids (batch, seq) where the
             model takes them, past_key_values.{i}.key / .value (batch, kv_heads, past, head_dim) per layer
             that keeps a cache
    outputs  logits (batch, seq, vocab), present.{i}.key / .value (batch, kv_heads, past + seq, head_dim)
batch, seq and past dynamic; past may be 0 (the prompt). Left-padded rows work: the mask hides the padding
and position_ids = cumsum(mask) - 1 places each row's tokens. Weights over 2 GB go to model.onnx_data.
fp16 is captured from the model in fp16 (torch.export traces fake tensors, so the CPU needs no fp16 kernels);
the cache and logits are then float16 too.

onnxscript's optimize_for_ort then fuses what onnxruntime has kernels for. Measured on the tiny 2-layer
models of tests/test_exporter_torch_decoder.py (eager attention, which it fuses; SDPA's graph it does not):
    llama       RMSNorm 5, SkipRMSNorm 4, rotary 4, attention -> MultiHeadAttention 2; logits within 3e-7
    ministral3  RMSNorm 5, SkipRMSNorm 4, rotary 4 (attention left unfused)
    gemma4      attention -> MultiHeadAttention 2 (its norms left unfused)
    gpt2        SkipLayerNorm 5 and MultiHeadAttention 2, but the fused graph leaves a Gemm with a 3-D input
                that onnxruntime refuses: the unfused graph is written instead
Every graph is probed (_probe) before it is kept: onnxruntime must give PyTorch's logits on a left-padded
prompt and on a cached step, else the next candidate is tried (_candidates), so a fusion that does not fit an
architecture costs its speed, not the export. No GroupQueryAttention: onnxruntime's kernel reads each row
from column 0 (right padding), which this graph's left-padded rows are not. What that costs, measured on a
random 55M Llama (hidden 512, 8 layers, 8 query / 2 key-value heads, vocab 32000) under lite-sft's server
runtime (serve/backends/ort.py), 1 thread, a 128-token prompt then 64 greedy tokens, the two graphs interleaved,
median of 7 rounds, two runs on a shared 2-core AMD EPYC (load average 3-4, so the spread is wide):
    graph                                  prefill 128    decode
    this one (fused MultiHeadAttention)    168-212 ms     55-58 tok/s
    onnxruntime-genai's builder (GQA)      162-191 ms     62-89 tok/s
The builder's graph decodes 1.1-1.6x faster (the runtime binds its cache in place, where this graph's
Concat copies the cache each step: serve/backends/ort.py), one reason the registry tries the builder first.

What it refuses (refuses()): models whose cache is more than one key and one value per layer, i.e. hybrids
with recurrent, Mamba or convolution state (qwen3_5, qwen3_next, nemotron_h, olmo_hybrid, lfm2, jamba, ...),
models whose layers' caches differ in shape (gemma4's full-attention layers, with their own head size) or
whose keys and values do (deepseek's latent attention), which the runtime cannot hold: it keeps one
(kv_heads, head_dim) for every layer, and recurrent models without attention (mamba, rwkv).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from lite_sft.artifacts import ONNX_FILE, copy_model_files

from .. import ExportError
from ..onnx import one_line
from ..ort_decoder import OnnxDecoder
from .dynamo import dynamo_export

log = logging.getLogger(__name__)

NAME = "torch"
DTYPES = ("fp32", "fp16")
# Layer kinds whose cache is plain keys and values (sliding-window layers keep the whole cache here: the mask
# hides what falls out of the window, so present stays past + seq long, as the runtime expects); "dummy" layers
# keep none (Gemma-4's layers that reuse another layer's cache, MLP-only layers).
KV_LAYERS = ("full_attention", "sliding_attention")
CACHELESS = ("dummy",)
# transformers' cache kinds for layers that keep a recurrent or convolution state (cache_utils).
STATEFUL = ("linear_attention", "conv", "hybrid", "hybrid_sliding")
# Weights past this go to model.onnx_data: the protobuf limit is 2 GB for the graph and its weights together.
EXTERNAL_DATA_BYTES = 1_800_000_000
# The attention the model is captured with, in order until one exports: eager attention's graph is what
# onnxscript fuses into MultiHeadAttention (SDPA's it leaves unfused).
ATTENTION = ("eager", "sdpa")
# How far onnxruntime's logits may be from PyTorch's in the probe, relative to the largest logit: wide enough
# for kernels that add in another order, narrow enough for a fusion that changed what is computed.
PROBE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


def refuses(config, dtype: str) -> str | None:
    """Why this exporter cannot export the transformers `config` at `dtype`, or None when it can."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    if dtype not in DTYPES:
        return f"--dtype {dtype} (it exports {' or '.join(DTYPES)})"
    if getattr(config, "is_encoder_decoder", False):
        return f"{config.model_type} is an encoder-decoder, not a decoder-only model"
    text = config.get_text_config(decoder=True)
    if not getattr(text, "num_attention_heads", None):
        return f"{config.model_type} has no attention heads (a recurrent model: its state is no key-value cache)"
    try:
        kinds, _ = get_layer_types_and_kwargs(text)
    except Exception as err:  # noqa: BLE001  (a config transformers cannot read its layers from)
        return f"cannot read the layer kinds of {config.model_type} ({type(err).__name__})"
    stateful = sorted(set(kinds) & set(STATEFUL))
    if stateful:
        return (f"{config.model_type} is a hybrid: its {', '.join(stateful)} layers carry recurrent or convolution "
                "state, not only keys and values, which the runtime's cache layout has no place for")
    other = sorted(set(kinds) - set(KV_LAYERS) - set(CACHELESS))
    if other:
        return f"{config.model_type} has {', '.join(other)} layers, which this exporter does not take"
    layers = [c for c, kind in zip(text.per_layer_config, kinds) if kind in KV_LAYERS]
    if any(getattr(c, "kv_lora_rank", None) or getattr(c, "v_head_dim", None) not in (None, head_dim(c))
           for c in layers):
        return (f"{config.model_type}'s keys and values differ in head size (latent attention); the runtime keeps "
                "one head size for both")
    shapes = {(getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim(c)) for c in layers}
    if len(shapes) > 1:
        return (f"{config.model_type}'s layers cache keys and values of different shapes {sorted(shapes)} "
                "(kv heads, head size); the runtime keeps one shape for every layer")
    return None


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class FlatCache(torch.nn.Module):
    """The causal LM over flat tensors, as the graph takes and gives them: transformers 5 models take a Cache
    object, which torch.onnx cannot have as an input, so it is built here from one key and one value per
    cached layer and read back into present tensors.

    transformers' own helper (integrations/executorch.py, register_dynamic_cache_export_support) flattens a
    DynamicCache given with the config, whose sliding-window layers keep only the window: present would then
    be shorter than past + seq, which the runtime's buffers are not. Plain DynamicLayers keep every column and
    the model's mask still applies the window.
    """

    def __init__(self, model, cached: list[int], positions: bool):
        super().__init__()
        self.model, self.cached, self.positions = model, cached, positions

    def forward(self, input_ids, attention_mask, position_ids, past: list):
        from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer

        layers = [DummyLayer() for _ in range(self.model.config.get_text_config(decoder=True).num_hidden_layers)]
        for n, i in enumerate(self.cached):
            layers[i] = DynamicLayer()
            layers[i].lazy_initialization(past[2 * n], past[2 * n + 1])
            layers[i].keys, layers[i].values = past[2 * n], past[2 * n + 1]
        cache = DynamicCache()
        cache.layers = layers
        extra = {"position_ids": position_ids} if self.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, **extra)
        present = [t for i in self.cached for t in (cache.layers[i].keys, cache.layers[i].values)]
        return out.logits, present


def cached_layers(config) -> list[int]:
    """The layers that keep keys and values (not Gemma-4's that reuse another's, not MLP-only ones)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [i for i, kind in enumerate(kinds) if kind in KV_LAYERS]


def export(model, merged: Path, out: Path, dtype: str) -> None:
    """Write `out`/model.onnx (with a KV cache, the layout in the module docstring) from `model`, the merged
    causal LM loaded in fp32 from `merged`, and copy its config, generation config and tokenizer beside it.
    fp16 converts `model` in place: the caller hands it over."""
    why = refuses(model.config, dtype)
    if why:
        raise ExportError(f"the torch exporter cannot export this model: {why}")
    if out.exists():
        raise ExportError(f"{out} already exists: the torch exporter writes a new folder")
    model = model.eval().to(torch.float16 if dtype == "fp16" else torch.float32)
    flat = FlatCache(model, cached_layers(model.config), "position_ids" in inspect.signature(model.forward).parameters)
    out.mkdir(parents=True)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    failures = []
    for graph, how, err in _candidates(flat):
        if graph is not None:
            try:
                _save(graph, out / ONNX_FILE, large)
                _probe(flat, out / ONNX_FILE, dtype)
                log.info("torch exporter: %s", how)
                break
            except Exception as probed:  # noqa: BLE001  (onnxruntime raises its own types)
                err = probed
                for old in out.iterdir():
                    old.unlink()
        failures.append(f"{how}: {one_line(err)}")
        log.info("torch exporter: %s; trying the next way", failures[-1])
    else:
        raise ExportError(f"torch.onnx could not export this {model.config.model_type} model "
                          f"({'; '.join(failures)}); the merged model is fine: export it alone with --no-onnx")
    copy_model_files(merged, out)


def _candidates(flat: FlatCache):
    """The graphs to try, best first, as (onnx_ir model or None, how it was made, why there is none): for each
    attention in ATTENTION, its graph fused by onnxscript's optimize_for_ort, then the same graph unfused
    (where a fusion does not fit the graph: GPT-2's attention fused into MultiHeadAttention leaves a Gemm
    onnxruntime refuses)."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    for attention in ATTENTION:
        try:
            program = _capture(flat, attention)
        except Exception as err:  # noqa: BLE001  (torch.export and torch.onnx raise anything from deep inside)
            yield None, f"{attention} attention", err
            continue
        plain = program.model.clone()  # the weights are shared, not copied
        try:
            fused, fusions = optimize_for_ort(program.model)
            fused_as = ", ".join(f"{k} {v}" for k, v in fusions.items() if v) or "nothing"
            yield fused, f"{attention} attention, onnxscript fused {fused_as}", None
        except Exception as err:  # noqa: BLE001  (a rewrite rule failing on an unexpected pattern)
            yield None, f"{attention} attention, fused", err
        yield plain, f"{attention} attention, unfused", None


def _capture(flat: FlatCache, attention: str):
    """torch.onnx's ONNXProgram of `flat`, its model's attention written as `attention` ("eager", "sdpa")."""
    model = flat.model
    before = model.config._attn_implementation
    model.set_attn_implementation(attention)
    inputs = _example(flat, batch=2, seq=3, past=4)
    layers = len(flat.cached)
    names = ["input_ids", "attention_mask", "position_ids"] + kv_names("past_key_values", layers)
    # Named axes become dynamic (Dim.DYNAMIC): torch.export works out that the mask is past + seq long itself.
    shapes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
              "position_ids": {0: "batch", 1: "sequence"}, "past": [{0: "batch", 2: "past"}] * (2 * layers)}
    try:
        program = dynamo_export(flat, inputs, dynamic_shapes=shapes, input_names=names,
                                output_names=["logits"] + kv_names("present", layers))
    finally:
        model.set_attn_implementation(before)
    if not flat.positions:  # the wrapper's argument is there either way; the graph never reads it
        program.model.graph.inputs[:] = [v for v in program.model.graph.inputs if v.name != "position_ids"]
    return program


def _save(graph, model_file: Path, large: bool) -> None:
    """`graph` (an onnx_ir model) to `model_file`, its weights beside it in model.onnx_data when `large`."""
    import onnx_ir

    # onnx_ir would also declare every weight's shape in value_info, where a tool that rewrites a weight leaves
    # it stale (quantize.py's Gemm -> MatMul did, on the encoders). The weight carries its own shape.
    for value in graph.graph.initializers.values():
        value.shape, value.type = None, None
    onnx_ir.save(graph, model_file, external_data=model_file.name + "_data" if large else None)


def _example(flat: FlatCache, batch: int, seq: int, past: int, seed: int = 0) -> tuple:
    """(input_ids, attention_mask, position_ids, past) for `flat`, the last row left-padded by one token.
    Sizes apart from each other and from 0 and 1, which torch.export would otherwise specialise the graph to."""
    config = flat.model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dtype = next(flat.model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[-1, 0] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -seq:]
    cache = [torch.randn(batch, heads, past, head_dim(config), generator=gen).to(dtype)
             for _ in range(2 * len(flat.cached))]
    return ids, mask, positions, cache


def _probe(flat: FlatCache, model_file: Path, dtype: str) -> None:
    """Raise unless onnxruntime runs the graph as PyTorch runs the model: on a left-padded prompt (no past) and on
    a decode step after a cache. A fusion that does not fit the graph shows here (GPT-2's attention fused
    into MultiHeadAttention leaves a Gemm onnxruntime refuses), before the parity gate would fail the export."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # see export/ort_decoder.py for why
    options.log_severity_level = 3  # a graph that fails here is a candidate dropped, said in one log line
    session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    takes = {i.name for i in session.get_inputs()}
    names = ["input_ids", "attention_mask", "position_ids"] + kv_names("past_key_values", len(flat.cached))
    for batch, seq, past in ((2, 5, 0), (3, 1, 6)):
        ids, mask, positions, cache = inputs = _example(flat, batch, seq, past, seed=1)
        feed = {n: t.numpy() for n, t in zip(names, (ids, mask, positions, *cache)) if n in takes}
        logits = session.run(["logits"], feed)[0].astype("float32")
        with torch.no_grad():
            expected = flat(*inputs)[0].float().numpy()
        real = mask[:, -seq:].bool().numpy()  # padded positions' logits are never read
        diff = float(abs(logits - expected)[real].max())
        limit = PROBE_TOLERANCE[dtype] * max(1.0, float(abs(expected).max()))
        if not diff <= limit:
            raise ExportError(f"onnxruntime's logits differ from PyTorch's by {diff:.3g} (past {past}, seq {seq})")


def kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def open(folder: Path):  # noqa: A001  (the registry's name for it)
    """What the parity gate runs the exported folder with."""
    return OnnxDecoder(folder)

