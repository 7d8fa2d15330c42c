"""An exported ONNX decoder (causal-lm) under onnxruntime with IO binding: the KV cache stays on the device.

    backend = OrtBackend("exports/demo/onnx", "auto")     # or factory.load_backend("exports/demo")
    logits, state = backend.prefill(ids, mask, capacity)  # the calls of protocol.py, with join and release

A graph whose attention is onnxruntime's fused GroupQueryAttention (as onnxruntime-genai's model builder makes
them, which `lite-sft export` uses for decoders it takes: ~150 nodes a step where an unfused graph runs ~1,000)
keeps each row's cache from column 0 instead of left-padded: GQA
reads a row's length from the attention mask's sum, places its positions from that, and writes a row's new
key and value right after its own past (onnxruntime's GQA kernel: past_seqlen = seqlens_k + 1 - new), so rows
are right-padded, and a left-padded batch would be wrong (measured: the batched tokens differ from alone).
Such a graph has no position_ids input; the same three calls, join and keep work with the padding on the right.
Its prompt is prefilled in one call (GQA's chunked "subsequent prompt" is not used). And its cache is written
in place, as onnxruntime-genai runs it: past and present are bound to one buffer of the state's whole
capacity (GQA then appends each row's new key and value where its past ends and copies nothing), instead of
the two buffers an unfused graph's Concat needs, which copies the whole cache every step.

Why IO binding and ping-pong buffers: a graph without GQA (torch.onnx's, exporters/torch_decoder.py) takes `past_key_values.N.*` of length L and returns
`present.N.*` of length L + new, a fresh tensor each step. Without binding, onnxruntime allocates every
present tensor and copies it to the host, and we copy it back. Here each layer's K and V live in two device
buffers big enough for a whole generation (batch x (prompt + max new tokens)), allocated once and kept for
the next batch (a bigger pair is made only when one needs more); a step reads the past from one and writes the
present into the other, so the cache never leaves the device and no step allocates. Each state owns its pair
while it runs: rows prefilled to join a running batch fill a pair of their own, and join copies both into a
third (a copy the size of one step's, once per join).
onnxruntime cannot write in place into its own input (Concat reads while it writes), hence two buffers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lite_sft.adapters import MASK_INPUT
from lite_sft.artifacts import MODEL_CONFIG, ONNX_FILE
from lite_sft.errors import ServeError

from .devices import NP_TYPES, ORT_TYPES, onnx_precision, open_session
from .folder import max_context
from .protocol import align_left

# Prefill's logits are (batch, chunk, vocab): a 2,000-token prompt with a 150k vocabulary would need 1.2 GB
# for one sequence, so long prompts are fed in chunks whose logits fit in this much memory.
LOGITS_BUDGET_BYTES = 256 * 2**20
# Buffer pairs kept for reuse after their batch ended (the largest): a running batch, rows joining it and the
# pair a join copies them into are three at most at a time.
SPARE_PAIRS = 3


@dataclass
class OrtState:
    """One batch's place in generation: its KV buffers, length and attention mask."""

    buffers: list[dict[str, torch.Tensor]] | None  # two, each input name -> flat buffer of batch x heads x capacity
    # x dim; None once released
    current: int  # which buffer holds the past
    length: int  # tokens in the cache
    mask: np.ndarray  # (batch, length) int64: 0 on padding (left; right for a GroupQueryAttention graph)
    capacity: int
    binding: object = field(repr=False, default=None)
    bound: tuple | None = None  # (current, batch) the in-place cache was last bound as; the same needs no binding
    adapters: list = field(default_factory=list)  # each row's adapter name (None: the base), for a LoRA backend
    bank: int = -1  # the version of the LoRA banks bound to `binding` (lora.py); -1: none yet

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


class OrtBackend:
    """An exported ONNX decoder with a KV cache (the builder's GQA graph or torch.onnx's) under onnxruntime."""

    task = "causal-lm"

    def __init__(self, folder: str | Path, device: str = "auto", threads: int | None = None):
        self.folder = Path(folder)
        self.session = open_session(self.folder / ONNX_FILE, device, threads)
        self.provider = self.session.get_providers()[0]
        self.device = torch.device("cuda" if self.provider == "CUDAExecutionProvider" else "cpu")
        self.name = f"onnx-{self.folder.name}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = {"input_ids", "attention_mask", "past_key_values.0.key"} - set(inputs)
        if missing or "logits" not in outputs:
            raise ServeError(f"{self.folder / ONNX_FILE} is not a decoder with a KV cache (missing inputs "
                             f"{sorted(missing)}): export it with `lite-sft export`")
        if MASK_INPUT in inputs and type(self) is OrtBackend:  # lora.py's LoraOrtBackend serves these
            raise ServeError(f"{self.folder / ONNX_FILE} has LoRA branches (a multi-adapter export's graph): serve the "
                             "export folder holding adapters.json, which names its adapters")
        self.has_positions = "position_ids" in inputs
        self.pad_right = _uses_gqa(self.folder / ONNX_FILE)  # rows from column 0: see the module docstring
        # past_key_values.N.key -> present.N.key, in layer order
        self.kv = [(name, name.replace("past_key_values", "present")) for name in inputs if name.startswith("past_key_values.")]
        past = inputs["past_key_values.0.key"]
        config = json.loads((self.folder / MODEL_CONFIG).read_text())
        self.kv_heads, self.head_dim = past.shape[1], past.shape[3]
        if not isinstance(self.head_dim, int):  # a symbolic axis (onnxruntime-genai's builder names it): config's
            heads = config.get("num_attention_heads")
            self.head_dim = config.get("head_dim") or (heads and config.get("hidden_size", 0) // heads)
        if not all(isinstance(d, int) and d > 0 for d in (self.kv_heads, self.head_dim)):
            raise ServeError(f"{self.folder}: cannot read the KV cache's head count and size from {past.shape}")
        self.kv_dtype = ORT_TYPES[past.type]
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self.logits_dtype = ORT_TYPES[logits_type]
        self.vocab_size = config.get("vocab_size") or self.session.get_outputs()[0].shape[-1]
        self.max_context = max_context(self.folder)
        self.precision = onnx_precision(self.folder, self.kv_dtype == torch.float16)
        self._spare: list[list[dict[str, torch.Tensor]]] = []  # buffer pairs of ended batches, for the next ones
        self._logits: torch.Tensor | None = None  # the logits output's buffer, reused by every call (_logits_view)

    def describe(self) -> str:
        return f"{self.folder} on onnxruntime {self.provider} ({self.precision})"

    def weight_bytes(self) -> int:
        """The graph and its external data on disk."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if ".onnx" in p.name)

    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads: all but the input-embedding table, of which a lookup reads one
        row (unless the same table is the output head). Found in the graph: the Gather on input_ids, maybe
        behind a DequantizeLinear (int8 quantises the table too)."""
        import math

        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        graph = onnx.load(str(self.folder / ONNX_FILE), load_external_data=False).graph
        size = {t.name: math.prod(t.dims) * tensor_dtype_to_np_dtype(t.data_type).itemsize for t in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        lookup = next((n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"), None)
        table = lookup.input[0] if lookup is not None else None
        if table in producer and producer[table].op_type == "DequantizeLinear":
            table = producer[table].input[0]
        users = sum(table in n.input for n in graph.node)
        return self.weight_bytes() - (size.get(table, 0) if users == 1 else 0)

    # -- buffers ---------------------------------------------------------------------------------------------

    def _take(self, batch: int, capacity: int) -> list[dict[str, torch.Tensor]]:
        """Two sets of flat KV buffers for (batch, heads, capacity, dim): the smallest spare pair that is big
        enough, else a new pair."""
        need = batch * self.kv_heads * capacity * self.head_dim
        fits = [i for i, pair in enumerate(self._spare) if self._elements(pair) >= need]
        if fits:
            return self._spare.pop(min(fits, key=lambda i: self._elements(self._spare[i])))
        return [{name: torch.empty(need, dtype=self.kv_dtype, device=self.device) for name, _ in self.kv}
                for _ in range(2)]

    def _elements(self, pair: list[dict[str, torch.Tensor]]) -> int:
        return pair[0][self.kv[0][0]].numel()

    def release(self, state: OrtState) -> None:
        """`state` is done: its buffers are kept for a later batch (the SPARE_PAIRS largest), the rest freed."""
        if state.buffers is not None:
            self._spare.append(state.buffers)
            state.buffers = None
            self._spare.sort(key=self._elements, reverse=True)
            del self._spare[SPARE_PAIRS:]

    def _view(self, flat: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        # The first batch*heads*length*dim elements, as a contiguous (batch, heads, length, dim) tensor.
        return flat[: batch * self.kv_heads * length * self.head_dim].view(batch, self.kv_heads, length, self.head_dim)

    def _bind(self, binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        kind = binding.bind_output if output else binding.bind_input
        kind(name, self.device.type, self.device.index or 0, NP_TYPES[tensor.dtype], tuple(tensor.shape),
             tensor.data_ptr())

    # -- the three calls --------------------------------------------------------------------------------------

    def prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int) -> tuple[np.ndarray, OrtState]:
        """Read the (left-padded) prompts; `capacity` is the longest the cache will grow (prompt + new tokens)."""
        return self._prefill(ids, mask, capacity, [])

    def _prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int,
                 adapters: list) -> tuple[np.ndarray, OrtState]:
        batch, seq = ids.shape
        state = OrtState(self._take(batch, capacity), 0, 0, mask[:, :0], capacity, self.session.io_binding(),
                         adapters=adapters)
        if self.pad_right:
            ids, mask = align_left(ids, mask, 0)
            logits = self._run(state, ids, mask)  # (batch, seq, vocab): each row's last token is its own
            return _numpy(logits[torch.arange(batch), torch.from_numpy(mask.sum(axis=1) - 1)]), state
        chunk = max(1, LOGITS_BUDGET_BYTES // (batch * self.vocab_size * 4))
        for start in range(0, seq, chunk):
            logits = self._run(state, ids[:, start:start + chunk], mask[:, :start + chunk])
        return _numpy(logits[:, -1]), state

    def decode(self, state: OrtState, tokens: np.ndarray) -> np.ndarray:
        if self.pad_right:  # each row's next column is its own: ones up to its length + 1
            mask = (np.arange(state.length + 1) <= state.mask.sum(axis=1)[:, None]).astype(np.int64)
        else:
            mask = np.concatenate([state.mask, np.ones((state.batch, 1), dtype=np.int64)], axis=1)
        return _numpy(self._run(state, tokens.reshape(-1, 1).astype(np.int64), mask)[:, -1])

    def keep(self, state: OrtState, rows: list[int]) -> OrtState:
        """Only `rows` of the batch go on: their cache is gathered into the other buffer, without the leading
        columns that were padding for all of them (left there by a longer row that has left)."""
        mask = state.mask[rows]
        if self.pad_right:  # the columns after the longest kept row go
            start, length = 0, int(mask.sum(axis=1).max())
        else:  # every row has a token, so some column is 1
            start = int(mask.any(axis=0).argmax())
            length = state.length - start
        index = torch.tensor(rows, device=self.device)
        src, dst = state.buffers[state.current], state.buffers[1 - state.current]
        for name, _ in self.kv:
            kept = self._cache(src[name], state.batch, state.length, state.capacity)[:, :, start:start + length]
            self._cache(dst[name], len(rows), length, state.capacity).copy_(torch.index_select(kept, 0, index))
        self._synchronize()
        state.current, state.length, state.mask = 1 - state.current, length, mask[:, start:start + length]
        state.adapters = [state.adapters[i] for i in rows] if state.adapters else []
        return state

    def join(self, state: OrtState, other: OrtState) -> OrtState:
        """One state holding `state`'s rows then `other`'s, each right-aligned at the longer of their lengths
        (the columns before a row's cache are zeros its mask hides: zeros, since 0 x NaN from an unwritten
        buffer would still be NaN). Both inputs are released."""
        length = max(state.length, other.length)
        capacity = length + max(s.capacity - s.length for s in (state, other))  # room for the longest to finish
        batch = state.batch + other.batch
        buffers = self._take(batch, capacity)
        for name, _ in self.kv:
            out, row = self._cache(buffers[0][name], batch, length, capacity), 0
            for part in (state, other):
                pad = length - part.length
                cache, padding = (slice(0, part.length), slice(part.length, length)) if self.pad_right else \
                    (slice(pad, length), slice(0, pad))
                out[row:row + part.batch, :, padding].zero_()
                out[row:row + part.batch, :, cache].copy_(self._cache(part.buffers[part.current][name], part.batch,
                                                                      part.length, part.capacity))
                row += part.batch
        self._synchronize()
        mask = np.concatenate([np.pad(s.mask, ((0, 0), (0, length - s.length) if self.pad_right
                                               else (length - s.length, 0))) for s in (state, other)])
        adapters = state.adapters + other.adapters if state.adapters or other.adapters else []
        self.release(state)
        self.release(other)
        return OrtState(buffers, 0, length, mask, capacity, self.session.io_binding(), adapters=adapters)

    def _cache(self, flat: torch.Tensor, batch: int, length: int, capacity: int) -> torch.Tensor:
        """The (batch, heads, length, dim) cache held in `flat`: contiguous at `length` columns, or, written in
        place (GQA), the first `length` columns of a (batch, heads, capacity, dim) buffer."""
        if self.pad_right:
            return self._view(flat, batch, capacity)[:, :, :length]
        return self._view(flat, batch, length)

    def _logits_view(self, rows: int) -> torch.Tensor:
        """`rows` x vocab logits in one buffer kept across calls (grown when a call needs more): a prompt's are
        (batch x prompt) x vocab, 131 MB at batch 8, and a fresh tensor each call paid its page faults again
        (measured: int8 batch-8 time to first token 558 -> 480 ms with the buffer kept). Callers copy out what they
        keep (_numpy)."""
        need = rows * self.vocab_size
        if self._logits is None or self._logits.numel() < need:
            self._logits = torch.empty(need, dtype=self.logits_dtype, device=self.device)
        return self._logits[:need]

    def _bind_more(self, state: OrtState, binding) -> None:
        """Inputs a subclass adds to every call (lora.py: the LoRA banks and the rows' mask); none here."""

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # onnxruntime runs on its own stream

    def _run(self, state: OrtState, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """One forward over `ids` (batch, new) after the cached tokens; returns the logits (batch, new, vocab)."""
        batch, new = ids.shape
        length = state.length + new
        if length > state.capacity:
            raise ServeError(f"the cache holds {state.capacity} tokens; step to {length} refused")
        binding = state.binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        if self.has_positions:
            # Left padding: a token's position counts only the real tokens before it.
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -new:]
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        self._bind_more(state, binding)
        src, dst = state.buffers[state.current], state.buffers[1 - state.current]
        if self.pad_right and state.bound != (state.current, batch):
            # In place: one buffer of the whole capacity is both past and present, the same every step until
            # rows leave (keep moves them to the other buffer); binding 2 x layers tensors again each step
            # cost ~0.5 ms of a 7 ms step.
            for past, present in self.kv:
                self._bind(binding, past, self._view(src[past], batch, state.capacity))
                self._bind(binding, present, self._view(src[past], batch, state.capacity), output=True)
            state.bound = (state.current, batch)
        elif not self.pad_right:
            for past, present in self.kv:
                self._bind(binding, past, self._view(src[past], batch, state.length))
                self._bind(binding, present, self._view(dst[past], batch, length), output=True)
        logits = self._logits_view(batch * new).view(batch, new, self.vocab_size)
        self._bind(binding, "logits", logits, output=True)
        self.session.run_with_iobinding(binding)
        if self.device.type == "cuda":
            binding.synchronize_outputs()
        if not self.pad_right:
            state.current = 1 - state.current
        state.length, state.mask = length, mask
        return logits


def _numpy(logits: torch.Tensor) -> np.ndarray:
    """A copy: on the CPU `logits` is a view of the backend's reused logits buffer, which the next call overwrites."""
    return logits.float().cpu().numpy().copy()


def _uses_gqa(model_file: Path) -> bool:
    """Whether the graph's attention is onnxruntime's GroupQueryAttention (its weights are not read)."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return any(node.op_type == "GroupQueryAttention" for node in graph.node)
