"""Encoder-decoder generation (T5, BART) behind the generation loop's three calls.

    backend, tokenizer = load_backend("exports/summaries")   # factory.py: OUT/onnx on onnxruntime, or merged/
    generate(backend, [tokenizer("translate : un deux")["input_ids"]], SamplingParams(max_new_tokens=16), tokenizer)

prefill(source ids, mask, _) runs the encoder once and the decoder's first step from decoder_start_token_id
(followed by the generation config's forced_bos_token_id where it has one, as mBART's language codes);
decode(state, tokens) is one decoder step on the cache; keep(state, rows) drops finished rows from the encoder's
output, its mask and the cache. Sampling, stop strings and streaming then work as for a decoder-only model.

Two models run those calls: TorchSeq2Seq, transformers' own model on a Hugging Face folder, and OrtSeq2Seq, the
export's two graphs on onnxruntime (lite_sft.artifacts names them; `lite-sft export` writes them: the encoder
gives every decoder layer's cross-attention keys and values once, and one decoder graph takes every step, the
first on an empty cache). OrtSeq2Seq keeps both caches as torch tensors on the session's device and binds them to the graph
(IO binding), so under CUDA the cache never leaves the GPU; each step's new self-attention cache is a fresh
tensor (the graph's Concat cannot write into its own input), and keep drops finished rows with torch indexing.

The loop hands prompts left-padded; BART numbers the source's positions from its first token, so the source is
moved to the left here, its padding on the right. Every row's decoder starts from the same tokens, so the decoder
needs no padding at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lite_sft.artifacts import DECODER_FILE, ENCODER_FILE, GENERATION_CONFIG, MODEL_CONFIG, read_json_object
from lite_sft.errors import ServeError

from .devices import DTYPES, NP_TYPES, ORT_TYPES, onnx_precision, open_session, pick_device
from .folder import max_context
from .protocol import align_left


@dataclass
class Seq2SeqState:
    encoder: object
    """What the decoder cross-attends to: transformers' BaseModelOutput (TorchSeq2Seq), or each decoder layer's
    cross-attention key and value, (batch, heads, source, head_dim) tensors (OrtSeq2Seq)."""
    mask: torch.Tensor
    """(batch, source) long: 1 on the source's tokens, 0 on the padding after them."""
    past: object = None
    """The decoder's self-attention cache: transformers' EncoderDecoderCache, or per layer key and value."""

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


class TorchSeq2Seq:
    """transformers' *ForConditionalGeneration, called as generate() calls it."""

    def __init__(self, model):
        self.model, self.device = model, torch.device(model.device)

    def encode(self, source: torch.Tensor, mask: torch.Tensor):
        return self.model.get_encoder()(input_ids=source, attention_mask=mask)

    def step(self, state: Seq2SeqState, decoder_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(encoder_outputs=state.encoder, attention_mask=state.mask, decoder_input_ids=decoder_ids,
                         cache=state.past, use_cache=True)
        state.past = out.cache
        return out.logits[:, -1]

    def select(self, state: Seq2SeqState, index: torch.Tensor) -> None:
        from transformers.modeling_outputs import BaseModelOutput

        state.encoder = BaseModelOutput(last_hidden_state=state.encoder.last_hidden_state[index])
        state.past.batch_select_indices(index)


class OrtSeq2Seq:
    """The export's encoder_model.onnx and decoder_model.onnx on onnxruntime, the caches bound as torch tensors."""

    def __init__(self, folder: Path, device: str, threads: int | None, vocab_size: int):
        self.encoder = open_session(folder / ENCODER_FILE, device, threads)
        self.decoder = open_session(folder / DECODER_FILE, device, threads)
        provider = self.encoder.get_providers()[0]
        self.device = torch.device("cuda", torch.cuda.current_device()) if provider == "CUDAExecutionProvider" \
            else torch.device("cpu")
        self.cross = [o.name for o in self.encoder.get_outputs()]  # present.N.encoder.key / .value
        outputs = self.decoder.get_outputs()
        self.own = [o.name for o in outputs[1:]]  # present.N.decoder.key / .value
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        missing = [n for n in ["decoder_input_ids", "encoder_attention_mask", *self._past(self.cross + self.own)]
                   if n not in inputs]
        if outputs[0].name != "logits" or missing or not self.cross:
            raise ServeError(f"{folder} is not an encoder-decoder export lite-sft serves (its decoder lacks "
                             f"{', '.join(missing) or 'logits'}); re-export it with `lite-sft export`")
        key = inputs[self._past(self.own[:1])[0]]
        _, self.heads, _, self.head_dim = key.shape  # (batch, heads, past, head_dim): the exporter fixes heads, dim
        self.dtype = ORT_TYPES[key.type]
        vocab = outputs[0].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else vocab_size

    @staticmethod
    def _past(names: list[str]) -> list[str]:
        return [n.replace("present.", "past_key_values.", 1) for n in names]

    def encode(self, source: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        binding = self.encoder.io_binding()
        self._bind(binding, "input_ids", source)
        self._bind(binding, "attention_mask", mask)
        batch, length = source.shape
        cross = [torch.empty(batch, self.heads, length, self.head_dim, dtype=self.dtype, device=self.device)
                 for _ in self.cross]
        for name, tensor in zip(self.cross, cross):
            self._bind(binding, name, tensor, output=True)
        self._run(self.encoder, binding)
        return cross

    def step(self, state: Seq2SeqState, decoder_ids: torch.Tensor) -> torch.Tensor:
        batch, new = decoder_ids.shape
        if state.past is None:  # the first step reads an empty cache
            state.past = [torch.empty(batch, self.heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
                          for _ in self.own]
        length = state.past[0].shape[2] + new
        binding = self.decoder.io_binding()
        self._bind(binding, "decoder_input_ids", decoder_ids)
        self._bind(binding, "encoder_attention_mask", state.mask)
        for name, tensor in zip(self._past(self.own + self.cross), state.past + state.encoder):
            self._bind(binding, name, tensor)
        logits = torch.empty(batch, new, self.vocab_size, dtype=self.dtype, device=self.device)
        present = [torch.empty(batch, self.heads, length, self.head_dim, dtype=self.dtype, device=self.device)
                   for _ in self.own]
        for name, tensor in zip(["logits", *self.own], [logits, *present]):
            self._bind(binding, name, tensor, output=True)
        self._run(self.decoder, binding)
        state.past = present
        return logits[:, -1]

    def select(self, state: Seq2SeqState, index: torch.Tensor) -> None:
        state.encoder = [t[index] for t in state.encoder]
        state.past = [t[index] for t in state.past]

    def _bind(self, binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        """Bind a contiguous tensor (every one here is: fresh, or indexed by keep) by its address."""
        (binding.bind_output if output else binding.bind_input)(
            name, self.device.type, self.device.index or 0, NP_TYPES[tensor.dtype], tuple(tensor.shape),
            tensor.data_ptr())

    def _run(self, session, binding) -> None:
        session.run_with_iobinding(binding)
        if self.device.type == "cuda":
            binding.synchronize_outputs()


class Seq2SeqBackend:
    task = "seq2seq"

    def __init__(self, model, folder: Path, name: str, precision: str, provider: str, context: int,
                 config: dict, generation: dict):
        """`model`: TorchSeq2Seq or OrtSeq2Seq; `config`, `generation`: the folder's config.json and
        generation_config.json as dicts (the latter may be empty)."""
        self.model, self.folder, self.name, self.precision, self.provider = model, folder, name, precision, provider
        self.device = model.device
        self.max_context = context
        start = generation.get("decoder_start_token_id")
        start = start if isinstance(start, int) else config.get("decoder_start_token_id")
        if not isinstance(start, int):
            raise ServeError(f"{folder}: neither config.json nor generation_config.json gives decoder_start_token_id, "
                             "the token every output starts from; re-export the model")
        forced = generation.get("forced_bos_token_id")
        self.decoder_prompt = [start] + ([forced] if isinstance(forced, int) else [])
        """What the decoder reads before the first generated token (and what a repetition penalty sees)."""
        pad = config.get("pad_token_id")
        self.pad_id = pad if isinstance(pad, int) else 0
        self.vocab_size = config.get("vocab_size")

    @classmethod
    def from_onnx(cls, folder: str | Path, device: str = "auto", threads: int | None = None,
                  tokenizer=None) -> "Seq2SeqBackend":
        folder = Path(folder)
        config = read_json_object(folder / MODEL_CONFIG)
        generation = read_json_object(folder / GENERATION_CONFIG) if (folder / GENERATION_CONFIG).is_file() else {}
        model = OrtSeq2Seq(folder, device, threads, config.get("vocab_size"))
        provider = model.encoder.get_providers()[0]
        return cls(model, folder, f"onnx-{folder.name}", onnx_precision(folder, model.dtype == torch.float16),
                   provider, max_context(folder, tokenizer), config, generation)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "auto", dtype: str | None = None,
                    threads: int | None = None, tokenizer=None) -> "Seq2SeqBackend":
        from transformers import AutoModelForSeq2SeqLM

        folder, dev = Path(folder), pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        precision = dtype or ("bf16" if dev.type == "cuda" else "fp32")
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=DTYPES[precision]).to(dev).eval()
        except (OSError, ValueError) as err:
            raise ServeError(f"could not load the PyTorch seq2seq model in {folder}: {err}") from err
        return cls(TorchSeq2Seq(model), folder, "torch-merged", precision, f"torch {dev.type}",
                   max_context(folder, tokenizer), model.config.to_dict(), model.generation_config.to_dict())

    def describe(self) -> str:
        return f"{self.folder} on {self.provider} ({self.precision}), seq2seq"

    # -- the three calls --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int) -> tuple[np.ndarray, Seq2SeqState]:
        """Encode the (left-padded) sources and take the decoder's first step; `capacity` is a decoder-only's."""
        source, source_mask = align_left(ids, mask, self.pad_id)
        source_mask = torch.from_numpy(source_mask).to(self.device)
        state = Seq2SeqState(self.model.encode(torch.from_numpy(source).to(self.device), source_mask), source_mask)
        start = torch.tensor([self.decoder_prompt] * len(ids), dtype=torch.long)
        return self._run(state, start), state

    @torch.inference_mode()
    def decode(self, state: Seq2SeqState, tokens: np.ndarray) -> np.ndarray:
        return self._run(state, torch.from_numpy(tokens.reshape(-1, 1)).long())

    @torch.inference_mode()
    def keep(self, state: Seq2SeqState, rows: list[int]) -> Seq2SeqState:
        index = torch.tensor(rows, device=self.device)
        state.mask = state.mask[index]
        self.model.select(state, index)
        return state

    def _run(self, state: Seq2SeqState, decoder_ids: torch.Tensor) -> np.ndarray:
        return self.model.step(state, decoder_ids.to(self.device)).float().cpu().numpy()  # (batch, vocab)
