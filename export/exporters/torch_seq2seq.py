"""Encoder-decoders (T5, BART and kin) through torch.onnx (dynamo), with a KV cache.

    lite-sft export runs/summaries --out exports/summaries --quantize int8    # exports/summaries/onnx/

The folder (N counts the decoder's layers; lite_sft.artifacts names the two graphs):
    encoder_model.onnx   input_ids, attention_mask (batch, source) int64
                         -> present.N.encoder.key / .value (batch, heads, source, head_dim): the cross-attention
                         keys and values of every decoder layer, computed once per source
    decoder_model.onnx   decoder_input_ids (batch, new) int64, encoder_attention_mask (batch, source) int64,
                         past_key_values.N.decoder.key / .value (batch, heads, past, head_dim): the self-attention
                         cache, past = 0 at the first step; past_key_values.N.encoder.key / .value: the encoder's
                         -> logits (batch, new, vocab), present.N.decoder.key / .value (batch, heads, past + new,
                         head_dim)
    *.onnx.data          a graph's weights, where they pass the 2 GB protobuf limit
    config.json, generation_config.json and the tokenizer files, copied from merged/
One decoder graph serves every step: the first one reads an empty cache. optimum wrote two decoders (first step,
later steps) and a third merging both behind an If node, each holding the decoder's weights again; here every
weight is in one graph only (the cross-attention key and value projections in the encoder's), and the
quantisers see plain graphs. Its inputs and outputs keep optimum's names.

torch.onnx.export(dynamo=True) captures each graph with torch.export from a small nn.Module around the
transformers model: transformers 5 decoders read their cache as an EncoderDecoderCache of two DynamicCaches,
which those modules build from the flat tensors the graph takes. The graphs stay as torch.onnx writes them
(constants folded, unused nodes dropped): onnxscript's optimize_for_ort kept the logits (within 6e-6) but made
nothing clearly faster, as onnxruntime fuses at load time itself, and the packed Attention node it made of
BART's encoder quantised worse. Fused against unfused, random t5-small- and bart-base-sized models, one
thread, a 64-token source, the runners interleaved on a shared 2-core CPU (so +-15%): T5 fp32 encoder 68 / 67
ms, decoder step 20.7 / 20.3 ms, int8 25 / 23 ms and 27 / 32 ms; BART fp32 155 / 151 ms and 44 / 40 ms, int8
69 / 53 ms and 49 / 46 ms.

fp32 only: a seq2seq export shrinks with --quantize (int8, int4), which quantize.py does to both graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from lite_sft.artifacts import DECODER_FILE, ENCODER_FILE, copy_model_files

from .. import ExportError
from ..onnx import one_line
from .dynamo import dynamo_export

NAME = "torch"
# Weights past this go to <graph>.onnx.data: the protobuf limit is 2 GB for a graph and its weights together.
EXTERNAL_DATA_BYTES = 1_800_000_000


def refuses(config, dtype: str) -> str | None:
    if not getattr(config, "is_encoder_decoder", False):
        return f"{getattr(config, 'model_type', '?')} is not an encoder-decoder"
    if dtype != "fp32":
        return f"seq2seq exports in fp32 only, not {dtype}; shrink it with --quantize int8 or int4"
    return None


def cache_names(layers: int, prefix: str, part: str) -> list[str]:
    """The graph's names of one cache: `prefix`.N.`part`.key / .value for each layer, in that order."""
    return [f"{prefix}.{i}.{part}.{kv}" for i in range(layers) for kv in ("key", "value")]


def decoder_inputs(layers: int) -> list[str]:
    """decoder_model.onnx's inputs, in their order: per layer its own cache, then the encoder's (as optimum's)."""
    names = ["decoder_input_ids", "encoder_attention_mask"]
    for i in range(layers):
        names += [f"past_key_values.{i}.{part}.{kv}" for part in ("decoder", "encoder") for kv in ("key", "value")]
    return names


def export(model, merged: Path, out: Path, dtype: str) -> None:
    if refuses(model.config, dtype):
        raise ExportError(refuses(model.config, dtype))
    model = model.eval().float()
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    # Two sources of seven tokens, the second padded, two decoder tokens after a cache of three: sizes apart
    # from each other and from 0 and 1, which torch.export would otherwise fix the graph to.
    ids = torch.full((2, 7), 3, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch, source = torch.export.Dim("batch_size"), torch.export.Dim("encoder_sequence_length")
    new, past = torch.export.Dim("decoder_sequence_length"), torch.export.Dim("past_decoder_sequence_length")
    encoder = Encoder(model)
    with torch.no_grad():
        cross = encoder(ids, mask)  # per layer key, value: (batch, heads, source, head_dim)
    # A self-attention cache of three tokens. Each input its own tensor: torch.export takes one tensor passed
    # twice for one input, and the graph would read a layer's keys as its values too.
    heads, head_dim = cross[0].shape[1], cross[0].shape[3]
    caches = [t for i in range(layers)
              for t in (torch.zeros(2, heads, 3, head_dim), torch.zeros(2, heads, 3, head_dim), cross[2 * i],
                        cross[2 * i + 1])]  # in decoder_inputs' order
    cache_shapes = [{0: batch, 2: past}, {0: batch, 2: past}, {0: batch, 2: source}, {0: batch, 2: source}] * layers
    out.mkdir(parents=True)
    kind = model.config.model_type
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    _export(encoder, (ids, mask), ["input_ids", "attention_mask"], cache_names(layers, "present", "encoder"),
            ({0: batch, 1: source}, {0: batch, 1: source}), out / ENCODER_FILE, large, kind)
    _export(Decoder(model, layers), (ids[:, :2], mask, caches), decoder_inputs(layers),
            ["logits"] + cache_names(layers, "present", "decoder"),
            ({0: batch, 1: new}, {0: batch, 1: source}, cache_shapes), out / DECODER_FILE, large, kind)
    copy_model_files(merged, out)  # config.json, generation_config.json and the tokenizer's files


def _export(module, args, inputs: list[str], outputs: list[str], shapes, path: Path, large: bool,
            model_type: str) -> None:
    try:
        program = dynamo_export(module, args, input_names=inputs, output_names=outputs, dynamic_shapes=shapes)
    except Exception as err:  # noqa: BLE001  (torch.export and onnxscript raise anything from deep inside)
        raise ExportError(f"torch.onnx could not export this {model_type} model's {path.stem} for seq2seq "
                          f"({one_line(err)}); the merged model is fine: export it alone with --no-onnx") from err
    program.save(path, external_data=large)  # external: <graph>.onnx.data


class Encoder(nn.Module):
    """input_ids, attention_mask -> every decoder layer's cross-attention key and value, flat."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # One decoder step on an empty cache fills the cross-attention cache, whatever the architecture calls its
        # projections; the step's other work feeds no output, so the exporter drops it from the graph.
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask,
                   decoder_input_ids=input_ids[:, :1], cache=cache, use_cache=True)
        return tuple(t for layer in cache.cross_attention_cache.layers for t in (layer.keys, layer.values))


class Decoder(nn.Module):
    """decoder_input_ids, encoder_attention_mask, the flat caches -> logits, the self-attention cache, flat."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, decoder_input_ids, encoder_attention_mask, past):
        own = [(past[4 * i], past[4 * i + 1]) for i in range(self.layers)]
        cross = [(past[4 * i + 2], past[4 * i + 3]) for i in range(self.layers)]
        cache = EncoderDecoderCache(DynamicCache(own), DynamicCache(cross))
        # The decoder cross-attends only when given encoder states, and reads just their batch, length and dtype
        # from them (the keys and values come from the cache): a view of the first cross key says those.
        stand_in = past[2].transpose(1, 2).flatten(2)  # (batch, source, heads * head_dim)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=stand_in),
                         attention_mask=encoder_attention_mask, decoder_input_ids=decoder_input_ids, cache=cache,
                         use_cache=True)
        own = cache.self_attention_cache.layers
        return (out.logits,) + tuple(t for layer in own for t in (layer.keys, layer.values))


def open(folder: Path):  # noqa: A001  (the registry's name for it)
    """The parity gate's runner for an exported folder: Runner on onnxruntime's CPU provider."""
    return Runner(Path(folder))


class Runner:
    """encoder_model.onnx and decoder_model.onnx on onnxruntime's CPU provider, on torch tensors, for the parity
    gate (export/parity_tasks.py drives it step by step as generation does; serving has its own, on the device).

        runner = open(Path("exports/summaries/onnx"))
        cache = runner.encode(input_ids, attention_mask)          # the encoder's keys and values, and an empty cache
        logits, cache = runner.step(decoder_ids, attention_mask, cache)   # logits (batch, new, vocab)
    """

    def __init__(self, folder: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # As many threads as torch uses (OMP_NUM_THREADS): onnxruntime would otherwise take every core and
        # spin-wait on them, which on a shared machine makes small models many times slower.
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.encoder, self.decoder = (onnxruntime.InferenceSession(str(folder / name), options,
                                                                       providers=["CPUExecutionProvider"])
                                          for name in (ENCODER_FILE, DECODER_FILE))
        except Exception as err:  # noqa: BLE001  (onnxruntime raises its own Fail / NoSuchFile / ... types)
            raise ExportError(f"onnxruntime could not load the exported {folder.name}/ ({one_line(err)})") from err
        self.cross = [o.name for o in self.encoder.get_outputs()]
        self.layers = len(self.cross) // 2
        self.own = cache_names(self.layers, "past_key_values", "decoder")

    def encode(self, input_ids, attention_mask) -> dict:
        """The cache a source starts from: the encoder's keys and values, and an empty self-attention cache."""
        cross = self.encoder.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        key = cross[0]  # (batch, heads, source, head_dim)
        empty = np.zeros((key.shape[0], key.shape[1], 0, key.shape[3]), key.dtype)
        return {**{n.replace("present", "past_key_values"): t for n, t in zip(self.cross, cross)},
                **{name: empty for name in self.own}}

    def step(self, decoder_ids, attention_mask, cache: dict):
        """Logits (batch, new, vocab) as a torch tensor for `decoder_ids` (batch, new) after `cache`, and the
        cache with them."""
        out = self.decoder.run(None, {"decoder_input_ids": decoder_ids.numpy(),
                                      "encoder_attention_mask": attention_mask.numpy(), **cache})
        return torch.from_numpy(out[0]).float(), {**cache, **dict(zip(self.own, out[1:]))}
