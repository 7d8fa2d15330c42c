"""The ONNX exporters, one module each, and the one table that says which exports what.

    lite-sft export runs/qwen --out exports/qwen                       # causal-lm: builder, else torch
    lite-sft export runs/gpt2 --out exports/gpt2 --exporter torch      # force one

Each row of EXPORTERS is one task and one exporter; for a task, the first row whose exporter takes the
architecture is used (`--exporter NAME` forces a row of that name). An exporter module has:

    NAME                                   "builder" or "torch": what --exporter, the log and parity.json say
    refuses(config, dtype) -> str | None   why it cannot export this model (config: the merged model's
                                           transformers config), or None when it can; asked before any work
    export(model, merged, out, dtype)      write the ONNX folder `out` from the merged model (`model`, loaded in
                                           fp32 from the merged/ folder `merged`): the graph(s), config.json,
                                           generation_config.json and the tokenizer, so the folder is servable
                                           (lite_sft.artifacts.copy_model_files copies those from `merged`)
    quantize(src, dst, method, block_size, merged) (optional) a quantised copy of the exported folder `src`;
                                           without it quantize.quantize (onnxruntime's quantisers) is used

A builder that fails at export time falls back to the next row (pipeline.py says so in the log); an
architecture no row takes is one ExportError naming it before anything is written.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .. import ExportError
from lite_sft.options import EXPORTER_CHOICES



@dataclass(frozen=True)
class Row:
    task: str
    name: str
    """What --exporter calls it."""
    module: str
    """The module under lite_sft.export.exporters that does the work."""

    def load(self):
        return importlib.import_module(f"{__name__}.{self.module}")


EXPORTERS = (
    # Decoders: onnxruntime-genai's model builder gives the fused GroupQueryAttention graph onnxruntime-genai
    # runs; every architecture it does not take goes through torch.onnx.
    Row("causal-lm", "builder", "builder"),
    Row("causal-lm", "torch", "torch_decoder"),
    Row("seq-cls", "torch", "torch_encoder"),
    Row("token-cls", "torch", "torch_encoder"),
    Row("seq2seq", "torch", "torch_seq2seq"),
)


def candidates(task: str, config, dtype: str, forced: str = "auto") -> list[Row]:
    """The rows that can export this model for `task`, in the order they are tried; never empty (an
    ExportError says what no row takes, and why each refused)."""
    if forced not in EXPORTER_CHOICES:
        raise ExportError(f"--exporter {forced!r}: choose one of {', '.join(EXPORTER_CHOICES)}")
    rows = [r for r in EXPORTERS if r.task == task]
    if forced != "auto":
        if not any(r.name == forced for r in rows):
            raise ExportError(f"--exporter {forced}: {task} runs export with {' or '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name == forced]
    reasons, taken = [], []
    for row in rows:
        why = row.load().refuses(config, dtype)
        if why is None:
            taken.append(row)
        else:
            reasons.append(f"{row.name}: {why}")
    if not taken:
        model_type = getattr(config, "model_type", "?")
        raise ExportError(f"no ONNX exporter takes this {model_type} model for {task} ({'; '.join(reasons)}); "
                          "export only the merged model with --no-onnx")
    return taken
