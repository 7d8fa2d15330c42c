"""Decoders through onnxruntime-genai's model builder: the graph onnxruntime-genai itself runs.

    lite-sft export runs/qwen --out exports/qwen --exporter builder --quantize int4

The builder (onnxruntime_genai.models.builder, run in-process) writes model.onnx + model.onnx.data with
onnxruntime's fused kernels (GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization, ~35 nodes
for two layers) and genai_config.json, so og.Model loads the folder as it is; config.json,
generation_config.json (the run's stop ids) and the tokenizer are copied from the merged folder so that
`lite-sft serve` loads it too. fp32 is built for the CPU execution provider, fp16 for CUDA. The fp16 graph
also runs on onnxruntime 1.31's CPU provider (its GroupQueryAttention has an fp16 CPU kernel; logits within
7e-4 of the fp32 graph on the tiny Llama and Gemma-2), but its genai_config.json names the CUDA provider, so
og.Model on a machine without CUDA needs `og.Config(folder).clear_providers()` first.

Sliding-window models (Mistral, Phi-3 with sliding_window, Gemma-2/3, Qwen2 with use_sliding_window): by
default the builder gives sliding-window layers a ring-buffer cache of the window's size (GQA attribute
sliding_window_cache), and onnxruntime 1.31 then refuses any cache shorter than the window ("KV cache capacity
(14) must be at least local_window_size (4096)": a 14-token generation of a tiny Gemma-2, whose default window
is 4096). lite-sft's server sizes every layer's cache to prompt + new tokens, so the builder is asked for full
caches (windowed_kv_cache=false): every layer's cache is as long as the sequence, and GroupQueryAttention's
local_window_size masks what lies outside the window, as transformers does. And the builder reads which layers
slide from config.layer_types only: a Mistral or Phi-3 config has none (transformers applies the window to
every layer), so the builder would attend globally past the window; it is handed the layer kinds transformers
infers (cache_utils.get_layer_types_and_kwargs).

int4 (quantize()): the builder again, from the merged model, at precision int4: MatMulNBits with
`block_size` and accuracy level 4 (int8 activations on CPU, see export/quantize.py), asymmetric (uint4 with a
zero point per block, as lite-sft's int4 was before; the builder's default is symmetric int4): on the tiny
Qwen2 run of tests/test_export.py, symmetric int4 agreed with the merged model on 16% of greedy tokens and
failed the int4 gate (flat random logits: scale 0.67), asymmetric passed it; on the 93M Llama of
benchmarks/export.py (four prompts, 16 tokens each) asymmetric agreed on 52.9% of positions and symmetric on
22.1% (mean |dlogit| 0.129 against 0.139). Asymmetric int4 from the builder is the very graph onnxruntime's
MatMulNBitsQuantizer makes from the builder's fp32 one (identical logits). int8: onnxruntime's
quantize_dynamic over the fp32 graph (export/quantize.py's int8; genai_config.json stays right, the graph's
inputs and outputs are unchanged), not the builder's int8 (MatMulNBits with 8-bit weights, block 32, accuracy
level 4). Measured on a random 55M Llama (hidden 512, 8 layers, 8 query / 2 key-value heads, vocab 32000)
through onnxruntime_genai's generator, 1 thread, a 128-token prompt then 64 greedy tokens, the three graphs
interleaved, median of 15 rounds, two runs, one shared AMD EPYC core with AVX-512 VNNI, onnxruntime 1.31:

    graph                     prefill 128   decode         on disk   top-1 = fp32   max |dlogit|
    fp32                      166-217 ms    56-81 tok/s    222 MB
    quantize_dynamic (kept)    62-79 ms     129-184 tok/s   56 MB    0.78           0.18
    builder int8              126-170 ms    140-218 tok/s  110 MB    0.94           0.06

The builder's decodes 8-18% faster, but prefills twice as slowly (its MatMulNBits prefill kernel, as on the
AVX2 core export/quantize.py measured), so prompt + answer took as long or longer (410 against 420 ms, 574
against 629 ms); it is twice the size, since it leaves the embedding table in fp32. Its logits are closer to
fp32 (top-1 over the prompt's 128 positions, and the largest logit error): it scales weights per block of 32
and activations per block, quantize_dynamic per output channel and per tensor, in 7 bits (reduce_range, for
CPUs without VNNI; full 8-bit weights gave 0.85 and 0.12). The int8 parity gate judges whether it is close enough.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

from lite_sft.artifacts import GENAI_CONFIG, ONNX_FILE, copy_model_files

from .. import ExportError
from ..ort_decoder import OnnxDecoder
from ..quantize import quantize as ort_quantize

NAME = "builder"
log = logging.getLogger(__name__)

# dtype -> (the builder's precision, its execution provider)
PRECISIONS = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda")}
INT4_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations on CPU (export/quantize.py's docstring says why)
# Layers whose cache is one key and one value, which is all lite-sft's server keeps per layer.
KV_LAYERS = ("full_attention", "sliding_attention")


@functools.cache
def builder_architectures() -> frozenset[str]:
    """The decoder architectures the builder takes: the `config.architectures[0] == "..."` names its
    create_model dispatches on, read from its source rather than imported (importing it takes seconds) or
    copied into a table here that would fall behind the installed version. Only *ForCausalLM: the
    *ForConditionalGeneration names are multimodal or speech models, whose text decoder lite-sft does not tune."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return frozenset()
    tree = ast.parse(Path(spec.origin).read_text())
    create = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "create_model")
    return frozenset(c.value for node in ast.walk(create) if isinstance(node, ast.Compare)
                     and ast.unparse(node.left) == "config.architectures[0]"
                     for c in node.comparators if isinstance(c, ast.Constant) and str(c.value).endswith("ForCausalLM"))


def refuses(config, dtype: str) -> str | None:
    """Why the builder cannot export the transformers `config` at `dtype` for lite-sft, or None when it can."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    if dtype not in PRECISIONS:
        return f"--dtype {dtype} (it exports {' or '.join(PRECISIONS)})"
    arch = (getattr(config, "architectures", None) or ["(no architectures in config.json)"])[0]
    taken = builder_architectures()
    if not taken:
        return "onnxruntime-genai is not installed"
    if arch not in taken:
        return f"onnxruntime-genai's model builder does not take {arch}"
    if arch == "PhiMoEForCausalLM":  # the builder switches it to CUDA and int4 whatever was asked
        return "PhiMoE's mixture-of-experts layers run on CUDA only in onnxruntime"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if arch == "Phi3ForCausalLM" and rope != "default" \
            and config.original_max_position_embeddings != config.max_position_embeddings:
        # Phi3MiniLongRoPEModel reads rope_scaling["type"], which transformers 5's rope_parameters no longer has
        # (KeyError 'type'); a Phi-3 config whose rope is not LongRoPE fails there too (KeyError 'multi_cache')
        # unless export() aligns the two lengths, which it does for the default rope.
        return (f"Phi-3 with {rope} rope (original_max_position_embeddings {config.original_max_position_embeddings} "
                f"!= max_position_embeddings {config.max_position_embeddings}): the builder fails on transformers 5's "
                "rope_parameters")
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None)
    head_size = getattr(text, "head_dim", None) or (heads and text.hidden_size // heads)
    if head_size and head_size % 8:
        # onnxruntime's GroupQueryAttention kernel refuses it at run time: "head_size must be a multiple of 8"
        return f"head size {head_size}: onnxruntime's GroupQueryAttention needs a multiple of 8"
    kinds, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(kinds) - set(KV_LAYERS))
    if other:
        return (f"{config.model_type} has {', '.join(other)} layers, whose state beside the key-value cache "
                "lite-sft's server does not keep")
    return None


def export(model, merged: Path, out: Path, dtype: str) -> None:
    """Write the ONNX folder `out` from the merged folder `merged` at `dtype` (fp32: CPU graph, fp16: CUDA graph).
    `model` is not used: the builder loads the checkpoint itself (from_pretrained in its load_weights), and takes
    no module."""
    precision, provider = PRECISIONS[dtype]
    _build(merged, out, precision, provider)


def quantize(src: Path, dst: Path, method: str, block_size: int, merged: Path) -> None:
    """A quantised copy of the exported folder `src` at `dst`: int4 built again from `merged` by the builder, int8
    by onnxruntime's quantize_dynamic over `src`'s fp32 graph (see the module docstring)."""
    if method == "int8":
        ort_quantize(src, dst, "int8")
    elif method == "int4":
        if block_size < 16 or block_size & (block_size - 1):
            raise ExportError(f"--block-size {block_size}: MatMulNBits needs a power of two, at least 16")
        # The int4 graph runs where the exported one does: an fp16 export targets CUDA, where the builder keeps
        # fp16 activations (and the GPU kernel ignores the accuracy level).
        provider = PRECISIONS["fp16" if _provider(src) == "cuda" else "fp32"][1]
        _build(merged, dst, "int4", provider, block_size=block_size, accuracy_level=INT4_ACCURACY_LEVEL,
               is_symmetric="false")
    else:
        raise ExportError(f"--quantize {method!r}: the builder quantises to int8 or int4")


def open(folder: Path):  # noqa: A001  (the exporter interface's name)
    """What the parity gate runs the exported folder with."""
    return OnnxDecoder(folder)


def _build(merged: Path, out: Path, precision: str, provider: str, **options) -> None:
    """Run the builder on `merged` into `out`, then copy the files lite-sft's server reads beside the graph."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    merged, out = Path(merged), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hf_token=false: the builder never asks the Hugging Face hub for anything (the folder is local).
    # windowed_kv_cache=false: full-length caches for sliding-window layers (the module docstring says why).
    extra = ["hf_token=false", "windowed_kv_cache=false"] + [f"{k}={v}" for k, v in options.items()]
    captured = io.StringIO()
    # The builder's cache (temporary external-data files, never the user's Hugging Face cache) sits beside `out`,
    # on the same disk, and goes when the build ends.
    with tempfile.TemporaryDirectory(prefix=".builder-cache-", dir=out.parent) as cache:
        try:
            # It prints every option and a progress bar per tensor; kept for the debug log and a failure.
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                from onnxruntime_genai.models import builder

                kwargs = builder.parse_extra_options(None, str(merged), str(out), precision, provider, cache, extra)
                config = kwargs["hf_details"]["hf_config"]  # the config create_model builds from
                _fit_config(config, get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])
                builder.create_model(None, str(merged), str(out), precision, provider, cache, **kwargs)
        except Exception as err:  # noqa: BLE001  (the builder raises bare Exception, KeyError, NotImplementedError...)
            log.debug("onnxruntime-genai's model builder said:\n%s", captured.getvalue())
            shutil.rmtree(out, ignore_errors=True)
            text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
            raise ExportError(f"onnxruntime-genai's model builder failed ({precision}, {provider}) on {merged}: "
                              f"{type(err).__name__}: {text[:300]}") from err
    log.debug("onnxruntime-genai's model builder said:\n%s", captured.getvalue())
    # The merged folder's config, generation config (the run's stop ids) and tokenizer replace the builder's copies:
    # it re-saves the tokenizer through AutoTokenizer (with its own model_max_length), and the run's are the reference.
    copy_model_files(merged, out)
    if not (out / ONNX_FILE).is_file() or not (out / GENAI_CONFIG).is_file():
        raise ExportError(f"onnxruntime-genai's model builder wrote no {ONNX_FILE} and {GENAI_CONFIG} in {out}")


def _fit_config(config, kinds: list[str]) -> None:
    """Tell the builder what transformers does with this config where the builder would read it otherwise."""
    if getattr(config, "layer_types", None) is None and "sliding_attention" in kinds:
        # Mistral, Phi-3: a sliding_window and no layer_types; transformers slides every layer.
        config.layer_types = kinds
    if config.architectures[0] == "Phi3ForCausalLM" and \
            (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") == "default":
        # The builder picks its LongRoPE class when the two lengths differ; with the default rope transformers
        # never reads original_max_position_embeddings, so aligning them changes nothing but that choice.
        config.original_max_position_embeddings = config.max_position_embeddings


def _provider(folder: Path) -> str:
    """The execution provider an exported folder's genai_config.json names for its decoder ("cpu" when none)."""
    decoder = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]["decoder"]
    options = decoder.get("session_options", {}).get("provider_options", [])
    return next((name for entry in options for name in entry), "cpu")
