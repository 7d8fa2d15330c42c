"""Convert a merged model to ONNX through optimum's exporter, in optimum's own folder layout.

    lite-sft export runs/qwen --out exports/qwen --dtype fp32        # exports/qwen/onnx/

Each lite-sft task is exported as the optimum task in OPTIMUM_TASKS and read back with the ORT class in
ORT_CLASSES, the one a user loads it with:
    causal-lm  text-generation-with-past        model.onnx
    seq-cls    text-classification              model.onnx (logits: batch, labels)
    token-cls  token-classification             model.onnx (logits: batch, sequence, labels)
    seq2seq    text2text-generation-with-past   encoder_model.onnx, decoder_model.onnx (first step),
               decoder_with_past_model.onnx (later steps) and decoder_model_merged.onnx (both in one graph,
               which ORTModelForSeq2SeqLM loads by default; `use_merged=False` loads the two instead)

causal-lm, `text-generation-with-past`: inputs input_ids, attention_mask, position_ids (where the
architecture takes them) and past_key_values.N.key / .value; outputs logits and present.N.key / .value;
batch and sequence axes dynamic. A model over 2 GB gets its weights as external data (model.onnx_data), as the ONNX
protobuf limit requires; optimum does that itself. The folder also holds config.json,
generation_config.json and the tokenizer with its chat template, so ORTModelForCausalLM.from_pretrained
loads it as it is.

optimum's own validation is switched off: it only logs a warning when the outputs differ. The parity
gate (parity.py) compares against the merged PyTorch model instead and fails the export when they differ.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import ExportError

log = logging.getLogger(__name__)

OPTIMUM_TASKS = {"causal-lm": "text-generation-with-past", "seq-cls": "text-classification",
                 "token-cls": "token-classification", "seq2seq": "text2text-generation-with-past"}
ORT_CLASSES = {"causal-lm": "ORTModelForCausalLM", "seq-cls": "ORTModelForSequenceClassification",
               "token-cls": "ORTModelForTokenClassification", "seq2seq": "ORTModelForSeq2SeqLM"}
ONNX_DTYPES = ("fp32", "fp16")


def supported_model_types(task: str = "causal-lm") -> list[str]:
    """Architectures optimum exports for the lite-sft `task` (as its OPTIMUM_TASKS task)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registering the configs fills TasksManager)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(OPTIMUM_TASKS[task], exporter="onnx"))


def check_supported(model_type: str, task: str = "causal-lm") -> None:
    """Fail before any work when optimum cannot export this architecture for `task`."""
    supported = supported_model_types(task)
    if model_type not in supported and model_type.replace("_", "-") not in supported:
        raise ExportError(f"ONNX export does not support the {model_type!r} architecture for {task} (optimum has no "
                          f"{OPTIMUM_TASKS[task]} config for it). Supported: {', '.join(supported)}. "
                          "Export only the merged model with --no-onnx.")


def check_dtype(dtype: str, task: str = "causal-lm") -> None:
    """fp16 is traced and tested for decoders only; the classic tasks shrink with --quantize instead."""
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(ONNX_DTYPES)}")
    if dtype != "fp32" and task != "causal-lm":
        raise ExportError(f"--dtype {dtype} exports causal-lm runs only; export this {task} run in fp32 (and shrink "
                          "it with --quantize int8 or int4)")


def export_onnx(model, out: Path, dtype: str = "fp32", task: str = "causal-lm") -> None:
    """Write `model` (a merged PyTorch model loaded from its merged/ folder) to `out` as ONNX for `task`
    (causal-lm and seq2seq with a KV cache).

    fp16 is traced in fp16 (on a GPU when there is one), which keeps the fp32 islands the modelling code
    asks for (RMSNorm's variance, rotary angles). The model is converted in place: the caller hands it over.
    """
    check_dtype(dtype, task)
    if dtype == "fp32":
        _trace(model, out, "cpu", task)
        return
    import torch

    try:
        _trace(model.half(), out, "cuda" if torch.cuda.is_available() else "cpu")
    except Exception as err:  # noqa: BLE001  (onnxruntime refusing the traced graph raises its own types)
        # Traced in fp16 on CPU, LayerNorm models (GPT-2 and kin) come out with an fp32 cast in front of
        # fp16 LayerNorm weights, which onnxruntime refuses. Export fp32 instead and let onnxruntime's
        # converter make that fp16 (the weights were already rounded to fp16, so nothing else changes).
        log.warning("fp16 tracing gave a graph onnxruntime cannot load (%s); converting the fp32 graph instead",
                    str(err).splitlines()[0][:200])
        shutil.rmtree(out, ignore_errors=True)
        _trace(model.float(), out, "cpu")
        _to_fp16(out / "model.onnx")


def _trace(model, out: Path, device: str, task: str = "causal-lm") -> None:
    import warnings

    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        # Tracing warns at every Python-side shape check in the modelling code. optimum patches the ones that
        # matter, and the parity gate runs the graph at other lengths than the traced ones, so it would notice.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        try:
            # The tokenizer and chat template come from model.config._name_or_path, the merged/ folder.
            onnx_export_from_model(model, out, task=OPTIMUM_TASKS[task], do_validation=False, device=device)
        except Exception as err:  # noqa: BLE001  (optimum and torch.onnx raise anything from deep in a trace)
            raise ExportError(f"optimum could not export this {model.config.model_type} model to ONNX for {task} "
                              f"({one_line(err)}); the merged model is fine: export it alone with --no-onnx") from err


def _to_fp16(model_file: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    data = [p for p in model_file.parent.iterdir() if is_model_file(p.name) and p != model_file]
    converted = convert_float_to_float16(onnx.load(str(model_file)), keep_io_types=False)
    for p in data:
        p.unlink()  # onnx appends to an existing external-data file rather than replacing it
    onnx.save(converted, str(model_file), save_as_external_data=bool(data), location=model_file.name + "_data")


def load_ort(folder: Path, task: str = "causal-lm", **kwargs):
    """The task's ORT model (ORT_CLASSES) on CPU: the parity gate's view of the artefact, the one a user gets.
    `kwargs` go to from_pretrained (seq2seq: use_merged=False loads the two decoders instead of the merged one)."""
    import onnxruntime
    import optimum.onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    # As many threads as torch uses (OMP_NUM_THREADS): onnxruntime would otherwise take every core and
    # spin-wait on them, which on a shared machine makes small models many times slower.
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        model = getattr(optimum.onnxruntime, ORT_CLASSES[task]).from_pretrained(
            folder, provider="CPUExecutionProvider", use_io_binding=False, session_options=options, **kwargs)
    except Exception as err:  # noqa: BLE001  (onnxruntime and optimum raise their own types)
        raise ExportError(f"onnxruntime could not load the exported {folder.name}/ ({one_line(err)})") from err
    if task == "causal-lm":
        _fix_cache_shape(model)
    return model


def _fix_cache_shape(model) -> None:
    """Size the empty first-step cache as the graph declares it.

    ORTModelForCausalLM (optimum-onnx 0.1.0) takes the key-value head count from the config only for the
    model types it lists, and the head size as hidden / heads for most: Phi-3 with fewer key-value heads
    than heads and Gemma-2 (whose head size is not hidden / heads) get a cache onnxruntime refuses. The
    graph's own input shape (batch, kv heads, past, head size) says what it needs.
    """
    past = next((i for i in model.session.get_inputs() if i.name == "past_key_values.0.key"), None)
    if past is None or not hasattr(model, "embed_size_per_head"):  # no cache, or separate key and value sizes
        return
    heads, size = past.shape[1], past.shape[3]
    if isinstance(heads, int) and isinstance(size, int):
        model.num_key_value_heads, model.embed_size_per_head = heads, size


def one_line(err: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def is_model_file(name: str) -> bool:
    """The graph or its external weights: model.onnx, model.onnx_data (optimum), model.onnx.data (onnxruntime)."""
    return name.endswith(".onnx") or ".onnx_data" in name or ".onnx.data" in name


def onnx_bytes(folder: Path) -> int:
    """Size on disk of the model itself: the graph and its external data."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if is_model_file(p.name))
