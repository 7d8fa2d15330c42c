"""Merge a run's LoRA / DoRA adapter into its base model and save a standard Hugging Face folder.

    lite-sft export runs/qwen --out exports/qwen --no-onnx        # exports/qwen/merged + parity.json

16/32-bit runs: the adapter is merged into the base weights in fp32 on CPU.

QLoRA runs: every forward pass in training used the *dequantised* NF4 weights, and the adapter learned
to correct those, not the original 16-bit ones. So the base is loaded exactly as training loaded it
(`lite_sft.model.load_base_model`, bitsandbytes quantising the same weights the same way), every 4-bit
layer is dequantised with bitsandbytes' own routine, and the adapter is merged onto that; the result is
saved in 16 bits, not re-quantised. `onto="original"` merges onto the original weights instead, which
gives a different model (tests/test_export_merge.py shows by how much) and is only an explicit option.
8-bit runs are merged the same way, onto their dequantised int8 weights.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import torch

from lite_sft.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE, METRICS_FILE, has_adapter
from lite_sft.config import load_config
from lite_sft.errors import ConfigError, ModelError
from lite_sft.model import load_base_model, load_tuned, run_base_path
from lite_sft.stops import stop_ids as decide
from lite_sft.stops import write_stop_tokens
from lite_sft.tasks.base import get_task

from . import ExportError
from lite_sft.options import MERGE_ONTO

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU = torch.device("cpu")


def read_run(run_dir: Path):
    """The run's resolved config, after checking the directory holds a finished adapter."""
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ExportError(f"{run_dir} has no {CONFIG_FILE}: pass the output_dir of a `lite-sft tune` run")
    if not has_adapter(run_dir):
        raise ExportError(f"{run_dir} holds no adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}): the run "
                          "has not finished; continue it with `lite-sft tune --output-dir RUN --resume`")
    try:
        return load_config(run_dir / CONFIG_FILE)
    except ConfigError as err:
        raise ExportError(f"{run_dir}/{CONFIG_FILE}: {err}") from err


def base_path(cfg, run_dir: Path) -> str:
    """The base model folder (or hub id) the run's config names, with the config's name in any error."""
    try:
        return run_base_path(cfg, run_dir)
    except ModelError as err:
        raise ExportError(str(err)) from err


def load_reference(run_dir: Path, cfg):
    """(adapter model, tokenizer): the base loaded as training loaded it, plus the adapter, in fp32 on CPU.

    This is the model the merge must reproduce. Computing in fp32 keeps rounding out of the comparison;
    the weights are exactly what training used (a 4-bit base is re-quantised from the same checkpoint).
    """
    try:
        model, tokenizer, _ = load_tuned(run_dir, CPU)
    except ModelError as err:
        raise ExportError(str(err)) from err
    except (RuntimeError, ValueError) as err:  # peft's size mismatch, or target modules not found
        raise _mismatch(err, cfg.model.name_or_path, run_dir) from err
    _compute_in_fp32(model)
    return model, tokenizer


def _mismatch(err: Exception, name: str, run_dir: Path) -> ExportError:
    detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
    detail = detail.rstrip(".")
    return ExportError(f"the adapter in {run_dir} does not fit the base model {name}: it is not the model the "
                       f"adapter was trained on ({detail}). Point model.name_or_path in {run_dir}/{CONFIG_FILE} at "
                       "the original base model")


def _compute_in_fp32(model) -> None:
    """Upcast floating weights (lossless) and make 4-bit layers compute in fp32 too."""
    torch.nn.Module.float(model)  # nn.Module's: transformers' own .float() refuses quantised models
    for module in model.modules():
        if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
            module.compute_dtype = torch.float32


def unquantized_base(reference, tokenizer, cfg, run_dir: Path, onto: str = "dequantized"):
    """For a quantised run: the base as plain fp32 modules holding the dequantised weights the adapter
    was trained against (or, with onto="original", the checkpoint's own weights), ready for merge()."""
    if onto not in MERGE_ONTO:
        raise ExportError(f"--merge-onto {onto!r}: choose one of {', '.join(MERGE_ONTO)}")
    if onto == "original":
        log.warning("merging a %s run's adapter onto the ORIGINAL base weights: it was trained against the "
                    "dequantised weights, so the merged model will not match the tuned one", cfg.model.quant)
    base = plain_base(cfg, run_dir, tokenizer)
    if onto == "dequantized":
        _copy_dequantized(reference, base)
    return base


def merge(model, cfg, run_dir: Path):
    """The merged model, fp32 on CPU, no adapter left. `model` is the adapter model of a 16/32-bit run
    (merged in place) or, for a quantised run, the unquantized_base() the adapter is loaded onto."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        try:
            with warnings.catch_warnings():
                # GPT-2's adapter was trained on 4-bit Linear layers; peft notices the plain Conv1D and
                # transposes the update itself, which is what we want, so its warning is noise.
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
                model = PeftModel.from_pretrained(model, str(run_dir))
        except (RuntimeError, ValueError) as err:
            raise _mismatch(err, cfg.model.name_or_path, run_dir) from err
    merged = model.merge_and_unload()
    check_finite(merged)
    merged.config.use_cache = True  # training switched the cache off; inference wants it
    merged.eval()
    return merged


def plain_base(cfg, run_dir: Path, tokenizer):
    """The base checkpoint as ordinary fp32 modules (Linear, GPT-2's Conv1D), with the run's task head and
    sized for the run's tokenizer: lite_sft.model's own loading, without the quantisation."""
    task = get_task(cfg.task.name)
    plain = dataclasses.replace(cfg.model, quant="none", dtype="float32")
    try:
        model = load_base_model(plain, base_path(cfg, run_dir), CPU, task, **task.saved_model_kwargs(run_dir))
    except ModelError as err:
        raise ExportError(str(err)) from err
    if model.config.pad_token_id is None:  # as lite_sft.model.load_tuned does
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


@torch.no_grad()
def _copy_dequantized(reference, base) -> None:
    """Overwrite `base`'s weights with the dequantised weights of every bitsandbytes layer in `reference`.

    Every quantised layer counts, adapted or not: the tuned model computed with all of them dequantised.
    """
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
    from transformers.pytorch_utils import Conv1D

    targets = dict(base.named_modules())
    copied = 0
    for name, module in reference.get_base_model().named_modules():
        weight = getattr(module, "weight", None)
        # bitsandbytes' own layers only: peft's wrappers around them expose the same weight, not the 8-bit state.
        if not type(module).__module__.startswith("bitsandbytes.") or not get_bnb_param_type(weight):
            continue
        target = targets[name.replace(".base_layer", "")]
        dequantized = dequantize_bnb_weight(weight, getattr(module, "state", None)).float()
        if isinstance(target, Conv1D):
            dequantized = dequantized.T  # GPT-2 stores (in, out); bitsandbytes quantised it as a Linear (out, in)
        if dequantized.shape != target.weight.shape:
            raise ExportError(f"{name}: dequantised weight {tuple(dequantized.shape)} does not fit the base's "
                              f"{tuple(target.weight.shape)}")
        target.weight.copy_(dequantized)
        copied += 1
    if not copied:
        raise ExportError("the run is a quantised run but its base loaded with no bitsandbytes layer to dequantise")


def check_finite(model) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ExportError(f"merged tensor {name} holds NaN or infinite values: the adapter is broken "
                              f"(check the run's {METRICS_FILE} for a diverging loss)")


def merged_dtype(option: str, quant: str, stored: torch.dtype) -> torch.dtype:
    """`auto`: the dtype the base checkpoint was stored in; for a quantised (QLoRA, 8-bit) run 16 bits
    (float16 if the base was stored in fp32), never the format the adapter was trained against."""
    if option != "auto":
        if option not in DTYPES:
            raise ExportError(f"--merged-dtype {option!r}: choose auto or one of {', '.join(DTYPES)}")
        return DTYPES[option]
    if quant != "none":
        return stored if stored in (torch.float16, torch.bfloat16) else torch.float16
    return stored


def stored_dtype(path: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype config.json says the checkpoint's weights are stored in (float32 when it says nothing)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_merged(model, tokenizer, out: Path, dtype: torch.dtype, max_shard_size: str | int = "5GB",
                stop_ids: list[int] | None = None, generation=None) -> None:
    """A folder the task's Auto class loads unchanged: safetensors (sharded past `max_shard_size`), config
    (with a classifier's id2label / label2id), tokenizer, and the generation config: for an encoder-decoder
    `generation`, the run's own settings; for a causal LM the model's, its eos_token_id the run's stop list
    (lite_sft.stops); an encoder has none."""
    causal = generation is None and model.can_generate()
    if generation is not None:
        model.generation_config = generation
    elif causal:
        gen = model.generation_config
        # Stop where the tuned model learned to stop: at EOS and at the chat template's end of turn.
        gen.eos_token_id = list(stop_ids) if stop_ids else decide(tokenizer, gen)
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
    model.to(dtype)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    if causal:
        write_stop_tokens(out, model.generation_config.eos_token_id)
