"""The files lite-sft writes and reads back, in one place: a tune run directory and an export OUT folder.

    lite-sft tune --output-dir runs/qwen     # RUN_DIR: config.yaml, the adapter, the tokenizer, stop ids, ...
    lite-sft export runs/qwen --out OUT      # OUT: merged/, onnx/ (onnx-int8/, onnx-int4/), parity.json

A run directory holds CONFIG_FILE (the resolved config), the adapter (ADAPTER_CONFIG, ADAPTER_WEIGHTS, and
TRAINABLE for a task head), the tokenizer, GENERATION_CONFIG with the run's stop ids (lite_sft.stops), a
classifier's LABELS_FILE and the held-out examples (VALIDATION_SPLIT_FILE), besides checkpoints and metrics.

An export OUT holds merged/ (the Hugging Face model), onnx/ and a folder per quantised variant, and
PARITY_FILE: the run it came from, its task, and every stage's gate. `lite-sft export --quantize int8` writes
onnx-int8/ beside onnx/ and records "gates": [{"stage": "merge", ...}, {"stage": "onnx", ...}, {"stage": "int8",
"artefact": "onnx-int8", "passed": true, ...}]. A quantised graph was asked for to be served, so unless told
otherwise the server serves the one whose gate passed; an export without such a gate (none asked, or an older
or hand-made parity.json) serves onnx/.

    lite-sft serve exports/qwen                  # the quantised variant the export made and gated, else onnx/
    lite-sft serve exports/qwen --variant fp     # told: onnx/ (int8: onnx-int8/, int4: onnx-int4/)

Every other module asks this one for a file's name, a folder's kind or a model's task. It is core: it imports
only the error tree and the task rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import ServeError
from .taskspec import TASK_NAMES, task_named, task_of_peft_type

# A tune run directory
CONFIG_FILE = "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINABLE_FILE = "trainable.safetensors"  # modules trained whole (a task head), beside the adapter
GENERATION_CONFIG = "generation_config.json"  # the run's stop ids as `eos_token_id` (lite_sft.stops)
LABELS_FILE = "labels.json"
VALIDATION_SPLIT_FILE = "validation_split.json"  # the held-out examples as validation tokenised them
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"

# A model folder (Hugging Face's files, which an ONNX folder keeps beside its graph)
MODEL_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")

# An export OUT
MERGED_DIR = "merged"
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's, written by its model builder
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


def is_run_dir(folder: Path) -> bool:
    """A `lite-sft tune` run directory: an adapter without a model's config.json beside it."""
    return (Path(folder) / ADAPTER_CONFIG).is_file() and not (Path(folder) / MODEL_CONFIG).is_file()


def run_task(run_dir: Path) -> str:
    """A run directory's task, from its adapter's peft task type (an adapter without one is a causal LM's)."""
    return task_of_peft_type(read_json_object(Path(run_dir) / ADAPTER_CONFIG).get("task_type")).name


def model_task(folder: str | Path) -> str:
    """What the model in `folder` does (a name in taskspec.TASKS): the task parity.json records for an export,
    else the head config.json's architectures name. A model without a head lite-sft serves is one clear
    ServeError."""
    folder = Path(folder)
    for parity in (folder / PARITY_FILE, folder.parent / PARITY_FILE):  # an export OUT, or a folder in it
        if parity.is_file():
            task = read_json_object(parity).get("task")
            if task is not None:
                spec = task_named(task)
                if spec is None:
                    raise ServeError(f"{parity} names the task {task!r}; lite-sft serves {', '.join(TASK_NAMES)}")
                return spec.name
            break
    # An export OUT holds its config in onnx/ and merged/
    holder = next((f for f in (folder, folder / "onnx", folder / MERGED_DIR) if (f / MODEL_CONFIG).is_file()), folder)
    config = read_json_object(holder / MODEL_CONFIG)
    archs = config.get("architectures") or []
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return "seq-cls"
        if arch.endswith("ForTokenClassification"):
            return "token-cls"
        if arch.endswith(("ForCausalLM", "LMHeadModel")) and not config.get("is_encoder_decoder"):
            return "causal-lm"
    if config.get("is_encoder_decoder") and any(a.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) for a in archs):
        return "seq2seq"
    raise ServeError(f"{folder}: config.json's architectures {archs or '(none)'} name no head lite-sft serves: "
                     "*ForCausalLM (generation), encoder-decoder *ForConditionalGeneration (seq2seq), "
                     "*ForSequenceClassification (classify) or *ForTokenClassification (ner); export a model "
                     "trained with one of these tasks")


# --- export folder

ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # an older peft's adapter weights, which export still reads
TOKENIZER_CONFIG = "tokenizer_config.json"  # a tokenizer saved by transformers, with or without tokenizer.json
# What a Hugging Face folder holds that an ONNX folder beside it does not need: the PyTorch weights (the graph
# replaces them) and their shard indexes.
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")


def has_adapter(run_dir: Path) -> bool:
    """A finished adapter in a run directory: its config and its weights (safetensors, or an older peft's .bin)."""
    run_dir = Path(run_dir)
    return (run_dir / ADAPTER_CONFIG).is_file() and any((run_dir / name).is_file()
                                                         for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN))


def is_model_file(name: str) -> bool:
    """An ONNX graph or its external weights: model.onnx, model.onnx_data (torch.onnx), model.onnx.data (the builder)."""
    return name.endswith(".onnx") or ".onnx_data" in name or ".onnx.data" in name


def copy_model_files(src: Path, dst: Path) -> None:
    """Put beside the ONNX graph in `dst` what makes the folder servable on its own, from the Hugging Face folder
    `src` (an export's merged/): every file but the weights, i.e. config.json (a classifier's labels),
    generation_config.json (the run's stop ids or generation settings), the tokenizer and its chat template. They
    replace any copy an exporter wrote itself (the model builder re-saves the tokenizer): the run's are the
    reference."""
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not any(Path(path.name).match(pattern) for pattern in WEIGHT_FILES):
            shutil.copy2(path, Path(dst) / path.name)
