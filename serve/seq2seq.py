"""Encoder-decoder generation (T5, BART) behind the generation loop's three calls.

    backend, tokenizer = load_backend("exports/summaries")   # runtime.py: OUT/onnx on onnxruntime, or merged/
    generate(backend, [tokenizer("translate : un deux")["input_ids"]], SamplingParams(max_new_tokens=16), tokenizer)

prefill(source ids, mask, _) runs the encoder once and the decoder's first step from decoder_start_token_id
(followed by the generation config's forced_bos_token_id where it has one, as mBART's language codes);
decode(state, tokens) is one decoder step on the cache; keep(state, rows) drops finished rows from the encoder's
output, its mask and the cache. Sampling, stop strings and streaming then work as for a decoder-only model.

The ONNX path is optimum's ORTModelForSeq2SeqLM over the export's encoder_model.onnx and decoder files (the
merged decoder where there is one, else decoder_model + decoder_with_past_model): it picks the decoder branch
per step and binds the cache on the device under CUDA, and its forward takes the arguments transformers' own
model takes, so one class drives both.

The loop hands prompts left-padded; BART numbers the source's positions from its first token, so the source is
moved to the left here, its padding on the right. Every row's decoder starts from the same tokens, so the decoder
needs no padding at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import ServeError
from .generate import align_left
from .runtime import max_context
from .sessions import check_provider, onnx_precision, ort_providers, session_options


@dataclass
class Seq2SeqState:
    encoder: object
    """transformers' BaseModelOutput: last_hidden_state (batch, source, hidden)."""
    mask: torch.Tensor
    """(batch, source) long: 1 on the source's tokens, 0 on the padding after them."""
    past: object = None
    """The decoder's cache: transformers' EncoderDecoderCache, or optimum's tuple per layer."""

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


class Seq2SeqBackend:
    task = "seq2seq"

    def __init__(self, model, folder: Path, name: str, precision: str, provider: str, context: int):
        self.model, self.folder, self.name, self.precision, self.provider = model, folder, name, precision, provider
        self.device = torch.device(model.device)
        self.max_context = context
        config, generation = model.config, getattr(model, "generation_config", None)
        start = getattr(generation, "decoder_start_token_id", None)
        start = start if isinstance(start, int) else config.decoder_start_token_id
        if not isinstance(start, int):
            raise ServeError(f"{folder}: neither config.json nor generation_config.json gives decoder_start_token_id, "
                             "the token every output starts from; re-export the model")
        forced = getattr(generation, "forced_bos_token_id", None)
        self.decoder_prompt = [start] + ([forced] if isinstance(forced, int) else [])
        """What the decoder reads before the first generated token (and what a repetition penalty sees)."""
        self.pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
        self.vocab_size = config.vocab_size

    @classmethod
    def from_onnx(cls, folder: str | Path, device: str = "auto", threads: int | None = None,
                  tokenizer=None) -> "Seq2SeqBackend":
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        folder, providers = Path(folder), ort_providers(device)
        try:
            model = ORTModelForSeq2SeqLM.from_pretrained(folder, provider=providers[0],
                                                         session_options=session_options(threads),
                                                         use_io_binding=providers[0] == "CUDAExecutionProvider")
        except Exception as err:  # noqa: BLE001  (optimum and onnxruntime raise their own types)
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ServeError(f"onnxruntime could not load the encoder-decoder in {folder}: {first[:300]}") from err
        session = model.encoder.session
        check_provider(session.get_providers()[0], providers)
        fp16 = session.get_outputs()[0].type == "tensor(float16)"
        return cls(model, folder, f"onnx-{folder.name}", onnx_precision(folder, fp16), session.get_providers()[0],
                   max_context(folder, tokenizer))

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "auto", dtype: str | None = None,
                    threads: int | None = None, tokenizer=None) -> "Seq2SeqBackend":
        from transformers import AutoModelForSeq2SeqLM

        from .torch_backend import DTYPES, pick_device

        folder, dev = Path(folder), pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        precision = dtype or ("bf16" if dev.type == "cuda" else "fp32")
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=DTYPES[precision]).to(dev).eval()
        except (OSError, ValueError) as err:
            raise ServeError(f"could not load the PyTorch seq2seq model in {folder}: {err}") from err
        return cls(model, folder, "torch-merged", precision, f"torch {dev.type}", max_context(folder, tokenizer))

    def describe(self) -> str:
        return f"{self.folder} on {self.provider} ({self.precision}), seq2seq"

    # -- the three calls --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int) -> tuple[np.ndarray, Seq2SeqState]:
        """Encode the (left-padded) sources and take the decoder's first step; `capacity` is a decoder-only's."""
        source, source_mask = align_left(ids, mask, self.pad_id)
        source_mask = torch.from_numpy(source_mask).to(self.device)
        encoder = self.model.get_encoder()(input_ids=torch.from_numpy(source).to(self.device),
                                           attention_mask=source_mask)
        state = Seq2SeqState(encoder, source_mask)
        start = torch.tensor([self.decoder_prompt] * len(ids), dtype=torch.long)
        return self._run(state, start), state

    @torch.inference_mode()
    def decode(self, state: Seq2SeqState, tokens: np.ndarray) -> np.ndarray:
        return self._run(state, torch.from_numpy(tokens.reshape(-1, 1)).long())

    def keep(self, state: Seq2SeqState, rows: list[int]) -> Seq2SeqState:
        from transformers.modeling_outputs import BaseModelOutput

        index = torch.tensor(rows, device=self.device)
        state.encoder = BaseModelOutput(last_hidden_state=state.encoder.last_hidden_state[index])
        state.mask = state.mask[index]
        if hasattr(state.past, "batch_select_indices"):  # transformers' cache object
            state.past.batch_select_indices(index)
        else:  # optimum's: per layer (self key, self value, cross key, cross value)
            state.past = tuple(tuple(t[index] for t in layer) for layer in state.past)
        return state

    def _run(self, state: Seq2SeqState, decoder_ids: torch.Tensor) -> np.ndarray:
        out = self.model(encoder_outputs=state.encoder, attention_mask=state.mask,
                         decoder_input_ids=decoder_ids.to(self.device), past_key_values=state.past, use_cache=True)
        state.past = out.past_key_values
        return out.logits[:, -1].float().cpu().numpy()  # (batch, vocab)
