"""An exported decoder folder under onnxruntime, called as the parity gate calls it: one forward with a KV cache.

    decoder = OnnxDecoder(Path("exports/demo.tmp-1/onnx"))
    step = decoder(input_ids=ids, attention_mask=mask)                      # the prompt
    step = decoder(input_ids=next_ids, attention_mask=longer_mask, past_key_values=step.past_key_values)

Both of lite-sft's decoder graphs have the same names: inputs input_ids, attention_mask, past_key_values.N.key
and .value (batch, kv heads, past, head size), and position_ids where the graph takes them; outputs logits and
present.N.key / .value. They differ in padding. The torch exporter's graph (exporters/torch_decoder.py) takes
position_ids and left-padded rows, as a Hugging Face model does. The model builder's (exporters/builder.py) uses
onnxruntime's GroupQueryAttention, which places a row's positions from its attention mask's sum and writes a
row's new key and value right after its own past, so its rows are padded on the right (`pad_right`).

Written here rather than reusing lite-sft's server runtime (serve/backends/ort.py): export sits below serve and
does not import it, and a second, plain feed (no IO binding, no buffer pool, the whole cache copied each step) is an
independent check of the graph the server then runs its own way.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lite_sft.adapters import MASK_INPUT
from lite_sft.artifacts import MODEL_CONFIG, ONNX_FILE

from . import ExportError
from .onnx import one_line

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxDecoder:
    """The folder's model.onnx on the CPU provider, with torch tensors in and out."""

    def __init__(self, folder: Path):
        import onnx
        import onnxruntime

        model_file = Path(folder) / ONNX_FILE
        options = onnxruntime.SessionOptions()
        # As many threads as torch uses (OMP_NUM_THREADS): onnxruntime would otherwise take every core and
        # spin-wait on them, which on a shared machine makes small models many times slower.
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001  (onnxruntime raises its own Fail / InvalidProtobuf / ... types)
            raise ExportError(f"onnxruntime could not load the exported {model_file} ({one_line(err)})") from err
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.past = [n for n in inputs if n.startswith("past_key_values.")]
        if not {"input_ids", "attention_mask"} <= set(inputs) or not self.past:
            raise ExportError(f"{model_file} is not a decoder with a KV cache (inputs: {', '.join(inputs)})")
        self.present = [n.replace("past_key_values", "present") for n in self.past]
        first = inputs[self.past[0]]
        self.kv_type = NP_TYPES[first.type]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        if not isinstance(self.head_dim, int):  # the builder leaves the head size symbolic: the config has it
            config = json.loads((Path(folder) / MODEL_CONFIG).read_text())
            heads = config.get("num_attention_heads")
            self.head_dim = config.get("head_dim") or config["hidden_size"] // heads
        graph = onnx.load(str(model_file), load_external_data=False).graph
        self.pad_right = any(node.op_type == "GroupQueryAttention" for node in graph.node)
        self.constants: dict[str, np.ndarray] = {}
        self.row_mask: np.ndarray | None = None

    def feed_also(self, constants: dict[str, np.ndarray], row_mask: np.ndarray) -> None:
        """Inputs a multi-adapter graph (lite_sft/adapters.py) takes besides the decoder's: `constants` fed as they
        are on every call (the LoRA banks), and `row_mask` (rows, R) as the lora_mask of a call with `rows` rows,
        or, with one row, of every row of any call."""
        self.constants = {name: value.astype(self.kv_type, copy=False) for name, value in constants.items()}
        self.row_mask = row_mask.astype(self.kv_type, copy=False)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None,
                 position_ids: torch.Tensor | None = None, use_cache: bool = True) -> SimpleNamespace:
        """logits (batch, new, vocab) as fp32 torch, and past_key_values to pass to the next call."""
        batch = input_ids.shape[0]
        feed = {"input_ids": input_ids.numpy().astype(np.int64),
                "attention_mask": attention_mask.numpy().astype(np.int64)}
        if "position_ids" in self.input_names:
            if position_ids is None:  # positions count real tokens only (left padding)
                position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            feed["position_ids"] = position_ids.numpy().astype(np.int64)
        if past_key_values is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_type)
            past_key_values = [empty] * len(self.past)
        feed.update(zip(self.past, past_key_values))
        if self.row_mask is not None:
            rows = self.row_mask if self.row_mask.shape[0] == batch else np.repeat(self.row_mask[:1], batch, 0)
            feed.update(self.constants, **{MASK_INPUT: rows})
        outputs = self.session.run(["logits", *self.present], feed)
        return SimpleNamespace(logits=torch.from_numpy(outputs[0]).float(), past_key_values=outputs[1:])
