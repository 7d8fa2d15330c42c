"""Convert a merged model to ONNX with the exporter its task and architecture call for (exporters/).

    lite-sft export runs/qwen --out exports/qwen --dtype fp32        # exports/qwen/onnx/
    lite-sft export runs/gpt2 --out exports/gpt2 --exporter torch    # force torch.onnx

Which exporter (exporters/__init__.py has the one table):
    causal-lm  onnxruntime-genai's model builder (exporters/builder.py): model.onnx with onnxruntime's fused
               GroupQueryAttention, and genai_config.json, so onnxruntime-genai runs the folder as it is; an
               architecture the builder does not take, or a builder failure, goes to torch.onnx
               (exporters/torch_decoder.py): model.onnx with a KV cache, fused by onnxscript's optimize_for_ort
    seq-cls    torch.onnx + fusion (exporters/torch_encoder.py): model.onnx (logits: batch, labels)
    token-cls  the same (logits: batch, sequence, labels)
    seq2seq    torch.onnx (exporters/torch_seq2seq.py): an encoder graph and decoder graphs with a KV cache

Every decoder graph has the same names: inputs input_ids, attention_mask, past_key_values.N.key / .value and
position_ids where the graph takes them; outputs logits and present.N.key / .value (ort_decoder.py). Each folder
also holds config.json, generation_config.json (the run's stop ids) and the tokenizer with its chat template,
so `lite-sft serve` loads it as it is.

optimum-onnx, which lite-sft used before, is not used: its last release (0.1.0) needs transformers < 4.58 and
fails at import under transformers 5. The parity gate (parity.py) compares every folder with the merged
PyTorch model and fails the export when they differ.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from lite_sft.artifacts import is_model_file
from lite_sft.options import ONNX_DTYPES
from lite_sft.taskspec import TASKS

from . import ExportError
from .exporters import EXPORTERS, Row, candidates
from .quantize import quantize

log = logging.getLogger(__name__)


def check_dtype(dtype: str, task: str = "causal-lm") -> None:
    """A task exports the precisions its row names (fp16: decoders only, where it is tested); the others shrink
    with --quantize instead."""
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(ONNX_DTYPES)}")
    if dtype not in TASKS[task].onnx_dtypes:
        takers = " and ".join(spec.name for spec in TASKS.values() if dtype in spec.onnx_dtypes)
        raise ExportError(f"--dtype {dtype} exports {takers} runs only; export this {task} run in fp32 (and shrink "
                          "it with --quantize int8 or int4)")


def export_onnx(model, out: Path, dtype: str = "fp32", task: str = "causal-lm", merged: Path | None = None,
                exporter: str = "auto", rows: list[Row] | None = None,
                say: Callable[[str], None] = log.info) -> tuple[Row, str | None]:
    """Write `model` (a merged PyTorch model, fp32, loaded from the Hugging Face folder `merged`; by default the
    folder it was loaded from) to `out` as ONNX for `task`. Returns the exporter's row and, when an earlier one
    failed and this one stood in, why. `rows`: the candidates already chosen (exporters.candidates)."""
    check_dtype(dtype, task)
    merged = Path(merged or model.config._name_or_path)
    rows = rows or candidates(task, model.config, dtype, exporter)
    failed = []
    for i, row in enumerate(rows):
        try:
            row.load().export(model, merged, out, dtype)
            return row, "; ".join(failed) or None
        except ExportError as err:
            shutil.rmtree(out, ignore_errors=True)
            if i == len(rows) - 1:
                raise
            failed.append(f"{row.name} failed ({err})")
            say(f"the {row.name} exporter failed ({err}); trying {rows[i + 1].name}")
    raise AssertionError("unreachable: candidates() never returns an empty list")


def quantize_onnx(row: Row, src: Path, dst: Path, method: str, block_size: int, merged: Path) -> None:
    """The exporter's own quantiser where it has one (the builder makes its int4 itself), else onnxruntime's."""
    module = row.load()
    if hasattr(module, "quantize"):
        module.quantize(src, dst, method, block_size, merged)
    else:
        quantize(src, dst, method, block_size)


def load_ort(folder: Path, task: str = "causal-lm"):
    """What the parity gate runs an exported folder of `task` with: causal-lm's ort_decoder.OnnxDecoder (either
    decoder graph), or the task exporter's own runner."""
    return next(r for r in EXPORTERS if r.task == task).load().open(folder)


def one_line(err: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def onnx_bytes(folder: Path) -> int:
    """Size on disk of the model itself: the graph and its external data."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if is_model_file(p.name))
