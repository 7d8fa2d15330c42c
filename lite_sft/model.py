"""Load a base model (hub id, local folder or the built-in tiny Llama), quantise it, add LoRA.

    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, device)          # 4-bit / 8-bit / 16-bit backbone
    model = add_lora(model, cfg.lora, cfg.model)        # peft PeftModel, only adapters trainable

Everything heavy goes through transformers, bitsandbytes and peft; this module only makes the
choices (dtype for the device, NF4 + double quantisation, k-bit preparation) and turns their
failures into messages that say what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .artifacts import ADAPTER_CONFIG, CONFIG_FILE, MODEL_CONFIG
from .config import BUILTIN_MODEL, LoraConfig, ModelConfig, load_config
from .errors import ModelError
from .tasks.base import get_task
from .tiny import materialize_builtin_model

# On CPU bitsandbytes (imported by peft too) tries to fetch an optional kernel from the hub and warns
# when it cannot; its built-in CPU kernel is used instead, so the warning only alarms offline users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)




def resolve_model_path(name_or_path: str) -> str:
    """The built-in name becomes its cache folder; a path must exist; anything else is a hub id."""
    if name_or_path == BUILTIN_MODEL:
        return str(materialize_builtin_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / MODEL_CONFIG).is_file():
            raise ModelError(f"model folder {path} has no config.json: pass a Hugging Face model folder or a hub id")
        return str(path)
    # Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path:
        raise ModelError(f"model path {name_or_path} does not exist: pass an existing folder or a hub id like 'Qwen/Qwen2.5-0.5B'")
    return name_or_path


def recorded_model_name(name_or_path: str) -> str:
    """What a run records as its base: a local folder as an absolute path (export, generate and eval may run
    from another directory), the built-in name and hub ids as given."""
    path = Path(name_or_path).expanduser()
    if name_or_path != BUILTIN_MODEL and path.is_dir():
        return os.path.abspath(path)  # not resolve(): a symlinked folder stays the link the user named
    return name_or_path


def run_base_path(cfg, run_dir: str | Path) -> str:
    """The base model folder (or hub id) of the run in `run_dir`, as its config.yaml records it."""
    name, config = cfg.model.name_or_path, Path(run_dir) / CONFIG_FILE
    if name != BUILTIN_MODEL and Path(name).expanduser().is_absolute() and not Path(name).expanduser().exists():
        raise ModelError(f"base folder not found: {name} (model.name_or_path in {config}); put the base model back "
                         "there, or set model.name_or_path in that file to where it is now")
    try:
        return resolve_model_path(name)
    except ModelError as err:
        raise ModelError(f"the base model in {config} (model.name_or_path: {name}) cannot be used: {err}") from err


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """Weights: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU (where `auto` computes in
    bf16 under autocast instead, when the CPU has native bf16: see train.mixed_precision)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it bf16 is emulated, slow.
    LITE_SFT_CPU_BF16=on|off overrides the detection, so a run (or the test suite) computes the same on any CPU."""
    import torch.cpu

    forced = os.environ.get("LITE_SFT_CPU_BF16", "").strip().lower()
    if forced in ("on", "off"):
        return forced == "on"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def mixed_precision(cfg: ModelConfig, device_type: str) -> str:
    """Autocast for accelerate (`no`, `bf16`, `fp16`). 16-bit weights (`--dtype bfloat16/float16`, or `auto` on a
    GPU) compute in their own dtype. fp32 weights on a CPU run their matmuls in bf16 under autocast when
    `cpu_bf16` says so: `auto` does where the CPU has native bf16 and the dtype is `auto`, 1.5x faster than
    fp32 for a 35M Llama (benchmarks/train_vs_trl.py)."""
    if cfg.dtype in ("bfloat16", "float16"):
        return {"bfloat16": "bf16", "float16": "fp16"}[cfg.dtype]
    if device_type != "cpu" or cfg.cpu_bf16 == "off":
        return "no"
    if cfg.cpu_bf16 == "on":
        return "bf16"
    return "bf16" if cfg.dtype == "auto" and cpu_has_fast_bf16() else "no"


def check_bitsandbytes(quant: str, device: torch.device) -> None:
    """Fail early, with the fix, when the chosen quantisation cannot run here."""
    if quant == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library raising anything
        raise ModelError(
            f"--quant {quant} needs bitsandbytes, which failed to import ({err}); "
            "install it with `pip install bitsandbytes` or use --quant none"
        ) from err
    if device.type not in ("cuda", "cpu", "xpu"):
        raise ModelError(f"--quant {quant}: bitsandbytes does not support the {device.type} device; use --quant none")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, TypeError, AttributeError, ValueError) as err:
        # A folder without tokenizer files fails deep inside transformers (a TypeError or AttributeError on None).
        reason = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if Path(path).is_dir():
            raise ModelError(f"{path} holds no tokenizer transformers can load{reason}: copy the base model's tokenizer "
                             "files (tokenizer.json, tokenizer_config.json, ...) into it, or pass a folder or hub id "
                             "that has them") from err
        raise ModelError(f"could not load a tokenizer from {path}{reason}") from err
    if tokenizer.pad_token is None:
        # Padding positions are masked by position, so reusing EOS as pad is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocab(model, tokenizer, path: str, added: tuple[str, ...] = ()) -> None:
    """Refuse a tokenizer with token ids past the model's input embedding: training would fail on the first such
    id with "IndexError: index out of range in self". `added` are the chat template tokens that data preparation
    gave the tokenizer, for which the embedding is then resized (train.setup): they need no row yet."""
    rows = model.get_input_embeddings().num_embeddings
    ids = [i for token, i in tokenizer.get_vocab().items() if token not in added]
    if ids and max(ids) >= rows:
        raise ModelError(f"the tokenizer in {path} has {len(tokenizer) - len(added)} tokens (ids up to {max(ids)}) but "
                         f"the model's embedding has {rows} rows: its ids past {rows - 1} have no embedding. Use the "
                         "tokenizer the model was trained with, or a model folder whose weights and tokenizer match")


def check_task_model(task, path: str, cfg: ModelConfig) -> None:
    """Refuse, before anything is loaded, a base whose architecture cannot do `task` (its config.json is read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not read the config of model {cfg.name_or_path} ({path}): {err}") from err
    task.check_model(config, cfg.name_or_path)


def load_base_model(cfg: ModelConfig, path: str, device: torch.device, task=None, **model_kwargs):
    """The frozen backbone, quantised as asked, on `device`, with `task`'s head (default: a causal LM).
    `model_kwargs` go to from_pretrained (a classifier's num_labels and id2label)."""
    import transformers
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(cfg, device)
    check_bitsandbytes(cfg.quant, device)
    auto = getattr(transformers, task.auto_class if task is not None else "AutoModelForCausalLM")
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
                  **model_kwargs)
    # A task head is new (not in the checkpoint) and trained whole: it stays in float. transformers 5 would
    # otherwise make a classifier's head a 4-bit layer whose float weight, missing from the checkpoint, is never
    # quantised, and bitsandbytes fails on it at the first forward ("quantization state not initialized").
    skip = {"llm_int8_skip_modules": list(task.head_names)} if task is not None and task.head_names else {}
    if cfg.quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            **skip,
        )
    elif cfg.quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, **skip)
    if cfg.quant != "none":
        kwargs["device_map"] = {"": device}
    try:
        model = _from_pretrained(auto, path, kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load model {cfg.name_or_path} ({path}): {err}") from err
    if cfg.quant == "none":
        model.to(device)
    elif cfg.quant == "4bit" and device.type == "cpu":
        _keep_4bit_trainable_on_cpu(model)
    model.config.use_cache = False  # training never reuses a KV cache
    return model


def _from_pretrained(auto, path: str, kwargs: dict):
    import logging as stdlib_logging

    from transformers.utils import logging as hf_logging

    # A fresh task head is expected here ("Some weights ... newly initialized"): the adapter trains it.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(stdlib_logging.ERROR)
    try:
        try:
            return auto.from_pretrained(path, **kwargs)
        except ValueError as err:
            if "attn_implementation" not in str(err) and "does not support" not in str(err):
                raise
            # Older encoders (BERT's own attention, T5) have no SDPA path; their eager one is what they run.
            kwargs = {**kwargs, "attn_implementation": "eager"}
            return auto.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)


def _keep_4bit_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first eval-mode forward (an evaluation, a generation) repacks each
    Linear4bit for a kernel that has no backward; every later training step then silently loses the
    gradient through the base weights (tests/test_model.py shows it). The generic dequantise-and-matmul
    path is differentiable and is what GPUs use anyway.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(model, lora: LoraConfig, model_cfg: ModelConfig, new_token_ids: list[int] | None = None, task=None):
    """Wrap `model` in peft LoRA adapters; only the adapters, any newly added token rows and `task`'s new head
    (trained whole and saved with the adapter) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # Not peft's prepare_model_for_kbit_training: it upcasts every non-quantised weight (embeddings,
    # output layer, norms) to fp32, which on Llama-3.1-8B adds 2 GB of frozen weights. Frozen weights
    # train fine in the compute dtype; get_peft_model freezes the base, and the adapters are fp32.
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = lora.target_modules
    heads = [name for name in (task.head_names if task is not None else ()) if hasattr(model, name)]
    target_modules = "all-linear" if targets == ["all-linear"] else list(targets)
    if target_modules == "all-linear" and task is not None and not task.lora_all_linear:
        # peft keeps the head out of "all-linear" for causal LMs and sequence classifiers only (a token
        # classifier's head would be wrapped twice and peft raises), so name the layers ourselves.
        target_modules = linear_layer_names(model, exclude=heads)
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type=task.peft_task_type if task is not None else "CAUSAL_LM",
        modules_to_save=heads or None,
        # Tokens the chat template needed but the vocabulary lacked: train just their rows.
        trainable_token_indices=_new_token_rows(model, new_token_ids),
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise ModelError(f"lora.target_modules {targets}: {err}") from err


def _new_token_rows(model, new_token_ids: list[int] | None) -> list[int] | dict[str, list[int]] | None:
    """peft's trainable_token_indices for tokens added to the vocabulary.

    A list targets the input embedding only, and peft carries it into an output layer tied to it. An
    untied output layer has rows of its own for the new tokens, initialised at random by the resize:
    they must train too, and be saved in the adapter, or every later load resizes them afresh and the
    model's predictions of its template tokens change from one load to the next.
    """
    if not new_token_ids:
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return list(new_token_ids)
    names = {module: name for name, module in model.named_modules()}
    return {names[embedding]: list(new_token_ids), names[head]: list(new_token_ids)}


def linear_layer_names(model, exclude: list[str]) -> list[str]:
    """The last name of every linear layer (plain, bitsandbytes or GPT-2's Conv1D) outside `exclude`'s modules
    and the output layer: what peft's "all-linear" means, for any head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if name.split(".")[0] in exclude or module is head or name == "":
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ModelError(f"{type(model).__name__} has no linear layers for LoRA; name them with --target-modules")
    return sorted(names)


def load_tuned(run_dir: str | Path, device: torch.device | None = None):
    """Base model (with the run's task head) + adapter from a run directory, ready for inference (unmerged)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    if not (run_dir / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{run_dir} holds no adapter (adapter_config.json): pass the output_dir of a finished `lite-sft tune` run")
    cfg = load_config(run_dir / CONFIG_FILE)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(str(run_dir), cfg.model.trust_remote_code)
    task = get_task(cfg.task.name)
    base = load_base_model(cfg.model, run_base_path(cfg, run_dir), device, task,
                           **task.saved_model_kwargs(run_dir))
    if base.config.pad_token_id is None:  # as training set it
        base.config.pad_token_id = tokenizer.pad_token_id
    if base.get_input_embeddings().num_embeddings < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, str(run_dir))
    model.eval()
    return model, tokenizer, cfg
