"""The PyTorch backend: a Hugging Face causal LM (merged, or base + adapter unmerged) behind the same three
calls as the ONNX one, so the generation loop and the benchmark compare like with like.

    python -m lite_sft.serve.bench exports/demo --backends torch-merged,onnx-fp32     # uses it

Eager PyTorch with transformers' own DynamicCache: no compilation, no custom kernels. This is the
baseline the ONNX targets are measured against.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lite_sft.errors import ServeError

from .devices import DTYPES, pick_device
from .folder import max_context


@dataclass
class TorchState:
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # (batch, length) long: 0 on left padding

    @property
    def batch(self) -> int:
        return self.mask.shape[0]



class TorchBackend:
    task = "causal-lm"

    def __init__(self, model, name: str, precision: str, max_context: int, vocab_size: int,
                 folder: Path | None = None):
        self.model = model.eval()
        self.folder = folder
        self.name = name
        self.precision = precision
        self.device = next(model.parameters()).device
        self.provider = f"torch {self.device.type}"
        self.max_context = max_context
        self.vocab_size = vocab_size
        # transformers 5 renames forward's `past_key_values` to `cache` (the old name goes in 5.40); a model with
        # code of its own (trust_remote_code) may know only the old one.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "auto", dtype: str | None = None,
                    threads: int | None = None, name: str = "torch-merged") -> "TorchBackend":
        from transformers import AutoModelForCausalLM

        dev = pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        precision = dtype or ("bf16" if dev.type == "cuda" else "fp32")  # bf16 matmuls are slow on CPU
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[precision]).to(dev)
        except (OSError, ValueError) as err:
            raise ServeError(f"could not load the PyTorch model in {folder}: {err}") from err
        return cls(model, name, precision, max_context(Path(folder)), model.config.vocab_size, Path(folder))

    @classmethod
    def from_model(cls, model, name: str, precision: str = "fp32") -> "TorchBackend":
        """Wrap a model already in memory, e.g. a peft PeftModel with its adapter unmerged."""
        config = model.config
        ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        return cls(model, name, precision, ctx, config.vocab_size)

    def describe(self) -> str:
        return f"{self.name} on {self.provider} ({self.precision})"

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: all but an input-embedding table that is not the output head."""
        table = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == table.data_ptr()
        return self.weight_bytes() - (0 if tied else table.numel() * table.element_size())

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int) -> tuple[np.ndarray, TorchState]:
        from transformers import DynamicCache

        state = TorchState(DynamicCache(), torch.from_numpy(mask[:, :0]).to(self.device))
        return self._run(state, torch.from_numpy(ids), torch.from_numpy(mask)), state

    @torch.inference_mode()
    def decode(self, state: TorchState, tokens: np.ndarray) -> np.ndarray:
        ones = torch.ones(state.batch, 1, dtype=torch.long, device=self.device)
        return self._run(state, torch.from_numpy(tokens.reshape(-1, 1)), torch.cat([state.mask, ones], dim=1))

    def keep(self, state: TorchState, rows: list[int]) -> TorchState:
        """Only `rows` go on, without the leading columns that are padding for all of them (ort.py's keep)."""
        index = torch.tensor(rows, device=self.device)
        mask = state.mask[index]
        pad = int(mask.any(dim=0).int().argmax())
        for layer in state.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, pad:], layer.values[index, :, pad:]
        state.mask = mask[:, pad:]
        return state

    def join(self, state: TorchState, other: TorchState) -> TorchState:
        """`state`'s rows then `other`'s in one cache, each left-padded with zeros (masked) to the longer length."""
        from transformers import DynamicCache

        length = max(state.mask.shape[1], other.mask.shape[1])

        def left(t: torch.Tensor, dim: int) -> torch.Tensor:  # zeros before the columns along `dim`
            shape = list(t.shape)
            shape[dim] = length - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        layers = [(torch.cat([left(a.keys, 2), left(b.keys, 2)]), torch.cat([left(a.values, 2), left(b.values, 2)]))
                  for a, b in zip(state.cache.layers, other.cache.layers)]
        return TorchState(DynamicCache(layers), torch.cat([left(state.mask, 1), left(other.mask, 1)]))

    def release(self, state: TorchState) -> None:
        """Nothing is pooled: the cache's tensors are freed with the state."""

    def _run(self, state: TorchState, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        ids, mask = ids.to(self.device, torch.long), mask.to(self.device, torch.long)
        new = ids.shape[1]
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -new:]  # left padding: count real tokens only
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: state.cache})
        state.cache, state.mask = out[self.cache_arg], mask
        return out.logits[:, -1].float().cpu().numpy()  # (batch, vocab)
