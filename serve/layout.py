"""What an export OUT holds, as serving reads it: its ONNX variants, and which of them passed their gates.

    lite-sft serve exports/qwen                  # the quantised variant the export made and gated, else onnx/
    lite-sft serve exports/qwen --variant fp     # told: onnx/ (int8: onnx-int8/, int4: onnx-int4/)

`lite-sft export --quantize int8` writes onnx-int8/ beside onnx/ and records every stage's gate in parity.json:
"gates": [{"stage": "merge", ...}, {"stage": "onnx", ...}, {"stage": "int8", "artefact": "onnx-int8",
"passed": true, ...}]. A quantised graph was asked for to be served, so unless told otherwise the server serves
the one whose gate passed; an export without such a gate (none asked, or an older or hand-made parity.json)
serves onnx/.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import ServeError

ONNX_FILE = "model.onnx"
# An encoder-decoder's two graphs (export/exporters/torch_seq2seq.py writes them; its docstring has their inputs):
# the encoder gives every decoder layer's cross-attention keys and values, the decoder takes every step.
ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model.onnx"
PARITY_FILE = "parity.json"
VARIANTS = ("fp", "int8", "int4")


def variant_folder(variant: str) -> str:
    return "onnx" if variant == "fp" else f"onnx-{variant}"


def has_onnx(folder: Path) -> bool:
    """An ONNX model: model.onnx, or an encoder-decoder's encoder_model.onnx (and decoder_model.onnx)."""
    return (folder / ONNX_FILE).is_file() or (folder / ENCODER_FILE).is_file()


def read_json_object(path: Path) -> dict:
    """A JSON object the export wrote (parity.json, config.json), or one clear ServeError saying to re-export."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ServeError(f"{path} is not a JSON object ({err}): re-export the model") from err
    if not isinstance(value, dict):
        raise ServeError(f"{path} is not a JSON object: re-export the model")
    return value


def served_variant(out: Path) -> str:
    """The variant an export OUT serves when not told: the quantised one whose gate passed and whose folder is
    there, else fp."""
    gates = read_json_object(out / PARITY_FILE).get("gates")
    for gate in reversed(gates if isinstance(gates, list) else []):
        stage = gate.get("stage") if isinstance(gate, dict) else None
        if stage in VARIANTS[1:] and gate.get("passed") is True and has_onnx(out / variant_folder(stage)):
            return stage
    return "fp"


def variant_line(folder: Path, variant: str | None) -> str | None:
    """The start-up line saying which variant of an export OUT is served and why (None for another folder)."""
    if not (folder / PARITY_FILE).is_file():
        return None
    chosen = variant or served_variant(folder)
    why = ("as --variant asked" if variant else "the export gated no quantised variant" if chosen == "fp"
           else "the quantised graph the export made, which passed its parity gate; --variant fp serves onnx/")
    return f"variant {chosen} ({variant_folder(chosen)}/): {why}"
