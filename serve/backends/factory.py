"""From a folder to a running backend: which folder to load, on which runtime, with which task's backend.

    backend, tokenizer = load_backend("exports/demo")                 # OUT/onnx (or its gated int8/int4)
    backend, tokenizer = load_backend("exports/demo/merged", "cpu")  # a Hugging Face folder in PyTorch

A folder is one of (resolve_model):
    an export OUT (parity.json beside onnx/, merged/)   -> OUT/onnx, onnx-int8 or onnx-int4 (lite_sft.artifacts
        says which: the quantised variant the export gated, unless told)
    a multi-adapter export OUT (adapters.json beside onnx/) -> lora.py's LoraOrtBackend, every adapter loaded;
        lora_encoder.py's LoraEncoderBackend where the adapters are classifiers (a trunk graph and a head each)
    an ONNX folder (model.onnx, or encoder_model.onnx + decoder files, + config.json + tokenizer, as
        `lite-sft export` writes it)
    a Hugging Face folder (config.json + weights)       -> PyTorch
and its task one of lite_sft.taskspec.TASKS, read by lite_sft.artifacts.model_task. open_backend picks the
backend from the task's row: a generating decoder-only model (ort.py's OrtBackend, pytorch.py's TorchBackend),
an encoder-decoder (seq2seq.py) or a classifier that scores its input (encoder.py). `lite-sft serve` and
`lite-sft bench` both build their backends here.
"""

from __future__ import annotations

from pathlib import Path

from lite_sft.artifacts import (ADAPTER_CONFIG, GENAI_CONFIG, MODEL_CONFIG, PARITY_FILE, VARIANTS, has_onnx,
                                model_task, served_variant, variant_folder)
from lite_sft.adapters import MANIFEST_FILE, read_manifest
from lite_sft.errors import ServeError
from lite_sft.taskspec import TASKS

from .encoder import OrtEncoderBackend, TorchEncoderBackend
from .folder import check_tokenizer, load_tokenizer
from .lora import LoraOrtBackend
from .lora_encoder import LoraEncoderBackend, serves_classifiers
from .ort import OrtBackend
from .pytorch import TorchBackend
from .seq2seq import Seq2SeqBackend


def resolve_model(folder: str | Path, variant: str | None = None) -> tuple[str, Path]:
    """("onnx" | "torch", the folder to load); `variant` None picks an export's as artifacts.served_variant does.
    Says what a folder lacks when it is not a model."""
    folder = Path(folder)
    if variant not in (None, *VARIANTS):
        raise ServeError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if not folder.is_dir():
        raise ServeError(f"{folder} does not exist or is not a folder")
    if (folder / PARITY_FILE).is_file():  # an export OUT
        variant = variant or served_variant(folder)
        sub = folder / variant_folder(variant)
        if not has_onnx(sub):
            have = sorted(p.name for p in folder.iterdir() if has_onnx(p))
            raise ServeError(f"{folder} is an export without {sub.name}/ (it has: {', '.join(have) or 'no ONNX model'}); "
                             f"re-export with `lite-sft export RUN --out {folder} --overwrite"
                             + (f" --quantize {variant}`" if variant != "fp" else "`"))
        folder = sub
    elif variant not in (None, "fp"):
        raise ServeError(f"variant {variant} picks a folder inside an export OUT; {folder} is not one (no parity.json)")
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / MODEL_CONFIG).is_file():
        raise ServeError(f"{folder} is a `lite-sft tune` run directory: export it first "
                         f"(`lite-sft export {folder} --out OUT`) and serve OUT")
    if (folder / GENAI_CONFIG).is_file() and not (folder / MODEL_CONFIG).is_file():
        raise ServeError(f"{folder} is onnxruntime-genai's builder output: copy config.json, generation_config.json "
                         "and the tokenizer files of the model it was built from (an export's merged/ or onnx/) "
                         "beside its model.onnx, and serve it")
    if not (folder / MODEL_CONFIG).is_file():
        raise ServeError(f"{folder} is not an exported model: expected model.onnx + config.json (an ONNX folder), "
                         "config.json + weights (a Hugging Face folder) or an export OUT with parity.json")
    check_tokenizer(folder)
    if has_onnx(folder):
        return "onnx", folder
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return "torch", folder
    raise ServeError(f"{folder} has a config.json but no model.onnx and no weights (*.safetensors)")


def open_backend(kind: str, path: Path, task: str, device: str = "auto", threads: int | None = None,
                 tokenizer=None):
    """The backend for `task` (a name in TASKS) on the folder `path`: "onnx" on onnxruntime, "torch" in PyTorch.
    A classifier given its tokenizer checks it can do what the task's endpoint asks."""
    spec = TASKS[task]
    if not spec.generates:
        backend = (OrtEncoderBackend(path, task, device, threads) if kind == "onnx"
                   else TorchEncoderBackend.from_folder(path, task, device, threads=threads))
        if tokenizer is not None:
            backend.check_tokenizer(tokenizer)
        return backend
    if spec.encoder_decoder:
        load = Seq2SeqBackend.from_onnx if kind == "onnx" else Seq2SeqBackend.from_folder
        return load(path, device, threads=threads, tokenizer=tokenizer)
    if kind == "onnx":
        return OrtBackend(path, device, threads)
    return TorchBackend.from_folder(path, device, threads=threads)


def load_backend(folder: str | Path, device: str = "auto", threads: int | None = None, variant: str | None = None):
    """(backend, tokenizer) for a model folder; see resolve_model for the folders understood. `backend.task`
    says which task: generating backends (causal-lm, seq2seq) follow protocol.GeneratingBackend, encoder
    classifiers (seq-cls, token-cls) protocol.ScoringBackend."""
    kind, path = resolve_model(folder, variant)
    task = model_task(path)
    tokenizer = load_tokenizer(path)
    # A multi-adapter export: OUT/adapters.json beside OUT/onnx/ (lite_sft/adapters.py); its graph serves them all.
    manifest_dir = next((d for d in (Path(folder), path.parent) if (d / MANIFEST_FILE).is_file()), None)
    if manifest_dir is not None and kind == "onnx":
        if serves_classifiers(read_manifest(manifest_dir)):  # its adapters' tasks, not parity.json's, say so
            backend = LoraEncoderBackend(path, device, threads, manifest_dir=manifest_dir)
            backend.check_tokenizer(tokenizer)
            return backend, tokenizer
        if task == "causal-lm":
            return LoraOrtBackend(path, device, threads, manifest_dir=manifest_dir), tokenizer
    return open_backend(kind, path, task, device, threads, tokenizer), tokenizer
